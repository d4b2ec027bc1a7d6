"""Kill-safety: SIGKILL a training run at random steps, restart it, compare with a clean run.

The kill steps are random per run; a failure names the seed, and `MTKD_RESUME_SEED=<seed>`
replays the same choice.
"""

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import resume_worker

WORKER = Path(__file__).with_name("resume_worker.py")
TOTAL = resume_worker.EPOCHS * resume_worker.STEPS_PER_EPOCH
SAVE_EVERY = resume_worker.SAVE_EVERY
STAGE_TIMEOUT = 90.0


class _Worker:
    """A worker subprocess whose `step <n>` lines are read by a thread into a queue."""

    def __init__(self, tmp_path, name, checkpoint_dir, *, delay=0.03):
        self.out = tmp_path / f"{name}.json"
        self.stderr_path = tmp_path / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--checkpoint-dir",
                    str(checkpoint_dir),
                    "--out",
                    str(self.out),
                    "--delay",
                    str(delay),
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.start = None
        self.last_step = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def stderr(self):
        return self.stderr_path.read_text()[-3000:]

    def follow(self, *, kill_at=None):
        """Read lines until the worker ends, or SIGKILL it once `step >= kill_at` is printed."""
        deadline = time.monotonic() + STAGE_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"worker silent for {STAGE_TIMEOUT} s; stderr:\n{self.stderr()}")
            if line is None:
                break
            word, _, value = line.partition(" ")
            if word == "start":
                self.start = int(value)
            elif word == "step":
                self.last_step = int(value)
                if kill_at is not None and self.last_step >= kill_at:
                    self.proc.send_signal(signal.SIGKILL)
                    break
        return self.proc.wait(timeout=STAGE_TIMEOUT)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STAGE_TIMEOUT)
        self.reader.join(timeout=STAGE_TIMEOUT)
        self.proc.stdout.close()


@pytest.mark.timeout(300)
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted_run(tmp_path):
    seed = int(os.environ.get("MTKD_RESUME_SEED", secrets.randbits(32)))
    rng = np.random.default_rng(seed)
    # After step 2 * SAVE_EVERY at least one checkpoint is complete (orbax finishes one
    # asynchronous save before it starts the next).
    kill_1 = int(rng.integers(2 * SAVE_EVERY + 1, TOTAL // 2))
    kill_2 = int(rng.integers(kill_1 + SAVE_EVERY + 1, TOTAL - 2))
    why = f"(MTKD_RESUME_SEED={seed}: kills after steps {kill_1} and {kill_2})"
    ckpt = tmp_path / "ckpt"
    workers = []
    try:
        first = _Worker(tmp_path, "first", ckpt)
        workers.append(first)
        assert first.follow(kill_at=kill_1) == -signal.SIGKILL, f"{why}\n{first.stderr()}"
        assert first.start == -1 and kill_1 <= first.last_step < TOTAL, why

        second = _Worker(tmp_path, "second", ckpt)
        workers.append(second)
        assert second.follow(kill_at=kill_2) == -signal.SIGKILL, f"{why}\n{second.stderr()}"
        # It resumed from a checkpoint of the first run (the newest may have been lost
        # mid-write, so it can be one save older) and replayed from there.
        assert second.start % SAVE_EVERY == 0, why
        assert first.last_step - 2 * SAVE_EVERY <= second.start <= first.last_step, why
        assert kill_2 <= second.last_step < TOTAL, why

        third = _Worker(tmp_path, "third", ckpt)
        workers.append(third)
        assert third.follow() == 0, f"{why}\n{third.stderr()}"
        assert second.last_step - 2 * SAVE_EVERY <= third.start <= second.last_step, why
    finally:
        for worker in workers:
            worker.close()

    # The uninterrupted run, in this process (same XLA flags, no second interpreter start).
    clean_out = tmp_path / "clean.json"
    resume_worker.main(["--checkpoint-dir", str(tmp_path / "clean"), "--out", str(clean_out)])

    got, want = json.loads(third.out.read_text()), json.loads(clean_out.read_text())
    assert got["step"] == want["step"] == TOTAL
    assert got["resumed_from"] == third.start and want["resumed_from"] is None
    for name in ("w", "b"):
        np.testing.assert_allclose(
            got["params"][name], want["params"][name], rtol=0, atol=1e-6, err_msg=why
        )
    for a, b in zip(got["opt_state"], want["opt_state"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=why)
    assert got["history"] == want["history"], why
    assert got["best"] == want["best"], why
