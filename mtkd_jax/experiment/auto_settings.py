"""Settings that follow the data: what a run uses for the fields the user left to it.

A few fields of the config default to "chosen from the data" (`AUTO`, 0 for numbers;
``"auto"`` for `color_mode`): the batch sizes, the teachers' epochs, the student's updates and
both learning rates. `resolve` fills them in from the loaded dataset (its train size and its
input kind: 1-D signals or images) and the model family, and says why, one line per field;
every value the user set is kept as it is. On image inputs the teachers' default model, the
1-D `cnn1d`, is replaced by a small convnet (it cannot take images).

The rules, in order:

1. models: images with the default teacher (`cnn1d` with its default `model_kwargs`) ->
   `IMAGE_TEACHER` with `IMAGE_TEACHER_KWARGS`.
2. batch sizes: the family's batch size (`FAMILIES`), halved until an epoch of the train
   split has at least `MIN_UPDATES_PER_EPOCH` updates (so a small folder is not trained with
   one update per epoch).
3. schedules: teachers train for at least `MIN_TEACHER_UPDATES` updates, in whole epochs;
   the student for `STUDENT_UPDATES` updates (`student.steps`; runs round it to whole
   epochs). These are what the MNIST-1D defaults give, so the default run is unchanged.
4. learning rates: the family's (`FAMILIES`), tuned on MNIST-1D for `cnn1d` and the MLP on
   signals, on the MNIST digits for the image models.

Example:
  >>> from mtkd_jax.experiment.auto_settings import choose_batch_size
  >>> choose_batch_size(180, preferred=128)  # 180 // 16 = 11 updates per epoch
  16
  >>> choose_batch_size(3600, preferred=128)
  128
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from mtkd_jax.experiment.progress import log

__all__ = [
    "AUTO",
    "FAMILIES",
    "IMAGE_TEACHER",
    "IMAGE_TEACHER_KWARGS",
    "MIN_TEACHER_UPDATES",
    "MIN_UPDATES_PER_EPOCH",
    "STUDENT_UPDATES",
    "Choice",
    "choose_batch_size",
    "input_kind",
    "resolve",
    "settle",
]

AUTO = 0
"""The value of a numeric field that follows the data (``--config.teachers.batch_size=0``)."""

MIN_UPDATES_PER_EPOCH = 10
MIN_TEACHER_UPDATES = 560  # the MNIST-1D default: 20 epochs x 28 updates of 128 examples
STUDENT_UPDATES = 1500

IMAGE_TEACHER = "small_convnet"
IMAGE_TEACHER_KWARGS = {"widths": (16, 32), "flatten": True}  # 95.9% on the MNIST folder


@dataclasses.dataclass(frozen=True)
class Family:
    """The batch size and learning rate (AdamW, cosine decay) a model family starts from."""

    batch_size: int
    teacher_learning_rate: float
    student_learning_rate: float
    why: str


FAMILIES: dict[tuple[str, str], Family] = {
    ("cnn1d", "signal"): Family(128, 1e-2, 1e-2, "tuned on MNIST-1D"),
    ("mlp", "signal"): Family(256, 5e-3, 5e-3, "tuned on MNIST-1D"),
    ("mlp", "image"): Family(256, 2e-3, 2e-3, "tuned on the MNIST digits"),
    ("small_convnet", "image"): Family(64, 6e-3, 6e-3, "tuned on the MNIST digits"),
    ("convnet", "image"): Family(64, 2e-3, 2e-3, "tuned on the MNIST digits"),
    ("resnet", "image"): Family(64, 1e-3, 1e-3, "a common AdamW rate for ResNets"),
}
"""(model, input kind) -> `Family`; any other pair uses `_FALLBACK`."""

_FALLBACK = Family(128, 1e-3, 1e-3, "a common AdamW rate")
_CNN1D_KWARGS = {"features": (32, 32, 64), "hidden": 128}


@dataclasses.dataclass(frozen=True)
class Choice:
    """One field chosen from the data: its dotted path, the value, and why."""

    path: str
    value: object
    why: str

    def line(self) -> str:
        return f"{self.path}={self.value} ({self.why})"


def input_kind(input_shape) -> str:
    """``"image"`` for `[H, W, C]` inputs, ``"signal"`` otherwise (`[L]` or `[L, F]`)."""
    return "image" if len(tuple(input_shape)) == 3 else "signal"


def choose_batch_size(n_train: int, *, preferred: int,
                      min_updates: int = MIN_UPDATES_PER_EPOCH) -> int:
    """`preferred`, halved until `n_train // batch >= min_updates` (at least 1)."""
    batch = preferred
    while batch > 1 and n_train // batch < min_updates:
        batch //= 2
    return batch


def _family(model: str, kind: str) -> Family:
    return FAMILIES.get((model, kind), _FALLBACK)


def _kwargs(section) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in section.model_kwargs.to_dict().items()}


def resolve(config: ml_collections.ConfigDict, *, n_train: int, input_shape,
            color_mode: str | None = None) -> tuple[ml_collections.ConfigDict, list[Choice]]:
    """The config with every field left to the data filled in, and why each was chosen.

    Args:
      config: a validated config; fields at `AUTO` (and ``color_mode="auto"``) are chosen.
      n_train: examples in the train split.
      input_shape: one example's shape (`DatasetInfo.input_shape`).
      color_mode: the color mode the image folder was read in (its `"auto"` detection).

    Returns:
      `(resolved copy, [Choice])`; the input config is not changed.

    Example:
      >>> from mtkd_jax.experiment.config import default_config
      >>> from mtkd_jax.experiment.auto_settings import resolve
      >>> c, why = resolve(default_config(), n_train=180, input_shape=(32, 32, 3))
      >>> c.teachers.model, c.teachers.batch_size, c.teachers.epochs, c.student.batch_size
      ('small_convnet', 16, 51, 16)
      >>> why[1].line()
      'teachers.batch_size=16 (180 train examples: 11 updates/epoch)'
    """
    c = ml_collections.ConfigDict(config.to_dict())  # an unlocked deep copy
    kind = input_kind(input_shape)
    out: list[Choice] = []
    if color_mode is not None and c.color_mode == "auto":
        c.color_mode = color_mode
        out.append(Choice("color_mode", color_mode, "detected from the image files"))
    t, s = c.teachers, c.student
    if (kind == "image" and t.model == "cnn1d" and not tuple(t.models)
            and _kwargs(t) == _CNN1D_KWARGS):
        t.model = IMAGE_TEACHER
        t.model_kwargs = ml_collections.ConfigDict(dict(IMAGE_TEACHER_KWARGS))
        out.append(Choice("teachers.model", f"{IMAGE_TEACHER} {IMAGE_TEACHER_KWARGS}",
                          "image inputs; the default cnn1d takes 1-D signals"))

    for name, section in (("teachers", t), ("student", s)):
        fam = _family(section.model, kind)
        if section.batch_size == AUTO:
            section.batch_size = choose_batch_size(n_train, preferred=fam.batch_size)
            spe = n_train // section.batch_size
            out.append(Choice(f"{name}.batch_size", section.batch_size,
                              f"{n_train} train examples: {spe} updates/epoch"))
        if section.learning_rate == AUTO:
            lr = fam.teacher_learning_rate if name == "teachers" else fam.student_learning_rate
            section.learning_rate = lr
            out.append(Choice(f"{name}.learning_rate", lr,
                              f"{section.model} on {kind}s, {fam.why}"))
    if t.epochs == AUTO:
        spe = max(1, n_train // t.batch_size)
        t.epochs = math.ceil(MIN_TEACHER_UPDATES / spe)
        out.append(Choice("teachers.epochs", t.epochs,
                          f"at least {MIN_TEACHER_UPDATES} updates: {t.epochs * spe} of "
                          f"{t.batch_size}"))
    if s.steps == AUTO:
        s.steps = STUDENT_UPDATES
        out.append(Choice("student.steps", s.steps, "updates per student row"))
    c.lock()
    return c, out


def settle(config: ml_collections.ConfigDict, dataset) -> ml_collections.ConfigDict:
    """`resolve` for a loaded `mtkd_jax.data.Dataset`, printing each choice with why.

    The color mode of an image folder is read back from the dataset (C = 1: grayscale).
    """
    color = None
    if config.dataset.startswith("folder:"):
        color = "grayscale" if dataset.info.input_shape[-1] == 1 else "rgb"
    resolved, choices = resolve(config, n_train=len(dataset.train),
                                input_shape=dataset.info.input_shape, color_mode=color)
    if choices:
        log("settings chosen from the data (set a key to keep your own value):")
        for choice in choices:
            log(f"  {choice.line()}")
    return resolved
