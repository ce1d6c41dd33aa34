"""`curation filter`: a DataComp baseline over a pool, per shard on Ray, resumable.

Pass 1 (only for filters with a global parameter, e.g. top 30% by CLIP score) scores every shard
in a Ray task and returns the scores; the driver fits the global threshold (the barrier). Pass 2
runs one task per shard through the runner: the kept rows go to `OUT/part-<shard>.parquet`, the
marker holds rows read / written / dropped by reason (each dropped row counted once, under the
first condition it fails, in the filter's order). Then the driver writes DataComp's uid file
`OUT/uids.npy` (sorted `u8,u8`) from the kept parts, and `OUT/manifest.json`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import datacomp, fsio
from curation.runner import Shard, part_url, run_stage, write_marker


def _read(filt: Any, url: str, all_columns: bool) -> pa.Table:
    embeddings = [c for c in filt.columns if c in datacomp.EMBEDDING_KEYS]
    if all_columns:
        return datacomp.read_shard(url, embeddings=embeddings)
    columns = ["uid", *(c for c in filt.columns if c not in embeddings and c != "uid")]
    return datacomp.read_shard(url, columns=columns, embeddings=embeddings)


def score_task(url: str, filt: Any) -> dict[str, np.ndarray]:
    """Pass 1: one shard's scores (for the global fit)."""
    filt.setup()
    return filt.score(_read(filt, url, all_columns=False))


def first_failure_counts(conditions: dict[str, np.ndarray], n: int) -> Counter:
    """rows_dropped_<reason> with each dropped row counted once, under its first failed reason."""
    counts: Counter = Counter()
    alive = np.ones(n, dtype=bool)
    for reason, ok in conditions.items():
        fail = alive & ~ok
        counts[f"rows_dropped_{reason.replace('/', '_')}"] = int(fail.sum())
        alive &= ok
    return counts


def keep_task(shard: Shard, stage_dir: str, filt: Any) -> dict:
    """Pass 2: keep rows of one shard, write the part (without embeddings) and the marker."""
    filt.setup()
    table = _read(filt, shard.input, all_columns=True)
    scores = filt.score(table)
    conds = filt.conditions(scores)
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    for ok in conds.values():
        keep &= ok
    counts = first_failure_counts(conds, n)
    counts["rows_read"] = n
    emb = [c for c in table.column_names if c in datacomp.EMBEDDING_KEYS]
    kept = table.drop_columns(emb).filter(pa.array(keep))
    fsio.atomic_write_parquet(part_url(stage_dir, shard.name), kept)
    counts["rows_written"] = kept.num_rows
    stats = {"shard": shard.name, "input": shard.input, "counts": dict(sorted(counts.items()))}
    write_marker(stage_dir, shard.name, stats)
    return stats


def run_filter(
    filt: Any,
    inputs: Sequence[str],
    out: str,
    *,
    params: dict[str, Any],
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `filt` over the DataComp-layout shards `inputs` into `out`; returns the summary."""
    import ray

    from curation.pipeline import public, summarize, versions
    from curation.runner import shard_names

    urls = datacomp.list_shards(list(inputs))
    if not urls:
        raise FileNotFoundError(f"no .parquet shards in {list(inputs)}")
    shards = shard_names(urls)
    fit_info: dict[str, Any] = {}
    if filt.needs_fit:
        remote = ray.remote(num_cpus=1, max_retries=3)(score_task)
        refs = [remote.remote(u, filt) for u in urls]
        filt.fit([ray.get(r) for r in refs])
        fit_info = {
            k: getattr(f, k)
            for f in getattr(filt, "filters", [filt])
            for k in ("threshold",)
            if getattr(f, k, None) is not None
        }
    sizes = [[s.name, (datacomp_size(s.input))] for s in shards]
    fp = {"stage": "filter", "params": params, "inputs": sizes, "fit": fit_info}
    markers = run_stage(
        "filter", out, shards, keep_task, (filt,), fp=fp, overwrite=overwrite, progress=progress
    )
    summary = summarize("filter", markers)
    uids = [pq.read_table(part_url(out, s.name), columns=["uid"]).column("uid") for s in shards]
    all_uids = pa.chunked_array([c for col in uids for c in col.chunks], type=pa.string())
    n_uids = datacomp.save_uids(fsio.join(out, "uids.npy"), all_uids)
    manifest = {
        "stage": "filter",
        "params": params,
        "fit": fit_info,
        "versions": versions(),
        "summary": public(summary),
        "outputs": {"subset": out, "uids": fsio.join(out, "uids.npy"), "uid_count": n_uids},
    }
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), manifest)
    summary["fit"] = fit_info
    summary["uid_count"] = n_uids
    return summary


def datacomp_size(url: str) -> int | None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    try:
        return fs.info(path).get("size")
    except FileNotFoundError:
        return None
