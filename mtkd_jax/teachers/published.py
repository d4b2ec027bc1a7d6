"""Teachers from published checkpoints: `load_published_teachers`.

K checkpoint directories (`mtkd_jax.models.load_pretrained` each) become one teacher
ensemble for the library's steps, `teacher_apply(teacher_params, x) -> logits [K, B, L, V]`:

* all K of one family and size (equal `TransformerConfig`s): their params stacked
  (`stack_params`, leaves `[K, ...]`) and run by `make_stacked_apply`;
* otherwise (different sizes or families): a tuple of K params run by
  `make_heterogeneous_apply`.

The K teachers must speak one tokenizer (equal fingerprints) and have one vocabulary size:
their logits are compared token by token over one vocabulary. Teachers with different
tokenizers need a vocabulary alignment, which this does not do (ValueError naming them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mtkd_jax.models.checkpoints import Pretrained, load_pretrained
from mtkd_jax.models.stacking import stack_params
from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.teachers.inference import make_heterogeneous_apply, make_stacked_apply

__all__ = ["PublishedTeachers", "load_published_teachers"]


class PublishedTeachers(NamedTuple):
    """K published checkpoints as one ensemble.

    Attributes:
      teacher_apply: un-jitted `(teacher_params, x) -> logits [K, B, L, V]`, frozen; `x`
        tokens `[B, L]` or the transformer's dict (``{"tokens", "mask", ...}``).
      teacher_params: stacked params (`stacked`) or a tuple of K params.
      stacked: whether the K share one architecture and are stacked.
      tokenizer: the common `tokenizers.Tokenizer`.
      tokenizer_fingerprint: its fingerprint.
      names: the K directory names.
      pretrained: the K `Pretrained` (models, configs).
    """

    teacher_apply: Callable[[Any, Any], Any]
    teacher_params: Any
    stacked: bool
    tokenizer: Any
    tokenizer_fingerprint: str
    names: tuple[str, ...]
    pretrained: tuple[Pretrained, ...]


def load_published_teachers(
    paths: Sequence[str | os.PathLike],
    *,
    dtype: Any = None,
    mesh: Any = None,
    rule: Any = None,
    strategy: str = "vmap",
) -> PublishedTeachers:
    """Load K checkpoint directories as one teacher ensemble (stacked when they can be).

    Args:
      paths: K >= 1 checkpoint directories (see `mtkd_jax.models.load_pretrained`).
      dtype: the params' dtype (default each checkpoint's own; stacking needs one dtype,
        so give it when bfloat16 and float32 checkpoints of one size are mixed).
      mesh, rule: place each teacher's weights into shards (`load_pretrained`).
      strategy: `make_stacked_apply`'s strategy for a stacked ensemble ("vmap", "loop";
        "auto" is not offered here, it needs an example batch).

    Raises:
      ValueError: no paths; teachers with different tokenizers or vocabulary sizes (naming
        each); the errors of `load_pretrained`.

    Example:
      >>> import pathlib, jax, jax.numpy as jnp
      >>> from mtkd_jax.teachers.published import load_published_teachers
      >>> root = pathlib.Path("tests/fixtures/checkpoints")  # from the repository root
      >>> t = load_published_teachers([root / "qwen3", root / "llama"])
      >>> x = jnp.ones((2, 5), jnp.int32)
      >>> t.stacked, jax.jit(t.teacher_apply)(t.teacher_params, x).shape
      (False, (2, 2, 5, 256))
    """
    if isinstance(paths, str | os.PathLike) or not paths:
        raise ValueError(f"`paths` must be a non-empty list of checkpoint directories, "
                         f"got {paths!r}.")
    loaded = tuple(load_pretrained(p, dtype=dtype, mesh=mesh, rule=rule) for p in paths)
    names = tuple(os.path.basename(os.path.normpath(p.path)) for p in loaded)
    prints = {p.tokenizer_fingerprint for p in loaded}
    if len(prints) > 1:
        found = ", ".join(f"{n}: {p.tokenizer_fingerprint[:12]}" for n, p in zip(
            names, loaded, strict=True))
        raise ValueError(
            "the teachers speak different tokenizers (fingerprints " + found + "); their "
            "logits are over different vocabularies and cannot be fused token by token."
        )
    sizes = {p.config.vocab_size for p in loaded}
    if len(sizes) > 1:
        found = ", ".join(f"{n}: {p.config.vocab_size}" for n, p in zip(names, loaded,
                                                                        strict=True))
        raise ValueError(f"the teachers' embeddings have different vocab_size ({found}).")
    fns = [token_model_fns(p.model) for p in loaded]  # (functions, nnx.State params)
    same = all(p.config == loaded[0].config for p in loaded)
    if same:
        teacher_apply = make_stacked_apply(fns[0][0].logits, strategy=strategy)
        teacher_params = stack_params([f[1] for f in fns])
    else:
        teacher_apply = make_heterogeneous_apply([f[0].logits for f in fns], names=names)
        teacher_params = tuple(f[1] for f in fns)
    return PublishedTeachers(teacher_apply, teacher_params, same, loaded[0].tokenizer,
                             loaded[0].tokenizer_fingerprint, names, loaded)
