"""Image folders end to end: settings that follow the data, the teacher check, the folder
announcement, time-based checkpoints, and `mtkd run` on real MNIST digits written as PNGs
(tests/image_folders.py writes the folders)."""

import csv
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from image_folders import write_mnist_folder, write_shapes_folder
from PIL import Image

from mtkd_jax import data
from mtkd_jax.experiment import auto_settings
from mtkd_jax.experiment.config import default_config, validate_config
from mtkd_jax.experiment.teacher_check import (
    TeachersAtChance,
    chance_threshold,
    check_teachers,
)
from mtkd_jax.training.fit import fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--config.progress=False", "--config.plots=False", "--config.tensorboard=False"]


def _mtkd(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "mtkd_jax", "run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _rows(out):
    with open(os.path.join(out, "results_per_seed.csv")) as f:
        return list(csv.DictReader(f))


# -- settings that follow the data ------------------------------------------------------------

def test_the_mnist1d_defaults_are_what_they_were():
    c, _ = auto_settings.resolve(default_config(), n_train=3600, input_shape=(40,))
    t, s = c.teachers, c.student
    assert (t.model, t.batch_size, t.epochs, t.learning_rate) == ("cnn1d", 128, 20, 1e-2)
    assert (s.model, s.batch_size, s.steps, s.learning_rate) == ("mlp", 256, 1500, 5e-3)
    assert t.model_kwargs.to_dict() == {"features": (32, 32, 64), "hidden": 128}


@pytest.mark.parametrize("n_train", [20, 180, 3500, 60000])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (40,)])
def test_chosen_settings_give_enough_updates(n_train, shape):
    c, why = auto_settings.resolve(default_config(), n_train=n_train, input_shape=shape)
    validate_config(c)
    for section in (c.teachers, c.student):
        spe = n_train // section.batch_size
        assert spe >= auto_settings.MIN_UPDATES_PER_EPOCH or section.batch_size == 1
        assert section.learning_rate > 0
    assert c.teachers.epochs * (n_train // c.teachers.batch_size) >= (
        auto_settings.MIN_TEACHER_UPDATES)
    assert (c.teachers.model != "cnn1d") == (len(shape) == 3)  # cnn1d takes no images
    paths = [w.path for w in why]
    assert len(paths) == len(set(paths)) and all("=" in w.line() for w in why)


def test_values_the_user_set_are_kept():
    config = default_config()
    config.teachers.batch_size = 128  # the MNIST-1D value, set explicitly
    config.student.learning_rate = 0.1
    config.teachers.model = "mlp"
    config.color_mode = "rgb"
    c, why = auto_settings.resolve(config, n_train=180, input_shape=(32, 32, 3),
                                   color_mode="grayscale")
    assert (c.teachers.batch_size, c.student.learning_rate) == (128, 0.1)
    assert (c.teachers.model, c.color_mode) == ("mlp", "rgb")
    chosen = {w.path for w in why}
    assert not chosen & {"teachers.batch_size", "student.learning_rate", "teachers.model",
                         "color_mode"}
    assert {"teachers.epochs", "student.batch_size"} <= chosen
    assert config.teachers.epochs == 0  # the caller's config is not changed


def test_a_small_folder_gets_a_batch_with_updates_per_epoch():
    c, why = auto_settings.resolve(default_config(), n_train=180, input_shape=(32, 32, 3))
    assert c.teachers.batch_size == 16 and c.student.batch_size == 16
    line = next(w.line() for w in why if w.path == "teachers.batch_size")
    assert line == "teachers.batch_size=16 (180 train examples: 11 updates/epoch)"


# -- the teachers against chance ---------------------------------------------------------------

def test_chance_threshold_against_a_binomial_reference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=137)
    p = np.bincount(y).max() / len(y)
    chance, threshold = chance_threshold(y)
    np.testing.assert_allclose([chance, threshold], [p, p + 2 * np.sqrt(p * (1 - p) / 137)])


def test_teachers_at_chance_stop_the_run_unless_forced():
    y = np.repeat(np.arange(3), 20)
    config = default_config()
    check_teachers(config, [0.9, 0.8, 0.7], y, seed=0)  # well above: nothing happens
    with pytest.raises(TeachersAtChance, match=r"teacher_1 is no better than chance.*force"):
        check_teachers(config, [0.9, 0.34, 0.7], y, seed=0)
    config.force = True
    check_teachers(config, [0.3, 0.3, 0.3], y, seed=0)


# -- the folder announcement ---------------------------------------------------------------------

