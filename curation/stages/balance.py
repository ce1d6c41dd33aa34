"""Counting and balancing: MetaCLIP's head/tail flattening of the concept distribution.

A row with matched entries E is kept with probability 1 - prod_{e in E}(1 - p_e), where
p_e = min(1, t / count_e). The randomness is a counter-based hash of (seed, uid, entry_id) →
uniform [0, 1): the row is kept when any of its entries' draws is below p_e. That is exactly the
probability above (draws are independent per entry), is independent of worker count, order and
retries, and is nested: a larger t keeps a superset of rows.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (Steele et al.), elementwise on uint64 with wrap-around."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def stable_hash64(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FNV-1a 64 over each string's UTF-8 bytes, then SplitMix64: a hash fixed by this code.

    Vectorized over the column (one NumPy pass per byte position, not per row), and independent
    of library versions, so sampling decisions are reproducible across installs. Nulls hash as "".
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    strings = pc.fill_null(pc.cast(strings, pa.large_string()), "")
    n = len(strings)
    bufs = strings.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    max_len = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        for j in range(max_len):
            active = np.nonzero(lengths > j)[0]
            if len(active) == n:
                h = (h ^ data[starts + j].astype(np.uint64)) * _FNV_PRIME
            else:
                h[active] = (h[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
        h = (h ^ lengths.astype(np.uint64)) * _FNV_PRIME
    return _splitmix64(h)


def uniform_draws(uid_hash: np.ndarray, entry_ids: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) draw per (seed, uid, entry_id), elementwise; float64 with 53 random bits."""
    seed_key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        x = _splitmix64(uid_hash ^ seed_key)
        x = _splitmix64(x + (entry_ids.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p_e = min(1, t / count_e) (MetaCLIP's count_to_prob); entries never matched get 1."""
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"t must be a finite number > 0, got {t}")
    c = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(c, t)


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Tail proportion for threshold t: the share of matches in entries with count < t.

    Same definition as MetaCLIP 2's `t_to_p`.
    """
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return float(c[c < t].sum() / total) if total > 0 else 0.0


def p_to_t(counts: np.ndarray, p: float) -> int:
    """Threshold t whose tail proportion is closest to p (MetaCLIP 2's `p_to_t`).

    Sort the counts, take the cumulative share, and return the count where it is nearest to p.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"tail proportion must be in (0, 1], got {p}")
    c = np.sort(np.asarray(counts, dtype=np.uint64))
    total = float(c.sum())
    if total == 0:
        raise ValueError("cannot derive t from a tail proportion: no entry has any match")
    portion = np.cumsum(c, dtype=np.float64) / total
    t = int(c[int(np.abs(portion - p).argmin())])
    return max(t, 1)


def count_entries(entry_ids: pa.Array | pa.ChunkedArray, num_entries: int) -> np.ndarray:
    """Matches per entry (uint64, length num_entries) from a list<uint32> column."""
    if isinstance(entry_ids, pa.ChunkedArray):
        entry_ids = (
            entry_ids.combine_chunks() if entry_ids.num_chunks else pa.array([], entry_ids.type)
        )
    flat = pc.list_flatten(entry_ids).to_numpy(zero_copy_only=False)
    if len(flat) and int(flat.max()) >= num_entries:
        raise ValueError(
            f"entry id {int(flat.max())} is out of range for metadata with {num_entries} entries; "
            "the matched data was produced with a different metadata file"
        )
    return np.bincount(flat.astype(np.int64), minlength=num_entries).astype(np.uint64)


class Balancer:
    """Keeps rows by MetaCLIP's rule, given the global entry probabilities (a CPU stage)."""

    def __init__(self, probabilities: np.ndarray, seed: int) -> None:
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.seed = int(seed)

    def setup(self) -> None:
        """Nothing to build: the probability vector is passed in (broadcast once)."""

    def keep_mask(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(keep, has_match) boolean masks over the rows of `table` (needs uid and entry_ids)."""
        for col in ("uid", "entry_ids"):
            if col not in table.column_names:
                raise ValueError(f"balance needs a {col!r} column; run `curation match` first")
        n = table.num_rows
        ids = (
            table.column("entry_ids").combine_chunks() if n else pa.array([], pa.list_(pa.uint32()))
        )
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        parents = pc.list_parent_indices(ids).to_numpy(zero_copy_only=False)
        has_match = np.bincount(parents, minlength=n) > 0
        if len(flat) == 0:
            return np.zeros(n, dtype=bool), has_match
        uid_hash = stable_hash64(table.column("uid"))
        draws = uniform_draws(uid_hash[parents], flat, self.seed)
        hit = draws < self.probabilities[flat]
        keep = np.bincount(parents[hit], minlength=n) > 0
        return keep, has_match

    def process(self, table: pa.Table) -> tuple[pa.Table, Counter]:
        """Kept rows and counters: rows_read, rows_written, dropped_no_match, dropped_not_sampled."""
        keep, has_match = self.keep_mask(table)
        counts: Counter = Counter()
        counts["rows_read"] = table.num_rows
        counts["rows_written"] = int(keep.sum())
        counts["rows_dropped_no_match"] = int((~has_match).sum())
        counts["rows_dropped_not_sampled"] = int((has_match & ~keep).sum())
        return table.filter(pa.array(keep)), counts
