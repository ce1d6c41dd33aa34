"""`curation score`: CLIP-score image shards on a Ray actor pool, resumable, per shard.

Per input shard (a webdataset tar or a Parquet image table, see `curation.images`):

1. a CPU task reads the shard (streamed, bounded) and decodes its images in chunks of
   `chunk_rows` with the model's own resize/crop (`PixelTransform`), yielding uint8 pixels;
2. a pool of scorer actors (one per GPU with `num_gpus=1`, or CPU actors when there is no GPU)
   turns each chunk into embeddings and scores (`curation.score.ClipScorer`);
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
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from curation import fsio
from curation.datacomp import embedding_column
from curation.images import ImageLimits, PixelTransform, decode_images, read_image_shard
from curation.runner import Shard, finish_part

__all__ = ["OUTPUT_COLUMNS", "ScoreActor", "decode_chunks", "score_shards"]

OUTPUT_COLUMNS = (
    "uid",
    "key",
    "url",
    "text",
    "original_width",
    "original_height",
    "clip_score",
    "image_embedding",
    "text_embedding",
)


def decode_chunks(
    shard: Shard,
    limits: ImageLimits,
    transform: PixelTransform,
    chunk_rows: int,
    image_column: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Read one image shard and yield decoded chunks (runs as a Ray CPU generator task).

    Each chunk: `meta` (the kept rows' metadata, image bytes dropped), `pixels` (uint8),
    `counts` and `quarantine` for that chunk; the first chunk also carries the shard-level
    counters (rows read, tar-level drops, a corrupt-shard record).
    """
    img = read_image_shard(shard.input, limits, image_column)
    table = img.table
    n = table.num_rows
    for lo in range(0, max(n, 1), chunk_rows):
        part = table.slice(lo, chunk_rows)
        pixels, ok, failures, sizes = decode_images(part.column("image"), transform, limits)
        counts: Counter = Counter(img.counts) if lo == 0 else Counter()
        quarantine = list(img.quarantine) if lo == 0 else []
        if failures:
            keys = np.asarray(part.column("key").to_pylist(), dtype=object)[~ok]
            for key, (reason, detail) in zip(keys, failures, strict=True):
                counts[f"rows_dropped_{reason}"] += 1
                quarantine.append(
                    {"shard": shard.input, "key": key, "reason": reason, "detail": detail[:300]}
                )
        meta = _with_sizes(part.drop_columns(["image"]).filter(pa.array(ok)), sizes)
        yield {"meta": meta, "pixels": pixels, "counts": counts, "quarantine": quarantine}


class ScoreActor:
    """Ray actor body: holds one `ClipScorer`, scores decoded chunks."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def setup(self) -> str | None:
        """Load the model; an error comes back as its message (the runner raises it)."""
        try:
            self.scorer.setup()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to the driver
            return f"{self.scorer.model_name}: {type(exc).__name__}: {exc}"
        return None

    def process(self, chunk: dict[str, Any]) -> dict[str, Any]:
        meta: pa.Table = chunk["meta"]
        res = self.scorer.score(chunk["pixels"], meta.column("text").to_pylist())
        d = self.scorer.embed_dim
        out = {
            "meta": meta,
            "clip_score": res.clip_score,
            "image_embedding": res.image_embedding.astype(np.float16).reshape(-1, d),
            "text_embedding": res.text_embedding.astype(np.float16).reshape(-1, d),
            "counts": chunk["counts"],
            "quarantine": chunk["quarantine"],
        }
        return out


def _with_sizes(meta: pa.Table, sizes: np.ndarray) -> pa.Table:
    """Missing original_width/height come from the decoded image."""
    import pyarrow.compute as pc

    for j, name in enumerate(("original_width", "original_height")):
        col = pc.coalesce(meta.column(name), pa.array(sizes[:, j], pa.int32()))
        meta = meta.set_column(meta.schema.get_field_index(name), name, col)
    return meta


def finish_shard(shard: Shard, stage_dir: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate a shard's scored chunks in order (a shard yields at least one), write the
    part and then the marker."""
    counts: Counter = Counter()
    for r in results:
        counts.update(r["counts"])
    meta = pa.concat_tables([r["meta"] for r in results])
    table = pa.table(
        {
            **{c: meta.column(c) for c in OUTPUT_COLUMNS[:6]},
            "clip_score": pa.array(np.concatenate([r["clip_score"] for r in results])),
            **{
                c: embedding_column(np.concatenate([r[c] for r in results]), c, shard.input)
                for c in OUTPUT_COLUMNS[7:]
            },
        }
    )
    # Dictionary-encoding float16 embeddings only slows reading them back (about 3x).
    return finish_part(
        stage_dir,
        shard,
        table,
        counts,
        parquet={"use_dictionary": list(OUTPUT_COLUMNS[:4])},
        quarantine=[q for r in results for q in r["quarantine"]],
    )


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
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image shard of `inputs` into `out`; writes the manifest, returns the summary.

    `scorer` is a `ClipScorer` (not yet set up); its device is chosen here from the cluster:
    one actor per GPU when there are GPUs (`device` auto or cuda), else CPU actors.
    """

    from curation.images import check_image_shards, list_image_shards
    from curation.pipeline import _inputs_fingerprint, public, summarize, versions, write_quarantine
    from curation.runner import run_actor_stage, shard_names

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    limits = limits or ImageLimits()
    urls = list_image_shards(inputs)
    check_image_shards(urls, image_column)
    shards = shard_names(urls)
    import ray

    dev, n_actors, options, decoders = _pool_shape(
        device, num_actors, cpus_per_actor, ray.cluster_resources()
    )
    scorer = copy.copy(scorer)
    scorer.device_request = dev
    scorer.num_threads = max(1, int(options["num_cpus"]))  # leave the other cores to decoding
    pp = scorer.expected_preprocess()  # each actor checks its model agrees
    transform = PixelTransform(pp["size"], pp["interpolation"], pp["resize_mode"])
    params = {
        **scorer.describe(),
        "checkpoint_sha256": scorer.checkpoint_digest(),
        "limits": dataclasses.asdict(limits),
        "chunk_rows": chunk_rows,
        "image_column": image_column,
        "device": dev,
    }
    fp = {"stage": "score", "params": params, "inputs": _inputs_fingerprint(urls, out)}
    markers = run_actor_stage(
        "score",
        out,
        shards,
        split=decode_chunks,
        split_args=(limits, transform, chunk_rows, image_column),
        actor_cls=ScoreActor,
        actor_args=(scorer,),
        num_actors=n_actors,
        actor_options=options,
        finish=finish_shard,
        fp=fp,
        shards_in_flight=decoders,
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize("score", markers)
    quarantined = write_quarantine(out, [markers])
    manifest = {
        "stage": "score",
        "params": params,
        "model": {**scorer.describe(), "embed_dim": scorer.embed_dim, "preprocess": pp},
        "device": dev,  # the pool's size is left out: it does not change any output byte
        "versions": versions(),
        "inputs": [[m["input"], m["shard"]] for m in markers.values()],
        "summary": public(summary),
        "quarantined": quarantined,
        "outputs": {
            "scores": out,
            "columns": list(OUTPUT_COLUMNS),
            "quarantine": fsio.join(out, "quarantine.jsonl"),
        },
    }
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), manifest)
    summary.update(device=dev, actors=n_actors, quarantined=quarantined)
    return summary
