"""The weighting registry: names -> strategies, and binding their hyperparameters."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax

from mtkd_jax.weighting.gate import gate
from mtkd_jax.weighting.routing import calibrated, energy, max_logit
from mtkd_jax.weighting.strategies import (
    agreement,
    confidence,
    entropy,
    from_scores,
    posterior,
    static,
    uniform,
)

__all__ = ["WEIGHTINGS", "PROTOCOL_KEYWORDS", "register_weighting", "get_weighting"]

PROTOCOL_KEYWORDS = ("logits", "labels", "label_mask")
"""Keywords every strategy accepts besides its hyperparameters (they may be None)."""

WEIGHTINGS: dict[str, Callable[..., jax.Array]] = {
    fn.__name__: fn for fn in (uniform, static, from_scores, confidence, entropy, agreement,
                               posterior, energy, max_logit, calibrated, gate)
}
"""Name -> strategy `fn(probs, *, logits, labels, label_mask, **hyperparameters) -> [K, ...]`.

Add one with `register_weighting`; bind hyperparameters with `get_weighting`.
"""


def _hyperparameters(fn: Callable) -> tuple[set[str], set[str], bool]:
    """(required, optional, takes **kwargs) keyword hyperparameters of a strategy."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins, some C callables: nothing to check
        return set(), set(), True
    required, optional, var_kw = set(), set(), False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is p.KEYWORD_ONLY and p.name not in PROTOCOL_KEYWORDS:
            (required if p.default is p.empty else optional).add(p.name)
    return required, optional, var_kw


def _check_protocol(fn: Callable, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"weighting {name!r} must be callable, got {type(fn).__name__}.")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [kw for kw in PROTOCOL_KEYWORDS if kw not in params and not has_var_kw]
    positional = [
        p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if missing or not positional:
        raise TypeError(
            f"weighting {name!r} must have the signature fn(probs, *, logits=None, labels=None, "
            f"label_mask=None, **hyperparameters); it lacks "
            f"{missing or ['a positional `probs` argument']}."
        )


def register_weighting(name: str, fn: Callable, *, overwrite: bool = False) -> Callable:
    """Add a strategy to `WEIGHTINGS` under `name`, so steps can pick it by name.

    Args:
      name: the registry name.
      fn: `fn(probs [K, ..., C], *, logits=None, labels=None, label_mask=None,
        **hyperparameters) -> [K, ...] or [K]`, non-negative and summing to 1 over K.
      overwrite: replace a strategy already registered under `name`.

    Returns:
      `fn`, unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> def first_only(probs, *, logits=None, labels=None, label_mask=None):
      ...     return jnp.zeros(probs.shape[:-1]).at[0].set(1.0)
      >>> _ = weighting.register_weighting("first_only", first_only)
      >>> weighting.get_weighting("first_only")(jnp.ones((2, 1, 3)) / 3)[:, 0]
      Array([1., 0.], dtype=float32)
      >>> del weighting.WEIGHTINGS["first_only"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty str, got {name!r}.")
    if name in WEIGHTINGS and not overwrite:
        raise ValueError(
            f"a weighting named {name!r} is already registered; pass overwrite=True to replace it."
        )
    _check_protocol(fn, name)
    WEIGHTINGS[name] = fn
    return fn


def get_weighting(name_or_fn: str | Callable, **hyperparameters) -> Callable[..., jax.Array]:
    """Resolve a strategy and bind its hyperparameters.

    Args:
      name_or_fn: a name in `WEIGHTINGS`, or a function with the protocol's signature.
      **hyperparameters: the strategy's keyword-only hyperparameters (e.g. `lambdas=[K]` for
        ``"static"``, `scores=[K]` and `temperature` for ``"from_scores"``, `kind` and
        `sharpness` for ``"agreement"``, `sharpness` and `temperatures=[K]` for the
        routing strategies, `scale=[K]` and `bias=[K]` (optionally `coefficients`, `mlp`)
        for ``"gate"``). A missing required one or an unknown one is an error, so a typo
        cannot be silently ignored.

    Returns:
      `fn(probs, *, logits=None, labels=None, label_mask=None) -> [K, ...]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.weighting import get_weighting
      >>> fn = get_weighting("static", lambdas=jnp.array([1.0, 1.0, 2.0]))
      >>> fn(jnp.ones((3, 1, 4)) / 4)[:, 0]
      Array([0.25, 0.25, 0.5 ], dtype=float32)
    """
    if isinstance(name_or_fn, str):
        if name_or_fn not in WEIGHTINGS:
            raise ValueError(
                f"Unknown weighting {name_or_fn!r}; registered names: {sorted(WEIGHTINGS)}."
            )
        fn, label = WEIGHTINGS[name_or_fn], repr(name_or_fn)
    elif callable(name_or_fn):
        fn, label = name_or_fn, getattr(name_or_fn, "__name__", "the given function")
        _check_protocol(fn, label)
    else:
        raise TypeError(
            f"`name_or_fn` must be a weighting name or a function, got {type(name_or_fn)}."
        )
    required, optional, var_kw = _hyperparameters(fn)
    missing = required - hyperparameters.keys()
    unknown = set() if var_kw else hyperparameters.keys() - required - optional
    clash = hyperparameters.keys() & set(PROTOCOL_KEYWORDS)
    if missing or unknown or clash:
        raise ValueError(
            f"weighting {label} needs {sorted(required)} and accepts {sorted(optional)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown | clash)}."
        )
    return functools.partial(fn, **hyperparameters) if hyperparameters else fn
