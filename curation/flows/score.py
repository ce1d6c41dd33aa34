"""`curation score`: CLIP-score image shards on a Ray actor pool, resumable, per shard.

Per input shard (a webdataset tar or a Parquet image table, see `curation.io.images`):

1. a CPU task reads the shard (streamed, bounded) and decodes its images in chunks of
   `chunk_rows` with the model's own resize/crop (`PixelTransform`), yielding uint8 pixels
   (`decode="pil"`, the default: exactly open_clip's `preprocess`). With `decode="device"` the
   task checks only image headers and ships plain JPEGs as bytes; the scorer decodes and
   resizes them on its device (`curation.stages.device_decode`; not bit-identical);
2. a pool of scorer actors (one per GPU with `num_gpus=1`, or CPU actors when there is no GPU)
   turns each chunk into embeddings and scores (`curation.stages.score.ClipScorer`);
3. the driver writes `OUT/part-<shard>.parquet` atomically, then `OUT/_done/<shard>.json`.

Output columns (one row per decoded sample, in shard order): `uid`, `key`, `url`, `text`,
`original_width`, `original_height` (int32; from the shard's metadata, else the decoded size),
`clip_score` (float32, cosine of the float32 unit embeddings), `image_embedding` and
`text_embedding` (`fixed_size_list<float16>[d]`, unit-norm before the cast, so the dot product
of the stored halves matches `clip_score` to about 1e-3). `curation filter` reads these columns
directly (no `.npz`). Undecodable samples are dropped with the reason (`not_an_image`,
`decode_error`, `image_too_large`, `no_image`, `member_too_large`, `bad_json`, `bad_utf8`) and
listed in `OUT/quarantine.jsonl`; `rows_read = rows_written + Σ rows_dropped` per shard.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

from curation.core import fsio
from curation.core.accounting import summarize, write_quarantine, write_stage_manifest
from curation.core.fingerprint import inputs_fingerprint
from curation.core.stage import Resources, Shard
from curation.executor.runner import (
    check_output_location,
    cluster_resources,
    map_shards,
    merge_tree,
    run_actor_stage,
)
from curation.io import uidsort
from curation.io.images import ImageLimits, PixelTransform, check_image_shards, list_image_shards
from curation.io.parts import (
    check_output_not_in_inputs,
    finish_part,
    leased,
    part_url,
    shard_names,
)
from curation.stages.device_decode import DECODE_MODES, DevicePreprocess
from curation.stages.score import (
    OUTPUT_COLUMNS,
    ScoreStage,
    assemble_shard,
    decode_chunks,
    probe_chunks,
)

__all__ = ["OUTPUT_COLUMNS", "score_shards"]


def finish_shard(shard: Shard, stage_dir: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble a shard's scored chunks, write the part and then the marker."""
    out = assemble_shard(shard, results)
    # Dictionary-encoding float16 embeddings only slows reading them back (about 3x).
    return finish_part(
        stage_dir,
        shard,
        out.table,
        out.counts,
        parquet={"use_dictionary": list(OUTPUT_COLUMNS[:4])},
        quarantine=out.quarantine,
    )


#: Scratch folder (under OUT) of the key runs `duplicate_uids` merges; removed at the end.
DUP_SCRATCH = "_dup_uids_tmp"


def _part_keys(item: tuple[int, str], scratch: str) -> uidsort.Run:
    i, part = item
    return uidsort.write_part_keys(part, uidsort.part_run_url(scratch, i))


