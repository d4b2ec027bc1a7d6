"""Experiments: the entry points end to end (quick variants), their outputs, bad input,
reports.

The quick runs go through the real scripts in a subprocess (with the 8 fake CPU devices that
conftest sets in the environment, so the data-parallel steps split every batch over them).
The full default run, which shows the method paying on MNIST-1D, is marked slow.
"""

import csv
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mtkd_jax import experiment
from mtkd_jax.experiment import config as config_lib
from mtkd_jax.experiment import report, summaries
from mtkd_jax.teachers import load_teachers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The quick variant of each entry point's config, with the rows (and, for compare.py, the
# mixed teachers with a learning rate each) that the tests below check.
SEED_QUICK = ("--config.distill.strategies=alone,mean,codistill",)
COMPARE_QUICK = (
    "--config.seeds=2", "--config.teachers.models=cnn1d,mlp",
    "--config.teachers.learning_rates=0.01,0.003",
    "--config.distill.strategies=alone,best_teacher,confidence_mse",
    "--config.distill.train_only=()", "--config.transfer.size=0",
    "--config.analysis.divergence_kinds=kl", "--config.checkpoints=False",
    "--config.tensorboard=False",
)


def _command(script, out_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "experiments", script), "--quick",
            f"--config.output_dir={out_dir}", "--config.progress=False", *extra]


def _run_script(script, out_dir, *extra, timeout=300):
    return subprocess.run(_command(script, out_dir, *extra), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _quick():
    """The config `seed.py --quick` runs in the `seed_run` fixture."""
    config = config_lib.quick(config_lib.default_config())
    config.distill.strategies = ("alone", "mean", "codistill")
    return config


# ---------------------------------------------------------------------------------------------
# Entry points, quick variants


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory):
    """Run both entry points on their quick variants, side by side (each is mostly compile
    time on one core), and return `{script: (output dir, completed process)}`."""
    root = tmp_path_factory.mktemp("entry_points")
    jobs = {"seed": ("seed.py", SEED_QUICK), "compare": ("compare.py", COMPARE_QUICK)}
    procs = {}
    for name, (script, extra) in jobs.items():
        procs[name] = subprocess.Popen(
            _command(script, root / name, *extra), cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)  # a hang guard; loaded machines are slow
        out[name] = (root / name, subprocess.CompletedProcess(proc.args, proc.returncode,
                                                              stdout, stderr))
    return out


