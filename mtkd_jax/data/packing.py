"""Packing: tokenized documents, joined with EOS, into fixed-length rows for a causal LM.

Each document of token ids `t_1 .. t_n` (n >= 1) becomes a *unit* of n + 1 positions:
inputs `[EOS, t_1, .., t_n]` and labels `[t_1, .., t_n, EOS]`, so the EOS that ends one
document starts the next (it acts as BOS): every token of the document and its final EOS
is predicted, and nothing is predicted across a document boundary. Units are laid end to
end in the given order and cut into rows of L positions; a unit that does not fit goes on
in the next row (long documents span several rows). Per row:

* `x` int32 `[N, L]`: input tokens; `y` int32 `[N, L]`: next-token labels;
* `mask` float32 `[N, L]`: 1 on every unit position, 0 on padding (only the last row of a
  split is padded, with `pad_id`);
* `segment_ids` int32 `[N, L]`: 1, 2, ... numbering the documents (pieces of documents)
  within the row in order, so non-decreasing; 0 on padding. Attention stays within a
  segment: a document continued from the previous row sees only its part in this row;
* `positions` int32 `[N, L]`: position within the segment, from 0 at each document start
  and at the start of each row (always < L, so a rotary table of L positions suffices);
* `row_bytes` int64 `[N]`: UTF-8 bytes of the text the row's labels stand for (the sum of
  `token_bytes[y]` over the mask, EOS counting 0): summed over a split it is the split's
  text bytes exactly, so bits per byte = (sum of masked NLL in nats) / (ln 2 * bytes).

`pack_documents` streams: it consumes documents one at a time and yields chunks of rows,
holding at most one chunk and one document beyond it. `write_packed` streams the chunks
into `.npy` files, `open_packed` maps them back (`PackedSplit`); `batches` yields the batch
layout of `mtkd_jax.batch` for sequences (`"x"`, `"y"`, `"mask"`, `"segment_ids"`,
`"positions"`, `"index"`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from mtkd_jax.data.pipeline import epoch_order

__all__ = ["FIELDS", "PackedSplit", "batches", "num_rows", "open_packed", "pack_documents",
           "write_packed"]

FIELDS = ("x", "y", "mask", "segment_ids", "positions")
"""The `[N, L]` arrays of a packed split, in file order."""
_DTYPES = {"x": np.int32, "y": np.int32, "mask": np.float32, "segment_ids": np.int32,
           "positions": np.int32, "row_bytes": np.int64}


def num_rows(doc_lengths, *, seq_len: int) -> int:
    """Rows that documents of these token counts pack into: `ceil(sum(n_i + 1) / L)`."""
    total = int(np.sum(np.asarray(doc_lengths, np.int64) + 1))
    return -(-total // seq_len)


def _rows(ux, uy, doc, off, *, pad_id: int, token_bytes) -> dict[str, np.ndarray]:
    """Rows from whole-row streams `[R, L]` (padding marked by doc == -1)."""
    real = doc >= 0
    first_doc, first_off = doc[:, :1], off[:, :1]
    seg = np.where(real, doc - first_doc + 1, 0).astype(np.int32)
    pos = np.where(doc == first_doc, off - first_off, off)
    rows = {"x": np.where(real, ux, pad_id).astype(np.int32),
            "y": np.where(real, uy, pad_id).astype(np.int32),
            "mask": real.astype(np.float32), "segment_ids": seg,
            "positions": np.where(real, pos, 0).astype(np.int32)}
    if token_bytes is not None:
        rows["row_bytes"] = np.where(real, token_bytes[rows["y"]], 0).sum(1, dtype=np.int64)
    return rows


def pack_documents(
    documents: Iterable[np.ndarray], *, seq_len: int, eos_id: int, pad_id: int,
    token_bytes: np.ndarray | None = None, rows_per_chunk: int = 1024,
) -> Iterator[dict[str, np.ndarray]]:
    """Pack token-id documents into rows, streamed in chunks of `rows_per_chunk` rows.

    Args:
      documents: int arrays `[n_i]` with n_i >= 1, in packing order.
      seq_len: L, positions per row.
      eos_id, pad_id: the end-of-document and padding ids.
      token_bytes: `[V]` bytes per token (`TextTokenizer.token_bytes`) to add `row_bytes`.
      rows_per_chunk: rows per yielded chunk (the last chunk may have fewer).

    Yields:
      `{"x", "y", "mask", "segment_ids", "positions"}` `[R, L]` (and `"row_bytes"` `[R]`).

    Raises:
      ValueError: an empty document, or bad sizes.

    Example:
      >>> import numpy as np
      >>> docs = [np.array([5, 6]), np.array([7])]
      >>> (rows,) = pack_documents(docs, seq_len=4, eos_id=1, pad_id=0)
      >>> rows["x"].tolist(), rows["y"].tolist()
      ([[1, 5, 6, 1], [7, 0, 0, 0]], [[5, 6, 1, 7], [1, 0, 0, 0]])
      >>> rows["segment_ids"].tolist(), rows["positions"].tolist()
      ([[1, 1, 1, 2], [1, 0, 0, 0]], [[0, 1, 2, 0], [0, 0, 0, 0]])
    """
    for v, name in ((seq_len, "seq_len"), (rows_per_chunk, "rows_per_chunk")):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
    target = seq_len * rows_per_chunk
    parts: list[tuple[np.ndarray, ...]] = []
    held = 0
    count = 0

    def flush(final: bool):
        nonlocal parts, held
        ux, uy, doc, off = (np.concatenate(p) for p in zip(*parts, strict=True))
        full = (held // seq_len) * seq_len if not final else -(-held // seq_len) * seq_len
        if final and full > held:
            pad = full - held
            ux, uy = np.pad(ux, (0, pad)), np.pad(uy, (0, pad))
            doc, off = np.pad(doc, (0, pad), constant_values=-1), np.pad(off, (0, pad))
        rest = tuple(a[full:] for a in (ux, uy, doc, off))
        parts = [rest] if rest[0].size else []
        held = rest[0].size
        shape = (full // seq_len, seq_len)
        return _rows(*(a[:full].reshape(shape) for a in (ux, uy, doc, off)), pad_id=pad_id,
                     token_bytes=token_bytes)

    for ids in documents:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"Document {count} has {ids.size} tokens (shape {ids.shape}): "
                             "documents must be non-empty 1-D token arrays.")
        eos = np.array([eos_id], ids.dtype)
        parts.append((np.concatenate([eos, ids]), np.concatenate([ids, eos]),
                      np.full(ids.size + 1, count, np.int64),
                      np.arange(ids.size + 1, dtype=np.int64)))
        held += ids.size + 1
        count += 1
        while held >= target:
            chunk = flush(final=False)
            for k in range(0, len(chunk["x"]), rows_per_chunk):
                yield {key: a[k:k + rows_per_chunk] for key, a in chunk.items()}
    if held:
        chunk = flush(final=True)
        for k in range(0, len(chunk["x"]), rows_per_chunk):
            yield {key: a[k:k + rows_per_chunk] for key, a in chunk.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSplit:
    """Packed rows (arrays, possibly memory-mapped) and their totals; `len()` is N.

    `num_tokens` counts the predicted positions (mask 1), `num_bytes` the text bytes they
    stand for (the bits-per-byte denominator), `num_docs` the documents packed.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    row_bytes: np.ndarray
    num_tokens: int
    num_bytes: int
    num_docs: int

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def seq_len(self) -> int:
        return self.x.shape[1]


