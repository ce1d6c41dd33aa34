"""MetaCLIP 2 ("worldwide") counting, thresholds and entry probabilities, one set per language.

Each row carries the metadata language of its text (`lang`) and entry ids within that language's
metadata (`entry_ids`). Counts are kept per (language, entry); English keeps its threshold
`t_en` and every other language gets the threshold whose tail proportion is nearest English's
(`per_language_t`, MetaCLIP 2's `global_count` in `metaclip/curation/curate.py`).

A row whose language has no metadata of its own belongs to the `other` metadata when the set
has one (`language_index`), else to none: it then never matches and is reported, not lost.

Differences from the reference, on purpose:

* Small languages. The reference's `p_to_t` can return t = 0 (when the smallest nonzero count's
  share of a language's matches is more than about 2p away from p), and its `count_to_prob` then
  gives every matched entry probability 0: the whole language silently disappears. Here t is
  floored at the language's smallest positive count (`FLOOR_MIN_COUNT`: the nearest non-empty
  tail), and with `min_matches` a language with fewer matches is kept whole (t = its largest
  count). The rule applied is reported per language (`LanguageThreshold.rule`).
* Probabilities are float64 (the reference stores float32; the difference is below 6e-8
  relative and is not worth a second rounding rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "FLOOR_MIN_COUNT",
    "GIVEN",
    "KEPT_WHOLE",
    "NO_MATCHES",
    "OTHER",
    "P_TO_T",
    "LanguageThreshold",
    "count_per_language",
    "count_to_prob",
    "language_index",
    "language_probabilities",
    "merge_language_counts",
    "per_language_t",
    "read_language_counts",
    "reference_p_to_t",
    "reference_t_to_p",
    "write_language_counts",
]

#: The pooled metadata language of texts whose own language has no metadata (MetaCLIP 2).
OTHER = "other"

# How a language's t was chosen (`LanguageThreshold.rule`).
GIVEN = "given"  # the reference language with t given
P_TO_T = "p_to_t"  # the reference rule: t = p_to_t(counts, p)
FLOOR_MIN_COUNT = "floor_min_count"  # p_to_t gave a t below every positive count (0)
KEPT_WHOLE = "kept_whole"  # fewer than min_matches matches: t = the largest count
NO_MATCHES = "no_matches"  # nothing matched: t = 1, nothing to sample


def reference_p_to_t(counts: np.ndarray, p: float) -> int:
    """MetaCLIP 2's `p_to_t`, exactly: sort the counts ascending (zeros included), take the
    inclusive cumulative share, return the count whose share is nearest p (first on ties).

    Can return 0 (see the module docstring); the sum is exact (uint64). All-zero counts give 0
    (the reference: NaN shares, `argmin` 0).
    """
    c = np.sort(np.asarray(counts, dtype=np.uint64))
    if len(c) == 0:
        raise ValueError("cannot derive t from an empty count vector")
    total = c.sum()
    if total == 0:
        return 0
    portion = np.cumsum(c) / total
    return int(c[int(np.abs(portion - p).argmin())])


def reference_t_to_p(counts: np.ndarray, t: float) -> float:
    """MetaCLIP 2's `t_to_p`: the share of matches in entries with count strictly below t
    (0.0 when nothing matched, where the reference divides 0 by 0)."""
    c = np.asarray(counts, dtype=np.uint64)
    total = c.sum()
    return float(c[c < t].sum() / total) if total else 0.0


def count_to_prob(counts: np.ndarray, t: float) -> np.ndarray:
    """MetaCLIP's `count_to_prob` for t > 0: min(1, t / count) per entry, float64; entries
    never matched get 1."""
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"t must be a finite number > 0, got {t}")
    c = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(c, t)


@dataclass(frozen=True)
class LanguageThreshold:
    """The threshold of one metadata language and how it was chosen."""

    lang: str
    matches: int  # sum of the language's counts
    entries_matched: int  # entries with a positive count
    t: float
    t_p_to_t: float | None  # what the reference rule gave (None for the given t)
    tail_proportion: float  # t_to_p(counts, t): share of matches in entries below t
    rule: str  # GIVEN, P_TO_T, FLOOR_MIN_COUNT, KEPT_WHOLE or NO_MATCHES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the manifest)."""
        return asdict(self)


