"""The filter contract (score, then decide), caption statistics and the global threshold.

A DataComp filter splits scoring from deciding: `score(table)` gives per-row arrays that can
be stored, `conditions(scores)` says which rows pass each test, `keep` is their AND.
Filters with a top-fraction rule are fitted once over the whole pool first (`fit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.select import check_request, threshold_of_parts

Scores = Mapping[str, np.ndarray]
#: (score key, fraction, mode): a global threshold a filter needs (see `Filter.quantile_requests`).
QuantileRequest = tuple[str, float, str]
LanguageFn = Callable[[pa.Array | pa.ChunkedArray], np.ndarray]

# Python's str.split() whitespace (every c with chr(c).isspace()), as an RE2 class body.
_PY_WS = (
    r"\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}"
    r"\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
)
# fastText's Dictionary::readWord separators: space, \n, \r, \t, \v, \f, \0.
_FT_WS = r" \n\r\t\x0b\x0c\x00"


# --------------------------------------------------------------------------------------------
# Caption statistics (whole columns)


def _texts(table_or_texts: pa.Table | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    texts = (
        table_or_texts.column("text") if isinstance(table_or_texts, pa.Table) else table_or_texts
    )
    # DataComp would fail on a null caption (len(None)); here it counts as the empty caption.
    return pc.fill_null(texts, "") if texts.null_count else texts


def caption_word_count(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Words as Python's `len(text.split())` counts them (DataComp's basic filter), vectorized."""
    counts = pc.count_substring_regex(_texts(texts), f"[^{_PY_WS}]+")
    return np.asarray(counts.to_numpy(zero_copy_only=False), dtype=np.int64)


