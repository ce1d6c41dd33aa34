"""DataComp's uid file by an external sort: sorted runs per part, merged in bounded memory.

`uids.npy` (see `datacomp.save_uids`) is every kept uid as a `(f0, f1)` uint64 pair, sorted,
duplicates kept, `np.save`d. At DataComp's scale (12.8B rows) that does not fit one process, so
it is built like an external merge sort, by tasks that each hold a few blocks:

1. `write_part_run`: one part's uids are checked (`datacomp.uid_check`), converted to pairs,
   sorted and written as a *run*: raw little-endian `u8,u8` records (16 bytes each, exactly
   the data section of the `.npy`), no header.
2. `merge_runs`: up to `fan_in` runs are stream-merged into one bigger run (`merge_blocks`:
   blocks of each run are read, every record <= the smallest block end among the runs that
   may still hold more is emitted, vectorized), then the inputs are deleted.
3. `write_uid_npy`: the last runs are merged the same way into the `.npy` header (`npy_header`,
   the bytes `np.save` writes for that many records) followed by the records, in one atomic
   write (`fsio.atomic_open`: on object stores one upload, committed at close).

A run is described by `(url, count)`; an empty part writes no file (`url` None). Everything
here takes fsspec URLs; which process runs what is the executor's business.

The same runs count the uids that occur in more than one part (`write_part_keys`: each part's
distinct uids as sorted 128-bit keys; `count_repeated`: keys that occur more than once in the
merge of those runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core import fsio
from curation.io import datacomp
from curation.io.parts import read_part

__all__ = [
    "BLOCK_ROWS",
    "RECORD_BYTES",
    "Run",
    "count_repeated",
    "count_repeated_blocks",
    "iter_blocks",
    "merge_blocks",
    "merge_node",
    "merge_runs",
    "npy_header",
    "part_run_url",
    "sort_pairs",
    "uid_keys",
    "write_part_keys",
    "write_part_run",
    "write_uid_npy",
]

#: Bytes of one `(f0, f1)` record in a run file and in the `.npy`.
RECORD_BYTES = datacomp.UID_DTYPE.itemsize
#: Records read from each run at a time by a merge (8 MiB per run; 16 runs: 128 MiB).
BLOCK_ROWS = 1 << 19

#: `(url, count)` of a sorted run file; url is None for an empty run (no file).
Run = tuple[str | None, int]


def sort_pairs(pairs: np.ndarray) -> np.ndarray:
    """`pairs` (of `UID_DTYPE`) sorted by (f0, f1): the order (and bytes) `np.sort` gives.

    A stable argsort on f0 (fast, and near-linear on concatenated sorted pieces), then only the
    groups of equal f0 whose f1 are out of order are sorted again by (f0, f1).
    """
    pairs = np.asarray(pairs, dtype=datacomp.UID_DTYPE)
    if len(pairs) < 2:
        return pairs.copy()
    out = pairs[np.argsort(pairs["f0"], kind="stable")]
    f0, f1 = out["f0"], out["f1"]
    tie = f0[1:] == f0[:-1]
    if (tie & (f1[1:] < f1[:-1])).any():
        grouped = np.zeros(len(out), dtype=bool)
        grouped[1:] |= tie
        grouped[:-1] |= tie
        sel = np.flatnonzero(grouped)  # rows of equal-f0 groups: contiguous, in f0 order
        sub = out[sel]
        out[sel] = sub[np.lexsort((sub["f1"], sub["f0"]))]
    return out


def merge_blocks(runs: Sequence[Iterable[np.ndarray]]) -> Iterator[np.ndarray]:
    """Merge sorted runs, each given as consecutive sorted blocks, into sorted output blocks.

    Holds at most one block per run (plus the output block): each step tops up every run whose
    block is used up, then emits every record <= the smallest last record among the blocks
    of runs that may still hold more (a run whose next block is not read yet); the run giving
    that bound empties its block, so every step makes progress. Duplicates are kept. The
    blocks may have any sizes (empty ones too).
    """
    its = [iter(r) for r in runs]
    bufs = [np.empty(0, dtype=datacomp.UID_DTYPE) for _ in its]
    live = [True] * len(its)
    while True:
        for i, it in enumerate(its):
            while live[i] and not len(bufs[i]):
                try:
                    bufs[i] = np.asarray(next(it), dtype=datacomp.UID_DTYPE)
                except StopIteration:
                    live[i] = False
        active = [i for i in range(len(its)) if len(bufs[i])]
        if not active:
            return
        ends = [(int(bufs[i][-1]["f0"]), int(bufs[i][-1]["f1"])) for i in active if live[i]]
        if ends:
            bound = np.array([min(ends)], dtype=datacomp.UID_DTYPE)
            take = {i: int(np.searchsorted(bufs[i], bound, side="right")[0]) for i in active}
        else:
            take = {i: len(bufs[i]) for i in active}
        pieces = [bufs[i][: take[i]] for i in active if take[i]]
        for i in active:
            bufs[i] = bufs[i][take[i] :]
        if len(pieces) == 1:
            yield pieces[0].copy()
        elif pieces:
            yield sort_pairs(np.concatenate(pieces))


def iter_blocks(
    f: BinaryIO, block_rows: int = BLOCK_ROWS, where: str = "run"
) -> Iterator[np.ndarray]:
    """The records of a run file (raw `u8,u8` little-endian), `block_rows` at a time."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    while True:
        data = f.read(block_rows * RECORD_BYTES)
        if not data:
            return
        while len(data) % RECORD_BYTES:  # a short read from a stream: finish the record
            more = f.read(RECORD_BYTES - len(data) % RECORD_BYTES)
            if not more:
                raise ValueError(f"{where}: truncated run file ({len(data)} bytes left over)")
            data += more
        yield np.frombuffer(data, dtype=datacomp.UID_DTYPE)


