r"""Train steps: supervised, multi-teacher distillation, codistillation, K models at once.

Every factory returns an un-jitted pure function (jit it, or wrap it with
`mtkd_jax.parallel.data_parallel_step`), with the optimizer and the apply functions in its
closure and only data in the state (`mtkd_jax.training.state.TrainState`)::

    step(state, batch, key, *, teacher_params=None) -> (state, metrics)

The data path of a distillation step, one line down the floors: batch (`mtkd_jax.training.batch`)
-> teacher logits `[K, B, C]` (`teacher_apply(teacher_params, x)`, or precomputed in
`batch["teacher_logits"]`) -> `distill_targets` (softmax at T, teacher weights, fused
target) -> `mean_distillation_loss` -> optax update -> metrics. Only the student is
differentiated; teachers are frozen.

Models: every factory takes a `mtkd_jax.models.Model` (or a Linen / NNX module, or a plain
`apply_fn(params, x)`, wrapped by `as_model`) and calls it as `model.apply(params,
state.model_state, x, train=True, key=model_key)`: only `state.params` is differentiated,
the returned model state (BatchNorm statistics) becomes the new `state.model_state`.

Randomness: the step folds `state.step` into `key` (`jax.random.fold_in(key, state.step)`),
the one place a per-step key is made, so the same `key` can be passed at every step and a
resumed run draws the same numbers. K stacked models (`stacked_step`, codistillation) get
`jax.random.fold_in(key, k)` first.

A step built with `axis_name=None` is compiled over the global batch; built with
`axis_name="data"` it is a per-device step that averages gradients and metrics over that
axis itself, for `jax.shard_map` or a user's own `jax.pmap`. Losses are means over the
examples of the global batch; the hard-label term is a mean over the labeled examples only
(`batch["label_mask"]`), however they fall across devices.
"""

from mtkd_jax.training.steps.distill import make_distill_step
from mtkd_jax.training.steps.stacked import make_codistill_step, stacked_step
from mtkd_jax.training.steps.supervised import make_supervised_step

__all__ = ["make_supervised_step", "make_distill_step", "make_codistill_step", "stacked_step"]
