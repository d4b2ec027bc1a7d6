"""The cross-tokenizer language-model run at test size: teachers with their own tokenizers
(vocabularies of different sizes), a student with its own."""

import math

import numpy as np
import pytest

from mtkd_jax.data.corpora import split_documents
from mtkd_jax.experiment.lm_xtok import lm_xtok_config, quick_lm_xtok, run_lm_xtok


def _domain(name, words, rng, n=60):
    docs = [(f"{name}{i}", " ".join(rng.choice(words, size=rng.integers(20, 60))) + "\n")
            for i in range(n)]
    return split_documents(name, docs, validation_fraction=0.1, test_fraction=0.1)


@pytest.mark.slow  # 53 s; the docs/lm.md block runs the same API in the default suite
def test_quick_run_with_own_tokenizers(tmp_path):
    rng = np.random.default_rng(0)
    code = _domain("code", ["def", "return", "x", "=", "(self):", "import", "numpy", "if",
                            "for", "in", "range(n):", "\n    "], rng)
    prose = _domain("prose", ["the", "teacher", "student", "learns", "from", "a", "ünïcode",
                              "word", "and", "of", "distillation.", "Über"], rng)
    cfg = quick_lm_xtok(lm_xtok_config())
    cfg.domains = (code, prose)
    cfg.teacher_vocab_sizes = (300, 340)
    out = run_lm_xtok(cfg, data_dir=str(tmp_path))
    rows = out["rows"]
    assert set(rows) == {"alone", "shared", "xtok-prefix", "xtok-uld"}
    for name, row in rows.items():
        assert math.isfinite(row["bpb"]) and row["bpb"] > 0, name
    # The shared teachers read the student's tokens: aligned everywhere; the others less.
    assert rows["shared"]["teacher_available"] == [1.0, 1.0]
    for k in range(2):
        assert 0 < rows["xtok-prefix"]["teacher_available"][k] < 1
    sizes = [t["vocab_size"] for t in out["teachers"].values()]  # at most what was asked
    assert sizes[0] != sizes[1] and sizes[0] <= 300 and sizes[1] <= 340
    assert "gain_fraction" in rows["xtok-prefix"] and "step_time_ratio" in rows["xtok-uld"]
