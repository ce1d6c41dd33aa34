"""Training data: webdataset tars streamed into deterministic, uint8 image batches per rank.

Read path (any fsspec URL; nothing is extracted to disk): a tar is streamed member by member
(`tarfile` "r|"); a sample is its consecutive members `KEY.<ext>` (webdataset's rule: the key
is the name up to the first dot of the base name); its uid is the `.json`'s `uid` (else the key),
its caption the `.txt` (else the `.json`'s `caption`). Members over `ImageLimits.max_member_bytes`
are skipped unread; images are opened with `curation.io.images.decode_images`, which refuses
declared sizes over `max_pixels` before decoding pixels. Samples without an image or a caption,
or with a broken `.json` / `.txt`, are dropped and counted (`dropped_<reason>`) — the same
rules at planning and at reading, so both see the same samples.

One pass (`pass_index`) over the data, for a fixed `LoaderConfig`:

1. **Plan** (every rank computes the same, in the main process, no image decoded): the shards
   in a pass order (a permutation seeded by `(seed, pass_index)`), and per shard its number of
   *candidates*: samples that pass the subset filter and then the `keep` hook (called on uids
   and captions, never on pixels). `N` = candidates, `steps = N // global_batch`; the
   candidates laid end to end in pass order are positions `0 .. N-1`, and positions
   `steps * global_batch ..` (the tail, `< global_batch` samples) are dropped.
2. **Layout**: rank `r` gets positions `[r*steps*B, (r+1)*steps*B)` (B = global_batch //
   world_size); that range is cut into `streams` contiguous pieces, stream `k` serving the
   rank's steps `k, k+streams, ...`. Splitting is by sample position, not by shard, so there
   is no "fewer shards than workers" failure: several streams may read one shard, each taking
   its own positions (reading past the ones before it without decoding them).
3. **Streams**: a stream reads its positions in order through a shuffle buffer
   (`shuffle_buffer` samples, seeded by `(seed, pass_index, first position)`); its j-th batch
   is the j-th `B` samples out of the buffer. The buffer's order is computed up front on indices
   (it does not depend on the bytes), so resuming at `start_step` skips the earlier batches'
   samples without decoding — and without keeping their bytes.
4. **Workers**: stream `k` runs in DataLoader worker `(k - start_step) mod W`; each worker
   yields whole batches for steps `start_step + w, start_step + w + W, ...` and the DataLoader
   (`batch_size=None`) returns them in round-robin worker order, which is step order. `W` =
   the largest divisor of `streams` that is `<= num_workers` (0: in process).

Guarantees (same `LoaderConfig`, `world_size`, `pass_index`, `keep`):

- The batches of a rank are a function of `(cfg, streams, rank, world_size, pass_index)`;
  `num_workers` (0, 1, 2, ... dividing `streams`) only sets parallelism. `streams` defaults to
  `max(1, num_workers)`: pin it to resume with another `num_workers`.
- `start_step = s` yields exactly the batches a full iteration yields from step `s` on.
- Every pass, over all ranks, each candidate at positions `< steps * global_batch` is in exactly
  one batch slot; the dropped tail is the same samples whatever `world_size` and `streams` are
  (it depends only on `(cfg, pass_index, keep)`). Which samples share a batch does depend on
  them.
- Each step every rank yields exactly `B` samples (ClipLoss gathers need equal sizes). A slot
  whose image fails to decode is counted (`dropped_<reason>`) and filled with a repeat of a
  decoded sample of the same batch (`padded`), so "exactly once" holds for candidates whose
  image decodes; broken images never crash the run.
- Memory per rank: `streams x (shuffle_buffer + B)` samples' bytes, plus a chunk of 512
  samples per open shard; the plan holds one count per shard.

Preprocessing: `curation.io.images.PixelTransform(image_size, "bicubic", "shortest")`, i.e.
exactly open_clip's eval `image_transform` up to `ToTensor` (resize the shorter side to
`image_size` with bicubic, center crop, RGB), as uint8 `[B, 3, H, W]`; `ToTensor` +
`Normalize` (`x / 255`, mean/std) run on the device. Difference from open_clip's *training*
transform: no `RandomResizedCrop(scale=(0.9, 1))` augmentation (the crop is deterministic).

Cost: the plan streams every tar once per pass per rank (metadata members read, image members
skipped), with a few I/O threads; with `keep=None` the per-shard counts do not depend on the pass
and are kept in the process (`_COUNTS`), so only the first pass reads them. Shards must not change
during a run (a stream that finds fewer samples than planned raises).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.utils.data as tud
from fsspec.core import url_to_fs

from curation.core import fsio
from curation.io import datacomp
from curation.io.images import (
    IMAGE_EXTS,
    ImageLimits,
    PixelTransform,
    _split_name,
    decode_images,
)

__all__ = [
    "TAR_SUFFIXES",
    "LoaderConfig",
    "Sample",
    "Subset",
    "TrainBatches",
    "count_samples",
    "iter_tar_samples",
    "list_tar_shards",
]

#: Suffixes of webdataset tar shards (gzip is detected by its magic bytes).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Samples handed to the subset filter and the `keep` hook at once (the same at plan and read).
CHUNK = 512
#: Threads reading shard metadata for the plan.
PLAN_THREADS = 4

Keep = Callable[[np.ndarray, list, int], tuple[np.ndarray, list]]


@dataclass(frozen=True)
class Sample:
    """One sample of a tar as read (`image` is None when images were not asked for; `members`
    holds every member's `(name, bytes)` when asked for)."""

    key: str
    uid: str
    text: str | None
    image: bytes | None
    reason: str | None = None  # why it is dropped, None when it is usable
    members: tuple[tuple[str, bytes], ...] | None = None


def list_tar_shards(inputs: Sequence[str]) -> list[str]:
    """Files / globs / folders on any fsspec URL -> sorted `.tar` / `.tar.gz` / `.tgz` URLs."""
    urls = fsio.expand_inputs(list(inputs), suffixes=TAR_SUFFIXES)
    tars = [u for u in urls if u.endswith(TAR_SUFFIXES)]
    if not tars:
        raise FileNotFoundError(f"no .tar / .tar.gz / .tgz shards in {list(inputs)}")
    return tars


# ----------------------------------------------------------------------------------------------
# Reading tars


_META_EXTS = ("json", "txt")
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _finish_sample(
    key: str, parts: dict[str, bytes | None], members: list | None, want_images: bool
) -> Sample:
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)

    def bad(reason: str) -> Sample:
        return Sample(key, key, None, None, reason, None)

    if img_ext is None:
        return bad("no_image")
    if any(parts.get(e, b"") is None for e in (img_ext, *_META_EXTS)):
        return bad("member_too_large")
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))  # type: ignore[union-attr]
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError, RecursionError):
            return bad("bad_json")
    text = meta.get("caption")
    if "txt" in parts:
        try:
            text = parts["txt"].decode("utf-8")  # type: ignore[union-attr]
        except UnicodeDecodeError:
            return bad("bad_utf8")
    if not isinstance(text, str) or not text.strip():
        return bad("no_text")
    uid = meta.get("uid")
    uid = str(uid) if uid not in (None, "") else key
    try:
        uid.encode("utf-8")
        text.encode("utf-8")
    except UnicodeEncodeError:
        return bad("bad_unicode")
    image = parts[img_ext] if want_images else None
    return Sample(key, uid, text, image, None, tuple(members) if members is not None else None)


