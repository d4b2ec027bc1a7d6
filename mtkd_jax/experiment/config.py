"""The experiment's configuration: its defaults, its quick variant, and the one check that
turns it into a `RunPlan` (strategies: strategies.py).

A run is described by one `ml_collections.ConfigDict` (see `default_config`); the files in
`experiments/configs/` start from it and change what they need, and `quick` shrinks any of
them to a seconds-long smoke run (`mtkd run CONFIG --quick`). `validate_config` checks the
values (names, ranges, how they fit together) with messages that list the valid choices,
and returns the `RunPlan`: everything the run derives from the config (the parsed rows,
the transfer set, the teachers, the student trainings), computed once. Every config mistake
is a `ConfigError`: the `mtkd` command prints it as one line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import numbers

import ml_collections

from mtkd_jax.core.losses import SOFT_LOSSES
from mtkd_jax.experiment.sources import SOURCE_KINDS, sources_config  # multi-source

# The strategy table lives in experiment/strategies.py; re-exported here for configs.
from mtkd_jax.experiment.strategies import (
    STRATEGIES,
    Group,
    Strategy,
    parse_strategy,
    strategy_names,
    student_groups,
)
from mtkd_jax.models import MODELS

__all__ = [
    "ConfigError",
    "RunPlan",
    "Strategy",
    "STRATEGIES",
    "DIVERGENCE_KINDS",
    "default_config",
    "parse_strategy",
    "quick",
    "strategy_names",
    "validate_config",
]

DIVERGENCE_KINDS = ("squared", "euclidean", "kl", "js")


class ConfigError(ValueError):
    """A config that cannot run, found before anything trains: a config file that does not
    load, an unknown key, a value of the wrong type or out of range, an unknown dataset, a
    model that does not fit the dataset, a run folder of another run. The `mtkd` command
    prints it as one line on stderr and exits with code 2."""


def default_config() -> ml_collections.ConfigDict:
    """The default experiment: MNIST-1D, 3 CNN teachers, an MLP student, a transfer set.

    Fields (all overridable as ``--config.<path>=value``):

    * `dataset`, `data_dir` (empty: `$TFDS_DATA_DIR` or `~/tensorflow_datasets`); for image
      folders (``folder:PATH``) `image_size` (H, W), `color_mode` and `flip`.
    * `seeds`: how many times the whole pipeline is repeated (seeds `first_seed`, ...),
      for the mean +- std of every row.
    * `teachers`: `num` K, `model` and `model_kwargs` (a name of `mtkd_jax.models.MODELS`),
      `epochs`, `learning_rate` (or `learning_rates`, one per teacher: "different
      optimizers"), `weight_decay`, `batch_size`; `models`, one name per teacher for mixed
      architectures (trained one after another; names other than `model` use their
      defaults).
    * `student`: `model`, `model_kwargs`, `steps` (updates, about the same for every row:
      rounded to whole epochs of the row's data, at least one), `learning_rate`,
      `weight_decay`, `batch_size`.
    * `distill`: `strategies` (rows, see `strategy_names`), `temperature`, `alpha` (hard-label
      weight), `soft_loss`, `scores_temperature` (tau of the performance weights),
      `train_only` (strategies also run without the transfer set, to show what it adds).
    * `codistill`: `epochs`, `learning_rate`, `soft_loss`, `temperature`, `alpha`.
    * `transfer`: `size` extra unlabeled MNIST-1D inputs labeled only by the teachers (0 for
      none), generator `seed`.
    * `analysis.divergence_kinds`; `compression` (`enabled`, `repeats`).
    * `output_dir`, `checkpoints`, `tensorboard`, `plots`, `progress`, `log_every`,
      `distributed` (call `jax.distributed.initialize()` first).
    * `checkpoint_minutes`, `checkpoint_every`: a training's latest checkpoint is written
      at least every this many minutes (and updates, when > 0), at its end and on Ctrl-C.
    * `force`: go on distilling when the teachers are no better than chance.

    The batch sizes, the teachers' epochs and both learning rates default to 0, "chosen from
    the data" (`mtkd_jax.experiment.auto_settings`: from the train size, the input kind and
    the model family; on MNIST-1D the values tuned for it), and `color_mode` to "auto".

    Example:
      >>> from mtkd_jax.experiment.config import default_config
      >>> c = default_config()
      >>> c.teachers.num, c.dataset
      (3, 'mnist1d')
    """
    c = ml_collections.ConfigDict()
    c.dataset = "mnist1d"
    c.data_dir = ""
    c.image_size = ()
    c.color_mode = "auto"  # image folders: grayscale when every file is (auto_settings.py)
    c.flip = False
    c.seeds = 3
    c.first_seed = 0
    c.output_dir = "runs/seed"
    c.checkpoints = True
    c.tensorboard = True
    c.plots = True
    c.progress = True
    c.log_every = 10
    c.distributed = False
    c.force = False  # go on when the teachers are no better than chance (teacher_check.py)
    c.checkpoint_minutes = 2.0  # latest checkpoint of a training at least this often
    c.checkpoint_every = 0  # ... and every this many updates (0: by time only)

    c.teachers = ml_collections.ConfigDict()
    c.teachers.num = 3
    c.teachers.model = "cnn1d"
    c.teachers.model_kwargs = ml_collections.ConfigDict(
        {"features": (32, 32, 64), "hidden": 128}
    )
    # 0: chosen from the data (experiment/auto_settings.py; on MNIST-1D: 20, 128, 1e-2).
    c.teachers.epochs = 0
    c.teachers.batch_size = 0
    c.teachers.learning_rate = 0.0
    c.teachers.learning_rates = ()
    c.teachers.models = ()
    c.teachers.weight_decay = 1e-4

    c.student = ml_collections.ConfigDict()
    c.student.model = "mlp"
    c.student.model_kwargs = ml_collections.ConfigDict({"features": (256, 256)})
    c.student.steps = 1500
    c.student.batch_size = 0  # 0: chosen from the data (on MNIST-1D: 256, 5e-3)
    c.student.learning_rate = 0.0
    c.student.weight_decay = 1e-4

    c.distill = ml_collections.ConfigDict()
    c.distill.strategies = (
        "alone", "best_teacher", "mean", "mean_mse", "scores", "confidence", "entropy",
        "agreement", "codistill",
    )
    c.distill.temperature = 1.0
    c.distill.alpha = 0.0
    c.distill.soft_loss = "kl"
    c.distill.scores_temperature = 0.01
    c.distill.gate_hidden = 16
    c.distill.train_only = ("mean",)

    c.codistill = ml_collections.ConfigDict()
    c.codistill.epochs = 1
    c.codistill.learning_rate = 1e-3
    c.codistill.soft_loss = "mse"
    c.codistill.temperature = 1.0
    c.codistill.alpha = 0.5

    c.transfer = ml_collections.ConfigDict()
    c.transfer.size = 40000
    c.transfer.seed = 1

    c.analysis = ml_collections.ConfigDict()
    c.analysis.divergence_kinds = DIVERGENCE_KINDS

    c.compression = ml_collections.ConfigDict()
    c.compression.enabled = True
    c.compression.repeats = 20

    c.sources = sources_config()  # where each teacher's data comes from (experiment/sources.py)

    c.lock()
    return c


_QUICK_MODEL_KWARGS = {"cnn1d": {"features": (4, 4), "hidden": 8}, "mlp": {"features": (8,)}}


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` shrunk to a seconds-long smoke run (``mtkd run CONFIG --quick``), in place.

    The same pipeline and rows at the smallest sizes: one seed, at most 2 teachers (one
    learning rate and architecture each where the config lists them; as many as the class
    groups where it sets them), one teacher and codistillation epoch, 8 student updates,
    batches of 256, at most 128 transfer inputs, tiny `cnn1d`/`mlp` models, the squared and
    JS divergences, 5 latency repeats, no stop for teachers at chance (`force`), and the run
    folder ``<output_dir>_quick``. The numbers of such a run mean nothing; it shows that
    every stage and output works.

    Example:
      >>> from mtkd_jax.experiment.config import default_config, quick
      >>> c = quick(default_config())
      >>> c.seeds, c.teachers.num, c.student.steps, c.output_dir
      (1, 2, 8, 'runs/seed_quick')
    """
    c, t, s = config, config.teachers, config.student
    c.output_dir = f"{c.output_dir.rstrip('/')}_quick"
    c.seeds, c.log_every = 1, 1
    t.num = len(c.sources.groups) if c.sources.groups else min(t.num, 2)
    t.learning_rates = tuple(t.learning_rates)[:t.num]
    t.models = tuple(t.models)[:t.num]
    t.epochs, t.batch_size = 1, 256
    s.steps, s.batch_size = 8, 256
    for section in (t, s):
        if section.model in _QUICK_MODEL_KWARGS:
            with section.unlocked():
                section.model_kwargs = ml_collections.ConfigDict(
                    _QUICK_MODEL_KWARGS[section.model])
    c.codistill.epochs = 1
    c.force = True  # one epoch of tiny teachers can be at chance: a smoke run distils anyway
    c.transfer.size = min(c.transfer.size, 128)
    if c.analysis.divergence_kinds:
        c.analysis.divergence_kinds = ("squared", "js")
    c.compression.repeats = 5
    return c


def transfer_size(config: ml_collections.ConfigDict) -> int:
    """The transfer set a run uses: `config.transfer.size` for MNIST-1D (which generates
    it), none for other datasets (`RunPlan.transfer_size`).

    Example:
      >>> from mtkd_jax.experiment.config import default_config, transfer_size
      >>> c = default_config()
      >>> before = transfer_size(c)
      >>> c.dataset = "digits"
      >>> before, transfer_size(c)
      (40000, 0)
    """
    return int(config.transfer.size) if config.dataset == "mnist1d" else 0


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run derives from its config, computed once by `validate_config`; every stage
    reads it instead of deriving it again.

    Attributes:
      strategies: the `Strategy` of each entry of `config.distill.strategies`, in order.
      train_only: the rows trained again without the transfer set
        (`config.distill.train_only`; empty when the run has no transfer set).
      transfer_size: unlabeled transfer inputs the run generates (0: none; only MNIST-1D
        generates them).
      teacher_models: the K teachers' model names (`teachers.models`, or K x
        `teachers.model`).
      teachers_stacked: whether the K teachers train as one vmapped program (one
        architecture, one source) rather than one after another.
      groups: the student trainings of a seed (`student_groups`), in training order.
      codistill: whether the teachers are codistilled (a ``codistill`` row).
      num_devices: the devices each batch is split over.
    """

    strategies: tuple[Strategy, ...]
    train_only: tuple[Strategy, ...]
    transfer_size: int
    teacher_models: tuple[str, ...]
    teachers_stacked: bool
    groups: tuple[Group, ...]
    codistill: bool
    num_devices: int

    @property
    def trainings_per_seed(self) -> int:
        """The teachers (one stacked training, or K), the student groups, codistillation."""
        teachers = 1 if self.teachers_stacked else len(self.teacher_models)
        return teachers + len(self.groups) + int(self.codistill)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value, path: str, *, minimum: int = 1) -> None:
    _require(_is_int(value) and value >= minimum,
             f"`config.{path}` must be an int >= {minimum}, got {value!r}.")


def _positive_float(value, path: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    _require(ok, f"`config.{path}` must be a number {'>=' if allow_zero else '>'} 0, "
                 f"got {value!r}.")


def _unit(value, path: str) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1
    _require(ok, f"`config.{path}` must be a number in [0, 1], got {value!r}.")


def _soft_loss(value, path: str) -> None:
    _require(value in SOFT_LOSSES,
             f"`config.{path}` must be one of {sorted(SOFT_LOSSES)}, got {value!r}.")


def _model(section, path: str) -> None:
    _require(section.model in MODELS,
             f"`config.{path}.model` must be one of {sorted(MODELS)}, got {section.model!r}.")


def _strategies(names, path: str) -> tuple[Strategy, ...]:
    out = []
    for name in names:
        _require(isinstance(name, str), f"`config.{path}` must hold strategy names, got "
                                        f"{name!r} in {tuple(names)!r}.")
        try:
            out.append(parse_strategy(name))
        except ValueError as e:
            raise ConfigError(f"`config.{path}`: {e}") from None
    return tuple(out)


def _check_sources(config) -> None:
    """`config.sources` (names, ranges, groups against K); see experiment/sources.py."""
    s, k = config.sources, config.teachers.num
    _require(s.kind in SOURCE_KINDS,
             f"`config.sources.kind` must be one of {list(SOURCE_KINDS)}, got {s.kind!r}.")
    _positive_float(s.alpha, "sources.alpha")
    _positive_int(s.seed, "sources.seed", minimum=0)
    groups = tuple(s.groups)
    _require(all(isinstance(g, tuple | list) and all(_is_int(c) and c >= 0 for c in g)
                 for g in groups),
             f"`config.sources.groups` must hold one tuple of class ids per teacher, e.g. "
             f"((0, 1), (2, 3)), got {groups!r}.")
    if s.kind == "classes" and groups:
        _require(len(groups) == k, f"`config.sources.groups` must hold one class group per "
                                   f"teacher ({k}), got {len(groups)}.")
        flat = [c for g in groups for c in g]
        _require(len(set(flat)) == len(flat) and all(len(g) for g in groups),
                 f"`config.sources.groups` must be disjoint, non-empty class groups, got "
                 f"{[list(g) for g in groups]}.")
    _require(s.kind == "same" or len(set(config.teachers.models)) <= 1,
             "Teachers from different sources (`config.sources.kind` = "
             f"{s.kind!r}) share one architecture; leave `config.teachers.models` empty.")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int = 1) -> RunPlan:
    """Check a config before anything is trained; return its `RunPlan`.

    Names (strategies, models, losses, divergence kinds, sources) are checked against their
    registries and the message lists the valid ones; numbers against their ranges; and the
    fields against each other (K >= 2 where teachers are compared, a transfer set only for
    MNIST-1D, batch sizes that divide over `num_devices`). What needs the data (the dataset
    name, models against its inputs, batches against its size) is checked by
    `mtkd_jax.experiment.dataset_check.check_against_dataset` once it is loaded.

    Args:
      config: a config built from `default_config`.
      num_devices: devices the data-parallel steps split each batch over.

    Returns:
      The `RunPlan`: the parsed rows, the transfer set, the teachers and the student
      trainings of the run.

    Raises:
      ConfigError: naming the field and what it accepts.

    Example:
      >>> from mtkd_jax.experiment.config import default_config, validate_config
      >>> c = default_config()
      >>> plan = validate_config(c)
      >>> [s.kind for s in plan.strategies][:3], plan.transfer_size, plan.trainings_per_seed
      (['supervised', 'distill', 'distill'], 40000, 6)
      >>> c.distill.strategies = ("mean", "median")
      >>> validate_config(c)
      Traceback (most recent call last):
      ...
      mtkd_jax.experiment.config.ConfigError: `config.distill.strategies`: Unknown ...
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"`config` must be an ml_collections.ConfigDict, got {type(config)}.")
    _require(isinstance(config.dataset, str) and bool(config.dataset),
             f"`config.dataset` must be a dataset name, got {config.dataset!r}.")
    size = tuple(config.image_size)
    _require(len(size) in (0, 2) and all(_is_int(v) and v > 0 for v in size),
             f"`config.image_size` must be () or (H, W) positive ints, got {size!r}.")
    _require(not config.dataset.startswith("folder:") or len(size) == 2,
             f"`config.image_size` (H, W) is needed for the image folder {config.dataset!r}, "
             "e.g. --config.image_size=28,28.")
    _require(config.color_mode in ("auto", "rgb", "grayscale"),
             f"`config.color_mode` must be 'auto', 'rgb' or 'grayscale', got "
             f"{config.color_mode!r}.")
    _positive_float(config.checkpoint_minutes, "checkpoint_minutes", allow_zero=True)
    _positive_int(config.checkpoint_every, "checkpoint_every", minimum=0)
    _positive_int(config.seeds, "seeds")
    _positive_int(config.first_seed, "first_seed", minimum=0)
    _positive_int(config.log_every, "log_every")
    _require(isinstance(config.output_dir, str) and bool(config.output_dir),
             f"`config.output_dir` must be a directory path, got {config.output_dir!r}.")

    t = config.teachers
    _positive_int(t.num, "teachers.num")
    _model(t, "teachers")
    _positive_int(t.epochs, "teachers.epochs", minimum=0)  # 0: from the data
    _positive_int(t.batch_size, "teachers.batch_size", minimum=0)
    _positive_float(t.learning_rate, "teachers.learning_rate", allow_zero=True)
    _positive_float(t.weight_decay, "teachers.weight_decay", allow_zero=True)
    lrs = tuple(t.learning_rates)
    _require(len(lrs) in (0, t.num),
             f"`config.teachers.learning_rates` must be empty or hold one rate per teacher "
             f"({t.num}), got {lrs!r}.")
    for i, lr in enumerate(lrs):
        _positive_float(lr, f"teachers.learning_rates[{i}]")
    archs = tuple(t.models)
    _require(len(archs) in (0, t.num),
             f"`config.teachers.models` must be empty or name one model per teacher "
             f"({t.num}), got {archs!r}.")
    for name in archs:
        _require(name in MODELS,
                 f"`config.teachers.models` must hold names from {sorted(MODELS)}, got "
                 f"{name!r}.")

    s = config.student
    _model(s, "student")
    _positive_int(s.steps, "student.steps")
    _positive_int(s.batch_size, "student.batch_size", minimum=0)  # 0: from the data
    _positive_float(s.learning_rate, "student.learning_rate", allow_zero=True)
    _positive_float(s.weight_decay, "student.weight_decay", allow_zero=True)

    d = config.distill
    _require(len(d.strategies) > 0, "`config.distill.strategies` must name at least one row.")
    strategies = _strategies(d.strategies, "distill.strategies")
    _require(len(set(d.strategies)) == len(d.strategies),
             f"`config.distill.strategies` has duplicates: {tuple(d.strategies)}.")
    train_only = _strategies(d.train_only, "distill.train_only")
    for strategy in train_only:
        _require(strategy.kind == "distill",
                 f"`config.distill.train_only` lists {strategy.name!r}, but only distillation "
                 "strategies use the transfer set.")
    _positive_float(d.temperature, "distill.temperature")
    _unit(d.alpha, "distill.alpha")
    _soft_loss(d.soft_loss, "distill.soft_loss")
    _positive_float(d.scores_temperature, "distill.scores_temperature")
    _positive_int(d.gate_hidden, "distill.gate_hidden", minimum=0)
    _require(len(set(archs)) <= 1 or all(x.kind != "codistill" for x in strategies),
             f"Codistillation trains the K teachers as one stacked program and needs one "
             f"architecture; `config.teachers.models` mixes {sorted(set(archs))}. Drop "
             "'codistill' from `config.distill.strategies`.")
    needs_pairs = [x.name for x in strategies if x.kind == "codistill" or x.weighting
                   == "agreement"]
    _require(t.num >= 2 or not needs_pairs,
             f"Strategies {needs_pairs} compare teachers with each other and need "
             f"`config.teachers.num` >= 2, got {t.num}.")
    _require(t.num >= 2 or not config.analysis.divergence_kinds,
             "Pairwise divergences need `config.teachers.num` >= 2; set "
             "`config.analysis.divergence_kinds=()` for a single teacher.")

    co = config.codistill
    _positive_int(co.epochs, "codistill.epochs")
    _positive_float(co.learning_rate, "codistill.learning_rate")
    _soft_loss(co.soft_loss, "codistill.soft_loss")
    _positive_float(co.temperature, "codistill.temperature")
    _unit(co.alpha, "codistill.alpha")

    _positive_int(config.transfer.size, "transfer.size", minimum=0)
    _positive_int(config.transfer.seed, "transfer.seed", minimum=0)
    _require(config.transfer.size == 0 or config.dataset == "mnist1d"
             or config.transfer.size == default_config().transfer.size,
             f"`config.transfer.size` > 0 needs the 'mnist1d' dataset (it generates the "
             f"extra inputs); got dataset {config.dataset!r}. Set transfer.size=0 (at its "
             "default the transfer set is left out for other datasets).")
    _require(config.transfer.size > 0 or not d.train_only,
             "`config.distill.train_only` compares with and without a transfer set; it needs "
             "`config.transfer.size` > 0 (or set it to ()).")
    for kind in config.analysis.divergence_kinds:
        _require(kind in DIVERGENCE_KINDS,
                 f"`config.analysis.divergence_kinds` must hold names from "
                 f"{list(DIVERGENCE_KINDS)}, got {kind!r}.")
    _positive_int(config.compression.repeats, "compression.repeats")
    _check_sources(config)

    _positive_int(num_devices, "num_devices (devices)")
    for path, size in (("teachers.batch_size", t.batch_size),
                       ("student.batch_size", s.batch_size)):
        _require(size % num_devices == 0,
                 f"`config.{path}` = {size} does not divide over the {num_devices} devices; "
                 f"use a multiple of {num_devices}.")

    transfer = transfer_size(config)
    teacher_models = archs or (t.model,) * t.num
    train_only = train_only if transfer else ()
    return RunPlan(
        strategies=strategies,
        train_only=train_only,
        transfer_size=transfer,
        teacher_models=teacher_models,
        teachers_stacked=len(set(teacher_models)) == 1 and config.sources.kind == "same",
        groups=tuple(student_groups(strategies, train_only, use_transfer=transfer > 0,
                                    soft_loss=d.soft_loss)),
        codistill=any(x.kind == "codistill" for x in strategies),
        num_devices=num_devices,
    )
