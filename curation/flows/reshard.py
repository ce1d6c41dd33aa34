"""`curation reshard`: copy a subset of webdataset tars into new tars of a fixed sample count.

Like DataComp's resharder: the input tars (sorted by URL) are streamed member by member
(`curation.train.data.iter_tar_samples`, nothing extracted to disk); a sample whose uid is in
the subset (a curated folder's Parquet parts or a DataComp uid `.npy`, see
`curation.train.data.Subset`) is copied, all its members in their order and bytes, into
`OUT/00000000.tar`, `OUT/00000001.tar`, ... of exactly `samples_per_shard` samples (the last
one fewer). Samples that a reader would drop (no image, an oversized member, a broken
`.json` / `.txt`, no caption) are not copied and are counted. Tar headers are fixed (mtime 0,
uid/gid 0, no owner names, mode 0o444, GNU format), so the same inputs give the same bytes.
`OUT/reshard_manifest.json` lists the shards, their sample counts and sha256, and the counters.

A plain driver-side stream rather than Ray tasks: an output shard's contents depend on how many
subset samples every earlier input shard holds, so a parallel version needs a counting pass
first (the plan `TrainBatches` computes) and then one task per output shard, each re-reading the
input shards it spans. The copy is I/O-bound and holds one sample at a time, so one stream is
simple and bounded; the counting-pass variant is the way to scale it out.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fsspec.core import url_to_fs

from curation.core import fsio
from curation.io.images import ImageLimits
from curation.train.data import Subset, iter_tar_samples, list_tar_shards

MANIFEST = "reshard_manifest.json"
RESHARD_VERSION = 1


def output_shard_name(index: int) -> str:
    return f"{index:08d}.tar"


class _HashingWriter:
    """A binary file wrapper that hashes what is written (sha256 of the whole shard)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _ShardWriter:
    """Writes output shards one after the other, each through `fsio.atomic_open`."""

    def __init__(self, out: str, per_shard: int) -> None:
        self.out, self.per_shard = out, per_shard
        self.index = 0
        self.n = 0
        self.shards: list[dict[str, Any]] = []
        self._ctx: Any = None
        self._hw: _HashingWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._url = ""

    def add(self, members: Sequence[tuple[str, bytes]]) -> None:
        import io

        if self._tar is None:
            self._url = fsio.join(self.out, output_shard_name(self.index))
            self._ctx = fsio.atomic_open(self._url)
            self._hw = _HashingWriter(self._ctx.__enter__())
            self._tar = tarfile.open(fileobj=self._hw, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.n += 1
        if self.n == self.per_shard:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._hw is not None
        self._ctx.__exit__(None, None, None)
        self.shards.append(
            {
                "url": self._url,
                "samples": self.n,
                "bytes": self._hw.size,
                "sha256": self._hw.sha.hexdigest(),
            }
        )
        self._tar = self._hw = self._ctx = None
        self.index += 1
        self.n = 0

    def abort(self) -> None:
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._tar = self._hw = self._ctx = None


def run_reshard(
    inputs: Sequence[str],
    subset: str,
    out: str,
    *,
    samples_per_shard: int = 10_000,
    overwrite: bool = False,
    limits: ImageLimits | None = None,
) -> dict[str, Any]:
    """Write the subset's samples of `inputs` as new tars under `out`; returns the manifest."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    t0 = time.perf_counter()
    shards = list_tar_shards(inputs)
    sub = Subset.load(subset)
    manifest_url = fsio.join(out, MANIFEST)
    fs, root = url_to_fs(out)
    if fs.exists(root):
        existing = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1] != ""]
        old = [p for p in existing if p.endswith(".tar") or p.endswith(MANIFEST)]
        if old and not overwrite:
            raise FileExistsError(f"{out} already holds reshard output; pass --overwrite")
        for p in old:
            fs.rm(p)
    fsio.makedirs(out)
    counts: Counter = Counter()
    writer = _ShardWriter(out, samples_per_shard)
    limits = limits or ImageLimits()
    try:
        for url in shards:
            batch: list = []
            for smp in iter_tar_samples(
                url, limits, want_images=False, want_members=True, counts=counts
            ):
                counts["read"] += 1
                if smp.reason is not None:
                    counts[f"dropped_{smp.reason}"] += 1
                    continue
                batch.append(smp)
                if len(batch) >= 512:
                    _flush(batch, sub, writer, counts)
                    batch = []
            _flush(batch, sub, writer, counts)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "kind": "reshard",
        "version": RESHARD_VERSION,
        "inputs": shards,
        "subset": {"url": subset, "uids": len(sub), "fingerprint": sub.fingerprint()},
        "samples_per_shard": samples_per_shard,
        "shards": writer.shards,
        "counts": dict(sorted(counts.items())),
        "samples_written": sum(s["samples"] for s in writer.shards),
    }
    fsio.atomic_write_json(manifest_url, manifest)
    return {**manifest, "seconds": time.perf_counter() - t0}


def _flush(batch: list, sub: Subset, writer: _ShardWriter, counts: Counter) -> None:
    if not batch:
        return
    mask = sub.contains([s.uid for s in batch])
    for smp, m in zip(batch, mask, strict=True):
        if not m:
            counts["dropped_subset"] += 1
            continue
        writer.add(smp.members or ())
        counts["written"] += 1