def duplicate_uids(
    parts: Sequence[str],
    scratch: str | None = None,
    *,
    block_rows: int = uidsort.BLOCK_ROWS,
    fan_in: int = 16,
) -> int:
    """How many distinct uids occur in more than one of the Parquet files `parts`.

    Reads only the `uid` columns. Rows are never dropped for it: the count goes to the
    manifest so that a pool assembled from overlapping shards is noticed.

    With `scratch` (a folder of the run's own, removed afterwards) it runs on Ray in bounded
    memory: a task per part writes its distinct uids as a sorted run of 128-bit keys
    (`uidsort.uid_keys`), a tree of tasks merges the runs `fan_in` at a time, and the root
    task counts the keys that occur more than once (`uidsort.count_repeated`); the driver
    holds run URLs. Without it, in this process (small inputs): the uid columns are read here.
    """
    if scratch is not None:
        fs, path = fsio.url_to_fs(scratch)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        try:
            runs = map_shards(_part_keys, list(enumerate(parts)), scratch)
            return int(
                merge_tree(
                    partial(uidsort.merge_node, scratch=scratch, block_rows=block_rows),
                    partial(uidsort.count_repeated, block_rows=block_rows),
                    [r for r in runs if r[0] is not None],
                    fan_in=fan_in,
                )
            )
        finally:
            if fs.exists(path):
                fs.rm(path, recursive=True)
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    per_part = []
    for url in parts:
        fs, path = fsio.url_to_fs(url)
        with fs.open(path, "rb") as f:
            uids = pq.read_table(f, columns=["uid"]).column("uid")
        per_part.append(pc.unique(uids.drop_null()).cast(pa.large_binary()))
    if len(per_part) < 2:
        return 0
    counts = pc.value_counts(pa.chunked_array(per_part, type=pa.large_binary()))
    return int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0)