def write_packed(
    path: str | os.PathLike, chunks: Iterable[dict[str, np.ndarray]], *, num_rows: int,
    seq_len: int, meta: dict | None = None,
) -> PackedSplit:
    """Stream chunks of `pack_documents` (with `row_bytes`) into `path/<field>.npy`.

    `num_rows` must be the rows the chunks hold (`num_rows(lengths, seq_len=L)`). The
    `meta.json` (counts and `meta`) is written last: a directory without it is incomplete.
    """
    os.makedirs(path, exist_ok=True)
    out = {k: np.lib.format.open_memmap(os.path.join(path, f"{k}.npy"), mode="w+",
                                        dtype=_DTYPES[k],
                                        shape=(num_rows,) if k == "row_bytes"
                                        else (num_rows, seq_len))
           for k in (*FIELDS, "row_bytes")}
    at = 0
    for chunk in chunks:
        n = len(chunk["x"])
        if at + n > num_rows:
            raise ValueError(f"The chunks hold more than `num_rows`={num_rows} rows.")
        for k, arr in out.items():
            arr[at:at + n] = chunk[k]
        at += n
    if at != num_rows:
        raise ValueError(f"The chunks hold {at} rows, not `num_rows`={num_rows}.")
    counts = {"num_tokens": int(sum(out["mask"][i:i + 4096].sum(dtype=np.int64)
                                    for i in range(0, num_rows, 4096))),
              "num_bytes": int(out["row_bytes"].sum()),
              "num_docs": int((meta or {}).get("num_docs", 0))}
    for arr in out.values():
        arr.flush()
    del out
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({**(meta or {}), **counts, "num_rows": num_rows, "seq_len": seq_len}, f)
    return open_packed(path)


def open_packed(path: str | os.PathLike) -> PackedSplit:
    """The packed split written by `write_packed`, memory-mapped read-only."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"No complete packed split in {os.fspath(path)!r} (no "
                                "meta.json).")
    with open(meta_path) as f:
        meta = json.load(f)
    arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r")
              for k in (*FIELDS, "row_bytes")}
    return PackedSplit(**arrays, num_tokens=meta["num_tokens"], num_bytes=meta["num_bytes"],
                       num_docs=meta["num_docs"])


def batches(
    split: PackedSplit, *, batch_size: int, seed: int = 0, epoch: int = 0,
    shuffle: bool = True, drop_remainder: bool = True, start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of rows `{"x", "y", "mask", "segment_ids", "positions"}` `[B, L]` and
    `"index"` `[B]` (row numbers, for a teacher cache), in `epoch_order(seed, epoch)`,
    from batch `start` on (a resumed run skips what it did). One host: every call yields
    the whole global batch. A model that takes packed rows as one input (the transformer's
    ``{"tokens", "segment_ids", "positions"}``) gets them as
    ``{"tokens": b["x"], "segment_ids": b["segment_ids"], "positions": b["positions"]}``.

    Example:
      >>> import numpy as np
      >>> docs = [np.arange(2, 2 + n) for n in (3, 5, 2, 6)]
      >>> rows = next(pack_documents(docs, seq_len=4, eos_id=1, pad_id=0,
      ...                            token_bytes=np.ones(10, np.int32)))
      >>> split = PackedSplit(**rows, num_tokens=20, num_bytes=0, num_docs=4)
      >>> [b["x"].shape for b in batches(split, batch_size=2, drop_remainder=False)]
      [(2, 4), (2, 4), (1, 4)]
    """
    n = len(split)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be an int in [1, {n}] (the rows), got "
                         f"{batch_size!r}.")
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    stop = n - n % batch_size if drop_remainder else n
    for begin in range(start * batch_size, stop, batch_size):
        idx = np.sort(order[begin:begin + batch_size])
        batch = {k: np.asarray(getattr(split, k)[idx]) for k in FIELDS}
        yield {**batch, "index": idx}
