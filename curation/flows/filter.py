"""`curation filter`: DataComp baselines and their combinations over a pool, on Ray, resumable.

Input: a DataComp-layout pool (Parquet + `.npz` embeddings) or our scored output (Parquet parts
with `clip_score` and `fixed_size_list` embedding columns); `datacomp.read_shard` reads either.
Pass 1 (only for filters with a global parameter, e.g. top 30% by CLIP score) finds the global
threshold by an exact radix selection (`fit_quantiles`, `core.select`): Ray tasks read each
shard's score column and only fixed-size histograms reach the driver (the barrier). Pass 2 runs the
filter stage (`stages.filters.apply.FilterStage`) over every shard. Then DataComp's uid file
`OUT/uids.npy` (sorted `u8,u8`) is written from the kept parts, when every kept uid is 32 hex
digits (else the manifest says why it is absent), and `OUT/manifest.json`.

Composition (`filters.AllOf` / `AnyOf`, a job spec's `filters: {combine, steps}`): every step
is scored and fitted on the same input rows (a top fraction is of the whole input, as in
DataComp's `image_based_intersect_clip_score`); `and` keeps a row every step keeps, `or` a row
some step keeps. In a job (`flows.pool`), MetaCLIP balancing runs before the filter stage
(filters then read the balanced rows, and fit on them) or after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from curation.core import fsio, select
from curation.core.accounting import summarize, write_stage_manifest
from curation.core.fingerprint import assets_fingerprint, inputs_fingerprint
from curation.core.stage import Shard
from curation.executor.runner import (
    check_output_location,
    map_shards,
    merge_tree,
    reduce_over_shards,
    run_stage,
)
from curation.io import datacomp, uidsort
from curation.io.parts import (
    check_output_not_in_inputs,
    leased,
    part_url,
    shard_names,
)
from curation.stages.filters.apply import FilterStage
from curation.stages.filters.base import Filter


def pool_shards(urls: Sequence[str]) -> list[Shard]:
    """Shards of a pool; a scored folder's `part-X.parquet` is shard `X` (not `part-X`)."""
    shards = shard_names(urls)
    stripped = [Shard(name=s.name.removeprefix("part-") or s.name, input=s.input) for s in shards]
    names = [s.name for s in stripped]
    return stripped if len(set(names)) == len(names) else shards


