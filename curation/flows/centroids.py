"""`curation filter centroids`: the pool k-means centroids DataComp's image-based baseline needs.

Mirrors mlfoundations/datacomp `baselines/image_based_clustering.py`:

1. per shard, on a Ray task (`stages.filters.image_based.shard_training_embeddings`): the image
   embeddings (`l14_img` of the `.npz` beside a DataComp shard, or the `image_embedding` column
   of `curation score` output) of the rows that pass DataComp's `caption_filter` (fastText
   English, > 1 fastText token, > 5 characters), optionally sub-sampled with replacement
   (`sample_ratio`, seeded per shard so the draw does not depend on scheduling);
2. one k-means task, started when every shard's share is ready, stacks them in shard order
   (float32) and runs `train_centroids`: `faiss.Clustering` with `niter=20`, `seed`,
   `max_points_per_centroid=10_000_000` (faiss uses every point) and an exact L2 flat index,
   replicated over every GPU of its node when faiss-gpu sees some (ask for them with `gpus`),
   on the CPU otherwise. As in DataComp the embeddings are used as given: no normalization, not
   spherical (the pool's embeddings are already unit vectors).

The training rows go from the shard tasks to the k-means task through the object store, never
through the driver, which only receives the `(k, d)` centroids and writes `OUT.npy` (float32,
what `curation filter apply --centroids` reads) and `OUT.json` (what was done: rows read,
caption-filtered and sampled per shard, settings). The k-means node holds the whole training
set (rows x dim x 4 bytes, as DataComp's script): sample for pools larger than its memory.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from curation.core import fsio
from curation.io import datacomp
from curation.stages.filters.base import LanguageFn
from curation.stages.filters.image_based import shard_training_embeddings, train_centroids
from curation.stages.filters.language import LanguageId

__all__ = ["build_centroids", "default_embedding_key"]


def default_embedding_key(shard_url: str) -> str:
    """`image_embedding` for `curation score` output (a Parquet column), else DataComp's
    `l14_img` (the `.npz` beside the shard)."""
    return (
        "image_embedding" if "image_embedding" in datacomp.parquet_columns(shard_url) else "l14_img"
    )


def _shard_rows(
    item: tuple[int, str],
    key: str,
    language: LanguageFn | None,
    shipment: dict[str, Any],
    sample_ratio: float | None,
    seed: int,
) -> tuple[np.ndarray, dict[str, int]]:
    """Task body: one shard's training rows and counts (the language model set up from its
    local copy)."""
    from curation.executor.runner import local_files

    index, url = item
    if language is not None:
        getattr(language, "use_assets", lambda _: None)(local_files(shipment))
        getattr(language, "setup", lambda: None)()
    return shard_training_embeddings(
        url, index, key, language is not None, language, sample_ratio, seed
    )


def _kmeans(k: int, seed: int, niter: int, *parts: np.ndarray) -> np.ndarray:
    """Task body: k-means over the shards' rows in shard order, on every core of the node
    (the shard tasks it waits for are done by the time it runs)."""
    import faiss

    if hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    x = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return train_centroids(x, k, seed=seed, niter=niter)


def build_centroids(
    pool: Sequence[str],
    out: str,
    k: int,
    key: str | None = None,
    sample_ratio: float | None = None,
    seed: int = 0,
    caption_filtering: bool = True,
    language: LanguageFn | None = None,
    niter: int = 20,
    gpus: float = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the pool's k-means centroids on the Ray cluster and write `out` (`.npy`) and its
    record (`.json` beside it); returns the record.

    `pool` is folders, files or globs of `.parquet` shards; `key` defaults to
    `default_embedding_key` of the first shard; `gpus` is what the k-means task asks Ray for
    (0: a CPU node, k-means on faiss' CPU index). Arguments are checked before any work.
    """
    from curation.executor.runner import map_then_combine, ship_files

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if niter < 1:
        raise ValueError(f"niter must be at least 1, got {niter}")
    if sample_ratio is not None and sample_ratio <= 0:
        raise ValueError(f"sample_ratio must be > 0 (a fraction of each shard), got {sample_ratio}")
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    if not out.endswith(".npy"):
        raise ValueError(f"{out}: the centroids are written as .npy; name a .npy file")
    shards = datacomp.list_shards(list(pool))
    if not shards:
        raise ValueError(f"no .parquet shards in {list(pool)}")
    key = key or default_embedding_key(shards[0])
    lang = (language if language is not None else LanguageId()) if caption_filtering else None
    shipment = ship_files(getattr(lang, "assets", dict)()) if lang is not None else {}

    def enough(per_shard: list[dict[str, int]]) -> None:
        if sum(c["sampled"] for c in per_shard) < k:
            raise ValueError(
                f"need at least k={k} training embeddings, got "
                f"{sum(c['sampled'] for c in per_shard)} (of {sum(c['rows'] for c in per_shard)} "
                "rows read); lower --k, use more shards or a larger --sample-ratio"
            )

    per_shard, centroids = map_then_combine(
        _shard_rows,
        list(enumerate(shards)),
        key,
        lang,
        shipment,
        sample_ratio,
        seed,
        combine=_kmeans,
        combine_args=(k, seed, niter),
        combine_gpus=gpus,
        check=enough,
        progress="centroids" if progress else None,
    )
    sampled = sum(c["sampled"] for c in per_shard)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(centroids, dtype=np.float32))
    fsio.atomic_write_bytes(out, buf.getvalue())
    record = {
        "out": out,
        "shape": list(centroids.shape),
        "key": key,
        "k": k,
        "seed": seed,
        "niter": niter,
        "caption_filtering": caption_filtering,
        "sample_ratio": sample_ratio,
        "max_points_per_centroid": 10_000_000,
        "shards": len(shards),
        "rows_read": sum(c["rows"] for c in per_shard),
        "rows_caption_passed": sum(c["caption_passed"] for c in per_shard),
        "training_rows": sampled,
        "inputs": [{"input": u, **c} for u, c in zip(shards, per_shard, strict=True)],
    }
    fsio.atomic_write_bytes(
        out[: -len(".npy")] + ".json",
        (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
    )
    return record