def per_language_t(
    counts: Mapping[str, np.ndarray],
    t_en: float | None = None,
    tail_proportion: float | None = None,
    *,
    reference_lang: str = "en",
    min_matches: int = 0,
) -> dict[str, LanguageThreshold]:
    """Thresholds per language, as MetaCLIP 2's `global_count`, plus a rule for small languages.

    The reference language (English) keeps `t_en`, or gets t_en = p_to_t(counts_en,
    tail_proportion) when that is given instead (exactly one of the two). Then p =
    t_to_p(counts_en, t_en) and every other language gets t = p_to_t(counts_lang, p). A t below
    the language's smallest positive count (the reference's t = 0, which drops the language) is
    raised to that count (rule FLOOR_MIN_COUNT); a language with fewer than `min_matches`
    matches is kept whole (t = its largest count, KEPT_WHOLE); one without matches gets t = 1
    (NO_MATCHES). Raises ValueError when the reference language is missing or has no matches.
    """
    if (t_en is None) == (tail_proportion is None):
        raise ValueError("give exactly one of t_en or tail_proportion")
    if reference_lang not in counts:
        raise ValueError(
            f"no counts for the reference language {reference_lang!r} (have "
            f"{sorted(counts)}); its t sets every other language's tail proportion"
        )
    ref = np.asarray(counts[reference_lang], dtype=np.uint64)
    if not ref.sum():
        raise ValueError(f"the reference language {reference_lang!r} has no matches")
    out: dict[str, LanguageThreshold] = {}
    if t_en is not None:
        t_en = float(t_en)
        if not np.isfinite(t_en) or t_en <= 0:
            raise ValueError(f"t_en must be a finite number > 0, got {t_en}")
        out[reference_lang] = _threshold(reference_lang, ref, t_en, None, GIVEN)
    else:
        if not 0.0 < tail_proportion <= 1.0:
            raise ValueError(f"tail_proportion must be in (0, 1], got {tail_proportion}")
        out[reference_lang] = _from_p(reference_lang, ref, tail_proportion, 0)
    p = reference_t_to_p(ref, out[reference_lang].t)
    for lang in sorted(counts):
        if lang != reference_lang:
            c = np.asarray(counts[lang], dtype=np.uint64)
            out[lang] = _from_p(lang, c, p, min_matches)
    return out


def _from_p(lang: str, c: np.ndarray, p: float, min_matches: int) -> LanguageThreshold:
    total = int(c.sum())
    if total == 0:
        return _threshold(lang, c, 1.0, None, NO_MATCHES)
    if total < min_matches:
        return _threshold(lang, c, float(c.max()), None, KEPT_WHOLE)
    raw = reference_p_to_t(c, p)
    floor = int(c[c > 0].min())
    if raw < floor:
        return _threshold(lang, c, float(floor), float(raw), FLOOR_MIN_COUNT)
    return _threshold(lang, c, float(raw), float(raw), P_TO_T)


def _threshold(
    lang: str, c: np.ndarray, t: float, raw: float | None, rule: str
) -> LanguageThreshold:
    return LanguageThreshold(
        lang=lang,
        matches=int(c.sum()),
        entries_matched=int(np.count_nonzero(c)),
        t=t,
        t_p_to_t=raw,
        tail_proportion=reference_t_to_p(c, t),
        rule=rule,
    )


def language_probabilities(
    counts: Mapping[str, np.ndarray], thresholds: Mapping[str, LanguageThreshold]
) -> dict[str, np.ndarray]:
    """Entry probabilities per language: count_to_prob(counts[lang], thresholds[lang].t)."""
    missing = sorted(set(counts) - set(thresholds))
    if missing:
        raise ValueError(f"no threshold for languages {missing}; run per_language_t on the counts")
    return {lang: count_to_prob(c, thresholds[lang].t) for lang, c in counts.items()}


def language_index(
    langs: pa.Array | pa.ChunkedArray, languages: Sequence[str], fallback: str | None = OTHER
) -> np.ndarray:
    """Position in `languages` of each row's metadata language (int64): its `lang` if listed,
    else `fallback` (MetaCLIP 2's `other`) if listed, else -1 (no metadata). Null is unlisted."""
    if isinstance(langs, pa.ChunkedArray):
        langs = langs.combine_chunks() if langs.num_chunks else pa.array([], pa.string())
    if not (pa.types.is_string(langs.type) or pa.types.is_large_string(langs.type)):
        langs = pc.cast(langs, pa.string())
    idx = pc.index_in(langs, value_set=pa.array(list(languages), type=langs.type))
    miss = -1
    if fallback is not None and fallback in languages:
        miss = list(languages).index(fallback)
    return pc.fill_null(idx, miss).to_numpy(zero_copy_only=False).astype(np.int64)


