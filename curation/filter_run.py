"""`curation filter`: DataComp baselines and their combinations over a pool, on Ray, resumable.

Input: a DataComp-layout pool (Parquet + `.npz` embeddings) or our scored output (Parquet parts
with `clip_score` and `fixed_size_list` embedding columns); `datacomp.read_shard` reads either.
Pass 1 (only for filters with a global parameter, e.g. top 30% by CLIP score) reads each shard's
score column in a Ray task and returns it; the driver fits the global threshold (the barrier).
Pass 2 runs one task per shard through the runner: the kept rows go to
`OUT/part-<shard>.parquet` with the input's Parquet columns (embeddings read from an `.npz` are
not copied), and the marker holds rows read / written / dropped by reason (each dropped row
counted once, under the first condition it fails, in the filter's order) and each step's rows
in / kept. Then the driver writes DataComp's uid file `OUT/uids.npy` (sorted `u8,u8`) from the
kept parts, when every kept uid is 32 hex digits (else the manifest says why it is absent), and
`OUT/manifest.json`.

Composition (`filters.AllOf` / `AnyOf`, a job spec's `filters: {combine, steps}`): every step
is scored and fitted on the same input rows (a top fraction is of the whole input, as in
DataComp's `image_based_intersect_clip_score`); `and` keeps a row every step keeps, `or` a row
some step keeps. Per step the manifest gives `rows_in` / `rows_kept` read in order (`and`: a
row leaves at its first failing step; `or`: it is kept by its first passing step, and the next
step sees the rest) and `rows_passed_alone` (the step on its own over all rows). In a job
(`pipeline.run_job`), MetaCLIP balancing runs before the filter stage (filters then read the
balanced rows, and fit on them) or after it (balancing counts only the filtered rows).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import datacomp, fsio
from curation.runner import Shard, finish_part, part_url, run_stage, shard_names

#: Row index into the pool shard, added by jobs so derived tables can find `.npz` embeddings.
POOL_ROW = "pool_row"


def pool_shards(urls: Sequence[str]) -> list[Shard]:
    """Shards of a pool; a scored folder's `part-X.parquet` is shard `X` (not `part-X`)."""
    shards = shard_names(urls)
    stripped = [Shard(name=s.name.removeprefix("part-") or s.name, input=s.input) for s in shards]
    names = [s.name for s in stripped]
    return stripped if len(set(names)) == len(names) else shards


def _options(pool_urls: Mapping[str, str] | None, row_index: bool) -> dict[str, Any]:
    return {"pool_urls": dict(pool_urls or {}), "row_index": row_index}


def _load(
    filt: Any, shard: Shard, opts: Mapping[str, Any], columns: Sequence[str] | None
) -> tuple[pa.Table, list[str]]:
    """The table `filt` reads for one shard (all columns when `columns` is None), and the
    columns its output keeps.

    The shard is a pool shard, or (`opts["pool_urls"]` names its pool shard) a table derived
    from one with a `pool_row` column, whose missing embeddings are read from the pool shard's
    `.npz` (or Parquet) at those rows.
    """
    emb = list(filt.embedding_columns)
    pool_url = opts["pool_urls"].get(shard.name)
    if pool_url is None:
        names = datacomp.parquet_columns(shard.input)
        cols = None
        if columns is not None:
            cols = [c for c in dict.fromkeys(["uid", *columns]) if c not in emb]
        table = datacomp.read_shard(shard.input, columns=cols, embeddings=emb)
        if opts["row_index"] and POOL_ROW not in names:
            rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
            table = table.append_column(POOL_ROW, rows)
            names = [*names, POOL_ROW]
        return table, [c for c in table.column_names if c in names]
    names = datacomp.parquet_columns(shard.input)
    cols = None
    if columns is not None:
        cols = [c for c in dict.fromkeys(["uid", POOL_ROW, *columns]) if c not in emb or c in names]
    fs, path = _fs(shard.input)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=cols)
    keep_cols = list(table.column_names)
    need = [e for e in emb if e not in table.column_names]
    if need:
        if POOL_ROW not in table.column_names:
            raise ValueError(
                f"{shard.input}: no {POOL_ROW!r} column to find embeddings {need} in {pool_url}"
            )
        for key, col in datacomp.read_embeddings(pool_url, need, table.column(POOL_ROW)).items():
            table = table.append_column(key, col)
    return table, keep_cols