def npy_header(count: int) -> bytes:
    """The header `np.save` writes for `count` records of `UID_DTYPE` (format 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(datacomp.UID_DTYPE),
            "fortran_order": False,
            "shape": (int(count),),
        },
    )
    return buf.getvalue()


def write_part_run(part: str, run_url: str) -> dict[str, Any]:
    """Check one part's uids and write them as a sorted run; `rows`, `bad`, `first`, `run`.

    With a uid that is not 32 hex digits (`bad > 0`, `first` the first) nothing is written and
    `run` is None; so it is for a part without rows. See `datacomp.uid_check`.
    """
    uids = read_part(part, columns=["uid"]).column("uid")
    rows, bad, first = datacomp.uid_check(uids)
    out: dict[str, Any] = {"rows": rows, "bad": bad, "first": first, "run": None}
    if bad or not rows:
        return out
    pairs = sort_pairs(datacomp.uids_to_pairs(uids, where=part))
    fsio.atomic_write_bytes(run_url, pairs.tobytes())
    out["run"] = run_url
    return out


def _open_runs(
    stack: contextlib.ExitStack, runs: Sequence[Run], block_rows: int
) -> list[Iterator[np.ndarray]]:
    its = []
    for url, _ in runs:
        if url is None:
            continue
        fs, path = fsio.url_to_fs(url)
        f = stack.enter_context(fs.open(path, "rb"))
        its.append(iter_blocks(f, block_rows, where=url))
    return its


def _stream(f: BinaryIO, blocks: Iterable[np.ndarray], count: int, where: str) -> None:
    written = 0
    for block in blocks:
        f.write(block.tobytes())
        written += len(block)
    if written != count:  # raised inside atomic_open: nothing is committed
        raise ValueError(f"{where}: merged {written:,} uids, expected {count:,}")


def merge_runs(runs: Sequence[Run], out_url: str, block_rows: int = BLOCK_ROWS) -> Run:
    """Stream-merge sorted runs into the run `out_url` (atomically); then delete the inputs.

    Idempotent for a retry: when an earlier attempt wrote `out_url` and began deleting the
    inputs, the missing inputs are taken as merged.
    """
    count = sum(n for _, n in runs)
    urls = [u for u, _ in runs if u is not None]
    if not urls:
        return None, 0
    if not all(fsio.exists(u) for u in urls) and fsio.exists(out_url):
        _delete(urls)
        return out_url, count
    with contextlib.ExitStack() as stack:
        blocks = merge_blocks(_open_runs(stack, runs, block_rows))
        with fsio.atomic_open(out_url) as f:
            _stream(f, blocks, count, out_url)
    _delete(urls)
    return out_url, count


def _delete(urls: Iterable[str]) -> None:
    for url in urls:
        fs, path = fsio.url_to_fs(url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


def write_uid_npy(runs: Sequence[Run], url: str, block_rows: int = BLOCK_ROWS) -> int:
    """Merge sorted runs into DataComp's uid file `url` (the bytes `save_uids` writes for the
    same uids), streamed into one atomic write; returns the number of uids."""
    count = sum(n for _, n in runs)
    with contextlib.ExitStack() as stack:
        blocks = merge_blocks(_open_runs(stack, runs, block_rows))
        with fsio.atomic_open(url) as f:
            f.write(npy_header(count))
            _stream(f, blocks, count, url)
    return count


def part_run_url(scratch: str, index: int) -> str:
    """The run file of the `index`-th part in the scratch folder `scratch`."""
    return fsio.join(scratch, f"part-{index:09d}.run")


def merge_node(runs: list[Run], key: str, scratch: str, block_rows: int = BLOCK_ROWS) -> Run:
    """`merge_runs` for the node `key` of a merge tree: into `SCRATCH/merge-<key>.run`."""
    return merge_runs(runs, fsio.join(scratch, f"merge-{key}.run"), block_rows)


def uid_keys(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The distinct non-null uids as sorted 128-bit keys (`UID_DTYPE`): BLAKE2b-128 of each
    uid's bytes, the first 8 bytes big-endian in f0, the next in f1.

    Any string maps to a key, so uids of any form can be compared across parts by their keys;
    two distinct uids share a key with probability about n^2 / 2^129 (below 1e-18 for 10^10).
    """
    arr = uids.drop_null() if hasattr(uids, "drop_null") else uids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    values = pc.unique(arr).cast(pa.large_binary()).to_pylist()
    raw = b"".join(hashlib.blake2b(v, digest_size=16).digest() for v in values)
    halves = np.frombuffer(raw, dtype=">u8").reshape(len(values), 2)
    out = np.empty(len(values), dtype=datacomp.UID_DTYPE)
    out["f0"] = halves[:, 0]
    out["f1"] = halves[:, 1]
    return sort_pairs(out)


