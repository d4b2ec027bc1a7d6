"""Multi-source fusion, disjoint class groups: each teacher knows only its own classes.

Command:
    python experiments/seed.py --config experiments/configs/multi_source_classes.py

What it does: the default experiment (MNIST-1D, CNN1D teachers, an MLP student on the labeled
train split plus 40000 unlabeled transfer inputs, 3 seeds), except that teacher k is trained
only on the examples of its class group ({0-3}, {4-6}, {7-9}) and knows only those classes
(`mtkd_jax.class_sets`: its logits are placed in the global 10-class space, each teacher's
softmax renormalised over its own classes). The rows: each teacher, their ensemble, the
student alone, from the best single teacher, and from every strategy, including the
label-free routing ones (energy; calibrated, with temperatures fitted on each teacher's own
validation classes; gate, fitted on the labeled train and validation splits). Plus
``teacher_trust.png``: which teacher each strategy trusts, per true class.
Outputs in runs/multi_source_classes/.

Expected: see docs/results/multi_source.md (measured numbers, 3 seeds).
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
    config.student.steps = 1000  # ~6 epochs of the 43600 inputs: the run fits in ~15 min
    config.distill.train_only = ()
    config.analysis.divergence_kinds = ("squared", "js")
    config.compression.repeats = 5
    return config