def filter_assets(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The files filter steps read (centroids, target embeddings, LID models), from their
    job-spec parameters: their contents go into the stage fingerprint."""
    assets: list[str] = []
    for params in steps:
        assets += [params[k] for k in ("centroids", "lid_model") if k in params]
        assets += list(params.get("target_embeddings", []))
    return assets


def _fit_scores(shard: Shard, stage: FilterStage) -> dict:
    return stage.fit_scores(shard)


def _score_histogram(
    shard: Shard, *, stage: FilterStage, key: str, prefix: int, level: int
) -> np.ndarray:
    return select.prefix_histogram(_fit_scores(shard, stage)[key], prefix, level)


def _score_candidates(
    shard: Shard, *, stage: FilterStage, key: str, prefix: int, level: int
) -> np.ndarray:
    return select.prefix_candidates(_fit_scores(shard, stage)[key], prefix, level)


def _concat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([a, b])


def fit_quantiles(filt: Filter, shards: Sequence[Shard], stage: FilterStage) -> None:
    """Answer `filt.quantile_requests()` by a radix selection over the shards on Ray.

    Each pass, every shard's score column is read in a task and only a fixed-size histogram
    leaves it, summed by a tree of tasks (`reduce_over_shards`); the last pass gathers the at
    most `select.GATHER_LIMIT` candidates. The driver holds O(shards + histogram), never a
    score column, and gets the bits `global_threshold` gives on the concatenated scores.
    """
    for key, fraction, mode in filt.quantile_requests():

        def histogram(prefix: int, level: int, key: str = key) -> np.ndarray | None:
            fn = partial(_score_histogram, stage=stage, key=key, prefix=prefix, level=level)
            return reduce_over_shards(fn, shards)

        def candidates(prefix: int, level: int, key: str = key) -> np.ndarray | None:
            fn = partial(_score_candidates, stage=stage, key=key, prefix=prefix, level=level)
            return reduce_over_shards(fn, shards, _concat)

        filt.set_quantile(key, select.radix_threshold(histogram, candidates, fraction, mode))


def check_pool(filt: Filter, url: str, extra: Sequence[str] = ()) -> None:
    """Fail before any work when the pool shard `url` lacks what `filt` (or `extra`) reads."""
    emb = list(filt.embedding_columns)
    cols = [c for c in dict.fromkeys(["uid", *extra, *filt.columns]) if c not in emb]
    datacomp.check_shard_columns(url, cols, emb, who=filt.name)


def filter_stage(
    filt: Filter,
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

    `fp` is the stage fingerprint (the fitted parameters are added to it). Shards from a pool
    are checked for changes since their markers; derived shards (`pool_urls`) are a job's own
    earlier stage, fingerprinted upstream.
    """
    filt.prepare()
    if filt.needs_fit:
        fit_quantiles(filt, shards, FilterStage(filt, pool_urls, row_index))
    if filt.needs_fit:  # global parameters other than thresholds: every shard's fit scores
        filt.fit(map_shards(_fit_scores, shards, FilterStage(filt, pool_urls, row_index)))
    fit = filt.fitted()
    markers = run_stage(
        FilterStage(filt, pool_urls, row_index),
        shards,
        stage_dir,
        fp={**fp, "fit": fit},
        overwrite=overwrite,
        progress=progress,
        check_inputs=not pool_urls,
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


#: Scratch folder (under OUT) of the sorted runs `write_uid_file` merges; removed at the end.
UID_SCRATCH = "_uids_tmp"


def _part_run(item: tuple[int, str], scratch: str) -> dict[str, Any]:
    i, part = item
    return uidsort.write_part_run(part, uidsort.part_run_url(scratch, i))


def _remove(url: str) -> None:
    fs, path = fsio.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_uid_file(
    out: str,
    stage_dir: str,
    shards: Sequence[Shard],
    *,
    block_rows: int = uidsort.BLOCK_ROWS,
    fan_in: int = 16,
) -> dict[str, Any]:
    """DataComp's uid file `OUT/uids.npy` from the kept parts, or why it was not written.

    An external sort on Ray (`io.uidsort`): a task per part checks its uids and writes them as
    a sorted run under `OUT/_uids_tmp/`; a tree of tasks merges `fan_in` runs at a time,
    reading `block_rows` records of each at once; the root task streams the `.npy` into
    place atomically. The driver holds run URLs and counts, never uids; the file is the bytes
    `datacomp.save_uids` writes for all kept uids. A uid that is not 32 hex digits (the first,
    in shard order, is named) skips the file and removes an earlier one.
    """
    url = fsio.join(out, "uids.npy")
    scratch = fsio.join(out, UID_SCRATCH)
    _remove(scratch)  # runs of an interrupted earlier attempt
    try:
        items = [(i, part_url(stage_dir, s.name)) for i, s in enumerate(shards)]
        checks = map_shards(_part_run, items, scratch)
        first = next((c["first"] for c in checks if c["bad"]), None)
        problem = datacomp.uid_problem_message(
            sum(c["rows"] for c in checks), sum(c["bad"] for c in checks), first, where=stage_dir
        )
        if problem is not None:
            _remove(url)  # a uid file of an earlier run would not match these parts
            return {"uids": None, "uid_count": None, "uid_file_skipped": problem}
        runs = [(c["run"], c["rows"]) for c in checks if c["run"] is not None]
        count = merge_tree(
            partial(uidsort.merge_node, scratch=scratch, block_rows=block_rows),
            partial(uidsort.write_uid_npy, url=url, block_rows=block_rows),
            runs,
            fan_in=fan_in,
        )
    finally:
        _remove(scratch)
    return {"uids": url, "uid_count": count}


@leased("out")
def run_filter(
    filt: Filter,
    inputs: Sequence[str],
    out: str,
    *,
    params: dict[str, Any],
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `filt` over the pool shards `inputs` into `out`; returns the summary.

    Checks before any work that the first shard has every column and embedding the filter
    reads. `params` are the job-spec parameters (`baseline` + the step's); the files they
    name go into the fingerprint by content.
    """
    check_output_location(out)
    check_output_not_in_inputs(out, inputs)
    urls = datacomp.list_shards(list(inputs))
    if not urls:
        raise FileNotFoundError(f"no .parquet shards in {list(inputs)}")
    check_pool(filt, urls[0])
    shards = pool_shards(urls)
    fp = {
        "stage": "filter",
        "params": params,
        "assets": assets_fingerprint(filter_assets([params])),
        "inputs": inputs_fingerprint([s.input for s in shards]),
    }
    summary = filter_stage(filt, shards, out, fp=fp, overwrite=overwrite, progress=progress)
    summary.pop("_markers")
    uid_info = write_uid_file(out, out, shards)
    write_stage_manifest(
        out,
        "filter",
        summary,
        params=params,
        fit=summary["fit"],
        outputs={"subset": out, **uid_info},
    )
    summary.update(uid_info)
    return summary