def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_counts_resized_and_converted_images(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(4):
            _save(tmp_path / "train" / c / f"{i}.png",
                  rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    _save(tmp_path / "train" / "a" / "big.png", rng.integers(0, 255, (12, 9, 3), dtype=np.uint8))
    _save(tmp_path / "train" / "b" / "gray.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    _save(tmp_path / "train" / "b" / "gray2.png", rng.integers(0, 255, (5, 5), dtype=np.uint8))
    ds = data.load_image_folder(tmp_path, image_size=8, color_mode="auto",
                                validation_fraction=0.2)
    assert ds.info.input_shape == (8, 8, 3)  # some files are in color
    notes = " | ".join(ds.info.notes)
    assert "11 images read as rgb (detected: some files are in color)" in notes
    assert "2 images resized to 8x8" in notes
    assert "2 grayscale images converted to RGB" in notes


def test_a_grayscale_folder_is_read_as_grayscale(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(5):
            _save(tmp_path / "train" / c / f"{i}.png",
                  rng.integers(0, 255, (6, 6), dtype=np.uint8))
    ds = data.load_image_folder(tmp_path, image_size=6, color_mode="auto",
                                validation_fraction=0.2)
    assert ds.info.input_shape == (6, 6, 1)
    assert "all 10 images already 6x6" in ds.info.notes


# -- checkpoints by time ---------------------------------------------------------------------------

def _tiny_fit(tmp_path, *, stop_at=None, **kw):
    from typing import NamedTuple

    class State(NamedTuple):
        step: jax.Array
        params: jax.Array
        opt_state: tuple = ()

    @jax.jit
    def step_fn(state, batch, key):
        loss, g = jax.value_and_grad(lambda w: jnp.mean((w - batch) ** 2))(state.params)
        return State(state.step + 1, state.params - 0.1 * g), {"loss": loss}

    def batches(epoch, start):
        for i in range(start, 10):
            if epoch * 10 + i == stop_at:
                raise KeyboardInterrupt  # Ctrl-C while the data of update `stop_at` loads
            yield np.full(3, 1.0 + 0.1 * i, np.float32)

    return fit(State(jnp.array(0), jnp.zeros(3)), step_fn, batches, num_epochs=3,
               steps_per_epoch=10, key=jax.random.key(0), progress=False, keep=100,
               checkpoint_dir=str(tmp_path), save_every=1000, async_save=False, **kw)


def _saved_steps(tmp_path):
    return sorted(int(n) for n in os.listdir(tmp_path / "latest") if n.isdigit())


def test_latest_checkpoint_follows_the_clock(tmp_path):
    now = [0.0]

    def clock():  # a fake clock: every reading is one second later
        now[0] += 1.0
        return now[0]

    _tiny_fit(tmp_path / "timed", save_every_seconds=4.0, clock=clock)
    steps = _saved_steps(tmp_path / "timed")
    assert steps[-1] == 30 and len(steps) >= 6
    assert max(np.diff([0, *steps])) <= 4  # never more than the interval between saves
    _tiny_fit(tmp_path / "untimed")
    assert _saved_steps(tmp_path / "untimed") == [30]


def test_ctrl_c_saves_the_updates_since_the_last_checkpoint(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _tiny_fit(tmp_path / "stopped", stop_at=13)
    assert _saved_steps(tmp_path / "stopped") == [13]
    resumed = _tiny_fit(tmp_path / "stopped")
    assert resumed.resumed_from == 13
    whole = _tiny_fit(tmp_path / "whole")
    np.testing.assert_array_equal(resumed.state.params, whole.state.params)


# -- mtkd run on image folders -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_tiny(tmp_path_factory):
    return write_mnist_folder(tmp_path_factory.mktemp("mnist_tiny"), per_class=(30, 6, 6))


def test_mtkd_run_on_a_tiny_mnist_png_folder(mnist_tiny, tmp_path):
    out = tmp_path / "run"
    proc = _mtkd(f"--config.dataset=folder:{mnist_tiny}", "--config.image_size=28,28",
                 f"--config.output_dir={out}", "--config.seeds=1",
                 "--config.distill.strategies=alone,mean", "--config.distill.train_only=()",
                 "--config.student.steps=40", "--config.compression.repeats=1", *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("300 train / 60 validation / 60 test, inputs (28, 28, 1), 10 classes",
                 "color_mode=grayscale (detected from the image files)",
                 "teachers.model=small_convnet",
                 "teachers.batch_size=16 (300 train examples: 18 updates/epoch)",
                 "teachers.epochs=32 (at least 560 updates: 576 of 16)"):
        assert line in proc.stdout, proc.stdout
    acc = {r["row"]: float(r["accuracy"]) for r in _rows(out)}
    assert min(acc[f"teacher_{k}"] for k in range(3)) > 0.5  # 300 digits: well above 10%
    md = (out / "results.md").read_text()
    assert "no transfer set" in md and "transfer set 40000" not in md


@pytest.mark.slow  # 10 minutes or more on the project's 2-CPU machine
@pytest.mark.timeout(7200)
def test_mtkd_run_on_the_mnist_png_folder_with_no_other_setting(tmp_path):
    root = write_mnist_folder(tmp_path / "mnist")
    out = tmp_path / "run"
    proc = _mtkd(f"--config.dataset=folder:{root}", "--config.image_size=28,28",
                 f"--config.output_dir={out}", "--config.progress=False", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    acc = {}
    for r in rows:
        acc.setdefault(r["row"], {})[r["seed"]] = float(r["accuracy"])
    assert min(acc[f"teacher_{k}"][s] for k in range(3) for s in acc["alone"]) >= 0.95
    multi = ("mean", "mean_mse", "scores", "confidence", "entropy", "agreement")
    gains = {m: np.mean([acc[m][s] - acc["alone"][s] for s in acc["alone"]]) for m in multi}
    assert max(gains.values()) > 0, gains


@pytest.mark.slow  # ~60 s: a whole mtkd run; the tiny MNIST folder run is the default one
def test_the_small_rgb_folder_learns_or_stops_clearly(tmp_path):
    root = write_shapes_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    proc = _mtkd(f"--config.dataset=folder:{root}", "--config.image_size=32,32",
                 f"--config.output_dir={out}", "--config.seeds=1",
                 "--config.distill.strategies=alone,mean", "--config.distill.train_only=()",
                 "--config.student.steps=40", "--config.compression.enabled=False", *QUIET)
    assert "teachers.batch_size=16 (180 train examples: 11 updates/epoch)" in proc.stdout
    if proc.returncode == 2:  # the clear stop
        assert "no better than chance" in proc.stderr and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = {r["row"]: float(r["accuracy"]) for r in _rows(out)}
    assert min(acc[f"teacher_{k}"] for k in range(3)) > 0.6  # chance is 1/3


TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")


@pytest.mark.slow  # three runs of a subprocess
@pytest.mark.timeout(3600)
def test_ctrl_c_mid_training_resumes_from_the_last_checkpoint(tmp_path):
    # The tiny MNIST-1D run with longer teachers (30 epochs x 14 = 420 updates), a
    # checkpoint every 5 updates; Ctrl-C once the teachers have written two.
    args = [TINY, "--config.teachers.epochs=30", "--config.checkpoint_every=5",
            "--config.transfer.size=0", "--config.distill.train_only=()",
            "--config.distill.strategies=alone,mean", "--config.compression.enabled=False",
            *QUIET]
    clean = _mtkd(*args, f"--config.output_dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-3000:]

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "mtkd_jax", "run", *args,
                             f"--config.output_dir={out}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "seed0" / "teachers" / "latest"

    def saved():
        names = os.listdir(latest) if latest.is_dir() else []
        return sorted(int(n) for n in names if n.isdigit())

    deadline = time.monotonic() + 600
    while len(saved()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    at_signal = saved()[-1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    resumed = saved()[-1]
    assert at_signal <= resumed < 420  # the Ctrl-C save, or the last one before it

    again = _mtkd(*args, f"--config.output_dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[seed 0] teachers: resuming at update {resumed} of 420" in again.stdout
    first = {r["row"]: r["accuracy"] for r in _rows(tmp_path / "clean")}
    assert {r["row"]: r["accuracy"] for r in _rows(out)} == first


@pytest.mark.slow  # ~30 s: two mtkd runs; the check itself is tested above, without a run
def test_teachers_at_chance_stop_mtkd_run_in_one_line(mnist_tiny, tmp_path):
    out = tmp_path / "run"
    args = [f"--config.dataset=folder:{mnist_tiny}", "--config.image_size=28,28",
            f"--config.output_dir={out}", "--config.seeds=1", "--config.teachers.epochs=1",
            "--config.teachers.learning_rate=1e-6", "--config.distill.strategies=alone,mean",
            "--config.distill.train_only=()", "--config.student.steps=5",
            "--config.compression.enabled=False", *QUIET]
    proc = _mtkd(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mtkd: error:")]
    assert len(lines) == 1 and "no better than chance" in lines[0], proc.stderr[-3000:]
    assert "--config.force=True" in lines[0]
    forced = _mtkd(*args, "--config.force=True")  # the same folder: the teachers are reused
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "[seed 0] teachers: restored its checkpoint at update 18 of 18" in forced.stdout
