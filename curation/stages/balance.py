"""Counting and balancing: MetaCLIP's head/tail flattening of the concept distribution.

A row (one image-text pair) with matched entries E is kept with probability
1 - prod_{e in E}(1 - p_e), where p_e = min(1, t / count_e). The randomness is a counter-based
hash of (seed, uid, text, entry_id) → uniform [0, 1): the row is kept when any of its entries'
draws is below p_e. That is exactly the probability above (draws are independent per entry), is
independent of worker count, order and retries, and is nested: a larger t keeps a superset.

The draws are per text, as in MetaCLIP's balancing (`metaclip1/balancing.py` samples each text
of an image, `metaclip1/indexing/balance_sampling.py` draws per (entry, text) of its inverted
index): two texts of one image (its alt and its title, or the same image on many pages) are
sampled independently, while the same (uid, text) pair seen twice gets the same draws and is
kept or dropped together. (MetaCLIP 2's `curation/curate.py` instead keeps one text per image,
picked at random, and keeps the image with that text's probability.)

The hash is fixed by this code, not by a library: MurmurHash64A (seed 0) of each string's UTF-8
bytes, computed on whole columns 8 bytes at a time; a row's key is H(uid) xor c·H(text) (c odd),
and its draw for entry e is SplitMix64(SplitMix64(key xor SplitMix64(seed)) + (e + 1)·φ).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core import fsio
from curation.core.arrow import string_buffers
from curation.core.stage import Stage, StageOutput
from curation.core.worldwide import (
    OTHER,
    language_index,
    reference_p_to_t,
    reference_t_to_p,
)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MURMUR_M = np.uint64(0xC6A4A7935BD1E995)
_MURMUR_R = np.uint64(47)
# rows hashed together: their bytes stay in cache while each word position is processed
_BLOCK_ROWS = 1 << 14
# strings longer than this are hashed apart from the blocks (see `_murmur_state`)
_LONG_BYTES = 256
# keeps the low `i` bytes of a little-endian word: the tail of a string that ends inside it
_TAIL_MASKS = np.array([(1 << (8 * i)) - 1 for i in range(8)], dtype=np.uint64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (Steele et al.), elementwise on uint64 with wrap-around."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def stable_hash64(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """MurmurHash64A (seed 0) of each string's UTF-8 bytes: a 64-bit hash fixed by this code.

    Vectorized over the column 8 bytes at a time (one NumPy pass per word position over the rows
    still that long, block by block of rows so the bytes stay in cache), and independent of
    library versions, so sampling decisions are reproducible across installs. Nulls hash as "".
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = (
            strings.combine_chunks() if strings.num_chunks else pa.array([], pa.large_string())
        )
    if not (pa.types.is_string(strings.type) or pa.types.is_large_string(strings.type)):
        strings = pc.cast(strings, pa.large_string())
    strings = pc.fill_null(strings, "")
    with np.errstate(over="ignore"):
        h = _murmur_state(strings, _LONG_BYTES)
        h ^= h >> _MURMUR_R
        h *= _MURMUR_M
        h ^= h >> _MURMUR_R
    return h


def _murmur_state(strings: pa.Array, long_bytes: int) -> np.ndarray:
    """MurmurHash64A's state after the 8-byte blocks and the tail (before the final mix).

    Strings longer than `long_bytes` are hashed apart, so that a block of rows takes as many
    passes as its longest short string, not as the few very long ones (alt texts have a tail).
    """
    n = len(strings)
    data, offsets = string_buffers(strings)
    lengths = offsets[1:] - offsets[:-1]
    h = lengths.astype(np.uint64) * _MURMUR_M  # seed ^ (len * m), seed 0
    long_rows = np.flatnonzero(lengths > long_bytes)
    if len(long_rows):
        h[long_rows] = _murmur_state(strings.take(pa.array(long_rows)), np.iinfo(np.int64).max)
    for r0 in range(0, n, _BLOCK_ROWS):
        r1 = min(n, r0 + _BLOCK_ROWS)
        lo, hi = int(offsets[r0]), int(offsets[r1])
        if hi == lo:
            continue
        # the block's bytes, zero-padded so that loading a string's last word stays in range
        block = np.empty(hi - lo + 16, dtype=np.uint8)
        block[: hi - lo] = data[lo:hi]
        block[hi - lo :] = 0
        _murmur_body(block, offsets[r0:r1] - lo, lengths[r0:r1], h[r0:r1], long_bytes)
    return h


