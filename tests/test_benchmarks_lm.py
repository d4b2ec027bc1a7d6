"""`benchmarks/lm.py --quick` (issue 26): runs end to end and writes the goals' keys, with the
library, bare JAX and (when torch is installed) PyTorch steps agreeing on the first loss."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lm_benchmark_quick(tmp_path):
    out = tmp_path / "lm.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lm.py"), "--quick",
                    "--json", str(out)], check=True, env=env, capture_output=True, text=True,
                   timeout=600)
    r = json.loads(out.read_text())
    for key in ("lib_vs_bare", "lib_vs_torch", "memory_ratio_128k", "cached_vs_online"):
        assert key in r, key
    units = r["speed"]["units"]
    torch = importlib.util.find_spec("torch") is not None
    assert ("torch_eager" in units) == torch
    for name, u in units.items():
        assert u["tok_s"] > 0 and u["first_loss"] > 0, name
    # The same loss on the same weights, to 1e-4 (the online library step, bare JAX, PyTorch).
    assert r["speed"]["checks"], r["speed"]
    for name, gap in r["speed"]["checks"].items():
        assert gap < 1e-4, (name, gap)
    assert r["lib_vs_bare"]["ratio"] > 0 and r["cached_vs_online"]["ratio"] > 0
    m = r["memory_ratio_128k"]
    for name in ("precomputed_logits", "online_teacher_head", "top_k_cache", "top_k_slots"):
        assert 0 < m[name]["ratio"] < 1, (name, m[name])
