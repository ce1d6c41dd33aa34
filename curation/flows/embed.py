"""`curation embed`: open_clip image embeddings of an image collection, e.g. a target set.

DataComp's image-based baseline keeps the pool clusters that hold the embeddings of a target set
(ImageNet-1k train images, L/14): its `--target-embeddings`. This makes them from a user's own
copy of the images, with the model and preprocessing of `curation score`:

- inputs are loose image files (folders are walked: `.jpg`, `.jpeg`, `.png`, `.webp`, `.bmp`,
  `.gif`, `.tif(f)`, any case; ImageNet's `train/<wnid>/*.JPEG` as it is) and/or image shards
  (webdataset tars, Parquet image tables, as `curation score` reads them);
- loose files are grouped, in sorted order, into shards of `files_per_shard` files whose lists
  are written to `OUT/_listing/` (on the output storage, so any node can read them); each
  listed file is read with a bound (`max_member_bytes`) and decoded with the pixel bound;
- CPU tasks decode (open_clip's exact eval transform, as `curation score`) and embedding actors
  (one per GPU, or CPU actors) run the image tower; the stage is resumable per shard;
- `OUT/part-<shard>.parquet`: `key` (the path below the files' common folder, or the shard's
  sample key), `url`, `original_width`, `original_height`, `image_embedding` (unit-norm,
  `fixed_size_list<float32|float16>[d]`); `OUT/quarantine.jsonl`; `OUT/manifest.json`;
- `OUT/embeddings.npy`: every part's embeddings in shard order then row order (the parts'
  rows, concatenated), written by streaming one part at a time; it is what
  `curation filter --baseline image_based --target-embeddings` takes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from curation.core import fsio
from curation.core.accounting import (
    quarantine_record,
    summarize,
    write_quarantine,
    write_stage_manifest,
)
from curation.core.fingerprint import inputs_fingerprint
from curation.core.stage import Resources, Shard
from curation.executor.runner import check_output_location, run_actor_stage
from curation.flows.score import plan_pool
from curation.io.datacomp import embedding_column
from curation.io.images import (
    IMAGE_EXTS,
    TAR_SUFFIXES,
    ImageLimits,
    ImageShard,
    PixelTransform,
    iter_image_shard,
    list_image_shards,
)
from curation.io.parts import (
    check_output_not_in_inputs,
    finish_part,
    leased,
    part_url,
    shard_names,
)
from curation.stages.device_decode import DevicePreprocess
from curation.stages.score import ScoreStage, decode_chunk, probe_chunk

__all__ = ["EMBEDDINGS_FILE", "EmbedStage", "embed_images", "list_embed_inputs"]

EMBEDDINGS_FILE = "embeddings.npy"
LISTING_DIR = "_listing"
LISTING_SUFFIX = ".listing.json"
STAGE = "embed"
IMAGE_FILE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
META = ("key", "url", "original_width", "original_height")


def list_embed_inputs(
    inputs: Sequence[str], literal: bool = False
) -> tuple[list[str], list[str], int]:
    """(image shards, loose image files, other files ignored) among files / globs / folders."""
    urls = fsio.expand_inputs(list(inputs), literal=literal)
    files = [u for u in urls if u.lower().endswith(IMAGE_FILE_SUFFIXES)]
    shardish = [u for u in urls if u.endswith(TAR_SUFFIXES + (".parquet",))]
    shards = list_image_shards(shardish, literal=True) if shardish else []
    ignored = len(urls) - len(files) - len(shardish)
    if not files and not shards:
        raise FileNotFoundError(
            f"no image files ({', '.join(IMAGE_FILE_SUFFIXES)}) or image shards (.tar, "
            f".tar.gz, .tgz, .parquet) in {list(inputs)}"
        )
    return shards, files, ignored


def _common_folder(urls: Sequence[str]) -> str:
    """The longest folder prefix (ending in `/`) shared by all of `urls`."""
    first, last = min(urls), max(urls)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[: first.rfind("/", 0, i) + 1]


def file_shards(files: Sequence[str], out: str, files_per_shard: int) -> list[Shard]:
    """Loose image files as shards of `files_per_shard` (sorted), their lists written under
    `OUT/_listing/` (rewritten only when they differ, so a resumed run reads the same ones)."""
    if not files:
        return []
    root = _common_folder(files)
    shards = []
    for i, lo in enumerate(range(0, len(files), files_per_shard)):
        group = files[lo : lo + files_per_shard]
        body = json.dumps(
            {"root": root, "files": [u[len(root) :] for u in group]}, separators=(",", ":")
        ).encode()
        name = f"files-{i:06d}"
        url = fsio.join(out, LISTING_DIR, name + LISTING_SUFFIX)
        fs, path = fsio.url_to_fs(url)
        if not fs.exists(path) or fs.cat_file(path) != body:
            fsio.atomic_write_bytes(url, body)
        shards.append(Shard(name=name, input=url))
    return shards


def _read_bounded(url: str, limit: int) -> bytes:
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read(limit + 1)


def _check_root_visible(root: str) -> None:
    """A listed file is gone: fine if it was deleted, but if its whole folder is missing here,
    this node does not see the driver's files; fail rather than quarantine every file."""
    fs, path = fsio.url_to_fs(root or ".")
    if not fs.exists(path):
        import socket

        raise RuntimeError(
            f"embed: the input folder {root} does not exist on node {socket.gethostname()}; "
            "the images must be on storage every node of the cluster sees (an object store or "
            "a shared file system)"
        )


