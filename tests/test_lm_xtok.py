"""`mtkd lm` with teachers that have their own tokenizers, end to end at its quick size
(experiments/configs/lm_xtok.py --quick), through the command line: report, resume."""

import json
import math
import os

import pytest

from mtkd_jax import cli

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "configs", "lm_xtok.py")


@pytest.mark.slow  # 30-50 s; the shared-tokenizer `mtkd lm` quick run stays in the default suite
def test_quick_run_reports_every_row_and_resumes_identically(tmp_path, capsys):
    out = tmp_path / "run"
    # Two domains and one loss chunk keep it short: compiling the steps is most of the time
    # (each own tokenizer compiles its teacher's steps).
    args = ["lm", _CONFIG, "--quick", f"--config.output_dir={out}",
            "--config.data.domains=python_code,shakespeare",
            "--config.own_tokenizers.teacher_vocab_sizes=300,420", "--config.chunk_size=32"]
    assert cli.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    rows = [r["row"] for r in result["table"]]
    assert rows == ["alone", "shared tokenizer", "own tokenizers: prefix",
                    "own tokenizers: uld"]
    for rec in result["table"]:
        assert math.isfinite(rec["bpb_mean"]) and rec["bpb_mean"] > 0, rec["row"]
    # Each own-tokenizer teacher speaks at some but not all of the student's tokens.
    assert len(result["availability"]) == 2
    assert all(0 < a < 1 for a in result["availability"]), result["availability"]
    # Every distilled row's gain kept is relative to the shared row (1 for itself).
    assert set(result["gain_kept"]) == set(rows) - {"alone"}
    shared = result["gain_kept"]["shared tokenizer"][0]
    assert shared == 1.0 or math.isnan(shared)
    assert set(result["step_seconds"]) == set(rows)
    vocab = {name: t["vocab_size"] for name, t in result["teachers"].items()}
    assert len(vocab) == 4 and len({v for n, v in vocab.items() if "own" in n}) == 2
    md = (out / "results.md").read_text()
    assert "gain kept" in md and "step time / shared" in md and "own tokenizers: uld" in md
    # A rerun reads every row and teacher from the run folder: the same numbers, no training.
    capsys.readouterr()
    assert cli.main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["seeds"] == result["seeds"] and again["teachers"] == result["teachers"]
    assert again["step_seconds"] == result["step_seconds"]
    assert "restored its checkpoint" in capsys.readouterr().out


def test_a_run_folder_holds_one_setting(tmp_path, capsys):
    (tmp_path / "setting.json").write_text(json.dumps({"tokenizers": "shared"}))
    assert cli.main(["lm", _CONFIG, "--quick", f"--config.output_dir={tmp_path}"]) == 2
    assert "tokenizers='shared'" in capsys.readouterr().err
    assert cli.main(["lm", "--quick", f"--config.output_dir={tmp_path}",
                     "--config.tokenizers=own", "--config.own_tokenizers.methods=best"]) == 2
    assert "own_tokenizers.methods" in capsys.readouterr().err