def _pool_shape(
    device: str, num_actors: int | None, cpus_per_actor: int | None, res: dict[str, float]
) -> tuple:
    """(actor device, actor count, actor resources, decode tasks in flight) for resources `res`."""
    gpus = int(res.get("GPU", 0))
    cpus = int(res.get("CPU", 1))
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise ValueError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
        n = num_actors or gpus
        if n > gpus:
            raise ValueError(f"--num-actors {n}: the Ray cluster has only {gpus} GPU(s)")
        # One CPU each by default, less when there are as many GPUs as CPUs.
        per: float = cpus_per_actor or (1 if n <= cpus - 1 else (cpus - 1) / n)
        if cpus < 2 or cpus - n * per < 1:
            raise ValueError(
                f"{n} GPU actor(s) x {per} CPUs leave no CPU of the cluster's {cpus} for "
                "decoding; lower --cpus-per-actor"
            )
        return "cuda", n, {"num_gpus": 1, "num_cpus": per}, max(2, int(cpus - n * per))
    if device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if cpus < 2:
        raise ValueError("CPU scoring needs a Ray cluster with at least 2 CPUs (decode + score)")
    n = num_actors or max(1, (cpus - 1) // (cpus_per_actor or max(1, cpus // 2)))
    if cpus_per_actor is not None:
        per = cpus_per_actor
        if n * per > cpus - 1:
            raise ValueError(
                f"{n} actor(s) x {per} CPUs leave no CPU of the cluster's {cpus} for decoding; "
                "lower --num-actors or --cpus-per-actor"
            )
    else:
        # Share the CPUs the decoders leave; fractional when there are more actors than CPUs.
        per = max(1, cpus // 2) if n * max(1, cpus // 2) <= cpus - 1 else (cpus - 1) / n
    return "cpu", n, {"num_cpus": per}, max(2, int(cpus - n * per))


@dataclasses.dataclass
class PoolPlan:
    """What `plan_pool` decided: the scorer (a copy placed on `device`), the actor pool, the
    CPU half's transform, the device half's preprocess (`decode="device"`), and the
    parameters that go into the stage fingerprint."""

    scorer: Any
    device: str
    actors: int
    resources: Resources
    decoders: int
    preprocess: dict[str, Any]
    transform: PixelTransform
    on_device: DevicePreprocess | None
    params: dict[str, Any]


def plan_pool(
    scorer: Any,
    limits: ImageLimits,
    chunk_rows: int,
    device: str,
    num_actors: int | None,
    cpus_per_actor: int | None,
    decode: str,
) -> PoolPlan:
    """The scorer actor pool of `score_shards` (and `curation embed`) for this cluster, its
    arguments checked first."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if decode not in DECODE_MODES:
        raise ValueError(f"--decode must be one of {DECODE_MODES}, got {decode!r}")
    dev, n_actors, options, decoders = _pool_shape(
        device, num_actors, cpus_per_actor, cluster_resources()
    )
    scorer = copy.copy(scorer)
    scorer.device_request = dev
    scorer.num_threads = max(1, int(options["num_cpus"]))  # leave the other cores to decoding
    pp = scorer.expected_preprocess()  # each actor checks its model agrees
    size, interpolation, mode = pp["size"], pp["interpolation"], pp["resize_mode"]
    params = {
        **scorer.describe(),
        "checkpoint_sha256": scorer.checkpoint_digest(),
        "limits": dataclasses.asdict(limits),
        "chunk_rows": chunk_rows,
        "device": dev,
        "decode": decode,
    }
    return PoolPlan(
        scorer=scorer,
        device=dev,
        actors=n_actors,
        resources=Resources(cpus=options["num_cpus"], gpus=options.get("num_gpus", 0), actor=True),
        decoders=decoders,
        preprocess=pp,
        transform=PixelTransform(size, interpolation, mode),
        on_device=DevicePreprocess(size, interpolation, mode, limits)
        if decode == "device"
        else None,
        params=params,
    )


@leased("out")
def score_shards(
    inputs: Sequence[str],
    out: str,
    scorer: Any,
    *,
    limits: ImageLimits | None = None,
    chunk_rows: int = 512,
    device: str = "auto",
    num_actors: int | None = None,
    cpus_per_actor: int | None = None,
    image_column: str | None = None,
    decode: str = "pil",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image shard of `inputs` into `out`; writes the manifest, returns the summary.

    `scorer` is a `ClipScorer` (not yet set up); its device is chosen here from the cluster:
    one actor per GPU when there are GPUs (`device` auto or cuda), else CPU actors.
    `decode`: `pil` (default) decodes and resizes in CPU tasks exactly as open_clip's
    `preprocess`; `device` decodes JPEGs on the scorer's device (nvJPEG on a GPU), faster but
    not bit-identical (`curation.stages.device_decode`).
    """
    check_output_location(out)
    check_output_not_in_inputs(out, inputs)

    limits = limits or ImageLimits()
    plan = plan_pool(scorer, limits, chunk_rows, device, num_actors, cpus_per_actor, decode)
    urls = list_image_shards(inputs)
    check_image_shards(urls, image_column)
    shards = shard_names(urls)
    scorer, dev, n_actors, pp = plan.scorer, plan.device, plan.actors, plan.preprocess
    params = {**plan.params, "image_column": image_column}
    fp = {"stage": "score", "params": params, "inputs": inputs_fingerprint(urls, out)}
    markers = run_actor_stage(
        ScoreStage(scorer, plan.resources, plan.on_device),
        shards,
        out,
        split=probe_chunks if plan.on_device else decode_chunks,
        split_args=(limits, plan.transform, chunk_rows, image_column),
        num_actors=n_actors,
        finish=finish_shard,
        fp=fp,
        shards_in_flight=plan.decoders,
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize("score", markers)
    n_dup = duplicate_uids(
        [part_url(out, name) for name in sorted(markers)], fsio.join(out, DUP_SCRATCH)
    )
    summary["duplicate_uids"] = n_dup
    if n_dup:
        warnings.warn(
            f"score {out}: {n_dup:,} uid(s) occur in more than one shard's part (rows kept; "
            "the input shards overlap or reuse keys)",
            stacklevel=2,
        )
    quarantined = write_quarantine(out, [markers])
    write_stage_manifest(
        out,
        "score",
        summary,
        params=params,
        model={**scorer.describe(), "embed_dim": scorer.embed_dim, "preprocess": pp},
        device=dev,  # the pool's size is left out: it does not change any output byte
        inputs=[[m["input"], m["shard"]] for m in markers.values()],
        quarantined=quarantined,
        outputs={
            "scores": out,
            "columns": list(OUTPUT_COLUMNS),
            "quarantine": fsio.join(out, "quarantine.jsonl"),
        },
    )
    summary.update(device=dev, actors=n_actors, quarantined=quarantined)
    return summary