def _file_images(shard: Shard, limits: ImageLimits, chunk_rows: int) -> Iterator[ImageShard]:
    """A listing shard's files as `ImageShard` chunks (`key` the path below the listing's
    root). A listed file that is gone or over the byte bound is counted and quarantined; other
    I/O errors propagate, so the task is retried."""
    fs, path = fsio.url_to_fs(shard.input)
    listing = json.loads(fs.cat_file(path))
    root, names = listing["root"], listing["files"]
    for lo in range(0, max(len(names), 1), chunk_rows):
        counts: Counter = Counter(rows_read=len(names[lo : lo + chunk_rows]))
        quarantine: list[dict[str, Any]] = []
        keys, blobs = [], []
        for key in names[lo : lo + chunk_rows]:
            reason, detail = "", ""
            try:
                data = _read_bounded(root + key, limits.max_member_bytes)
            except FileNotFoundError:
                _check_root_visible(root)
                reason, detail = "missing_file", "listed, then gone"
            else:
                if len(data) > limits.max_member_bytes:
                    reason = "member_too_large"
                    detail = f"over max_member_bytes {limits.max_member_bytes:,}"
            if reason:
                counts[f"rows_dropped_{reason}"] += 1
                quarantine.append(
                    quarantine_record(STAGE, shard.name, shard.input, reason, detail, key=key)
                )
            else:
                keys.append(key)
                blobs.append(data)
        n = len(keys)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "url": pa.array([root + k for k in keys], pa.string()),
                "original_width": pa.nulls(n, pa.int32()),
                "original_height": pa.nulls(n, pa.int32()),
                "image": pa.array(blobs, pa.binary()),
            }
        )
        yield ImageShard(table, counts, quarantine)


def embed_chunks(
    shard: Shard,
    limits: ImageLimits,
    transform: PixelTransform,
    chunk_rows: int,
    image_column: str | None = None,
    decode: str = "pil",
) -> Iterator[dict[str, Any]]:
    """The CPU half of the embed stage: `curation score`'s chunks (`decode_chunk`, or
    `probe_chunk` for `decode="device"`) of a listing shard or an image shard."""
    per_chunk = probe_chunk if decode == "device" else decode_chunk
    if shard.input.endswith(LISTING_SUFFIX):
        images: Iterator[ImageShard] = _file_images(shard, limits, chunk_rows)
    else:
        images = iter_image_shard(
            shard.input, limits, image_column, shard=shard.name, chunk_rows=chunk_rows
        )
    for img in images:
        yield per_chunk(img, shard, limits, transform, stage=STAGE)


