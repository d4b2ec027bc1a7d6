"""One line per config field: what it means (`mtkd run --help` and `mtkd sequence --help`
print it with the default).

Example:
  >>> from mtkd_jax.experiment.config import default_config
  >>> from mtkd_jax.experiment.config_help import FIELD_HELP, missing_help
  >>> FIELD_HELP["teachers.num"], missing_help(default_config())
  ('K, the number of teachers', [])
"""

from __future__ import annotations

__all__ = ["FIELD_HELP", "SEQUENCE_HELP", "missing_help"]

FIELD_HELP: dict[str, str] = {
    "dataset": "dataset name for mtkd_jax.data.load (mnist1d, digits, mnist, ...) or "
               "folder:PATH for an image folder",
    "data_dir": "TFDS data dir (empty: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    "image_size": "image folders: resize every image to H,W (required for folder:PATH)",
    "color_mode": "image folders: auto (grayscale when every file is), rgb or grayscale",
    "flip": "image folders: whether a horizontal flip keeps the label (off: digits, text)",
    "seeds": "how many times the whole pipeline runs (mean ± std of every row)",
    "first_seed": "the first seed; the run uses first_seed, first_seed + 1, ...",
    "output_dir": "the run folder (results, plots, checkpoints); a rerun resumes it",
    "checkpoints": "keep checkpoints (a rerun or a stopped run resumes from them)",
    "tensorboard": "write TensorBoard events",
    "plots": "draw the PNG plots",
    "progress": "show progress bars",
    "log_every": "TensorBoard: log train metrics every this many updates",
    "distributed": "call jax.distributed.initialize() first (several hosts)",
    "force": "go on distilling when the teachers are no better than chance",
    "checkpoint_minutes": "write a training's latest checkpoint at least this often (minutes)",
    "checkpoint_every": "... and every this many updates (0: by time only)",
    "teachers.num": "K, the number of teachers",
    "teachers.model": "teacher architecture (choosing one resets teachers.model_kwargs)",
    "teachers.model_kwargs": "the teacher model's arguments, e.g. features, hidden",
    "teachers.epochs": "teacher training epochs (0: from the data, >= 560 updates)",
    "teachers.batch_size": "teacher batch size (0: from the data)",
    "teachers.learning_rate": "teacher learning rate, AdamW, cosine decay (0: from the data)",
    "teachers.learning_rates": "one learning rate per teacher, or () for learning_rate",
    "teachers.models": "one architecture per teacher (mixed), or () for K x model",
    "teachers.weight_decay": "teacher weight decay",
    "student.model": "student architecture (choosing one resets student.model_kwargs)",
    "student.model_kwargs": "the student model's arguments",
    "student.steps": "student updates per row (rounded to whole epochs)",
    "student.batch_size": "student batch size (0: from the data)",
    "student.learning_rate": "student learning rate, AdamW, cosine decay (0: from the data)",
    "student.weight_decay": "student weight decay",
    "distill.strategies": "the rows: alone, best_teacher, mean, scores, confidence, entropy, "
                          "agreement (each also _mse or _kl), codistill",
    "distill.temperature": "T of the softmax of teachers and student",
    "distill.alpha": "weight of the hard-label loss, in [0, 1]",
    "distill.soft_loss": "kl or mse (the article's squared error)",
    "distill.scores_temperature": "tau of the performance weights softmax(acc / tau)",
    "distill.gate_hidden": "hidden units of the 'gate' row's network over the teachers' "
                           "outputs (0: linear gate)",
    "distill.train_only": "rows also trained without the transfer set",
    "codistill.epochs": "codistillation epochs",
    "codistill.learning_rate": "codistillation learning rate",
    "codistill.soft_loss": "codistillation soft loss (kl or mse)",
    "codistill.temperature": "codistillation temperature",
    "codistill.alpha": "codistillation hard-label weight",
    "transfer.size": "extra unlabeled MNIST-1D inputs labeled by the teachers (0: none)",
    "transfer.seed": "generator seed of the transfer set",
    "sources.kind": "where each teacher's training data comes from: 'same' (all of it), "
                    "'dirichlet' (class shares drawn from Dirichlet(alpha)), 'classes' "
                    "(disjoint class groups)",
    "sources.alpha": "Dirichlet concentration of the 'dirichlet' split (small: skewed shards)",
    "sources.groups": "the class groups of the 'classes' split, one tuple per teacher "
                      "(empty: K contiguous blocks)",
    "sources.seed": "seed of the split between teachers (combined with the run's seed)",
    "analysis.divergence_kinds": "pairwise divergences to report (squared, euclidean, kl, js)",
    "compression.enabled": "measure parameters, FLOPs and latency",
    "compression.repeats": "latency: timed calls per measurement (the median is reported)",
}
"""One line per config field: what `mtkd run --help` prints next to its default."""

SEQUENCE_HELP: dict[str, str] = {
    "output_dir": "the run folder (results.md, results.json, plots, TensorBoard, cache)",
    "seeds": "how many times the whole experiment runs (seeds 0, 1, ...)",
    "batch_size": "sequences per batch (teachers and students)",
    "learning_rate": "Adam learning rate (teachers and students)",
    "teacher_epochs": "teacher training epochs",
    "student_epochs": "student training epochs (every row)",
    "temperature": "T of the softmax of teachers and student",
    "alpha": "weight of the hard-label (next-token) loss, in [0, 1]",
    "chunk_size": "positions per chunk of the chunked distillation loss",
    "cache_top_k": "teacher log-probabilities kept per token in the cache",
    "weightings": "the multi-teacher rows: weighting names (uniform, confidence, entropy, ...)",
    "data.vocab_size": "tokens of the procedural source",
    "data.branching": "next tokens each context allows",
    "data.source_seed": "seed of the source (fixed across the run's seeds)",
    "data.max_len": "longest sequence",
    "data.min_len": "shortest sequence",
    "data.num_train": "train sequences per seed",
    "data.num_val": "validation sequences per seed (picks the best teacher)",
    "data.num_test": "test sequences per seed",
    "teachers.dims": "one width per teacher (K = its length)",
    "teachers.depths": "one depth per teacher",
    "teachers.contexts": "one causal context width per teacher",
    "student.dim": "student width",
    "student.depth": "student depth",
    "student.context": "student causal context width",
}
"""One line per field of the sequence experiment's config (`mtkd sequence --help`)."""


def missing_help(config, prefix: str = "") -> list[str]:
    """The fields of `config` (dotted paths) that `FIELD_HELP` does not describe; the
    entries of `model_kwargs` are the model's own arguments and not listed."""
    out = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        if name == "model_kwargs":
            out += [] if path in FIELD_HELP else [path]
        elif hasattr(value, "items"):
            out += missing_help(value, prefix=f"{path}.")
        elif path not in FIELD_HELP:
            out.append(path)
    return out