def write_part_keys(part: str, run_url: str) -> Run:
    """One part's distinct uids (`uid_keys`) as a sorted run; `(None, 0)` for none."""
    keys = uid_keys(read_part(part, columns=["uid"]).column("uid"))
    if not len(keys):
        return None, 0
    fsio.atomic_write_bytes(run_url, keys.tobytes())
    return run_url, len(keys)


def count_repeated_blocks(blocks: Iterable[np.ndarray]) -> int:
    """How many distinct records occur more than once in sorted `blocks` (one stream)."""
    total = 0
    last: np.ndarray | None = None  # the previous block's last record
    counted = False  # was it already counted (its group has two or more)?
    for b in blocks:
        if not len(b):
            continue
        same = np.empty(len(b), dtype=bool)  # equals the record before it
        same[1:] = (b["f0"][1:] == b["f0"][:-1]) & (b["f1"][1:] == b["f1"][:-1])
        same[0] = last is not None and b[0]["f0"] == last["f0"] and b[0]["f1"] == last["f1"]
        before = np.empty(len(b), dtype=bool)  # the record before it was counted
        before[1:] = same[:-1]
        before[0] = counted and bool(same[0])
        total += int((same & ~before).sum())
        last, counted = b[-1], bool(same[-1])
    return total


def count_repeated(runs: Sequence[Run], block_rows: int = BLOCK_ROWS) -> int:
    """`count_repeated_blocks` of the merge of sorted runs: with runs of each part's distinct
    keys (`write_part_keys`), the number of keys that occur in more than one part."""
    with contextlib.ExitStack() as stack:
        return count_repeated_blocks(merge_blocks(_open_runs(stack, runs, block_rows)))