def fasttext_token_count(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Tokens as `len(fasttext.tokenize(text))` counts them (DataComp's `caption_filter`).

    fastText splits on space, `\\n`, `\\r`, `\\t`, `\\v`, `\\f` and NUL, and every `\\n` is an
    extra end-of-sentence token `</s>` (Dictionary::readWord), so a newline adds one.
    """
    t = _texts(texts)
    words = pc.count_substring_regex(t, f"[^{_FT_WS}]+").to_numpy(zero_copy_only=False)
    newlines = pc.count_substring(t, "\n").to_numpy(zero_copy_only=False)
    return np.asarray(words, dtype=np.int64) + np.asarray(newlines, dtype=np.int64)


def caption_char_count(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Characters as Python's `len(text)` counts them (code points)."""
    return np.asarray(pc.utf8_length(_texts(texts)).to_numpy(zero_copy_only=False), np.int64)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        raise ValueError(f"table has no column {name!r} (has {table.column_names})")
    col = pc.cast(table.column(name), pa.float64())
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls -> NaN


# --------------------------------------------------------------------------------------------
# Global threshold (the barrier for "top fraction" filters)


def global_threshold(
    scores: Iterable[np.ndarray | pa.Array | pa.ChunkedArray] | np.ndarray,
    fraction: float,
    mode: str = "datacomp",
) -> float:
    """The score threshold that keeps the top `fraction` of the whole pool with `score >= t`.

    `mode="datacomp"` mirrors `get_threshold` in DataComp's `baselines/apply_filter.py`:
    `n = int(len(all) * fraction)` and `t = -np.sort(-all)[n]`, the (n+1)-th largest score
    (0-based index n of the descending order, NaN sorted last), applied as `score >= t`. Its
    quirk: it keeps n + 1 rows (more with ties at t), one more than the fraction. NaN/null
    scores count in `len(all)` but sort last, so when n + 1 is more than the non-NaN scores,
    index n falls on a NaN: the threshold is NaN and `>=` keeps nothing. This mode keeps that
    (DataComp parity); DataComp raises IndexError when n == len(all) (fraction 1.0), where this
    returns -inf (keep every non-NaN score).

    `mode="exact"` is the corrected rule: t is the n-th largest score, so `>= t` keeps exactly
    n rows when there are no ties at t (ties at t are all kept); n == 0 gives +inf. When n covers
    every non-NaN score (e.g. fraction 1.0 with a null score) t is -inf: every row with a score
    is kept (fewer than n rows: a NaN cannot be ranked), never NaN.

    `scores` is one array or an iterable of per-shard arrays (e.g. each shard's `clip_score`);
    the threshold is selected by `core.select.threshold_of_parts` (no concatenation, no full
    sort), the radix selection `flows.filter` runs over Ray for a pool too large for one
    process, so both give the same bits; -0.0 comes back as 0.0. A NaN threshold must not go
    into JSON (NaN != NaN: a fingerprint holding it never matches); `fitted()` writes it with
    `json_number`.
    """
    check_request(fraction, mode)
    if isinstance(scores, np.ndarray):
        parts = [scores]
    else:
        parts = [
            np.asarray(s.to_numpy(zero_copy_only=False) if hasattr(s, "to_numpy") else s)
            for s in scores
        ]
    return threshold_of_parts(
        [np.asarray(p, dtype=np.float64).ravel() for p in parts], fraction, mode
    )


def json_number(x: float) -> float | str:
    """`x` for JSON: a finite float as is, else `"nan"`, `"inf"` or `"-inf"`.

    Python's `json` would write NaN / Infinity, which is not JSON, and NaN != NaN makes a stage
    fingerprint holding it differ from itself, so every rerun would be refused as changed.
    """
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


# --------------------------------------------------------------------------------------------
# Filters


class Filter:
    """Base of the filters: `score` per row, `conditions` per reason, `keep` = AND of them."""

    name = "filter"
    #: How `steps` combine: "and" (every step keeps the row) or "or" (any step does).
    combine = "and"
    #: Input columns `score` reads (embedding columns included).
    columns: tuple[str, ...] = ()

    @property
    def embedding_columns(self) -> tuple[str, ...]:
        """The columns of `columns` that are embeddings: a Parquet column or the `.npz`'s."""
        return ()

    def setup(self) -> None:
        """Load models once per worker; the default has nothing to load."""

    def prepare(self) -> None:
        """One-time work on the driver before the filter is shipped to workers (default none)."""

    def assets(self) -> dict[str, str]:
        """Files a worker opens (`Stage.assets`); default: the `language` model's, if any."""
        lang = getattr(self, "language", None)
        return dict(lang.assets()) if hasattr(lang, "assets") else {}

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Open those files at local copies (`Stage.use_assets`); default: `language`'s."""
        lang = getattr(self, "language", None)
        if hasattr(lang, "use_assets"):
            lang.use_assets(paths)

    @property
    def needs_fit(self) -> bool:
        """True while a global threshold is still missing (call `fit` with all shards' scores)."""
        return False

    @property
    def fit_columns(self) -> tuple[str, ...]:
        """The columns `score_for_fit` reads (none once fitted)."""
        return self.columns if self.needs_fit else ()

    def score_for_fit(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The scores `fit` needs (pass 1 of the barrier); empty when nothing is to be fitted."""
        return self.score(table) if self.needs_fit else {}

    def quantile_requests(self) -> list[QuantileRequest]:
        """The global thresholds still missing, as (score key of `score_for_fit`, fraction,
        mode) of `global_threshold`; the runner selects each over the whole pool and hands it
        to `set_quantile`, without gathering the scores (the default asks for none)."""
        return []

    def set_quantile(self, key: str, value: float) -> None:
        """Take the threshold of the `quantile_requests` entry for score `key`."""
        raise KeyError(f"{self.name}: no quantile was requested for score {key!r}")

    def fit(self, all_scores: Sequence[Scores]) -> None:
        """Compute global parameters from every shard's scores (in memory).

        The default answers `quantile_requests` with `global_threshold` over the scores;
        filters with other global parameters override it.
        """
        for key, fraction, mode in self.quantile_requests():
            self.set_quantile(key, global_threshold([s[key] for s in all_scores], fraction, mode))

    def fitted(self) -> dict[str, dict[str, Any]]:
        """Global parameters computed by `fit`, keyed by filter name (for the manifest)."""
        return {}

    def steps(self, scores: Scores) -> list[tuple[str, np.ndarray]]:
        """(name, kept mask) of each step: one for a plain filter, one per filter combined."""
        return [(self.name, self.keep(scores))]

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Per-row scores of one shard (NumPy arrays keyed by name)."""
        raise NotImplementedError

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """For each reason, the rows that pass it."""
        raise NotImplementedError

    def keep(self, data: pa.Table | Scores) -> np.ndarray:
        """Boolean mask of the rows kept: every condition holds."""
        scores = self.score(data) if isinstance(data, pa.Table) else data
        conds = self.conditions(scores)
        n = len(next(iter(scores.values()))) if scores else 0
        mask = np.ones(n, dtype=bool)
        for c in conds.values():
            mask &= c
        return mask

    def dropped(self, scores: Scores) -> dict[str, int]:
        """Rows failing each condition (`dropped_<reason>` counters; a row may fail several)."""
        return {f"dropped_{k}": int((~v).sum()) for k, v in self.conditions(scores).items()}

    def _check_columns(self, table: pa.Table) -> None:
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{self.name}: table lacks column(s) {missing}; embeddings come from a Parquet "
                f"column or the .npz beside the shard (datacomp.read_shard(url, embeddings=[...]))"
            )
