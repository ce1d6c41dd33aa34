"""Exact order statistics of float64 scores spread over many shards, in bounded memory.

The global threshold of a "top fraction" filter (`stages.filters.base.global_threshold`) is
one order statistic of the whole pool's scores. Here it is found by a radix selection over
order-preserving 64-bit keys: each pass, every shard counts the next 16 bits of the keys that
match the prefix found so far (`prefix_histogram`, a fixed-size vector that sums across
shards), `choose_bin` picks the bin holding the wanted rank, and once the candidates are few
(`GATHER_LIMIT`) they are gathered (`prefix_candidates`) and selected exactly
(`select_key`). After 4 passes the key is fully known. `radix_threshold` runs those passes
over any reduction (a Ray tree in `flows.filter`, a loop over in-memory arrays in
`threshold_of_parts`), so the distributed and the in-memory results cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

#: Bits resolved per pass, bins of one histogram, and passes until the key is fully known.
BITS = 16
BINS = 1 << BITS
PASSES = 64 // BITS
#: Candidates few enough to be gathered to the driver and selected there.
GATHER_LIMIT = 1 << 20
#: `prefix_histogram` vectors: BINS counts, then the shard's rows, then its NaN rows.
HIST_SIZE = BINS + 2
_SIGN = np.uint64(1 << 63)
_MODES = ("datacomp", "exact")


def check_request(fraction: float, mode: str) -> None:
    """Raise ValueError unless `fraction` is in [0, 1] and `mode` is datacomp or exact."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'datacomp' or 'exact', got {mode!r}")


def float_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys ordered as the float64 `values` (NaN dropped; -0.0 and 0.0 are one key)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    bits = (v[~np.isnan(v)] + 0.0).view(np.uint64)  # x + 0.0: -0.0 -> 0.0, others as they are
    # negative: every bit flipped; positive: the sign bit set
    return bits ^ ((bits.view(np.int64) >> 63).view(np.uint64) | _SIGN)


def key_floats(keys: np.ndarray | int) -> np.ndarray:
    """The float64 values of `float_keys` keys (the inverse mapping)."""
    k = np.asarray(keys, dtype=np.uint64)
    return np.where(k & _SIGN, k ^ _SIGN, ~k).view(np.float64)


def _with_prefix(keys: np.ndarray, prefix: int, level: int) -> np.ndarray:
    if level == 0:
        return keys
    return keys[(keys >> np.uint64(64 - BITS * level)) == np.uint64(prefix)]


def prefix_histogram(values: np.ndarray, prefix: int, level: int) -> np.ndarray:
    """One shard's counts for pass `level` (0-based): an int64 vector of `HIST_SIZE`.

    Entry b < BINS counts the keys whose top `BITS * level` bits are `prefix` and whose next
    `BITS` bits are b; then come the shard's rows (NaN included) and its NaN rows. Vectors of
    different shards add up.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    keys = _with_prefix(float_keys(v), prefix, level)
    digits = (keys >> np.uint64(64 - BITS * (level + 1))) & np.uint64(BINS - 1)
    out = np.zeros(HIST_SIZE, dtype=np.int64)
    out[:BINS] = np.bincount(digits.astype(np.intp), minlength=BINS)
    out[BINS] = len(v)
    out[BINS + 1] = int(np.isnan(v).sum())
    return out


def prefix_candidates(values: np.ndarray, prefix: int, level: int) -> np.ndarray:
    """One shard's keys whose top `BITS * level` bits are `prefix` (every key for level 0)."""
    return _with_prefix(float_keys(values), prefix, level)


def choose_bin(hist: np.ndarray, rank: int) -> tuple[int, int, int]:
    """(bin, rank within the bin, keys in the bin) of the 0-based ascending `rank`."""
    counts = np.asarray(hist[:BINS], dtype=np.int64)
    cum = np.cumsum(counts)
    if not 0 <= rank < int(cum[-1]):
        raise ValueError(f"rank {rank} outside the {int(cum[-1])} counted keys")
    b = int(np.searchsorted(cum, rank, side="right"))
    return b, rank - int(cum[b] - counts[b]), int(counts[b])


