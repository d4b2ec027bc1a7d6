"""The sequence entry points end to end: the README's token-level example and a tiny run of
experiments/sequence.py (all its outputs)."""

import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_sequence_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Sequence distillation (token level)"):]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace = {}
    exec(block, namespace)
    metrics = namespace["metrics"]
    assert metrics["teacher_weights"].shape == (2,)
    assert bool(jnp.isfinite(metrics["loss"]))
    assert int(namespace["state"].step) == 4


def test_tiny_sequence_experiment_writes_every_output(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sequence.py"), "--config",
         str(ROOT / "experiments" / "configs" / "sequence_tiny.py"),
         f"--config.output_dir={out}"],
        check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600,
    )
    md = (out / "results.md").read_text()
    for row in ("alone", "best teacher", "2 teachers: entropy", "ensemble"):
        assert f"| {row} |" in md
    assert "vs best teacher" in md
    assert (out / "perplexity.png").stat().st_size > 0 and (out / "accuracy.png").exists()
    assert any((out / "tensorboard" / "seed0").iterdir())
