"""On-disk layout of a teacher cache: file names, row files, headers.

A cache is a directory of numpy ``.npy`` files, one set per shard (`-<shard>` appended to
each name; no suffix for an unsharded cache). V views, N examples, K teachers, C classes,
k = `top_k`:

```
cache{-shard}.json    header (written last, atomically: its presence marks a finished build)
values{-shard}.npy    [V, N, K, C] logits, or [V, N, K, k] top-k log-probabilities (`dtype`;
                      k + m slots with m sampled tail slots, `tail_samples`);
                      a sequence cache has a token axis L before the last: [V, N, K, L, k]
classes{-shard}.npy   [V, N, K, k] class indices (`index_dtype`: int16 when C <= 32767, else
                      int32; top-k only)
rest{-shard}.npy      [V, N, K] log of the probability outside the top-k (`dtype`; top-k only)
written{-shard}.npy   [V, N] uint8, 1 where the row was written
```

The arrays are preallocated (sparse files) and written row by row with `os.pwrite`, so a
build streams, and read back through `numpy` memory maps. A shard is a full-size file
written only at the rows its process saw.

The header is JSON: `format` (`FORMAT`), `kind` (``"logits"`` or ``"top_k_log_probs"``),
`top_k`, `tail_samples` (m, 0 or absent for a plain top-k cache), `num_examples`,
`num_views`, `num_teachers`, `num_classes`, `dtype`, `index_dtype`, `shard`, `fingerprint`
(the teachers' `params_fingerprint`), `num_written`, `build_seconds`, `meta` (the caller's
notes), and for a sequence cache `seq_len` (L) and
`tokenizer` (the fingerprint of the tokenization the inputs were made with, e.g.
`mtkd_jax.data.TextTokenizer.fingerprint`; None for classification caches). Shards of one
cache must agree on the sizes, the dtype, the fingerprint and the tokenizer.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

__all__ = [
    "FORMAT",
    "RowFile",
    "create_row_files",
    "fingerprint_sha",
    "header_file",
    "index_dtype",
    "load_shard",
    "read_headers",
    "shard_suffix",
    "write_header",
]

FORMAT = "mtkd_jax.cache/1"
"""The `format` string of a cache header; a header with another one is refused."""

_SHARD_RE = re.compile(r"^[A-Za-z0-9_.]*$")


def shard_suffix(shard) -> str:
    """`"-<shard>"` appended to every file name of a shard (`""` for None)."""
    if shard is None:
        return ""
    shard = str(shard)
    if not shard or not _SHARD_RE.match(shard):
        raise ValueError(
            f"`shard` must be None or a non-empty name of letters, digits, '_' and '.', got "
            f"{shard!r}."
        )
    return f"-{shard}"


def header_file(path: str, shard) -> str:
    """The header `cache{-shard}.json` of a shard in `path`."""
    return os.path.join(path, f"cache{shard_suffix(shard)}.json")


def _array_file(path: str, name: str, shard) -> str:
    return os.path.join(path, f"{name}{shard_suffix(shard)}.npy")


def fingerprint_sha(fingerprint, name: str = "expect_fingerprint") -> str | None:
    """The sha256 of a fingerprint dict (`params_fingerprint`) or string.

    None for None, and for a dict without one (a header written with a caller's own
    `fingerprint`); TypeError naming `name` for anything else.
    """
    if fingerprint is None:
        return None
    if isinstance(fingerprint, dict):
        return fingerprint.get("sha256")
    if isinstance(fingerprint, str):
        return fingerprint
    raise TypeError(
        f"`{name}` must be a fingerprint dict (from `params_fingerprint`) or its sha256 "
        f"string, got {type(fingerprint).__name__}."
    )


# ---------------------------------------------------------------------------------------------
# Writing: no memory map while building, so resident memory does not grow with the file
# (dirty pages of a writable map count in the process's RSS until the kernel flushes them).


class RowFile:
    """A preallocated `.npy` file `[V, N, *row]` written one row (or run of rows) at a time."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            self.offset = f.tell()
            self.row_bytes = int(np.prod(shape[2:], dtype=np.int64)) * self.dtype.itemsize
            f.truncate(self.offset + int(np.prod(shape[:2], dtype=np.int64)) * self.row_bytes)
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, rows: np.ndarray, order: np.ndarray, flat: np.ndarray) -> None:
        """Write `rows[order]` at the sorted flat row numbers `flat`, one pwrite per run."""
        rows = np.ascontiguousarray(rows[order], dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(flat) != 1) + 1
        for run in np.split(np.arange(len(flat)), breaks):
            os.pwrite(
                self.fd,
                rows[run[0] : run[-1] + 1].tobytes(),
                self.offset + int(flat[run[0]]) * self.row_bytes,
            )

    def close(self) -> None:
        os.close(self.fd)


