"""The sequence entry point end to end: a tiny run of experiments/sequence.py (all its outputs).

The token-level example of docs/sequences.md runs in tests/test_docs.py."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