def iter_tar_samples(
    url: str,
    limits: ImageLimits | None = None,
    *,
    want_images: bool = True,
    want_members: bool = False,
    counts: Counter | None = None,
) -> Iterator[Sample]:
    """Stream a webdataset tar's samples in order (usable and dropped ones, see `Sample.reason`).

    Only `.json` / `.txt` members are read unless `want_images` (image members) or
    `want_members` (every member, for copying). A tar that cannot be read on ends the stream
    there, counted as `shards_corrupt` in `counts`, its incomplete last sample dropped as
    `corrupt_shard` (the same samples whatever is asked for); other I/O errors propagate.
    """
    limits = limits or ImageLimits()
    fs, path = url_to_fs(url)
    key: str | None = None
    parts: dict[str, bytes | None] = {}
    members: list | None = [] if want_members else None
    try:
        with fs.open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            raw = gzip.GzipFile(fileobj=f, mode="rb") if head == b"\x1f\x8b" else f
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for m in tar:
                    if not m.isreg():
                        continue
                    k, ext = _split_name(m.name)
                    if k != key:
                        if key is not None:
                            yield _finish_sample(key, parts, members, want_images)
                        key, parts = k, {}
                        members = [] if want_members else None
                    is_img = ext in IMAGE_EXTS
                    read = want_members or ext in _META_EXTS or (want_images and is_img)
                    if m.size > limits.max_member_bytes:
                        parts[ext] = None
                        continue
                    if not read:
                        parts[ext] = b""
                        continue
                    fobj = tar.extractfile(m)
                    data = fobj.read() if fobj is not None else b""
                    parts[ext] = data
                    if members is not None:
                        members.append((m.name, data))
    except _CORRUPT:
        if counts is not None:
            counts["shards_corrupt"] += 1
        if key is not None:  # the sample being read when the tar broke: incomplete
            yield Sample(key, key, None, None, "corrupt_shard")
        return
    if key is not None:
        yield _finish_sample(key, parts, members, want_images)