def select_key(keys: np.ndarray, rank: int) -> float:
    """The float of the `rank`-th smallest (0-based) of `keys`."""
    keys = np.asarray(keys, dtype=np.uint64)
    return float(key_floats(np.partition(keys, rank)[rank]))


class Target(NamedTuple):
    """Where the threshold lies: `pos`, the 0-based ascending rank among the non-NaN scores,
    or (`pos` None) the threshold itself, when no score is it (inf, -inf or NaN)."""

    pos: int | None
    value: float


def threshold_target(total: int, nans: int, fraction: float, mode: str) -> Target:
    """The rule of `global_threshold` on the counts alone (see its docstring).

    `datacomp`: n = int(total * fraction), the index n of the descending order with NaN last;
    `exact`: index n - 1. Before the first score: +inf; past every row: -inf; on a NaN:
    NaN (`datacomp`) or -inf (`exact`).
    """
    check_request(fraction, mode)
    n = int(total * fraction)  # the same float expression as DataComp
    k = n if mode == "datacomp" else n - 1  # index into the descending order
    if k < 0:
        return Target(None, math.inf)
    if k >= total:
        return Target(None, -math.inf)
    ranked = total - nans  # -inf and +inf are ranked, NaN is not
    if k >= ranked:
        return Target(None, -math.inf if mode == "exact" else math.nan)
    return Target(ranked - 1 - k, math.nan)


def radix_threshold(
    histogram: Callable[[int, int], np.ndarray | None],
    candidates: Callable[[int, int], np.ndarray | None],
    fraction: float,
    mode: str,
    gather_limit: int | None = None,
) -> float:
    """`global_threshold` of a pool seen only through two reductions over its shards.

    `histogram(prefix, level)` is Σ `prefix_histogram` over the shards, `candidates(prefix,
    level)` the concatenated `prefix_candidates` (either may be None for no shards). At most
    `PASSES` histograms and one gather of at most `gather_limit` keys (default
    `GATHER_LIMIT`) are asked for. -0.0 comes back as 0.0.
    """
    check_request(fraction, mode)
    limit = GATHER_LIMIT if gather_limit is None else gather_limit
    hist = histogram(0, 0)
    if hist is None:
        hist = np.zeros(HIST_SIZE, dtype=np.int64)
    total, nans = int(hist[BINS]), int(hist[BINS + 1])
    target = threshold_target(total, nans, fraction, mode)
    if target.pos is None:
        return target.value
    rank, prefix, level, count = target.pos, 0, 0, total - nans
    while count > limit and level < PASSES:
        if level > 0:
            hist = histogram(prefix, level)
            if hist is None or (int(hist[BINS]), int(hist[BINS + 1])) != (total, nans):
                raise RuntimeError(
                    "the scores changed between passes of the threshold selection "
                    f"({total} rows, {nans} NaN at first); rerun on an input nobody writes to"
                )
        b, rank, count = choose_bin(hist, rank)
        prefix, level = (prefix << BITS) | b, level + 1
    if level == PASSES:
        return float(key_floats(prefix))
    keys = candidates(prefix, level)
    keys = np.zeros(0, np.uint64) if keys is None else np.asarray(keys, dtype=np.uint64)
    if len(keys) != count:
        raise RuntimeError(
            f"the scores changed between passes of the threshold selection ({count} "
            f"candidates counted, {len(keys)} gathered); rerun on an input nobody writes to"
        )
    return select_key(keys, rank)


def threshold_of_parts(
    parts: Sequence[np.ndarray], fraction: float, mode: str, gather_limit: int | None = None
) -> float:
    """`radix_threshold` over in-memory arrays (one per shard), reduced by a plain loop."""

    def histogram(prefix: int, level: int) -> np.ndarray:
        out = np.zeros(HIST_SIZE, dtype=np.int64)
        for p in parts:
            out += prefix_histogram(p, prefix, level)
        return out

    def candidates(prefix: int, level: int) -> np.ndarray:
        found = [prefix_candidates(p, prefix, level) for p in parts]
        return np.concatenate(found) if found else np.zeros(0, np.uint64)

    return radix_threshold(histogram, candidates, fraction, mode, gather_limit)