class EmbedStage(ScoreStage):
    """The model half: the scorer's image tower on an actor (`ScoreStage`'s model, assets and
    device decoding), embedding decoded chunks."""

    name = STAGE

    def __init__(
        self,
        scorer: Any,
        dtype: str,
        resources: Resources | None = None,
        device_preprocess: DevicePreprocess | None = None,
    ) -> None:
        super().__init__(scorer, resources, device_preprocess)
        self.dtype = dtype

    def process(self, chunk: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        """Unit-norm image embeddings of one chunk, with its `META` columns and counters."""
        chunk = self.decoded(chunk)
        emb = self.scorer.embed_pixels(chunk["pixels"]).reshape(-1, self.scorer.embed_dim)
        meta = chunk["meta"]
        return {
            "meta": pa.table({c: meta.column(c) for c in META}),
            "image_embedding": emb.astype(self.dtype),
            "counts": chunk["counts"],
            "quarantine": chunk["quarantine"],
        }


def _finish(shard: Shard, stage_dir: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    counts: Counter = Counter()
    for r in results:
        counts.update(r["counts"])
    meta = pa.concat_tables([r["meta"] for r in results])
    emb = np.concatenate([r["image_embedding"] for r in results])
    table = meta.append_column(
        "image_embedding", embedding_column(emb, "image_embedding", shard.input)
    )
    return finish_part(
        stage_dir,
        shard,
        table,
        counts,
        parquet={"use_dictionary": ["key", "url"]},
        quarantine=[q for r in results for q in r["quarantine"]],
    )


def write_embeddings_npy(parts: Sequence[str], url: str, dim: int, dtype: str) -> int:
    """Concatenate the parts' `image_embedding` into one `.npy` at `url`, one part at a time
    (the header first, from the row counts in the part footers); returns the rows written."""
    import pyarrow.parquet as pq

    rows = 0
    for p in parts:
        fs, path = fsio.url_to_fs(p)
        with fs.open(path, "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    header = np.lib.format.header_data_from_array_1_0(np.zeros((0, dim), dtype))
    header["shape"] = (rows, dim)
    with fsio.atomic_open(url) as out:
        np.lib.format.write_array_header_1_0(out, header)
        for p in parts:
            pfs, ppath = fsio.url_to_fs(p)
            with pfs.open(ppath, "rb") as f:
                col = pq.read_table(f, columns=["image_embedding"]).column("image_embedding")
            flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out.write(np.ascontiguousarray(flat, dtype=dtype).tobytes())
    return rows


@leased("out")
def embed_images(
    inputs: Sequence[str],
    out: str,
    scorer: Any,
    *,
    limits: ImageLimits | None = None,
    chunk_rows: int = 512,
    files_per_shard: int = 1024,
    dtype: str = "float32",
    device: str = "auto",
    num_actors: int | None = None,
    cpus_per_actor: int | None = None,
    image_column: str | None = None,
    decode: str = "pil",
    literal: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of `inputs` into `out` (parts, manifest, `embeddings.npy`); returns
    the summary. `scorer` is a `ClipScorer` (not set up); the actor pool is shaped as
    `curation score`'s (one actor per GPU, else CPU actors beside the decoders)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    check_output_location(out)
    check_output_not_in_inputs(out, inputs)
    limits = limits or ImageLimits()
    shard_urls, files, ignored = list_embed_inputs(inputs, literal)
    plan = plan_pool(scorer, limits, chunk_rows, device, num_actors, cpus_per_actor, decode)
    scorer, dev, pp = plan.scorer, plan.device, plan.preprocess
    params = {
        **plan.params,
        "files_per_shard": files_per_shard,
        "dtype": dtype,
        "image_column": image_column,
    }
    file_ids = hashlib.sha256(
        json.dumps(inputs_fingerprint(files, out), sort_keys=True).encode()
    ).hexdigest()
    fp = {
        "stage": STAGE,
        "params": params,
        "inputs": inputs_fingerprint(shard_urls, out),
        "files": [len(files), file_ids],
    }
    shards = shard_names(shard_urls) + file_shards(files, out, files_per_shard)
    markers = run_actor_stage(
        EmbedStage(scorer, dtype, plan.resources, plan.on_device),
        shards,
        out,
        split=embed_chunks,
        split_args=(limits, plan.transform, chunk_rows, image_column, decode),
        num_actors=plan.actors,
        finish=_finish,
        fp=fp,
        shards_in_flight=plan.decoders,
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize(STAGE, markers)
    parts = [part_url(out, s.name) for s in shards]
    rows = write_embeddings_npy(parts, fsio.join(out, EMBEDDINGS_FILE), scorer.embed_dim, dtype)
    quarantined = write_quarantine(out, [markers])
    write_stage_manifest(
        out,
        STAGE,
        summary,
        params=params,
        model={**scorer.describe(), "embed_dim": scorer.embed_dim, "preprocess": pp},
        device=dev,
        inputs={"shards": len(shard_urls), "files": len(files), "files_ignored": ignored},
        quarantined=quarantined,
        outputs={
            "embeddings": fsio.join(out, EMBEDDINGS_FILE),
            "rows": rows,
            "dim": scorer.embed_dim,
            "dtype": dtype,
            "parts": out,
            "quarantine": fsio.join(out, "quarantine.jsonl"),
        },
    )
    summary.update(device=dev, actors=plan.actors, quarantined=quarantined, embeddings=rows)
    return summary
