"""The sequence entry point end to end: a quick run of experiments/sequence.py (all its
outputs). The token-level example of docs/sequences.md runs in tests/test_docs.py."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_sequence_experiment_writes_every_output(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sequence.py"), "--quick",
         f"--config.output_dir={out}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    assert md in proc.stdout  # the report is printed at the end
    for row in ("alone", "best teacher", "2 teachers: entropy", "ensemble"):
        assert f"| {row} |" in md
    assert "vs best teacher" in md
    assert (out / "perplexity.png").stat().st_size > 0 and (out / "accuracy.png").exists()
    assert any((out / "tensorboard" / "seed0").iterdir())