# ----------------------------------------------------------------------------------------------
# Subset


class Subset:
    """uids to train on: from a curated folder (Parquet parts with a `uid` column) or a DataComp
    uid file (`.npy`, u8,u8). Held as one sorted array — `(f0, f1)` pairs when every uid is 32
    hex digits, else 64-bit hashes (`curation.stages.balance.stable_hash64`) — and looked up
    with `np.searchsorted`."""

    def __init__(self, keys: np.ndarray, mode: str, source: str = "") -> None:
        if mode not in ("pairs", "hash"):
            raise ValueError(f"mode must be 'pairs' or 'hash', got {mode!r}")
        self.keys = np.sort(keys)
        self.mode = mode
        self.source = source

    @classmethod
    def load(cls, url: str) -> Subset:
        if url.endswith(".npy"):
            return cls(datacomp.load_uids(url), "pairs", url)
        import pyarrow.parquet as pq

        parts = fsio.expand_inputs([url], suffixes=(".parquet",))
        parts = [p for p in parts if p.endswith(".parquet")]
        if not parts:
            raise FileNotFoundError(f"subset {url!r}: no .npy uid file or Parquet parts")

        def uid_column(part: str) -> pa.ChunkedArray:
            fs, path = url_to_fs(part)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if "uid" not in pf.schema_arrow.names:
                    raise ValueError(f"subset part {part} has no `uid` column")
                return pf.read(columns=["uid"]).column("uid").cast(pa.string())

        hexes = all(bool(datacomp.is_datacomp_uid(uid_column(p)).all()) for p in parts)
        arrays = []
        for p in parts:
            col = uid_column(p)
            col = col.filter(col.is_valid())
            arrays.append(datacomp.uids_to_pairs(col, where=p) if hexes else _hash(col))
        keys = np.concatenate(arrays) if arrays else np.zeros(0, np.uint64)
        return cls(keys, "pairs" if hexes else "hash", url)

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, uids: np.ndarray | Sequence[str]) -> np.ndarray:
        arr = pa.array(list(uids), pa.string())
        out = np.zeros(len(arr), dtype=bool)
        if not len(arr) or not len(self.keys):
            return out
        if self.mode == "pairs":
            ok = datacomp.is_datacomp_uid(arr)
            if not ok.any():
                return out
            q = datacomp.uids_to_pairs(arr.filter(pa.array(ok)))
            rows = np.flatnonzero(ok)
        else:
            q = _hash(arr)
            rows = np.arange(len(arr))
        i = np.searchsorted(self.keys, q)
        i_ok = i < len(self.keys)
        hit = np.zeros(len(q), dtype=bool)
        hit[i_ok] = self.keys[i[i_ok]] == q[i_ok]
        out[rows] = hit
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.mode.encode())
        h.update(np.ascontiguousarray(self.keys).tobytes())
        return h.hexdigest()[:16]


