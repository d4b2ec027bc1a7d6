"""The language-model experiment (`mtkd lm`) end to end at its quick size."""

import json
import math
import os

import jax
import numpy as np
import pytest

from mtkd_jax import cli
from mtkd_jax.experiment.lm import lm_config, quick_lm, run_lm


def _config(out):
    cfg = quick_lm(lm_config())
    cfg.output_dir = str(out)
    return cfg


def test_quick_run_reports_every_row_and_resumes_identically(tmp_path):
    cfg = _config(tmp_path / "run")
    result = run_lm(cfg)
    rows = {r["row"] for r in result["table"]}
    domains = cfg.data.domains
    assert {f"teacher {d}" for d in domains} | {"ensemble", "oracle-routed ensemble",
                                                 "alone", "best teacher"} <= rows
    assert {"3 teachers: uniform", "3 teachers: posterior",
            "3 teachers: posterior (online)"} <= rows
    for rec in result["table"]:
        for d in domains:
            assert math.isfinite(rec[f"{d}/perplexity_mean"]), rec["row"]
        # bits per byte and perplexity describe the same NLL
        assert rec["bpb_mean"] > 0 and rec["perplexity_mean"] > 1
    # The oracle-routed ensemble is each domain's own teacher on that domain.
    t = result["teachers"]
    for d in domains:
        assert t["oracle-routed ensemble"][f"{d}/perplexity"] == t[f"teacher {d}"][
            f"{d}/perplexity"]
    # Weights per domain sum to one over the teachers.
    for per in result["weights"].values():
        np.testing.assert_allclose(np.sum(per, axis=1), 1.0, rtol=1e-5)
    for name in ("results.md", "results.json", "domains.png", "learning_curves.png",
                 "weights.png"):
        assert os.path.exists(tmp_path / "run" / name), name
    # A rerun after losing one row's result restores that training from its checkpoint
    # (nothing is trained again) and gives the same numbers.
    row_file = tmp_path / "run" / "rows" / "seed_0_3_teachers_posterior.json"
    assert row_file.exists()
    before = json.loads(row_file.read_text())
    row_file.unlink()
    again = run_lm(cfg)
    assert json.loads(row_file.read_text())["metrics"] == before["metrics"]
    assert [r["row"] for r in again["table"]] == [r["row"] for r in result["table"]]


def test_config_mistakes_are_one_line_exit_2(tmp_path, capsys):
    out = f"--config.output_dir={tmp_path}"
    for arg, words in (("--config.weightings=uniform,best", "'best'"),
                       ("--config.teachers.size=huge", "config.teachers.size"),
                       ("--config.data.domains=python_code", "at least 2 domains")):
        assert cli.main(["lm", "--quick", out, arg]) == 2, arg
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_a_rerun_with_another_setting_does_not_reuse_the_folder(tmp_path):
    """Finished rows and checkpoints are found by name: a rerun that changes a number they
    depend on (the cache's k, a model size) is refused naming the key, one that only adds
    seeds or rows is not; a folder from before the whole setting was kept still resumes."""
    from mtkd_jax.experiment.config import ConfigError
    from mtkd_jax.experiment.lm_run import LMRun

    cfg = _config(tmp_path / "run")
    LMRun(cfg)
    for key, value in (("cache_top_k", 16), ("teachers.steps", 7)):
        other = _config(tmp_path / "run")
        node, leaf = (other.teachers, "steps") if "." in key else (other, key)
        setattr(node, leaf, value)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            LMRun(other)
    more = _config(tmp_path / "run")
    more.seeds, more.weightings = 3, ("uniform", "posterior", "entropy")
    LMRun(more)
    marker = tmp_path / "run" / "setting.json"
    marker.write_text(json.dumps({"tokenizers": "shared"}))  # the earlier marker
    LMRun(cfg)
    assert json.loads(marker.read_text())["cache_top_k"] == cfg.cache_top_k
    # A folder from before `cache_tail_samples` and `best_teacher_alpha` were keys resumes
    # under the values it ran with (no sampled tail; one alpha for every distilled row), and
    # its `online_weighting` (now `online_weightings`, which only adds rows) is no setting.
    setting = json.loads(marker.read_text())
    old_style = {k: v for k, v in setting.items()
                 if k not in ("cache_tail_samples", "best_teacher_alpha")}
    old_style["online_weighting"] = "posterior"  # one online row then; rows only now
    same = _config(tmp_path / "run")
    same.cache_tail_samples, same.best_teacher_alpha = 0, same.alpha
    for kept, ok in ((same, True), (cfg, (cfg.cache_tail_samples, cfg.best_teacher_alpha)
                                     == (0, cfg.alpha))):
        marker.write_text(json.dumps(old_style))
        if ok:
            LMRun(kept)
        else:
            with pytest.raises(ConfigError, match="cache_tail_samples|best_teacher_alpha"):
                LMRun(kept)


@pytest.mark.parametrize("weightings, online", [((), ()), (("uniform",), ("posterior",))])
def test_the_teacher_pass_with_any_weightings(weightings, online, rng):
    """The teachers' pass over the test batches (average weights per domain, the ensemble's
    prediction per token) with no weighting configured (it failed to stack none) and with
    cached and online ones (each named once, the weights of a domain summing to 1)."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from mtkd_jax.experiment.lm import _teacher_pass

    cfg = lm_config()
    cfg.weightings, cfg.online_weightings = weightings, online
    z = jnp.asarray(rng.normal(size=(3, 2, 5, 11)), jnp.float32)  # [K, B, L, V]
    batch = {"x": np.zeros((2, 5), np.int32), "y": rng.integers(0, 11, (2, 5)).astype(np.int32),
             "mask": np.ones((2, 5), np.float32)}
    weights = _teacher_pass(SimpleNamespace(cfg=cfg), SimpleNamespace(domains=("a",)),
                            lambda tp, x: z, None, {"a": [batch]})
    assert list(weights) == list(dict.fromkeys([*weightings, *online]))
    for per in weights.values():
        np.testing.assert_allclose(np.sum(per, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(batch["ensemble_pred"],
                                  np.argmax(np.asarray(jax.nn.softmax(z)).mean(0), -1))