def _fs(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def score_task(shard: Shard, filt: Any, opts: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Pass 1: one shard's scores for the global fit (only the columns the fit needs)."""
    table, _ = _load(filt, shard, opts, list(filt.fit_columns))
    return filt.score_for_fit(table)


def first_failure_counts(conditions: dict[str, np.ndarray], n: int) -> Counter:
    """rows_dropped_<reason> with each dropped row counted once, under its first failed reason."""
    counts: Counter = Counter()
    alive = np.ones(n, dtype=bool)
    for reason, ok in conditions.items():
        fail = alive & ~ok
        counts[f"rows_dropped_{reason.replace('/', '_')}"] = int(fail.sum())
        alive &= ok
    return counts


def step_counts(filt: Any, scores: Mapping[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    """Each step's rows in / kept, read in order (see the module docstring), and alone."""
    out = []
    left = np.ones(n, dtype=bool)  # and: rows still in; or: rows not yet kept
    for name, ok in filt.steps(scores):
        entry = {"name": name, "rows_in": int(left.sum()), "rows_passed_alone": int(ok.sum())}
        if filt.combine == "or":
            entry["rows_kept"] = int((left & ok).sum())
            left &= ~ok
        else:
            left &= ok
            entry["rows_kept"] = int(left.sum())
        out.append(entry)
    return out


def keep_task(shard: Shard, stage_dir: str, filt: Any, opts: Mapping[str, Any]) -> dict:
    """Pass 2: keep rows of one shard, write the part (input columns only) and the marker."""
    filt.setup()
    table, keep_cols = _load(filt, shard, opts, None)
    scores = filt.score(table)
    conds = filt.conditions(scores)
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    for ok in conds.values():
        keep &= ok
    counts = first_failure_counts(conds, n)
    counts["rows_read"] = n
    kept = table.select(keep_cols).filter(pa.array(keep))
    return finish_part(stage_dir, shard, kept, counts, steps=step_counts(filt, scores, n))


def check_pool(filt: Any, url: str, extra: Sequence[str] = ()) -> None:
    """Fail before any work when the pool shard `url` lacks what `filt` (or `extra`) reads."""
    emb = list(filt.embedding_columns)
    cols = [c for c in dict.fromkeys(["uid", *extra, *filt.columns]) if c not in emb]
    datacomp.check_shard_columns(url, cols, emb, who=filt.name)


def filter_stage(
    filt: Any,
    shards: Sequence[Shard],
    stage_dir: str,
    *,
    fp: dict[str, Any],
    pool_urls: Mapping[str, str] | None = None,
    row_index: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit (pass 1, when needed) and apply `filt` to `shards` into `stage_dir`; the summary.

    `pool_urls` maps shard names to their pool shards when the shards are derived tables with
    a `pool_row` column (embeddings come from there); `row_index` adds `pool_row` to the output
    of pool shards. `fp` is the stage fingerprint (the fitted parameters are added to it).
    """
    import ray

    from curation.pipeline import summarize

    opts = _options(pool_urls, row_index)
    filt.prepare()
    if filt.needs_fit:
        ref = ray.put(filt)
        remote = ray.remote(num_cpus=1, max_retries=3)(score_task)
        refs = [remote.remote(s, ref, opts) for s in shards]
        filt.fit([ray.get(r) for r in refs])
    fit = filt.fitted()
    markers = run_stage(
        "filter",
        stage_dir,
        shards,
        keep_task,
        (ray.put(filt), opts),
        fp={**fp, "fit": fit},
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize("filter", markers)
    summary["combine"] = filt.combine
    summary["steps"] = _sum_steps(markers)
    summary["fit"] = fit
    summary["_markers"] = markers
    return summary


def _sum_steps(markers: Mapping[str, dict]) -> list[dict[str, Any]]:
    total: dict[str, Counter] = {}
    for m in markers.values():
        for step in m.get("steps", []):
            c = total.setdefault(step["name"], Counter())
            c.update({k: v for k, v in step.items() if k != "name"})
    return [{"name": name, **dict(sorted(c.items()))} for name, c in total.items()]


def write_uid_file(out: str, stage_dir: str, shards: Sequence[Shard]) -> dict[str, Any]:
    """DataComp's uid file `OUT/uids.npy` from the kept parts, or why it was not written."""
    cols = [
        pq.read_table(part_url(stage_dir, s.name), columns=["uid"]).column("uid") for s in shards
    ]
    uids = pa.chunked_array([c for col in cols for c in col.chunks], type=pa.string())
    problem = datacomp.uid_file_problem(uids, where=stage_dir)
    url = fsio.join(out, "uids.npy")
    if problem is not None:
        fs, path = _fs(url)
        if fs.exists(path):  # a uid file of an earlier run would not match these parts
            fs.rm(path)
        return {"uids": None, "uid_count": None, "uid_file_skipped": problem}
    return {"uids": url, "uid_count": datacomp.save_uids(url, uids)}


def run_filter(
    filt: Any,
    inputs: Sequence[str],
    out: str,
    *,
    params: dict[str, Any],
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `filt` over the pool shards `inputs` into `out`; returns the summary.

    Checks before any work that the first shard has every column and embedding the filter
    reads, and prepares the filter once on the driver.
    """
    from curation.pipeline import public, versions

    urls = datacomp.list_shards(list(inputs))
    if not urls:
        raise FileNotFoundError(f"no .parquet shards in {list(inputs)}")
    check_pool(filt, urls[0])
    shards = pool_shards(urls)
    sizes = [[s.name, datacomp_size(s.input)] for s in shards]
    fp = {"stage": "filter", "params": params, "inputs": sizes}
    summary = filter_stage(filt, shards, out, fp=fp, overwrite=overwrite, progress=progress)
    summary.pop("_markers")
    uid_info = write_uid_file(out, out, shards)
    manifest = {
        "stage": "filter",
        "params": params,
        "fit": summary["fit"],
        "versions": versions(),
        "summary": public(summary),
        "outputs": {"subset": out, **uid_info},
    }
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), manifest)
    summary.update(uid_info)
    return summary


def datacomp_size(url: str) -> int | None:
    """Size in bytes of a shard (None when it is gone), for the stage fingerprint."""
    fs, path = _fs(url)
    try:
        return fs.info(path).get("size")
    except FileNotFoundError:
        return None