@pytest.fixture(scope="module")
def seed_run(entry_points):
    out, proc = entry_points["seed"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def compare_run(entry_points):
    out, proc = entry_points["compare"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_seed_entry_point_writes_every_output(seed_run):
    out, proc = seed_run
    for name in ("results.md", "results.csv", "results_per_seed.csv", "compression.csv",
                 "analysis.json", "histories.json", "config.json", "teacher_divergence.png",
                 "teacher_weights.png", "learning_curves.png", "accuracy.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    # The one-screen summary is printed at the end.
    assert "vs baselines" in proc.stdout and "results.md" in proc.stdout


def test_seed_results_tables_are_well_formed(seed_run):
    out, _ = seed_run
    rows = {r["row"]: r for r in _read_csv(out / "results.csv")}
    expected = {"teacher_0", "teacher_1", "teachers (mean)", "ensemble", "alone", "mean",
                "mean (no transfer)", "codistill (each)", "codistill (ensemble)"}
    assert set(rows) == expected
    for name, r in rows.items():
        assert r["n_seeds"] == "1"
        for m in ("accuracy", "recall", "f1", "precision", "ece"):
            assert 0.0 <= float(r[f"{m}_mean"]) <= 1.0, (name, m)
            assert float(r[f"{m}_std"]) == 0.0  # one seed: no spread
        assert float(r["nll_mean"]) > 0.0
        assert 0.0 <= float(r["agreement_mean"]) <= 1.0
    # The ensemble agrees with itself; a teacher's agreement is its own measurement.
    assert float(rows["ensemble"]["agreement_mean"]) == 1.0
    per_seed = _read_csv(out / "results_per_seed.csv")
    assert {r["row"] for r in per_seed} == expected and {r["seed"] for r in per_seed} == {"0"}
    assert all(float(r["n"]) == 1000 for r in per_seed)  # the MNIST-1D test split
    md = (out / "results.md").read_text()
    for name in expected:
        assert f"| {name} |" in md
    assert "## Compression" in md and "## Does distillation pay?" in md
    assert "undecided (1 seed)" in md


def test_seed_analysis_divergences_targets_weights(seed_run):
    out, _ = seed_run
    analysis = json.loads((out / "analysis.json").read_text())
    div = analysis["divergence"]["0"]
    assert set(div) == {"squared", "js"}
    for m in div.values():
        m = np.asarray(m)
        assert m.shape == (2, 2)
        np.testing.assert_allclose(np.diag(m), 0.0, atol=1e-7)
        np.testing.assert_allclose(m, m.T, rtol=1e-5, atol=1e-7)  # both kinds are symmetric
        assert (m >= 0).all()
    assert np.asarray(div["js"]).max() <= math.log(2) + 1e-6
    targets = analysis["targets"]["0"]
    assert {"mean", "leave_one_out[0]", "leave_one_out[1]"} <= set(targets)
    weights = analysis["mean_teacher_weights"]["0"]["mean"]
    np.testing.assert_allclose(weights, [0.5, 0.5], rtol=1e-6)
    histories = json.loads((out / "histories.json").read_text())["0"]
    assert {"teachers", "alone", "mean", "mean (no transfer)", "codistill"} <= set(histories)
    assert len(histories["teachers"]["eval"][-1]["accuracy_per_teacher"]) == 2


def test_seed_run_tensorboard_config_and_checkpoints(seed_run):
    out, _ = seed_run
    tb = out / "tensorboard" / "seed0"
    assert {p.name for p in tb.iterdir()} >= {"teachers", "alone", "mean", "codistill"}
    # One event folder per stacked student training; metrics per row k of it ("/k").
    scalars = summaries.read_scalars(tb / "mean")
    assert {"train/loss/0", "train/agreement/0", "eval/accuracy_per_teacher/0"} <= set(scalars)
    assert all(math.isfinite(v) for _, v in scalars["train/loss/0"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["teachers"]["num"] == 2 and saved["output_dir"] == str(out)
    params, record = load_teachers(out / "checkpoints" / "seed0" / "teachers_final")
    assert record["num_teachers"] == 2 and record["meta"]["models"] == ["cnn1d", "cnn1d"]
    ck = out / "checkpoints" / "seed0"
    assert {"teachers", "alone", "mean", "codistill"} <= {p.name for p in ck.iterdir()}
    assert (ck / "mean" / "latest").is_dir() and (ck / "mean" / "best").is_dir()


def test_rerun_with_another_config_is_refused(seed_run):
    out, _ = seed_run
    config = _quick()
    config.output_dir = str(out)
    config.distill.temperature = 3.0
    with pytest.raises(ValueError, match=r"another config \(differs in \['distill'\]\)"):
        experiment.prepare_run_dir(config)


def test_compare_entry_point_two_seeds(compare_run):
    out, _ = compare_run
    rows = {r["row"]: r for r in _read_csv(out / "results.csv")}
    assert set(rows) == {"teacher_0", "teacher_1", "teachers (mean)", "ensemble", "alone",
                         "best_teacher", "confidence_mse"}
    assert all(r["n_seeds"] == "2" for r in rows.values())
    per_seed = _read_csv(out / "results_per_seed.csv")
    for name, r in rows.items():
        values = [float(p["accuracy"]) for p in per_seed if p["row"] == name]
        assert len(values) == 2
        np.testing.assert_allclose(float(r["accuracy_mean"]), np.mean(values), rtol=1e-6)
        np.testing.assert_allclose(float(r["accuracy_std"]), np.std(values, ddof=1),
                                   rtol=1e-6, atol=1e-9)
    comp = _read_csv(out / "compression.csv")
    assert [c["model"].split(" (")[0] for c in comp] == ["student", "one teacher", "ensemble"]
    for c in comp:
        assert int(c["params"]) > 0 and float(c["flops_per_example"]) > 0
        assert float(c["latency_ms_b1"]) > 0 and float(c["latency_ms_b256"]) > 0
    # Mixed architectures: a CNN1D and an MLP teacher, trained one after the other.
    assert comp[2]["model"] == "ensemble (cnn1d + mlp)"
    assert int(comp[2]["params"]) > int(comp[1]["params"])
    histories = json.loads((out / "histories.json").read_text())["0"]
    assert {"teacher_0", "teacher_1"} <= set(histories)
    # Checkpoints and TensorBoard were switched off.
    assert not (out / "checkpoints").exists() and not (out / "tensorboard").exists()
    # Different learning rates per teacher ("different optimizers"), recorded in config.json.
    assert json.loads((out / "config.json").read_text())["teachers"]["learning_rates"] == [
        0.01, 0.003]


# ---------------------------------------------------------------------------------------------
# Bad input, refused before any training


def test_wrong_type_override_fails_the_script_before_training(tmp_path):
    out = tmp_path / "bad"
    for arg, key in (("--config.teachers.num=2.5", "config.teachers.num"),
                     ("--config.distill.temperature=hot", "config.distill.temperature")):
        proc = _run_script("seed.py", out, arg, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert key in proc.stderr
    assert not out.exists()  # nothing was written, let alone trained


def test_unknown_strategy_lists_the_valid_ones(tmp_path):
    config = _quick()
    config.output_dir = str(tmp_path / "x")
    config.distill.strategies = ("mean", "median")
    with pytest.raises(ValueError, match=r"Unknown strategy 'median'; valid strategies: "
                                         r"\[.*'confidence_mse'.*\]"):
        experiment.run(config)
    assert not (tmp_path / "x").exists()


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    config = _quick()
    config.output_dir = str(tmp_path / "x")
    config.dataset = "no_such_data"
    config.transfer.size = 0
    config.distill.train_only = ()
    with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_data'.*mnist1d"):
        experiment.run(config)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: setattr(c.student, "model", "transformer"),
         r"config.student.model` must be one of \[.*'mlp'.*\]"),
        (lambda c: setattr(c.teachers, "num", 1), r"need `config.teachers.num` >= 2"),
        (lambda c: setattr(c.teachers, "learning_rates", (1e-3,)),
         r"one rate per teacher \(2\)"),
        (lambda c: setattr(c.distill, "alpha", 1.5), r"config.distill.alpha` must be .* \[0, 1\]"),
        (lambda c: setattr(c.distill, "soft_loss", "l1"), r"must be one of \['kl', 'mse'\]"),
        (lambda c: setattr(c.distill, "train_only", ("alone",)),
         r"only distillation strategies use the transfer set"),
        (lambda c: setattr(c.analysis, "divergence_kinds", ("cosine",)),
         r"divergence_kinds` must hold names from \['squared', 'euclidean', 'kl', 'js'\]"),
        (lambda c: setattr(c, "dataset", "digits"), r"transfer.size` > 0 needs the 'mnist1d'"),
        (lambda c: setattr(c.distill, "strategies", ("mean", "mean")), r"duplicates"),
    ],
)
def test_validate_config_refuses_bad_values(change, match):
    config = _quick()
    change(config)
    with pytest.raises(ValueError, match=match):
        config_lib.validate_config(config)


def test_the_plan_derives_each_value_once_from_the_config():
    plan = config_lib.validate_config(_quick())
    assert [s.name for s in plan.strategies] == ["alone", "mean", "codistill"]
    assert plan.transfer_size == 128 and [s.name for s in plan.train_only] == ["mean"]
    assert plan.teacher_models == ("cnn1d", "cnn1d") and plan.teachers_stacked
    assert [g.rows for g in plan.groups] == [("alone",), ("mean",), ("mean (no transfer)",)]
    assert plan.codistill and plan.trainings_per_seed == 1 + 3 + 1
    config = config_lib.default_config()
    config.dataset = "digits"  # no transfer set (at its default size): no rows without it
    config.teachers.models = ("cnn1d", "mlp", "mlp")
    config.distill.strategies = ("alone", "mean")
    plan = config_lib.validate_config(config)
    assert plan.transfer_size == 0 and plan.train_only == ()
    assert not plan.teachers_stacked and plan.trainings_per_seed == 3 + 2


def test_batch_that_does_not_divide_over_devices_is_refused():
    config = _quick()
    config.student.batch_size = 60
    with pytest.raises(ValueError, match=r"student.batch_size` = 60 does not divide over the 8"):
        config_lib.validate_config(config, num_devices=8)


def test_strategy_registry():
    assert config_lib.parse_strategy("entropy_mse").soft_loss == "mse"
    assert config_lib.parse_strategy("entropy").soft_loss is None
    assert config_lib.parse_strategy("best_teacher").teachers == "best"
    for bad in ("codistill_mse", "alone_kl", "mean_l1", ""):
        with pytest.raises(ValueError, match="valid strategies"):
            config_lib.parse_strategy(bad)


# ---------------------------------------------------------------------------------------------
# Reports: reference values


def test_aggregate_matches_numpy(rng):
    seeds = [{row: {"accuracy": float(rng.uniform()), "nll": float(rng.uniform(0, 3))}
              for row in ("teacher_0", "alone", "mean")} for _ in range(4)]
    table = {r["row"]: r for r in report.aggregate(seeds)}
    for row in ("teacher_0", "alone", "mean"):
        for m in ("accuracy", "nll"):
            values = np.array([s[row][m] for s in seeds], np.float64)
            np.testing.assert_allclose(table[row][f"{m}_mean"], values.mean(), rtol=1e-12)
            np.testing.assert_allclose(table[row][f"{m}_std"], values.std(ddof=1), rtol=1e-12)
    assert table["teacher_0"]["group"] == "teachers" and table["mean"]["group"] == "students"


def test_verdicts_helps_hurts_noise():
    def seeds(alone, mean, entropy):
        return [{"alone": {"accuracy": a}, "mean": {"accuracy": m}, "entropy": {"accuracy": e}}
                for a, m, e in zip(alone, mean, entropy, strict=True)]

    v = {x["row"]: x for x in report.verdicts(
        seeds([0.60, 0.61, 0.62], [0.70, 0.71, 0.73], [0.59, 0.63, 0.61]),
        baselines=("alone",))}
    assert v["mean"]["verdict"] == "helps"
    np.testing.assert_allclose(v["mean"]["gain_mean"], np.mean([0.10, 0.10, 0.11]))
    np.testing.assert_allclose(v["mean"]["gain_std"], np.std([0.10, 0.10, 0.11], ddof=1))
    assert v["entropy"]["verdict"] == "within noise"
    v = {x["row"]: x for x in report.verdicts(
        seeds([0.70, 0.71, 0.72], [0.50, 0.52, 0.51], [0.70, 0.71, 0.72]),
        baselines=("alone",))}
    assert v["mean"]["verdict"] == "hurts"
    one = report.verdicts(seeds([0.6], [0.9], [0.6]), baselines=("alone",))
    assert {x["verdict"] for x in one} == {"undecided (1 seed)"}


def test_rows_without_transfer_set_meet_baselines_without_it():
    rows = ("alone", "best_teacher", "mean", "mean (no transfer)", "best_teacher (no transfer)")
    seeds = [{r: {"accuracy": 0.5 + 0.01 * i + 0.001 * j} for j, r in enumerate(rows)}
             for i in range(3)]
    pairs = {(v["row"], v["baseline"]) for v in report.verdicts(seeds)}
    assert pairs == {
        ("best_teacher", "alone"), ("mean", "alone"), ("mean (no transfer)", "alone"),
        ("best_teacher (no transfer)", "alone"), ("mean", "best_teacher"),
        ("mean (no transfer)", "best_teacher (no transfer)"),
    }
    # Without a no-transfer baseline, the no-transfer row only meets `alone`.
    seeds = [{r: v for r, v in s.items() if r != "best_teacher (no transfer)"} for s in seeds]
    pairs = {(v["row"], v["baseline"]) for v in report.verdicts(seeds)}
    assert ("mean (no transfer)", "best_teacher") not in pairs


def test_codistill_rows_are_compared_with_the_teachers_not_the_student():
    seeds = [{"teachers (mean)": {"accuracy": t}, "ensemble": {"accuracy": e},
              "alone": {"accuracy": 0.6}, "codistill (each)": {"accuracy": c},
              "codistill (ensemble)": {"accuracy": ce}}
             for t, e, c, ce in [(0.90, 0.93, 0.92, 0.93), (0.91, 0.94, 0.93, 0.94)]]
    pairs = {(v["row"], v["baseline"]) for v in report.verdicts(seeds)}
    assert pairs == {("codistill (each)", "teachers (mean)"),
                     ("codistill (ensemble)", "ensemble")}


def test_evaluate_logits_against_numpy(rng):
    n, c = 200, 5
    logits = rng.normal(size=(n, c)) * 2
    labels = rng.integers(0, c, n)
    ref = rng.dirichlet(np.ones(c), n)
    m = experiment.evaluate_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                   jnp.asarray(ref, jnp.float32))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    pred = logits.argmax(-1)
    np.testing.assert_allclose(m["accuracy"], np.mean(pred == labels), rtol=1e-6)
    np.testing.assert_allclose(m["nll"], -np.mean(logp[np.arange(n), labels]), rtol=1e-5)
    np.testing.assert_allclose(m["agreement"], np.mean(pred == ref.argmax(-1)), rtol=1e-6)
    recall = np.mean([np.mean(pred[labels == k] == k) for k in range(c)])
    np.testing.assert_allclose(m["recall"], recall, rtol=1e-5)
    f1 = np.mean([2 * np.sum((pred == k) & (labels == k))
                  / (np.sum(pred == k) + np.sum(labels == k)) for k in range(c)])
    np.testing.assert_allclose(m["f1"], f1, rtol=1e-5)
    assert math.isnan(experiment.evaluate_logits(jnp.asarray(logits, jnp.float32),
                                                 jnp.asarray(labels))["agreement"])


@pytest.mark.slow
def test_rerun_in_the_same_folder_resumes_to_the_same_results(seed_run, tmp_path):
    out, _ = seed_run
    first = _read_csv(out / "results_per_seed.csv")
    proc = _run_script("seed.py", out, *SEED_QUICK)  # every training restores its checkpoint
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = _read_csv(out / "results_per_seed.csv")
    assert [r["row"] for r in again] == [r["row"] for r in first]
    for a, b in zip(first, again, strict=True):
        for m in ("accuracy", "f1", "nll", "ece"):
            np.testing.assert_allclose(float(b[m]), float(a[m]), rtol=1e-5, err_msg=a["row"])


# ---------------------------------------------------------------------------------------------
# The full default run (the README's command)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 3-6 minutes on an idle 2-core CPU; far longer on a loaded one
def test_default_seed_run_pays(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the real command, on this machine's devices
    out = tmp_path / "default"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "seed.py"),
           f"--config.output_dir={out}", "--config.progress=False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["row"]: r for r in _read_csv(out / "results.csv")}
    assert all(r["n_seeds"] == "3" for r in rows.values())
    verdicts = json.loads((out / "analysis.json").read_text())["verdicts"]
    multi = [v for v in verdicts if v["baseline"] == "alone"
             and v["row"] in ("mean", "mean_mse", "scores", "confidence", "entropy",
                              "agreement")]
    assert multi and all(v["verdict"] == "helps" for v in multi), multi
    # A multi-teacher student beats the same student trained alone by more than the spread.
    best = max(multi, key=lambda v: v["gain_mean"])
    assert best["gain_mean"] > best["spread"]