def _hash(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    from curation.stages.balance import stable_hash64

    return np.asarray(stable_hash64(uids), dtype=np.uint64)


# ----------------------------------------------------------------------------------------------
# Config, plan, layout


@dataclass(frozen=True)
class LoaderConfig:
    shards: tuple[str, ...]
    global_batch: int  # samples per optimizer step over ALL ranks
    image_size: int  # the model's input size (square)
    seed: int
    shuffle_buffer: int = 2048  # samples per stream
    num_workers: int = 2  # torch DataLoader processes per rank (0 = in process)
    subset: str | None = None  # Subset URL
    drop_last: bool = True
    streams: int = 0  # data streams per rank (0: max(1, num_workers)); sets the order
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.num_workers < 0 or self.streams < 0 or self.shuffle_buffer < 0:
            raise ValueError("num_workers, streams and shuffle_buffer must be >= 0")
        if not self.drop_last:
            raise ValueError(
                "drop_last=False is not supported: every step needs the same batch on every rank"
            )
        if not self.shards:
            raise ValueError("no shards")

    @property
    def n_streams(self) -> int:
        return self.streams or max(1, self.num_workers)


@dataclass(frozen=True)
class _Plan:
    order: tuple[int, ...]  # shard indices (into cfg.shards) in pass order
    counts: tuple[int, ...]  # candidates per shard, in pass order
    counters: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _pass_rng(seed: int, pass_index: int, *more: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, pass_index, *more]))


def _select(
    samples: list[Sample], subset: Subset | None, keep: Keep | None, pass_index: int, c: Counter
) -> tuple[list[Sample], list[str]]:
    """The candidates of a chunk (subset, then keep) and their texts (as `keep` chose)."""
    good = []
    for s in samples:
        c["read"] += 1
        if s.reason is not None:
            c[f"dropped_{s.reason}"] += 1
        else:
            good.append(s)
    if subset is not None and good:
        mask = subset.contains(np.array([s.uid for s in good], dtype=object))
        c["dropped_subset"] += int((~mask).sum())
        good = [s for s, m in zip(good, mask, strict=True) if m]
    texts = [s.text or "" for s in good]
    if keep is not None and good:
        mask, chosen = keep(np.array([s.uid for s in good], dtype=object), texts, pass_index)
        mask = np.asarray(mask, dtype=bool)
        if len(mask) != len(good):
            raise ValueError(f"keep returned {len(mask)} flags for {len(good)} samples")
        chosen = list(chosen) if chosen is not None else texts
        if len(chosen) == len(good):
            texts = [t for t, m in zip(chosen, mask, strict=True) if m]
        elif len(chosen) == int(mask.sum()):
            texts = [str(t) for t in chosen]
        else:
            raise ValueError(f"keep returned {len(chosen)} texts for {len(good)} samples")
        c["dropped_keep"] += int((~mask).sum())
        good = [s for s, m in zip(good, mask, strict=True) if m]
    return good, texts


def _chunks(url: str, limits: ImageLimits, want_images: bool, c: Counter) -> Iterator[list[Sample]]:
    buf: list[Sample] = []
    for s in iter_tar_samples(url, limits, want_images=want_images, counts=c):
        buf.append(s)
        if len(buf) == CHUNK:
            yield buf
            buf = []
    if buf:
        yield buf