def _murmur_body(
    block: np.ndarray, starts: np.ndarray, lengths: np.ndarray, h: np.ndarray, long_bytes: int
) -> None:
    """MurmurHash64A's 8-byte blocks and tail for the strings at `starts` in `block`, into `h`
    (a view); strings longer than `long_bytes` are left alone.

    A string's word at byte offset o is read as two aligned words shifted together (o need not
    be a multiple of 8). Rows are ordered longest first, so that the rows with a whole word at
    position w are a prefix.
    """
    max_len = int(lengths.max())
    if lengths.min() == max_len:  # e.g. uids: no reordering
        if max_len > long_bytes:
            return
        rows = None
        lens, first, hg = lengths, starts, h
    else:
        key = max_len - lengths
        order = np.argsort(key.astype(np.uint16) if max_len < 1 << 16 else key, kind="stable")
        skip = int(np.count_nonzero(lengths > long_bytes))
        rows = order[skip:]
        lens, first, hg = lengths[rows], starts[rows], h[rows]
    words = block[: 8 * (len(block) // 8)].view("<u8")
    after = words[1:]
    q = first >> 3
    shift = ((first & 7) << 3).astype(np.uint64)
    # word = lo >> shift | hi << (64 - shift), written so that shift 0 gives hi's part 0
    back = np.uint64(63) - shift
    nfull = lens >> 3
    # whole[w]: how many rows (a prefix) have a whole 8-byte word at position w
    whole = np.searchsorted(-nfull, -np.arange(int(nfull[0]) if len(nfull) else 0), side="left")
    with np.errstate(over="ignore"):
        for w, c in enumerate(whole.tolist()):
            k = _load_words(words, after, q[:c] + w, shift[:c], back[:c])
            k *= _MURMUR_M
            k ^= k >> _MURMUR_R
            k *= _MURMUR_M
            hv = hg[:c]
            hv ^= k
            hv *= _MURMUR_M
        tail = lens & 7
        ends = np.flatnonzero(tail)
        if len(ends):
            last = _load_words(words, after, q[ends] + nfull[ends], shift[ends], back[ends])
            hg[ends] = (hg[ends] ^ (last & _TAIL_MASKS[tail[ends]])) * _MURMUR_M
    if rows is not None:
        h[rows] = hg


def _load_words(
    words: np.ndarray, after: np.ndarray, idx: np.ndarray, shift: np.ndarray, back: np.ndarray
) -> np.ndarray:
    """Little-endian 8-byte words at byte offsets 8·idx + shift/8 (two aligned loads)."""
    lo = np.take(words, idx)
    hi = np.take(after, idx)
    lo >>= shift
    hi <<= np.uint64(1)
    hi <<= back
    lo |= hi
    return lo


def row_keys(uids: pa.Array | pa.ChunkedArray, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The sampling key of each (uid, text) row: H(uid) xor c·H(text), c odd (see the module)."""
    with np.errstate(over="ignore"):
        return stable_hash64(uids) ^ (stable_hash64(texts) * _GOLDEN)


def uniform_draws(keys: np.ndarray, entry_ids: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) draw per (seed, key, entry_id), elementwise; float64 with 53 random bits.

    `keys` are row keys (`row_keys`); the draws of one key are independent across entries.
    """
    seed_key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        x = _splitmix64(keys ^ seed_key)
        x = _splitmix64(x + (entry_ids.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p_e = min(1, t / count_e) (MetaCLIP's count_to_prob); entries never matched get 1."""
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"t must be a finite number > 0, got {t}")
    c = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(c, t)


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """The distinct values of `x`, sorted (no sort when `x` already is, as list columns of
    sorted entry ids usually are; faster than `np.unique` on large int64 arrays)."""
    if len(x) > 1 and not bool(np.all(x[1:] >= x[:-1])):
        x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if len(x) else x


def keep_probabilities(
    entry_ids: pa.Array | pa.ChunkedArray, probabilities: np.ndarray
) -> np.ndarray:
    """Each row's keep probability 1 - prod_{e in E}(1 - p_e) over its distinct entries E.

    The probability the `Balancer` keeps a row with, and MetaCLIP's per-text rule
    (`metaclip/curation/curate.py`, `prob = 1. - np.prod(1. - entry_probs[matched_entry_ids])`).
    Rows without entries get 0. An entry listed twice counts once, as in the Balancer (the
    same (row, entry) pair gets the same draw).
    """
    if isinstance(entry_ids, pa.ChunkedArray):
        entry_ids = (
            entry_ids.combine_chunks() if entry_ids.num_chunks else pa.array([], entry_ids.type)
        )
    n = len(entry_ids)
    p = np.asarray(probabilities, dtype=np.float64)
    flat = pc.list_flatten(entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(flat) and int(flat.max()) >= len(p):
        raise ValueError(
            f"entry id {int(flat.max())} is out of range for {len(p)} entry probabilities; "
            "the matched data was produced with a different metadata file"
        )
    parents = pc.list_parent_indices(entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    pairs = sorted_unique(parents * len(p) + flat)  # distinct (row, entry), sorted by row
    rows, ents = np.divmod(pairs, len(p)) if len(p) else (pairs, pairs)
    out = np.zeros(n, dtype=np.float64)
    if len(pairs):
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        out[rows[starts]] = 1.0 - np.multiply.reduceat(1.0 - p[ents], starts)
    return out


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Tail proportion for threshold t: the share of matches in entries with count < t.

    Same definition as MetaCLIP 2's `t_to_p` (`curation.core.worldwide.reference_t_to_p`).
    """
    return reference_t_to_p(counts, t)


def p_to_t(counts: np.ndarray, p: float) -> int:
    """Threshold t whose tail proportion is closest to p (MetaCLIP 2's `p_to_t`).

    Sort the counts, take the cumulative share, and return the count where it is nearest to p
    (`curation.core.worldwide.reference_p_to_t`, exactly). One difference: where the reference
    gives t = 0 (which would drop every row), this gives 1, the smallest usable t.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"tail proportion must be in (0, 1], got {p}")
    if not np.asarray(counts, dtype=np.uint64).sum():
        raise ValueError("cannot derive t from a tail proportion: no entry has any match")
    return max(reference_p_to_t(counts, p), 1)


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


class Balancer(Stage):
    """Keeps rows by MetaCLIP's rule, given the global entry probabilities (a CPU stage).

    `process(table)` needs the columns `uid`, `text` and `entry_ids` and returns the kept rows
    with the counters `rows_read`, `rows_written`, `rows_dropped_no_match` and
    `rows_dropped_not_sampled`.
    """

    name = "balance"

    def __init__(self, probabilities: np.ndarray, seed: int) -> None:
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.seed = int(seed)

    def setup(self) -> None:
        """Nothing to build: the probability vector is passed in (broadcast once)."""

    def keep_mask(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(keep, has_match) boolean masks over the rows of `table`."""
        for col in ("uid", "text", "entry_ids"):
            if col not in table.column_names:
                raise ValueError(
                    f"balance needs a {col!r} column (have {table.column_names}); "
                    "balance the output of `curation match`"
                )
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
        keys = row_keys(table.column("uid"), table.column("text"))
        draws = uniform_draws(keys[parents], flat, self.seed)
        hit = draws < self.probabilities[flat]
        keep = np.bincount(parents[hit], minlength=n) > 0
        return keep, has_match

    def process(self, table: pa.Table) -> StageOutput:
        """The kept rows and the counters (see the class docstring); quarantines nothing."""
        keep, has_match = self.keep_mask(table)
        counts: Counter = Counter()
        counts["rows_read"] = table.num_rows
        counts["rows_written"] = int(keep.sum())
        counts["rows_dropped_no_match"] = int((~has_match).sum())
        counts["rows_dropped_not_sampled"] = int((has_match & ~keep).sum())
        return StageOutput(table.filter(pa.array(keep)), counts, [])


def read_counts(url: str) -> np.ndarray:
    """The `count` column of an `entry_counts.parquet` (entry_id checked to be 0..N-1 in
    order: one row per metadata entry), as uint64."""
    import pyarrow.parquet as pq

    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["entry_id", "count"])
    ids = table.column("entry_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{url}: entry_id must be 0..N-1 in order (one row per metadata entry)")
    return table.column("count").to_numpy().astype(np.uint64)


def resolve_t(
    counts: np.ndarray, t: float | None, tail_proportion: float | None
) -> tuple[float, float]:
    """(t, tail proportion) from exactly one of them (MetaCLIP 2's `p_to_t` / `t_to_p`)."""
    if (t is None) == (tail_proportion is None):
        raise ValueError("give exactly one of t or tail_proportion")
    if t is None:
        t = float(p_to_t(counts, tail_proportion))
    t = float(t)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"t must be a finite number > 0, got {t}")
    return t, t_to_p(counts, t)


class LanguageBalancer(Stage):
    """Keeps rows by MetaCLIP 2's rule: each row with its own language's entry probabilities.

    `probabilities` maps a metadata language to its entry probabilities
    (`curation.core.worldwide.language_probabilities`). A row's language is its `lang`, or
    `fallback` (`other`) when `lang` has no probabilities, as in matching; a row with neither
    cannot have matched. The draw is the `Balancer`'s, keyed by (seed, uid, text, entry id), so
    decisions do not depend on batching, workers or order, and an English-only table is balanced
    exactly as the `Balancer` balances it. (MetaCLIP 2 draws with an unseeded `random`; here it
    is reproducible.) `process(table)` needs `uid`, `text`, `lang` and `entry_ids` and counts
    `rows_read`, `rows_written`, `rows_dropped_no_metadata` (language without metadata),
    `rows_dropped_no_match` and `rows_dropped_not_sampled` (these three are disjoint).
    """

    name = "balance"

    def __init__(
        self, probabilities: dict[str, np.ndarray], seed: int, fallback: str | None = OTHER
    ) -> None:
        self.languages = sorted(probabilities)
        self.probabilities = {
            k: np.asarray(probabilities[k], dtype=np.float64) for k in self.languages
        }
        self.seed = int(seed)
        self.fallback = fallback
        sizes = [len(self.probabilities[k]) for k in self.languages]
        self._offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self._offsets[1:])
        self._flat = (
            np.concatenate([self.probabilities[k] for k in self.languages])
            if sizes
            else np.empty(0, np.float64)
        )

    def setup(self) -> None:
        """Nothing to build: the probability vectors are passed in (broadcast once)."""

    def keep_mask(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep, has_match, has_metadata) boolean masks over the rows of `table`."""
        for col in ("uid", "text", "lang", "entry_ids"):
            if col not in table.column_names:
                raise ValueError(
                    f"balance needs a {col!r} column (have {table.column_names}); balance the "
                    "output of per-language matching"
                )
        n = table.num_rows
        li = language_index(table.column("lang"), self.languages, self.fallback)
        ids = table.column("entry_ids")
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.list_(pa.uint32()))
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        parents = pc.list_parent_indices(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        has_match = np.bincount(parents, minlength=n) > 0
        has_metadata = li >= 0
        if len(flat) == 0:
            return np.zeros(n, dtype=bool), has_match, has_metadata
        lp = li[parents]
        if int(lp.min()) < 0:
            raise ValueError(
                f"row {int(parents[np.argmin(lp)])} has entry ids but no probabilities for its "
                f"language (have {self.languages}); balance with the counts of the same matching"
            )
        size = np.diff(self._offsets)[lp]
        if bool(np.any(flat >= size)):
            j = int(np.flatnonzero(flat >= size)[0])
            raise ValueError(
                f"entry id {int(flat[j])} is out of range for language "
                f"{self.languages[lp[j]]!r} ({int(size[j])} entries); the matched data was "
                "produced with a different metadata set"
            )
        keys = row_keys(table.column("uid"), table.column("text"))
        draws = uniform_draws(keys[parents], flat, self.seed)
        hit = draws < self._flat[self._offsets[lp] + flat]
        keep = np.bincount(parents[hit], minlength=n) > 0
        return keep, has_match, has_metadata

    def process(self, table: pa.Table) -> StageOutput:
        """The kept rows and the counters (see the class docstring); quarantines nothing."""
        keep, has_match, has_metadata = self.keep_mask(table)
        counts: Counter = Counter()
        counts["rows_read"] = table.num_rows
        counts["rows_written"] = int(keep.sum())
        counts["rows_dropped_no_metadata"] = int((~has_metadata).sum())
        counts["rows_dropped_no_match"] = int((has_metadata & ~has_match).sum())
        counts["rows_dropped_not_sampled"] = int((has_match & ~keep).sum())
        return StageOutput(table.filter(pa.array(keep)), counts, [])
