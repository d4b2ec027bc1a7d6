"""Teachers from different sources: how the training data is split between the K teachers.

`config.sources.kind` says where each teacher's data comes from:

* ``"same"`` (the default experiment): every teacher sees the whole train split;
* ``"dirichlet"``: the examples of each class are divided between the K teachers in
  proportions drawn from Dirichlet(`alpha` * 1_K), class by class (the usual non-IID split of
  federated learning, Hsu, Qi & Brown 2019): small `alpha` gives each teacher a few
  dominant classes, large `alpha` near-equal shards. Every teacher still knows all classes;
* ``"classes"``: disjoint class groups (`config.sources.groups`, or the C classes in K
  contiguous blocks when empty): teacher k sees only the examples of its
  group and knows only those classes (`mtkd_jax.core.class_sets`).

The validation split is divided the same way (the same class proportions per teacher), so
each teacher has its own held-out data from its own source (for its temperature,
`mtkd_jax.weighting.fit_temperature`). The split is drawn from
`config.sources.seed` and the run's seed, so each seed has its own shards.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mtkd_jax.core.class_sets import known_mask

__all__ = [
    "SOURCE_KINDS",
    "sources_config",
    "validate_sources",
    "class_groups",
    "dirichlet_split",
    "class_group_split",
    "source_splits",
]

SOURCE_KINDS = ("same", "dirichlet", "classes")


def sources_config() -> ml_collections.ConfigDict:
    """The `config.sources` section: ``kind``, ``alpha``, ``groups``, ``seed``.

    Example:
      >>> from mtkd_jax.experiment.sources import sources_config
      >>> sources_config().kind
      'same'
    """
    return ml_collections.ConfigDict(
        {"kind": "same", "alpha": 0.5, "groups": (), "seed": 0}
    )


def class_groups(config, num_classes: int) -> list[list[int]]:
    """The K class groups of ``"classes"``: `config.sources.groups`, or contiguous blocks.

    Example:
      >>> from mtkd_jax.experiment.config import default_config
      >>> from mtkd_jax.experiment.sources import class_groups
      >>> class_groups(default_config(), 10)
      [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    """
    k = config.teachers.num
    if config.sources.groups:
        return [list(g) for g in config.sources.groups]
    return [b.tolist() for b in np.array_split(np.arange(num_classes), k)]


def validate_sources(config, num_classes: int | None = None) -> None:
    """Check `config.sources` (names, ranges, groups against K and C); ValueError if wrong."""
    s, k = config.sources, config.teachers.num
    if s.kind not in SOURCE_KINDS:
        raise ValueError(f"`config.sources.kind` must be one of {list(SOURCE_KINDS)}, got "
                         f"{s.kind!r}.")
    if not (isinstance(s.alpha, int | float) and s.alpha > 0):
        raise ValueError(f"`config.sources.alpha` must be a number > 0, got {s.alpha!r}.")
    if s.kind == "classes" and s.groups and len(s.groups) != k:
        raise ValueError(f"`config.sources.groups` must hold one class group per teacher "
                         f"({k}), got {len(s.groups)}.")
    if s.kind == "classes" and s.groups:
        flat = [c for g in s.groups for c in g]
        if len(set(flat)) != len(flat) or any(len(g) == 0 for g in s.groups):
            raise ValueError(f"`config.sources.groups` must be disjoint, non-empty class "
                             f"groups, got {[list(g) for g in s.groups]}.")
        if num_classes is not None:
            known_mask(class_groups(config, num_classes), num_classes=num_classes)


def dirichlet_split(labels: np.ndarray, *, num_sources: int, alpha: float,
                    rng: np.random.Generator, shares: np.ndarray | None = None
                    ) -> list[np.ndarray]:
    """Divide each class's examples between `num_sources` in Dirichlet(alpha) proportions.

    Args:
      labels: `[N]` int labels.
      num_sources: K.
      alpha: the Dirichlet concentration (> 0).
      rng: draws the proportions and which examples go where.
      shares: optional `[C, K]` proportions to use instead of drawing them (to divide a
        second split, e.g. validation, like the first).

    Returns:
      K sorted index arrays, disjoint, covering every example.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.experiment.sources import dirichlet_split
      >>> parts = dirichlet_split(np.repeat(np.arange(3), 10), num_sources=2, alpha=0.5,
      ...                         rng=np.random.default_rng(0))
      >>> sum(len(p) for p in parts), len(np.unique(np.concatenate(parts)))
      (30, 30)
    """
    parts = [[] for _ in range(num_sources)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = (rng.dirichlet(np.full(num_sources, float(alpha))) if shares is None
                 else shares[c])
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def class_group_split(labels: np.ndarray, groups) -> list[np.ndarray]:
    """The indices of the examples of each class group.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.experiment.sources import class_group_split
      >>> [p.tolist() for p in class_group_split(np.array([0, 1, 2, 1]), [[0, 2], [1]])]
      [[0, 2], [1, 3]]
    """
    return [np.flatnonzero(np.isin(labels, g)) for g in groups]


def source_splits(config, labels: np.ndarray, seed: int, *, num_classes: int,
                  validation_labels: np.ndarray | None = None):
    """Each teacher's share of the train split (and of the validation split, if given).

    Returns:
      K index arrays into `labels` (and K into `validation_labels` when given: a pair).
    """
    k, s = config.teachers.num, config.sources
    if s.kind == "same":
        train = [np.arange(len(labels)) for _ in range(k)]
        val = None if validation_labels is None else [
            np.arange(len(validation_labels)) for _ in range(k)]
    elif s.kind == "classes":
        groups = class_groups(config, num_classes)
        train = class_group_split(labels, groups)
        val = None if validation_labels is None else class_group_split(validation_labels,
                                                                        groups)
    else:
        rng = np.random.default_rng([s.seed, seed])
        shares = rng.dirichlet(np.full(k, float(s.alpha)), size=num_classes)  # [C, K]
        train = dirichlet_split(labels, num_sources=k, alpha=s.alpha, rng=rng, shares=shares)
        val = None if validation_labels is None else dirichlet_split(
            validation_labels, num_sources=k, alpha=s.alpha, rng=rng, shares=shares)
    return train if validation_labels is None else (train, val)
