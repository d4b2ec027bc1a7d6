"""Multi-source experiments: the source splits (Dirichlet shares, class groups), config checks,
the trust-by-class matrix, and a tiny end-to-end run of a multi-source config."""

import csv
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mtkd_jax.experiment import sources
from mtkd_jax.experiment.config import default_config, validate_config
from mtkd_jax.experiment.multi_source import known_classes
from mtkd_jax.experiment.trust_plot import source_shares, trust_by_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(kind, **kw):
    c = default_config()
    c.sources.kind = kind
    for k, v in kw.items():
        c.sources[k] = v
    return c


def test_dirichlet_split_is_a_partition_with_the_same_shares_on_validation():
    rng = np.random.default_rng(0)
    y, val_y = rng.integers(0, 10, size=3000), rng.integers(0, 10, size=1000)
    c = _config("dirichlet", alpha=0.3)
    train, val = sources.source_splits(c, y, 0, num_classes=10, validation_labels=val_y)
    for parts, labels in ((train, y), (val, val_y)):
        allidx = np.concatenate(parts)
        assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    share_t = (np.stack([np.bincount(y[p], minlength=10) for p in train], 1)
               / np.bincount(y)[:, None])
    share_v = (np.stack([np.bincount(val_y[p], minlength=10) for p in val], 1)
               / np.bincount(val_y)[:, None])
    np.testing.assert_allclose(share_t, share_v, atol=0.05)  # one draw of [C, K] shares
    assert np.mean(share_t.max(1)) > 0.6  # alpha = 0.3: skewed
    again = sources.source_splits(c, y, 0, num_classes=10)
    other = sources.source_splits(c, y, 1, num_classes=10)
    assert all(np.array_equal(a, b) for a, b in zip(train, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(train, other, strict=True))
    np.testing.assert_allclose(source_shares(c, y, 0, 10), share_t)


def test_class_groups_and_known_classes():
    y = np.arange(20) % 10
    c = _config("classes")
    parts = sources.source_splits(c, y, 0, num_classes=10)
    assert [sorted(set(y[p])) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    known = known_classes(c, 10)
    assert known.sum(1).tolist() == [4, 3, 3] and known.sum(0).max() == 1
    assert known_classes(_config("dirichlet"), 10).all()
    c2 = _config("classes", groups=((0, 5), (1, 2, 3), (4, 6, 7, 8, 9)))
    assert known_classes(c2, 10)[0].nonzero()[0].tolist() == [0, 5]


@pytest.mark.parametrize("kw, match", [
    ({"kind": "shards"}, r"`config.sources.kind` must be one of \['same', 'dirichlet', "),
    ({"kind": "dirichlet", "alpha": 0.0}, r"`config.sources.alpha` must be a number > 0"),
    ({"kind": "classes", "groups": ((0, 1), (2,))}, r"one class group per teacher \(3\)"),
    ({"kind": "classes", "groups": ((0, 1), (1, 2), (3,))}, r"must be disjoint"),
])
def test_bad_sources_config(kw, match):
    c = default_config()
    for k, v in kw.items():
        c.sources[k] = v
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_teachers_from_different_sources_share_one_architecture():
    c = _config("dirichlet")
    c.teachers.models = ("cnn1d", "mlp", "cnn1d")
    c.distill.strategies = ("alone", "mean")
    with pytest.raises(ValueError, match=r"share one architecture; leave `config.teachers.models"):
        validate_config(c)


def test_trust_by_class_matches_a_loop():
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(3), size=50).T
    y = rng.integers(0, 4, size=50)
    m = trust_by_class(w, y, 5)
    for c in range(4):
        np.testing.assert_allclose(m[c], w[:, y == c].mean(1))
    assert np.all(np.isnan(m[4]))  # no example of class 4


@pytest.mark.slow  # a whole run in a subprocess or many compiles: kept out of the 10-minute suite
def test_quick_multi_source_run(tmp_path):
    """The multi-source config's quick variant end to end: every output, the routing rows,
    the plot."""
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "seed.py"),
           f"--config={os.path.join(ROOT, 'experiments', 'configs', 'multi_source_classes.py')}",
           "--quick", f"--config.output_dir={out}", "--config.progress=False",
           "--config.distill.strategies=best_teacher,gate", "--config.compression.enabled=False",
           "--config.analysis.divergence_kinds=squared", "--config.tensorboard=False",
           "--config.checkpoints=False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.csv") as f:
        rows = {r["row"] for r in csv.DictReader(f)}
    assert {"teacher_0", "teacher_1", "ensemble", "best_teacher", "gate"} <= rows
    png = out / "teacher_trust.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(default_config().sources, ml_collections.ConfigDict)


def test_the_run_progress_counts_each_source_teacher_as_a_training():
    # Multi-source teachers train one by one (their data differ), not as one stacked program.
    for kind, teachers in (("same", 1), ("dirichlet", 3), ("classes", 3)):
        c = _config(kind)
        c.distill.strategies = ("alone", "mean", "gate") if kind != "same" else ("alone", "mean")
        c.distill.train_only = ()
        assert validate_config(c).trainings_per_seed == teachers + 2, kind
