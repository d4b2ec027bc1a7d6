"""After the teachers train: stop a run whose teachers are no better than chance.

Distilling from teachers at chance teaches the student noise, and the table that follows
says nothing. `check_teachers` compares each teacher's validation accuracy with chance (the
frequency of the most common validation class) plus two binomial standard errors of it on
the validation set's size; a teacher not above that stops the run with one line saying what
to try, unless `config.force` is set. Teachers that see only some classes
(`config.sources.kind` other than "same") are not checked: they are meant to be partial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["TeachersAtChance", "chance_threshold", "check_teachers"]


class TeachersAtChance(ValueError):
    """The teachers learned nothing the validation set can tell from chance."""


def chance_threshold(val_y: np.ndarray) -> tuple[float, float]:
    """(chance, threshold): the most frequent class's share of `val_y` `[N]`, and chance
    plus two binomial standard errors at N examples (an accuracy above it is not luck).

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.experiment.teacher_check import chance_threshold
      >>> [round(v, 3) for v in chance_threshold(np.repeat([0, 1, 2], 20))]
      [0.333, 0.455]
    """
    val_y = np.asarray(val_y)
    if val_y.ndim != 1 or len(val_y) == 0:
        raise ValueError(f"`val_y` must be [N] labels with N >= 1, got shape {val_y.shape}.")
    chance = float(np.max(np.bincount(val_y)) / len(val_y))
    return chance, chance + 2 * math.sqrt(chance * (1 - chance) / len(val_y))


def check_teachers(config, val_accuracy: Sequence[float], val_y: np.ndarray, *,
                   seed: int) -> None:
    """Raise `TeachersAtChance` when a teacher is no better than chance (see the module).

    Args:
      config: the run's resolved config (`force`, `sources.kind`, the teachers' settings
        for the advice).
      val_accuracy: `[K]` validation accuracies of the teachers.
      val_y: `[N]` validation labels.
      seed: the seed, for the message.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.experiment.config import default_config
      >>> from mtkd_jax.experiment.teacher_check import check_teachers
      >>> y = np.repeat([0, 1, 2], 20)
      >>> check_teachers(default_config(), [0.9, 0.35], y, seed=0)
      Traceback (most recent call last):
      ...
      mtkd_jax.experiment.teacher_check.TeachersAtChance: seed 0: teacher_1 is no better ...
    """
    if config.force or config.sources.kind != "same":
        return
    chance, threshold = chance_threshold(val_y)
    acc = [float(a) for a in val_accuracy]
    low = [k for k, a in enumerate(acc) if a <= threshold]
    if not low:
        return
    t = config.teachers
    names = ", ".join(f"teacher_{k}" for k in low)
    verb = "is" if len(low) == 1 else "are"
    raise TeachersAtChance(
        f"seed {seed}: {names} {verb} no better than chance on the validation set "
        f"(accuracies {', '.join(f'{100 * a:.1f}%' for a in acc)}; chance "
        f"{100 * chance:.1f}%, the most frequent class; above {100 * threshold:.1f}% on "
        f"{len(val_y)} examples would not be luck), so distilling from them would teach "
        f"noise. Try more updates (--config.teachers.epochs, now {t.epochs}), a smaller "
        f"learning rate (--config.teachers.learning_rate, now {t.learning_rate:g}), "
        f"another model (--config.teachers.model, now {t.model}) or more data; "
        "--config.force=True distils anyway."
    )
