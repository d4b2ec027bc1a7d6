"""The `mtkd` command (`python -m mtkd_jax`): the launcher's experiments, help, one-line
config mistakes (in config files and overrides), the quick variant, Ctrl-C and resume, an
image-folder experiment end to end.

The runs use a micro config (the quick one without transfer set, codistillation, plots,
compression) so each is mostly compile time.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mtkd_jax import cli
from mtkd_jax.experiment.config import ConfigError, default_config, quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(ROOT, "experiments", "configs", "seed.py")
QUICK = [SEED, "--quick"]
MICRO = ["--config.transfer.size=0", "--config.distill.train_only=()",
         "--config.distill.strategies=alone,mean", "--config.compression.enabled=False",
         "--config.plots=False", "--config.tensorboard=False",
         "--config.analysis.divergence_kinds=squared", "--config.progress=False"]


def _mtkd(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mtkd_jax", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mtkd: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _key_line(stdout, key):
    return next(ln for ln in stdout.splitlines() if ln.strip().startswith(key + " "))


def test_help_lists_config_keys_with_defaults(capsys):
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out
    for key, default in (("teachers.num", "3"), ("student.steps", "1500"),
                         ("distill.temperature", "1.0"), ("image_size", "()")):
        line = _key_line(out, key)
        assert line.split()[1] == default, line
        assert len(line.split()) > 2, f"no meaning given for {key}: {line}"
    assert cli.main(["sequence", "--help"]) == 0
    out = capsys.readouterr().out
    assert _key_line(out, "teachers.dims").split()[1] == "64,48,32"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.EXPERIMENTS)


def test_every_experiment_of_the_launcher_resolves():
    # Each registry entry names a default config, a quick variant and a run function.
    for e in cli.EXPERIMENTS.values():
        config = cli._resolve(e.config)()
        small = cli._resolve(e.quick)(cli._resolve(e.config)())
        assert small.output_dir == config.output_dir + "_quick" and small.seeds == 1, e.name
        assert callable(cli._resolve(e.run)), e.name
        meaning = cli._resolve(e.field_help)
        assert set(cli.config_keys(config)) - {k for k in cli.config_keys(config)
                                                 if "model_kwargs" in k} <= set(meaning), e.name


def test_quick_is_the_config_at_its_smallest_with_overrides_after_it(tmp_path, capsys):
    c = quick(default_config())
    assert (c.seeds, c.teachers.num, c.teachers.epochs, c.student.steps) == (1, 2, 1, 8)
    assert c.transfer.size == 128 and c.teachers.model_kwargs.features == (4, 4)
    # A config that lists one learning rate per teacher keeps one per quick teacher.
    full = default_config()
    full.teachers.learning_rates = (1e-2, 3e-3, 1e-3)
    assert quick(full).teachers.learning_rates == (1e-2, 3e-3)
    # The command: --quick first, then the overrides (here one that is refused, to stop
    # before anything trains).
    code = cli.main(["run", *QUICK, f"--config.output_dir={tmp_path / 'o'}",
                     "--config.seeds=0"])
    assert code == 2 and "config.seeds" in capsys.readouterr().err


@pytest.mark.parametrize("args, names", [
    (["--config.teachrs.num=2"], ["'teachrs.num'", "did you mean 'teachers.num'"]),
    (["--config.teachers.num=three"], ["config.teachers.num", "int"]),
    (["--config.distill.strategies=mean,median"], ["'median'"]),
    (["--config.student.learning_rate=-1"], ["config.student.learning_rate"]),
    (["--config.distill.gate_hidden=-1"], ["config.distill.gate_hidden"]),
    # A value of the wrong type for a tuple key (names expected).
    (["--config.distill.strategies=1,2"], ["config.distill.strategies", "'1'"]),
    (["--config.distill.train_only=(1,)"], ["config.distill.train_only"]),
    (["--config.sources.groups=0,1"], ["config.sources.groups"]),
    (["--config.nosuch.model_kwargs.x=1"], ["'nosuch.model_kwargs.x'"]),
])
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, capsys, args, names):
    code = cli.main(["run", *QUICK, f"--config.output_dir={tmp_path / 'o'}", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mtkd: error:")]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


_CONFIG_FILES = {
    "typo.py": ("config.teachers.nmu = 3", ["line 6", "'nmu'", "did you mean 'teachers.num'"]),
    "syntax.py": ("config = default_config(", ["line 6", "syntax error"]),
    "wrong_type.py": ('config.teachers.num = "three"', ["line 6", "teachers.num", "TypeError"]),
    "raises.py": ("config.seeds = 1 / 0", ["line 6", "ZeroDivisionError"]),
}


@pytest.mark.parametrize("name", sorted(_CONFIG_FILES))
def test_config_file_mistakes_are_one_line_naming_the_line(tmp_path, capsys, name):
    line, names = _CONFIG_FILES[name]
    path = tmp_path / name
    path.write_text("from mtkd_jax.experiment.config import default_config\n\n\n"
                    "def get_config():\n    config = default_config()\n"
                    f"    {line}\n    return config\n")
    code = cli.main(["run", str(path), f"--config.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mtkd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0]
    for n in names:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_config_file_without_get_config_and_missing_file(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no get_config"):
        cli.load_config(str(tmp_path / "empty.py"))
    with pytest.raises(ConfigError, match="does not exist"):
        cli.load_config(str(tmp_path / "none.py"))


def test_a_config_mistake_in_a_subprocess_is_one_line_exit_2(tmp_path):
    # The real command and a script of experiments/, as a user runs them.
    proc = _mtkd("run", *QUICK, f"--config.output_dir={tmp_path / 'o'}",
                 "--config.distill.strategies=1,2")
    assert "config.distill.strategies" in _one_line_error(proc)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sequence.py"),
                           "--quick", "--config.teachers.dims=8,x"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert "config.teachers.dims" in _one_line_error(proc)


def test_a_model_that_does_not_fit_the_dataset_is_one_line_before_training(tmp_path, capsys):
    # cnn1d teachers on 8x8 images: refused at the config check, naming the key.
    code = cli.main(["run", *QUICK, f"--config.output_dir={tmp_path / 'o'}",
                     "--config.dataset=digits", *MICRO])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mtkd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "config.teachers.model" in lines[0] and "'digits'" in lines[0]
    assert "(8, 8, 1)" in lines[0]
    assert not (tmp_path / "o").exists()


def test_choosing_a_model_resets_its_kwargs():
    config = cli.apply_overrides(default_config(), ["--config.teachers.model=convnet"])
    assert config.teachers.model == "convnet" and config.teachers.model_kwargs.to_dict() == {}
    config = cli.apply_overrides(default_config(), [
        "--config.student.model_kwargs.features=(16,)", "--config.student.model=mlp"])
    assert config.student.model_kwargs.features == (16,)  # same model: kwargs kept and set
    config = cli.apply_overrides(default_config(), [
        "--config.teachers.model_kwargs.features=(8,)", "--config.teachers.model=mlp"])
    assert config.teachers.model_kwargs.to_dict() == {"features": (8,)}  # set after the reset


def _per_seed_rows(out):
    with open(out / "results_per_seed.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # a whole run in a subprocess or many compiles: kept out of the 10-minute suite
def test_ctrl_c_in_the_second_seed_keeps_the_first_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mtkd_jax", "run", *QUICK, f"--config.output_dir={out}",
            "--config.seeds=2", *MICRO]
    proc = subprocess.Popen(args, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = []
    for line in proc.stdout:  # wait for the second seed's first training
        lines.append(line)
        if line.startswith("[seed 1] alone"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "stopped by Ctrl-C" in stderr
    rows = _per_seed_rows(out)
    assert {r["seed"] for r in rows} == {"0"}
    assert "1 seed(s)" in (out / "results.md").read_text()
    assert (out / "checkpoints" / "seed0" / "alone" / "latest").is_dir()

    again = subprocess.run(args, cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[seed 0] alone: restored its checkpoint at update" in again.stdout
    assert "already finished" in again.stdout
    rows2 = _per_seed_rows(out)
    assert {r["seed"] for r in rows2} == {"0", "1"}
    first = {r["row"]: float(r["accuracy"]) for r in rows}
    for r in rows2:
        if r["seed"] == "0":
            np.testing.assert_allclose(float(r["accuracy"]), first[r["row"]], rtol=1e-6)


@pytest.mark.slow  # a whole run in a subprocess or many compiles: kept out of the 10-minute suite
def test_image_folder_experiment_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, n in (("train", 12), ("valid", 4), ("test", 4)):
        for c in ("dark", "light"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                base = 40 if c == "dark" else 200
                im = np.clip(base + rng.normal(0, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(im).save(root / split / c / f"{i}.png")
    out = tmp_path / "run"
    proc = _mtkd("run", *QUICK, f"--config.output_dir={out}", f"--config.dataset=folder:{root}",
                 "--config.image_size=8,8", "--config.color_mode=grayscale",
                 "--config.teachers.model=mlp", "--config.teachers.batch_size=8", *MICRO,
                 timeout=300)
    line = _one_line_error(proc)  # 256 > 24 train images: refused before training
    assert "config.student.batch_size" in line
    proc = _mtkd("run", *QUICK, f"--config.output_dir={out}", f"--config.dataset=folder:{root}",
                 "--config.image_size=8,8", "--config.color_mode=grayscale",
                 "--config.teachers.model=mlp", "--config.teachers.batch_size=8",
                 "--config.student.batch_size=8", "--config.force=True", *MICRO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "24 train / 8 validation / 8 test, inputs (8, 8, 1), 2 classes" in proc.stdout
    assert "40 images resized to 8x8" in proc.stdout
    assert "40 color images converted to grayscale" in proc.stdout
    rows = {r["row"] for r in _per_seed_rows(out)}
    assert {"teacher_0", "teacher_1", "alone", "mean"} <= rows
    report = _mtkd("report", str(out), timeout=300)
    assert report.returncode == 0 and "alone" in report.stdout


def test_every_config_key_has_a_meaning():
    from mtkd_jax.experiment.config_help import missing_help

    assert missing_help(default_config()) == []
