"""The config against the loaded dataset: `check_against_dataset`, the checks of
`validate_config` that need the data, and `model_kwargs`.

`check_against_dataset` builds every teacher and the student and traces each abstractly on
one example of the dataset (`jax.eval_shape`: nothing compiled, nothing trained), so a model
that does not take the dataset's inputs (cnn1d on images), arguments a model does not have,
or a wrong class count are one line naming the config key; batch sizes are checked against
the train split and class groups against the class count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mtkd_jax import models
from mtkd_jax.experiment.config import ConfigError

__all__ = ["check_against_dataset", "model_kwargs"]


def model_kwargs(section) -> dict:
    """A config section's `model_kwargs` as keyword arguments (lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in section.model_kwargs.to_dict().items()}


def _model_fits(path: str, name: str, kwargs: dict, info) -> None:
    """Build model `name` and trace it abstractly on one example of the dataset."""
    what = (f"`config.{path}` = {name!r} with {kwargs}" if kwargs
            else f"`config.{path}` = {name!r}")
    try:
        model = models.make_model(name, num_classes=info.num_classes, **kwargs)
        x = jax.ShapeDtypeStruct((1, *info.input_shape), jnp.float32)
        out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
    except Exception as e:  # any failure of the model on this input is the config's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{what} does not fit dataset {info.name!r} (inputs {tuple(info.input_shape)}, "
            f"{info.num_classes} classes): {type(e).__name__}: {first}"
        ) from None
    if tuple(out.shape) != (1, info.num_classes):
        raise ConfigError(f"{what} gives outputs {tuple(out.shape)} on dataset {info.name!r}; "
                          f"expected (1, {info.num_classes}).")


def check_against_dataset(config: ml_collections.ConfigDict, dataset) -> None:
    """Check the config against the loaded dataset before anything trains: every teacher
    and the student model accept its inputs and predict its classes (traced abstractly,
    `jax.eval_shape`, nothing compiled), the batch sizes fit the train split, and the class
    groups of ``sources.kind = "classes"`` name classes of the dataset.

    Args:
      config: a config that passed `validate_config`.
      dataset: the loaded `mtkd_jax.data.Dataset` of `config.dataset`.

    Raises:
      ConfigError: one line naming the config key, the model and the dataset's inputs.
    """
    info = dataset.info
    t = config.teachers
    _model_fits("teachers.model", t.model, model_kwargs(t), info)
    for i, name in enumerate(tuple(t.models)):
        if name != t.model:
            _model_fits(f"teachers.models[{i}]", name, {}, info)
    _model_fits("student.model", config.student.model,
                model_kwargs(config.student), info)
    if info.num_classes < 2:
        raise ConfigError(
            f"`config.dataset` = {config.dataset!r} has {info.num_classes} class(es); "
            "distillation needs at least 2.")
    n = len(dataset.train)
    for path, size in (("teachers.batch_size", t.batch_size),
                       ("student.batch_size", config.student.batch_size)):
        if size > n:
            raise ConfigError(f"`config.{path}` = {size} is larger than the {n} train "
                              f"examples of {config.dataset!r}; use at most {n}.")
    ids = [c for g in config.sources.groups for c in g]
    if config.sources.kind == "classes" and any(c >= info.num_classes for c in ids):
        raise ConfigError(f"`config.sources.groups` names class {max(ids)}, but dataset "
                          f"{config.dataset!r} has {info.num_classes} classes (0 to "
                          f"{info.num_classes - 1}).")
