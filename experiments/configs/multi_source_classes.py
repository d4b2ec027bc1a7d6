"""Multi-source fusion, disjoint class groups: each teacher knows only its own classes.

Command:
    python experiments/seed.py --config experiments/configs/multi_source_classes.py

What it does: the default experiment (MNIST-1D, CNN1D teachers, an MLP student on the labeled
train split plus 40000 unlabeled transfer inputs, 3 seeds), except that teacher k is trained
only on the examples of its class group ({0-3}, {4-6}, {7-9}) and knows only those classes
(`mtkd_jax.core.class_sets`: its logits are placed in the global 10-class space, each teacher's
softmax renormalised over its own classes). The rows: each teacher, their ensemble, the
student alone, from the best single teacher, and from every strategy, including the
label-free routing ones (energy; calibrated, with temperatures fitted on each teacher's own
validation classes; gate, one hidden layer over the teachers' outputs, fitted on the labeled
train and validation splits). Plus
``teacher_trust.png``: which teacher each strategy trusts, per true class.
Outputs in runs/multi_source_classes/.

Measured 2026-12-02 on the idle 2-CPU machine: 202 s wall. Gate student 81.4 ± 0.2 % (the
ensemble 58.6 ± 6.6, the best single teacher's student 38.7 ± 0.5); on a second host 120 s
and 82.4 ± 0.6, every other row identical (the gate fit's float results differ by CPU).
All rows: docs/results/multi_source.md (3 seeds).
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/multi_source_classes"
    config.sources.kind = "classes"
    config.distill.strategies = (
        "alone", "best_teacher", "mean", "scores", "confidence", "entropy", "agreement",
        "energy", "calibrated", "gate",
    )
    config.distill.train_only = ()
    config.analysis.divergence_kinds = ("squared", "js")
    config.compression.repeats = 5
    return config