def count_per_language(
    langs: pa.Array | pa.ChunkedArray,
    entry_ids: pa.Array | pa.ChunkedArray,
    sizes: Mapping[str, int],
    fallback: str | None = OTHER,
) -> dict[str, np.ndarray]:
    """Matches per (language, entry) from a `lang` and an `entry_ids` column: one uint64 vector
    per language of `sizes` (entries per language), all of them, zeros included.

    Rows resolve to a language as in `language_index`. Raises ValueError for an entry id out of
    range for its row's language, or a row with matches whose language has no metadata (both
    mean the rows were matched against other metadata).
    """
    languages = sorted(sizes)
    idx = language_index(langs, languages, fallback)
    if isinstance(entry_ids, pa.ChunkedArray):
        entry_ids = (
            entry_ids.combine_chunks() if entry_ids.num_chunks else pa.array([], entry_ids.type)
        )
    if len(entry_ids) != len(idx):
        raise ValueError(f"lang has {len(idx)} rows but entry_ids has {len(entry_ids)}")
    flat = pc.list_flatten(entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = pc.list_parent_indices(entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    li = idx[parents]
    if len(li) and int(li.min()) < 0:
        row = int(parents[np.flatnonzero(li < 0)[0]])
        raise ValueError(
            f"row {row} has entry ids but its language has no metadata in this set; the rows "
            "were matched against a different metadata set"
        )
    size = np.array([sizes[lang] for lang in languages], dtype=np.int64)
    offsets = np.zeros(len(languages) + 1, dtype=np.int64)
    np.cumsum(size, out=offsets[1:])
    bad = np.flatnonzero(flat >= size[li]) if len(flat) else flat
    if len(bad):
        j = int(bad[0])
        raise ValueError(
            f"entry id {int(flat[j])} is out of range for language {languages[li[j]]!r} with "
            f"{int(size[li[j]])} entries; the rows were matched against other metadata"
        )
    total = np.bincount(offsets[li] + flat, minlength=int(offsets[-1])).astype(np.uint64)
    return {lang: total[offsets[i] : offsets[i + 1]] for i, lang in enumerate(languages)}


def merge_language_counts(*parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum per-language count vectors (e.g. of shards); a language's vectors must agree in length."""
    out: dict[str, np.ndarray] = {}
    for part in parts:
        for lang, c in part.items():
            c = np.asarray(c, dtype=np.uint64)
            if lang not in out:
                out[lang] = c.copy()
            elif len(out[lang]) != len(c):
                raise ValueError(
                    f"language {lang!r}: count vectors of {len(out[lang])} and {len(c)} entries; "
                    "they were counted with different metadata"
                )
            else:
                out[lang] += c
    return dict(sorted(out.items()))


def write_language_counts(url: str, counts: Mapping[str, np.ndarray]) -> None:
    """Write per-language counts as Parquet with columns lang, entry_id (uint32), count (uint64):
    one row per entry of every language, languages sorted, ids 0..N-1 (atomic write)."""
    import pyarrow.parquet as pq

    from curation.core import fsio

    langs = sorted(counts)
    vecs = [np.asarray(counts[lang], dtype=np.uint64) for lang in langs]
    n = [len(v) for v in vecs]
    lang_col = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(langs), dtype=np.int32), n)), pa.array(langs, pa.string())
    ).cast(pa.string())
    ids = np.concatenate([np.arange(k, dtype=np.uint32) for k in n]) if n else np.empty(0, "u4")
    cnt = np.concatenate(vecs) if vecs else np.empty(0, np.uint64)
    table = pa.table(
        {"lang": lang_col, "entry_id": pa.array(ids, pa.uint32()), "count": pa.array(cnt)}
    )
    with fsio.atomic_open(url) as f:
        pq.write_table(table, f)


def read_language_counts(url: str) -> dict[str, np.ndarray]:
    """Per-language counts from `write_language_counts`' Parquet; each language's rows must be
    contiguous with entry_id 0..N-1 in order (ValueError naming the language otherwise)."""
    import pyarrow.parquet as pq

    from curation.core import fsio

    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["lang", "entry_id", "count"])
    enc = pc.dictionary_encode(table.column("lang")).combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = enc.dictionary.to_pylist()
    ids = table.column("entry_id").to_numpy().astype(np.int64)
    cnt = table.column("count").to_numpy().astype(np.uint64)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else codes
    ends = np.r_[starts[1:], len(codes)]
    out: dict[str, np.ndarray] = {}
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        lang = names[codes[s]]
        if lang in out:
            raise ValueError(f"{url}: the rows of language {lang!r} are not contiguous")
        if not np.array_equal(ids[s:e], np.arange(e - s)):
            raise ValueError(f"{url}: entry_id of language {lang!r} must be 0..N-1 in order")
        out[lang] = cnt[s:e]
    return out