def _count_shard(
    url: str, limits: ImageLimits, subset: Subset | None, keep: Keep | None, pass_index: int
) -> tuple[int, Counter]:
    c: Counter = Counter()
    n = 0
    for chunk in _chunks(url, limits, False, c):
        n += len(_select(chunk, subset, keep, pass_index, c)[0])
    return n, c


#: Per-shard counts without a `keep` hook (they do not depend on the pass), by
#: (shard URL, subset fingerprint, limits): later passes in this process skip the metadata read.
_COUNTS: dict[tuple[str, str, ImageLimits], tuple[int, Counter]] = {}


def _plan(cfg: LoaderConfig, pass_index: int, keep: Keep | None, subset: Subset | None) -> _Plan:
    order = _pass_rng(cfg.seed, pass_index).permutation(len(cfg.shards))
    urls = [cfg.shards[i] for i in order]
    fp = subset.fingerprint() if subset is not None else ""

    def count(url: str) -> tuple[int, Counter]:
        if keep is not None:
            return _count_shard(url, cfg.limits, subset, keep, pass_index)
        key = (url, fp, cfg.limits)
        if key not in _COUNTS:
            _COUNTS[key] = _count_shard(url, cfg.limits, subset, None, pass_index)
        return _COUNTS[key]

    with ThreadPoolExecutor(max_workers=min(PLAN_THREADS, len(urls))) as ex:
        results = list(ex.map(count, urls))
    total: Counter = Counter()
    for _, c in results:
        total.update(c)
    return _Plan(tuple(int(i) for i in order), tuple(n for n, _ in results), dict(total))


def count_samples(cfg: LoaderConfig) -> int:
    """Candidates per pass without a `keep` hook (subset applied; no image read or decoded).

    Steps per pass = `count // global_batch`; ValueError "batch larger than the data" when 0.
    """
    subset = Subset.load(cfg.subset) if cfg.subset else None
    n = _plan(cfg, 0, None, subset).total
    if n // cfg.global_batch == 0:
        raise ValueError(
            f"batch larger than the data: global batch {cfg.global_batch:,} > {n:,} samples"
        )
    return n


