"""TensorBoard event files, as the article monitors training (tensorboardX: no TensorFlow).

`log_fn(writer)` turns the `log_fn(step, metrics)` hook of `mtkd_jax.training.fit.fit` into scalar
summaries: scalars as they are, vectors (e.g. per-teacher weights `[K]`) one scalar per
entry, and matrices (the teacher divergence `[K, K]`) as the mean of their off-diagonal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["make_writer", "log_fn", "read_scalars"]


def make_writer(logdir: str | os.PathLike):
    """A `tensorboardX.SummaryWriter` writing event files into `logdir` (created).

    Example:
      >>> import tempfile
      >>> from mtkd_jax.experiment.summaries import make_writer
      >>> w = make_writer(tempfile.mkdtemp()); w.close()
    """
    from tensorboardX import SummaryWriter

    os.makedirs(logdir, exist_ok=True)
    return SummaryWriter(logdir=os.fspath(logdir), flush_secs=30)


def _scalars(name: str, value) -> dict[str, float]:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return {name: float(array)}
    if array.ndim == 1:
        return {f"{name}/{i}": float(v) for i, v in enumerate(array)}
    if array.ndim == 2 and array.shape[0] == array.shape[1] and array.shape[0] > 1:
        k = array.shape[0]
        off = array[~np.eye(k, dtype=bool)]
        return {f"{name}/offdiag_mean": float(np.mean(off))}
    return {}


def log_fn(writer, *, every: int = 1) -> Callable[[int, Mapping], None]:
    """A `fit` logging hook that writes scalar summaries.

    Args:
      writer: a `SummaryWriter` (see `make_writer`).
      every: write train metrics of every `every`-th step (evaluations always).

    Returns:
      `log(step, metrics)` for `mtkd_jax.training.fit.fit(..., log_fn=...)`.

    Example:
      >>> import tempfile
      >>> from mtkd_jax.experiment.summaries import make_writer, log_fn, read_scalars
      >>> d = tempfile.mkdtemp(); w = make_writer(d)
      >>> log = log_fn(w, every=2)
      >>> for step in range(1, 5):
      ...     log(step, {"train/loss": 1.0 / step, "train/teacher_weights": [0.5, 0.5]})
      >>> w.close()
      >>> sorted(read_scalars(d)), read_scalars(d)["train/loss"]
      (['train/loss', 'train/teacher_weights/0', 'train/teacher_weights/1'], [(2, 0.5), (4, 0.25)])
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"`every` must be an int >= 1, got {every!r}.")

    def log(step: int, metrics: Mapping) -> None:
        is_train = any(k.startswith("train/") for k in metrics)
        if is_train and step % every:
            return
        for name, value in metrics.items():
            for tag, v in _scalars(name, value).items():
                writer.add_scalar(tag, v, global_step=step)

    return log


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read back every scalar of the event files in `logdir`: tag -> [(step, value)].

    Uses tensorboardX's own event-file reader (its protobufs), so it needs no TensorFlow.
    """
    from tensorboardX.event_file_writer import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(f for f in os.listdir(logdir) if "tfevents" in f)
    for name in files:
        for record in _records(os.path.join(logdir, name)):
            event = event_pb2.Event()
            event.ParseFromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def _records(path: str):
    """The TFRecord framing: u64 length, u32 crc, payload, u32 crc."""
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            length = int(np.frombuffer(header, "<u8")[0])
            f.read(4)
            payload = f.read(length)
            f.read(4)
            if len(payload) < length:
                return
            yield payload