def create_row_files(
    path: str,
    shard,
    *,
    num_views: int,
    num_examples: int,
    num_teachers: int,
    num_classes: int,
    top_k: int | None,
    dtype,
    seq_len: int | None = None,
) -> dict[str, RowFile]:
    """Create the array files of one shard: `values`, `written` and, for top-k, `classes`
    and `rest` (module docstring); `seq_len` L adds a token axis. The caller closes them."""
    tokens = () if seq_len is None else (seq_len,)
    width = num_classes if top_k is None else top_k
    rows = (num_views, num_examples, num_teachers) + tokens + (width,)
    files = {"values": RowFile(_array_file(path, "values", shard), rows, dtype)}
    if top_k is not None:
        files["classes"] = RowFile(
            _array_file(path, "classes", shard), rows, index_dtype(num_classes)
        )
        files["rest"] = RowFile(_array_file(path, "rest", shard), rows[:-1], dtype)
    files["written"] = RowFile(
        _array_file(path, "written", shard), (num_views, num_examples), np.uint8
    )
    return files


def index_dtype(num_classes: int) -> np.dtype:
    """Storage dtype of class indices: int16 when C <= 32767, else int32."""
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def write_header(path: str, shard, header: dict) -> None:
    """Write the header of a shard atomically (a finished build)."""
    file = header_file(path, shard)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1)
    os.replace(tmp, file)


# ---------------------------------------------------------------------------------------------
# Reading


def load_shard(path: str, shard, top_k: int | None) -> dict[str, np.ndarray]:
    """Read-only memory maps of one shard's arrays (names as in `create_row_files`)."""
    names = ("values", "written") if top_k is None else ("values", "written", "classes", "rest")
    return {n: _memory_map(_array_file(path, n, shard), path, shard) for n in names}


def _memory_map(file: str, path: str, shard) -> np.ndarray:
    """A read-only memory map of one `.npy` file; a file shorter than its header says (a copy
    or build cut short) is named with the expected and actual sizes."""
    try:
        return np.load(file, mmap_mode="r")
    except ValueError as err:
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
                want = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        except (OSError, ValueError):
            raise err from None
        have = os.path.getsize(file)
        if have >= want:
            raise
        where = f"shard {shard!r} of " if shard not in (None, "") else ""
        raise ValueError(
            f"{file} ({where}the teacher cache in {path}) is truncated: its header says "
            f"{shape} {dtype}, {want} bytes, but the file has {have}. Copy the cache again, "
            "or rebuild it with `build_cache`."
        ) from err


def read_headers(path: str, shards) -> dict[str, dict]:
    """The headers of the shards in `path` (all, or those named), checked to agree.

    Returns:
      `{shard name: header}` ("" for an unsharded cache).

    Raises:
      FileNotFoundError: no finished shard in `path`, or a named shard is missing.
      ValueError: a header of another format, or shards that disagree.
    """
    if isinstance(shards, str):
        raise TypeError(f"`shards` must be a list of shard names, not a str: got {shards!r}.")
    found = {}
    for file in sorted(glob.glob(os.path.join(path, "cache*.json"))):
        name = os.path.basename(file)[len("cache") : -len(".json")]
        found[name[1:] if name.startswith("-") else name] = file
    if shards is not None:
        wanted = [str(s) if s is not None else "" for s in shards]
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise FileNotFoundError(
                f"No cache shard(s) {missing} in {path}; found {sorted(found)}."
            )
        found = {s: found[s] for s in wanted}
    if not found:
        raise FileNotFoundError(
            f"No teacher cache in {path} (no cache*.json header: never built, or the build "
            "did not finish)."
        )
    headers = {}
    for shard, file in found.items():
        with open(file) as f:
            headers[shard] = json.load(f)
        if headers[shard].get("format") != FORMAT:
            raise ValueError(f"{file} is not a teacher cache header (format {FORMAT!r}).")
    keys = ("num_examples", "num_views", "num_teachers", "num_classes", "top_k",
            "tail_samples", "dtype", "seq_len", "tokenizer")
    first = next(iter(headers.values()))
    for shard, h in headers.items():
        differ = [k for k in keys if h.get(k) != first.get(k)]
        if differ or fingerprint_sha(h["fingerprint"]) != fingerprint_sha(first["fingerprint"]):
            raise ValueError(
                f"Cache shard {shard!r} in {path} disagrees with the others on "
                f"{differ or ['fingerprint']}; rebuild the cache."
            )
    return headers