def _shuffle_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The output order (input indices) of a shuffle buffer of `size` over `n` inputs."""
    size = min(size, n)
    if size <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    buf = list(range(size))
    draws = rng.integers(0, size, size=n - size).tolist()
    o = 0
    for i, j in zip(range(size, n), draws, strict=True):
        out[o] = buf[j]
        buf[j] = i
        o += 1
    rest = np.asarray(buf, dtype=np.int64)
    rng.shuffle(rest)
    out[o:] = rest
    return out


def _workers(num_workers: int, streams: int) -> int:
    """DataLoader processes: the largest divisor of `streams` <= num_workers (0: in process)."""
    if num_workers <= 0:
        return 0
    return max(d for d in range(1, min(num_workers, streams) + 1) if streams % d == 0)


# ----------------------------------------------------------------------------------------------
# Batches


class _RankData:
    """The IterableDataset body (picklable): one rank's streams for one pass."""

    def __init__(
        self,
        cfg: LoaderConfig,
        plan: _Plan,
        subset: Subset | None,
        keep: Keep | None,
        rank: int,
        world_size: int,
        pass_index: int,
        start_step: int,
    ) -> None:
        self.cfg, self.plan, self.subset, self.keep = cfg, plan, subset, keep
        self.rank, self.world_size, self.pass_index = rank, world_size, pass_index
        self.start_step = start_step
        self.B = cfg.global_batch // world_size
        self.steps = plan.total // cfg.global_batch
        self.K = cfg.n_streams
        self.transform = PixelTransform(cfg.image_size, "bicubic", "shortest")

    def regions(self) -> list[tuple[int, int]]:
        """Per stream: (first global position, number of batches)."""
        pos = self.rank * self.steps * self.B
        out = []
        for k in range(self.K):
            n = len(range(k, self.steps, self.K))
            out.append((pos, n))
            pos += n * self.B
        return out

    def iterate(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        regions = self.regions()
        its: dict[int, Iterator[dict[str, Any]]] = {}
        for t in range(self.start_step + worker, self.steps, n_workers):
            k = t % self.K
            if k not in its:
                its[k] = self._stream(k, *regions[k])
            yield next(its[k])

    def _stream(self, k: int, start: int, n_batches: int) -> Iterator[dict[str, Any]]:
        B, cfg = self.B, self.cfg
        L = n_batches * B
        skip = len(range(k, self.start_step, self.K)) * B
        perm = _shuffle_order(L, cfg.shuffle_buffer, _pass_rng(cfg.seed, self.pass_index, start))
        needed = np.ones(L, dtype=bool)
        needed[perm[:skip]] = False
        pending: dict[int, tuple[Sample, str]] = {}
        batch: list[tuple[Sample, str]] = []
        out_pos = skip
        counts: Counter = Counter({"skipped_resume": skip} if skip else {})
        for i, item in self._inputs(start, L):
            if not needed[i]:
                continue
            pending[i] = item
            while out_pos < L and int(perm[out_pos]) in pending:
                batch.append(pending.pop(int(perm[out_pos])))
                out_pos += 1
                if len(batch) == B:
                    yield self._decode(batch, counts)
                    batch, counts = [], Counter()
        if out_pos < L:
            raise RuntimeError(
                f"stream {k} of rank {self.rank} read {out_pos} of {L} planned samples: "
                "a shard changed since the pass was planned"
            )

    def _inputs(self, start: int, n: int) -> Iterator[tuple[int, tuple[Sample, str]]]:
        """(index in stream, (sample, text)) for global positions [start, start + n)."""
        counts = np.asarray(self.plan.counts, dtype=np.int64)
        ends = np.cumsum(counts)
        s = int(np.searchsorted(ends, start, side="right"))
        pos = int(ends[s - 1]) if s else 0  # global position of shard s's first candidate
        end = start + n
        while pos < end and s < len(counts):
            url = self.cfg.shards[self.plan.order[s]]
            if pos + counts[s] <= start or counts[s] == 0:
                pos += int(counts[s])
                s += 1
                continue
            c: Counter = Counter()
            for chunk in _chunks(url, self.cfg.limits, True, c):
                good, texts = _select(chunk, self.subset, self.keep, self.pass_index, c)
                for smp, text in zip(good, texts, strict=True):
                    if start <= pos < end:
                        yield pos - start, (smp, text)
                    pos += 1
                if pos >= end:
                    break
            s += 1

    def _decode(self, batch: list[tuple[Sample, str]], counts: Counter) -> dict[str, Any]:
        images = [s.image or b"" for s, _ in batch]
        pixels, ok, failures, _ = decode_images(images, self.transform, self.cfg.limits)
        counts["read"] += len(batch)
        counts["kept"] += int(ok.sum())
        for reason, _detail in failures:
            counts[f"dropped_{reason}"] += 1
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            size = self.cfg.image_size
            pixels = np.zeros((1, size, size, 3), dtype=np.uint8)
            rows = [(0, "", "")] * len(batch)
            counts["padded_blank"] += len(batch)
        else:
            slot = np.cumsum(ok) - 1  # row -> index into pixels for decoded rows
            rows = []
            bad_seen = 0
            for r, (s, text) in enumerate(batch):
                if ok[r]:
                    rows.append((int(slot[r]), text, s.uid))
                else:
                    j = bad_seen % len(idx)
                    bad_seen += 1
                    src = int(idx[j])
                    rows.append((int(slot[src]), batch[src][1], batch[src][0].uid))
            counts["padded"] += bad_seen
        take = np.asarray([r[0] for r in rows], dtype=np.int64)
        arr = np.ascontiguousarray(pixels[take].transpose(0, 3, 1, 2))
        return {
            "images": torch.from_numpy(arr),
            "texts": [r[1] for r in rows],
            "uids": [r[2] for r in rows],
            "_counts": dict(counts),
        }


class _Iterable(tud.IterableDataset):
    """A rank's streams as a DataLoader dataset: worker `w` of `W` yields its steps."""

    def __init__(self, body: _RankData) -> None:
        self.body = body

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = tud.get_worker_info()
        if info is None:
            return self.body.iterate(0, 1)
        return self.body.iterate(info.id, info.num_workers)


class TrainBatches:
    """Iterator of one rank's batches for one pass: `dict(images=uint8 [B, 3, H, W],
    texts=list[str], uids=list[str])`, B = global_batch // world_size. See the module docstring
    for the order, the guarantees and the costs.

    `keep(uids, texts, pass_index) -> (mask, texts)` runs before any image is read or decoded
    (at planning and at reading; it must be deterministic and element-wise). `len(self)` is the
    number of batches this iteration yields (`steps_per_pass - start_step`).
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        *,
        rank: int,
        world_size: int,
        pass_index: int,
        start_step: int = 0,
        keep: Keep | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if cfg.global_batch % world_size:
            raise ValueError(
                f"global batch {cfg.global_batch} is not divisible by world_size {world_size}"
            )
        if start_step < 0 or pass_index < 0:
            raise ValueError("start_step and pass_index must be >= 0")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.pass_index, self.start_step, self.keep = pass_index, start_step, keep
        self._body: _RankData | None = None
        self._stats: Counter = Counter()

    def _ready(self) -> _RankData:
        if self._body is None:
            subset = Subset.load(self.cfg.subset) if self.cfg.subset else None
            plan = _plan(self.cfg, self.pass_index, self.keep, subset)
            self._body = _RankData(
                self.cfg,
                plan,
                subset,
                self.keep,
                self.rank,
                self.world_size,
                self.pass_index,
                self.start_step,
            )
            if self.rank == 0:  # pass-wide counters, once (stats are summed over ranks)
                steps = self._body.steps
                self._stats.update({f"pass_{k}": v for k, v in plan.counters.items()})
                self._stats["pass_candidates"] = plan.total
                self._stats["pass_steps"] = steps
                self._stats["pass_dropped_remainder"] = plan.total - steps * self.cfg.global_batch
        return self._body

    @property
    def steps_per_pass(self) -> int:
        return self._ready().steps

    def __len__(self) -> int:
        return max(0, self.steps_per_pass - self.start_step)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        body = self._ready()
        if self.start_step >= body.steps:
            return
        n_workers = _workers(self.cfg.num_workers, body.K)
        if n_workers == 0:
            source: Any = body.iterate(0, 1)
        else:
            source = tud.DataLoader(
                _Iterable(body),
                batch_size=None,
                num_workers=n_workers,
                prefetch_factor=2,
                persistent_workers=False,
            )
        for batch in source:
            self._stats.update(batch.pop("_counts"))
            yield batch

    def stats(self) -> dict[str, int]:
        """read, kept, dropped_<reason>, padded, skipped_resume so far (this rank); on rank 0
        also the pass-wide plan counters `pass_*` (read, dropped_<reason>, candidates, steps,
        dropped_remainder)."""
        return dict(self._stats)


def samples_per_pass(cfg: LoaderConfig, *, pass_index: int = 0, keep: Keep | None = None) -> int:
    """Candidates of one pass with `keep` (reads no image)."""
    subset = Subset.load(cfg.subset) if cfg.subset else None
    return _plan(cfg, pass_index, keep, subset).total


def steps_per_pass(cfg: LoaderConfig, *, pass_index: int = 0, keep: Keep | None = None) -> int:
    return samples_per_pass(cfg, pass_index=pass_index, keep=keep) // cfg.global_batch
