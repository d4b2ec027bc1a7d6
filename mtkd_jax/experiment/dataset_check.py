"""The config against the dataset: `check_against_dataset` before anything trains,
`transfer_size` (the transfer set a dataset gets) and `model_kwargs`.

`check_against_dataset` builds every teacher and the student and traces each abstractly on
one example of the dataset (`jax.eval_shape`: nothing compiled, nothing trained), so a model
that does not take the dataset's inputs (cnn1d on images), arguments a model does not have,
or a wrong class count are one line naming the config key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mtkd_jax import models

__all__ = ["check_against_dataset", "model_kwargs", "transfer_size"]


def model_kwargs(section) -> dict:
    """A config section's `model_kwargs` as keyword arguments (lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in section.model_kwargs.to_dict().items()}


def transfer_size(config: ml_collections.ConfigDict) -> int:
    """The transfer set a run uses: `config.transfer.size` for MNIST-1D (which generates
    it), none for other datasets.

    Example:
      >>> from mtkd_jax.experiment.config import default_config
      >>> from mtkd_jax.experiment.dataset_check import transfer_size
      >>> c = default_config()
      >>> before = transfer_size(c)
      >>> c.dataset = "digits"
      >>> before, transfer_size(c)
      (40000, 0)
    """
    return int(config.transfer.size) if config.dataset == "mnist1d" else 0


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
        raise ValueError(
            f"{what} does not fit dataset {info.name!r} (inputs {tuple(info.input_shape)}, "
            f"{info.num_classes} classes): {type(e).__name__}: {first}"
        ) from None
    if tuple(out.shape) != (1, info.num_classes):
        raise ValueError(f"{what} gives outputs {tuple(out.shape)} on dataset {info.name!r}; "
                         f"expected (1, {info.num_classes}).")


def check_against_dataset(config: ml_collections.ConfigDict, info) -> None:
    """Check the config against the loaded dataset before anything trains: every teacher
    and the student model accept its inputs and predict its classes (traced abstractly,
    `jax.eval_shape`, nothing compiled), and the transfer set fits it.

    Args:
      config: a validated config.
      info: the `mtkd_jax.data.DatasetInfo` of `config.dataset`.

    Raises:
      ValueError: one line naming the config key, the model and the dataset's inputs.
    """
    t = config.teachers
    _model_fits("teachers.model", t.model, model_kwargs(t), info)
    for i, name in enumerate(tuple(t.models)):
        if name != t.model:
            _model_fits(f"teachers.models[{i}]", name, {}, info)
    _model_fits("student.model", config.student.model,
                model_kwargs(config.student), info)
    if info.num_classes < 2:
        raise ValueError(
            f"`config.dataset` = {config.dataset!r} has {info.num_classes} class(es); "
            "distillation needs at least 2.")
