"""DataComp baselines on metadata columns: no filter, CLIP score, LAION-2B, basic."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from curation.stages.filters.base import (
    Filter,
    LanguageFn,
    QuantileRequest,
    Scores,
    _float_column,
    caption_char_count,
    caption_word_count,
    json_number,
)
from curation.stages.filters.language import LanguageId


class NoFilter(Filter):
    """Keep every row (DataComp `no_filter`: `load_uids`)."""

    name = "no_filter"
    columns = ("uid",)

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """One all-true column (`present`) so the row count travels with the scores."""
        return {"present": np.ones(table.num_rows, dtype=bool)}

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """No condition: every row passes."""
        return {}


_CLIP_KEYS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}


class ClipScoreFilter(Filter):
    """Keep rows whose CLIP score is `>= threshold` (DataComp `clip_score`).

    Mirrors `load_uids_with_clip_score(_helper)`: the column is `clip_b32_similarity_score`
    for `arch="b32"`, else `clip_l14_similarity_score`, or any `column` (e.g. `clip_score` in
    our scored output); give either a fixed `threshold` (e.g. 0.25 for B/32) or a `fraction`
    (e.g. 0.3 for L/14), which needs `fit` over the whole pool (see `global_threshold`, whose
    `mode` is `threshold_mode`). A NaN/null score is dropped.
    """

    name = "clip_score"

    def __init__(
        self,
        arch: str = "l14",
        threshold: float | None = None,
        fraction: float | None = None,
        threshold_mode: str = "datacomp",
        column: str | None = None,
    ) -> None:
        if arch not in _CLIP_KEYS:
            raise ValueError(f"arch must be one of {sorted(_CLIP_KEYS)}, got {arch!r}")
        if (threshold is None) == (fraction is None):
            raise ValueError("give exactly one of threshold= (a score) or fraction= (top share)")
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if threshold_mode not in ("datacomp", "exact"):
            raise ValueError(f"threshold_mode must be datacomp or exact, got {threshold_mode!r}")
        self.arch = arch
        self.key = column or _CLIP_KEYS[arch]
        self.columns = (self.key,)
        self.threshold = threshold
        self.fraction = fraction
        self.threshold_mode = threshold_mode

    @property
    def needs_fit(self) -> bool:
        """True until the global threshold for `fraction` is known."""
        return self.threshold is None

    def quantile_requests(self) -> list[QuantileRequest]:
        """The global threshold of `fraction` over `clip_score`, until it is known."""
        if self.fraction is None or self.threshold is not None:
            return []
        return [("clip_score", self.fraction, self.threshold_mode)]

    def set_quantile(self, key: str, value: float) -> None:
        """Take the global threshold (`fit` computes it in memory, `flows.filter` on Ray)."""
        if key != "clip_score" or self.fraction is None:
            super().set_quantile(key, value)
        value = float(value)
        self.threshold = 0.0 if value == 0.0 else value  # -0.0 -> 0.0

    def fitted(self) -> dict[str, dict[str, Any]]:
        """The global threshold of a `fraction` filter, once fitted."""
        if self.fraction is None or self.threshold is None:
            return {}
        return {
            self.name: {
                "threshold": json_number(self.threshold),
                "fraction": self.fraction,
                "threshold_mode": self.threshold_mode,
                "column": self.key,
            }
        }

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The CLIP score column as float64 (null -> NaN)."""
        self._check_columns(table)
        return {"clip_score": _float_column(table, self.key)}

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """`clip_score >= threshold`."""
        if self.threshold is None:
            raise RuntimeError(
                f"{self.name}: fraction={self.fraction} needs the global threshold; call "
                "fit() with the scores of every shard first"
            )
        with np.errstate(invalid="ignore"):
            return {"clip_score": scores["clip_score"] >= self.threshold}


class Laion2bFilter(Filter):
    """LAION-2B reproduction: English AND B/32 CLIP score `>= 0.28` (DataComp `laion2b`).

    DataComp (`load_uids_with_clip_score(..., gcld3_en_filter=True)`) detects English with
    gcld3 (`NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)`, language == "en");
    gcld3 is not used here: `language` defaults to fastText `LanguageId`, and any callable
    mapping a text column to language codes (e.g. a gcld3 wrapper) can be passed instead.
    `column` names another B/32 score column (default `clip_b32_similarity_score`).
    """

    name = "laion2b"

    def __init__(
        self,
        language: LanguageFn | None = None,
        threshold: float = 0.28,
        column: str = "clip_b32_similarity_score",
    ) -> None:
        self.language = language if language is not None else LanguageId()
        self.threshold = threshold
        self.key = column
        self.columns = ("text", column)

    def setup(self) -> None:
        """Load the language-id model."""
        getattr(self.language, "setup", lambda: None)()

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Language code and B/32 CLIP score per row."""
        self._check_columns(table)
        return {
            "lang": self.language(table.column("text")),
            "clip_b32": _float_column(table, self.key),
        }

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """English, and B/32 score `>= threshold`."""
        with np.errstate(invalid="ignore"):
            return {
                "english": scores["lang"] == "en",
                "clip_score": scores["clip_b32"] >= self.threshold,
            }


class BasicFilter(Filter):
    """DataComp `basic_filter` (`load_uids_with_basic_filter_helper` in `apply_filter.py`).

    Keeps rows with fastText language "en", more than 2 words (`len(text.split()) > 2`, i.e. at
    least 3 although the paper speaks of "fewer than two words"), more than 5 characters
    (`len(text) > 5`), `min(width, height) >= 200` and `max / min <= 3.0`.
    """

    name = "basic_filter"
    columns = ("text", "original_width", "original_height")
    MIN_WORDS_EXCLUSIVE = 2
    MIN_CHARS_EXCLUSIVE = 5
    MIN_IMAGE_DIM = 200
    MAX_ASPECT_RATIO = 3.0

    def __init__(self, language: LanguageFn | None = None) -> None:
        self.language = language if language is not None else LanguageId()

    def setup(self) -> None:
        """Load the language-id model."""
        getattr(self.language, "setup", lambda: None)()

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Language, word and character counts, smaller image side and aspect ratio."""
        self._check_columns(table)
        w = _float_column(table, "original_width")
        h = _float_column(table, "original_height")
        lo, hi = np.minimum(w, h), np.maximum(w, h)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = hi / lo  # 0 side -> inf (or NaN for 0x0), which fails `<= 3`, as in pandas
        text = table.column("text")
        return {
            "lang": self.language(text),
            "num_words": caption_word_count(text),
            "num_chars": caption_char_count(text),
            "min_dim": lo,
            "aspect_ratio": aspect,
        }

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """english, caption_words, caption_chars, min_dim, aspect_ratio."""
        with np.errstate(invalid="ignore"):
            return {
                "english": scores["lang"] == "en",
                "caption_words": scores["num_words"] > self.MIN_WORDS_EXCLUSIVE,
                "caption_chars": scores["num_chars"] > self.MIN_CHARS_EXCLUSIVE,
                "min_dim": scores["min_dim"] >= self.MIN_IMAGE_DIM,
                "aspect_ratio": scores["aspect_ratio"] <= self.MAX_ASPECT_RATIO,
            }
