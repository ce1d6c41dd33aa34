"""Image shards: read webdataset tars and Parquet image tables, decode images with bounds.

Layouts read (any fsspec URL):

- **webdataset tar** (img2dataset / DataComp / `curation synth --images` / `curation images
  fetch`): members `KEY.jpg|jpeg|png|webp|...`, `KEY.txt` (caption), `KEY.json` (metadata with
  `uid`, `url`, `caption`, `original_width`, ...), members of one sample consecutive. A `.parquet`
  beside a tar (same name) is its metadata table and is not read as images.
- **Parquet with an image-bytes column**: a binary column (`jpg`, `png`, `webp`, `image`,
  `image_bytes`, `bytes`) or a struct column with a `bytes` field (the Hugging Face `Image`
  layout), plus a caption column (`text` or `caption`) and `uid` (else `key`).

Shards are streamed: `iter_image_shard` yields chunks of at most `chunk_rows` samples, so a
reader holds about one chunk of image bytes however large the shard (`read_image_shard` collects
the chunks, for callers that want the whole shard).

Safety: tar members are read into memory one at a time from a stream, never extracted to disk;
non-regular members (directories, links, devices) are skipped and counted; a member larger than
`max_member_bytes` is skipped unread; a shard over `max_shard_bytes` (uncompressed) is cut
there; an image whose header declares more than `max_pixels` pixels is refused before its pixels
are decoded; only the formats in `IMAGE_FORMATS` are opened. Every dropped sample is counted
under `rows_dropped_<reason>` and listed in the quarantine (`core.accounting.quarantine_record`:
stage `score`, the shard's name and URL, the sample's `key`), so `rows_read = rows_written +
Σ rows_dropped` holds per shard.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from curation.core import fsio
from curation.core.accounting import quarantine_record

__all__ = [
    "IMAGE_EXTS",
    "IMAGE_FORMATS",
    "ImageLimits",
    "ImageShard",
    "PixelTransform",
    "check_image_shards",
    "decode_images",
    "iter_image_shard",
    "list_image_shards",
    "probe_images",
    "read_image_shard",
    "read_parquet_images",
    "read_tar",
]

#: Member extensions read as the sample's image (the first present, in this order).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: Pillow decoders allowed (anything else, e.g. EPS or PSD, is refused as not an image).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
#: Binary columns taken as image bytes in Parquet image tables, in this order.
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes", "bytes")
META_COLUMNS = ("key", "uid", "url", "text", "original_width", "original_height")
#: The stage named in quarantine records written here (image shards are read to be scored).
STAGE = "score"


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one sample may cost: bytes read per member, pixels decoded per image."""

    max_member_bytes: int = 32 << 20
    max_pixels: int = 50_000_000
    max_shard_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if min(self.max_member_bytes, self.max_pixels, self.max_shard_bytes) < 1:
            raise ValueError(
                f"image limits must be positive (max_member_bytes={self.max_member_bytes}, "
                f"max_pixels={self.max_pixels}, max_shard_bytes={self.max_shard_bytes})"
            )


@dataclass
class ImageShard:
    """Samples of a shard (all of it, or one chunk): `table` (META_COLUMNS + `image` bytes),
    counters and quarantine entries."""

    table: pa.Table
    counts: Counter = field(default_factory=Counter)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


class _Chunker:
    """Cuts a shard's kept samples into `ImageShard` chunks of `size` rows, with counters.

    A full chunk is handed out only when the next kept sample arrives, so a shard gives as many
    chunks as `ceil(kept / size)` (one, empty, when nothing is kept) and the last chunk carries
    what comes after its last row: trailing drops and the shard-level counters/quarantine. Each
    sample is counted on the chunk open when it is read, so every chunk reconciles on its own:
    `rows_read = num_rows + Σ rows_dropped_<reason>`.
    """

    def __init__(self, name: str, url: str, size: int) -> None:
        self.name, self.url, self.size = name, url, size
        self.rows_read = 0  # the whole shard's
        self._reset()

    def _reset(self) -> None:
        self.tables: list[pa.Table] = []
        self.rows: list[dict[str, Any]] = []
        self.n = 0
        self.counts: Counter = Counter()
        self.quarantine: list[dict[str, Any]] = []

    def drop(self, key: str | None, reason: str, detail: str = "") -> None:
        """One sample read and dropped for `reason`."""
        self.rows_read += 1
        self.counts["rows_read"] += 1
        self.counts[f"rows_dropped_{reason}"] += 1
        self.quarantine.append(
            quarantine_record(STAGE, self.name, self.url, reason, detail, key=key)
        )

    def fail(self, reason: str, exc: BaseException) -> None:
        """The shard cannot be read on (`corrupt_shard`, `shard_too_large`)."""
        self.counts[f"shards_{reason}"] += 1
        self.quarantine.append(
            quarantine_record(
                STAGE,
                self.name,
                self.url,
                reason,
                f"{type(exc).__name__}: {exc}",
                samples_before_error=self.rows_read,
            )
        )

    def add_row(self, row: dict[str, Any]) -> Iterator[ImageShard]:
        """One kept sample (a tar's); yields the previous chunk when it was full."""
        if self.n == self.size:
            yield self._take()
        self.rows.append(row)
        self.n += 1
        self.rows_read += 1
        self.counts["rows_read"] += 1

    def add_table(self, table: pa.Table) -> Iterator[ImageShard]:
        """Kept samples (a Parquet batch's); yields each chunk that fills up before them."""
        while table.num_rows:
            if self.n == self.size:
                yield self._take()
            k = min(self.size - self.n, table.num_rows)
            self.tables.append(table.slice(0, k))
            self.n += k
            self.rows_read += k
            self.counts["rows_read"] += k
            table = table.slice(k)

    def finish(self) -> ImageShard:
        """The last chunk."""
        return self._take()

    def _take(self) -> ImageShard:
        tables = self.tables + ([_table(self.rows)] if self.rows else [])
        table = pa.concat_tables(tables) if tables else _table([])
        chunk = ImageShard(table, self.counts, self.quarantine)
        self._reset()
        return chunk


def list_image_shards(inputs: Sequence[str], literal: bool = False) -> list[str]:
    """Tar shards (`.tar`, gzip'd `.tar.gz` / `.tgz`) and Parquet image tables among files /
    globs / folders, sorted. `literal`: inputs are paths, no glob or brace expansion.

    A `.parquet` with a tar of the same name beside it is that tar's metadata, not an
    image table, and is left out.
    """
    urls = fsio.expand_inputs(list(inputs), suffixes=TAR_SUFFIXES + (".parquet",), literal=literal)
    tars = {u[: -len(sfx)] for u in urls for sfx in TAR_SUFFIXES if u.endswith(sfx)}
    out = [
        u
        for u in urls
        if u.endswith(TAR_SUFFIXES)
        or (u.endswith(".parquet") and u[: -len(".parquet")] not in tars)
    ]
    if not out:
        raise FileNotFoundError(
            f"no .tar, .tar.gz, .tgz or .parquet image shards in {list(inputs)}"
        )
    return out


#: Suffixes of webdataset tar shards (the reader detects gzip by its magic bytes).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def iter_image_shard(
    url: str,
    limits: ImageLimits | None = None,
    image_column: str | None = None,
    shard: str | None = None,
    chunk_rows: int = 512,
) -> Iterator[ImageShard]:
    """Stream a tar or Parquet image shard (by suffix) as chunks of at most `chunk_rows` kept
    samples. Memory is bounded by a chunk, not by the shard: a tar is read one sample past the
    chunk it hands out; a Parquet table one row group at a time, in record batches.

    Each chunk's `counts` and `quarantine` cover the samples read with it (they reconcile per
    chunk); the shard-level ones (`shards_corrupt_shard` / `shards_shard_too_large` and their
    quarantine entry) ride on the **last** chunk, as do drops after the last kept sample. A
    shard always yields at least one chunk (an empty one when nothing is kept). `shard` names
    the shard in quarantine entries (default `fsio.shard_name(url)`). I/O errors propagate, so
    the task is retried rather than the shard recorded half-read; a consumer that has used
    earlier chunks must then start the shard over.
    """
    limits = limits or ImageLimits()
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    name = shard if shard is not None else fsio.shard_name(url)
    if url.endswith(TAR_SUFFIXES):  # gzip tars are detected by their magic bytes
        return _iter_tar(url, name, limits, chunk_rows)
    if url.endswith(".parquet"):
        return _iter_parquet(url, name, limits, image_column, chunk_rows)
    raise ValueError(
        f"{url}: an image shard is a .tar / .tar.gz / .tgz (webdataset) or a .parquet image table"
    )


def read_image_shard(
    url: str,
    limits: ImageLimits | None = None,
    image_column: str | None = None,
    shard: str | None = None,
) -> ImageShard:
    """Read a whole tar or Parquet image shard (by suffix) into one `ImageShard`.

    Holds every image of the shard in memory: stream with `iter_image_shard` where that matters.
    """
    return _collect(iter_image_shard(url, limits, image_column, shard, _COLLECT_ROWS))


#: Chunk size when a whole shard is collected anyway (fewer, larger pieces to concatenate).
_COLLECT_ROWS = 1 << 16


def _collect(chunks: Iterable[ImageShard]) -> ImageShard:
    tables: list[pa.Table] = []
    out = ImageShard(table=_table([]))
    for chunk in chunks:
        tables.append(chunk.table)
        out.counts.update(chunk.counts)
        out.quarantine.extend(chunk.quarantine)
    if tables:
        out.table = pa.concat_tables(tables)
    return out


def check_image_shards(urls: Sequence[str], image_column: str | None = None) -> None:
    """Fail before any work when a Parquet image table has no usable image column.

    Reads only the Parquet footers. A file that is not Parquet at all is left to the reader,
    which quarantines it as `corrupt_shard`.
    """
    for url in urls:
        if not url.endswith(".parquet"):
            continue
        fs, path = url_to_fs(url)
        try:
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
        except pa.ArrowInvalid:
            continue
        _image_bytes_field(schema, url, image_column)


# ----------------------------------------------------------------------------------------------
# webdataset tars


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


class _ShardTooLarge(Exception):
    pass


class _Tail:
    """A read-only tar stream that remembers its last bytes (to check how the tar ended) and
    stops at `limit` uncompressed bytes (a gzip tar could otherwise inflate without bound)."""

    KEEP = 1 << 16

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.pos = 0
        self.buf = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else 1 << 20)
        self.pos += len(data)
        if self.pos > self.limit:
            raise _ShardTooLarge(f"over max_shard_bytes {self.limit:,} uncompressed")
        self.buf += data
        if len(self.buf) > 2 * self.KEEP:
            del self.buf[: len(self.buf) - self.KEEP]
        return data

    def block_at(self, offset: int) -> bytes:
        """The 512 bytes at `offset` (fewer at end of stream); reads on as needed."""
        while self.pos < offset + 512:
            if not self.read(offset + 512 - self.pos):
                break
        start = offset - (self.pos - len(self.buf))
        if start < 0:
            raise ValueError(f"tar offset {offset} is behind the kept window")
        return bytes(self.buf[start : start + 512])


def _open_tar_stream(f: Any, limit: int) -> _Tail:
    """The uncompressed tar stream of `f` (gzip is detected by its magic bytes)."""
    head = f.read(2)
    f.seek(0)
    return _Tail(gzip.GzipFile(fileobj=f, mode="rb") if head == b"\x1f\x8b" else f, limit)


def _tar_samples(
    f: Any, limits: ImageLimits, chunks: _Chunker
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) groups of consecutive members; raises on a broken tar.

    Python's tarfile ends quietly when the stream stops at a block boundary or meets a
    garbage header; a tar is only complete when an all-zero end-of-archive block follows its
    last member, so anything else is reported as truncated / corrupt.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    stream = _open_tar_stream(f, limits.max_shard_bytes)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                chunks.counts["members_skipped_not_regular"] += 1
                continue
            k, ext = _split_name(member.name)
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            if member.size > limits.max_member_bytes:
                parts[ext] = b""
                parts.setdefault("_oversize", b"")
                continue
            fobj = tar.extractfile(member)
            parts[ext] = fobj.read() if fobj is not None else b""
        end = stream.block_at(tar.offset)
        if len(end) < 512:
            raise tarfile.ReadError(f"truncated: no end-of-archive block at byte {tar.offset}")
        if end.count(0) != 512:
            raise tarfile.ReadError(f"corrupt: invalid member header at byte {tar.offset}")
        if key is not None:
            yield key, parts


def _sample_row(key: str, parts: dict[str, bytes], chunks: _Chunker) -> dict[str, Any] | None:
    """The sample's row, or None after recording why it is dropped."""
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if "_oversize" in parts:
        chunks.drop(key, "member_too_large")
        return None
    if img_ext is None:
        chunks.drop(key, "no_image", f"members: {sorted(parts)}")
        return None
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            chunks.drop(
                key,
                "bad_json",
                "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc),
            )
            return None
        # a "\\ud800" escape decodes to a lone surrogate, which Arrow cannot hold
        for field in ("uid", "url", "caption"):
            value = meta.get(field)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    chunks.drop(
                        key,
                        "bad_unicode",
                        f"field {field!r} has a lone surrogate: {ascii(value[:80])}",
                    )
                    return None
    text = meta.get("caption")
    if "txt" in parts:
        try:
            text = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            chunks.drop(key, "bad_utf8", str(exc))
            return None
    uid = meta.get("uid")
    return {
        "key": key,
        "uid": str(uid) if uid not in (None, "") else key,
        "url": meta.get("url"),
        "text": text,
        "original_width": _int_or_none(meta.get("original_width", meta.get("width"))),
        "original_height": _int_or_none(meta.get("original_height", meta.get("height"))),
        "image": parts[img_ext],
    }


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return None
    return int(v)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "uid": pa.array([r["uid"] for r in rows], pa.string()),
            "url": pa.array([r["url"] for r in rows], pa.string()),
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "original_width": pa.array([r["original_width"] for r in rows], pa.int32()),
            "original_height": pa.array([r["original_height"] for r in rows], pa.int32()),
            "image": pa.array([r["image"] for r in rows], pa.binary()),
        }
    )


#: What a damaged tar raises (quarantined); any other OSError (a network read failing, a file
#: vanishing) propagates so that the task is retried and the shard is never marked done.
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _iter_tar(url: str, name: str, limits: ImageLimits, chunk_rows: int) -> Iterator[ImageShard]:
    """A tar's chunks; damage (and the shard limit) ends it with a quarantine entry."""
    chunks = _Chunker(name, url, chunk_rows)
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            for key, parts in _tar_samples(f, limits, chunks):
                row = _sample_row(key, parts, chunks)
                if row is not None:
                    yield from chunks.add_row(row)
    except (*_CORRUPT, _ShardTooLarge) as exc:
        chunks.fail("shard_too_large" if isinstance(exc, _ShardTooLarge) else "corrupt_shard", exc)
    yield chunks.finish()


def read_tar(url: str, limits: ImageLimits | None = None, shard: str | None = None) -> ImageShard:
    """Read a whole webdataset tar (plain or gzip) into memory, member by member, never to disk.

    A tar that cannot be read to its end is quarantined as `corrupt_shard`, one holding more
    than `max_shard_bytes` uncompressed as `shard_too_large` (the samples read before are kept
    and counted; the rest of the shard is unknown and said so). Streamed: `iter_image_shard`.
    """
    name = shard if shard is not None else fsio.shard_name(url)
    return _collect(_iter_tar(url, name, limits or ImageLimits(), _COLLECT_ROWS))


# ----------------------------------------------------------------------------------------------
# Parquet image tables


def _image_column(table_schema: pa.Schema, url: str, name: str | None) -> str:
    if name is not None:
        if name not in table_schema.names:
            raise ValueError(f"{url}: no image column {name!r} (has {table_schema.names})")
        return name
    for c in PARQUET_IMAGE_COLUMNS:
        if c in table_schema.names:
            return c
    raise ValueError(
        f"{url}: no image-bytes column; expected one of {PARQUET_IMAGE_COLUMNS} "
        f"(has {table_schema.names}); name it with --image-column"
    )


def _image_bytes_field(schema: pa.Schema, url: str, name: str | None) -> tuple[str, bool]:
    """The image column's name and whether it is a struct holding `bytes`; checks its type."""
    name = _image_column(schema, url, name)
    typ = schema.field(name).type
    is_struct = pa.types.is_struct(typ)
    if is_struct:
        if typ.get_field_index("bytes") < 0:
            raise ValueError(
                f"{url}: image column {name!r} is {typ}, not binary (a struct needs `bytes`)"
            )
        typ = typ.field("bytes").type
    if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        raise ValueError(f"{url}: image column {name!r} is {typ}, not binary")
    return name, is_struct


def _first(names: Sequence[str], *candidates: str) -> str | None:
    return next((c for c in candidates if c in names), None)


def _iter_parquet(
    url: str, name: str, limits: ImageLimits, image_column: str | None, chunk_rows: int
) -> Iterator[ImageShard]:
    """Read record batches of `chunk_rows` rows (a row group at a time), on whole columns.

    Rows whose image is null or empty are dropped as `no_image`, rows whose bytes exceed
    `max_member_bytes` as `member_too_large`. A file that is not Parquet, or whose data cannot
    be decoded (`ArrowInvalid`), is quarantined as `corrupt_shard`; I/O errors propagate.
    """
    import pyarrow.compute as pc

    chunks = _Chunker(name, url, chunk_rows)
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowInvalid as exc:
            chunks.fail("corrupt_shard", exc)
            yield chunks.finish()
            return
        schema = pf.schema_arrow
        img_name, is_struct = _image_bytes_field(schema, url, image_column)
        src = {
            "key": _first(schema.names, "key"),
            "uid": _first(schema.names, "uid"),
            "url": _first(schema.names, "url"),
            "text": _first(schema.names, "text", "caption"),
            "original_width": _first(schema.names, "original_width", "width"),
            "original_height": _first(schema.names, "original_height", "height"),
        }
        wanted = [c for c in dict.fromkeys([*src.values(), img_name]) if c is not None]
        batches = pf.iter_batches(batch_size=chunk_rows, columns=wanted)
        offset = 0
        while True:
            try:
                batch = next(batches, None)
            except pa.ArrowInvalid as exc:
                chunks.fail("corrupt_shard", exc)
                break
            if batch is None:
                break
            out = _parquet_rows(batch, src, img_name, is_struct, offset)
            offset += batch.num_rows
            lengths = pc.fill_null(pc.binary_length(out.column("image")), 0)
            lengths = lengths.to_numpy(zero_copy_only=False)
            reasons = np.where(
                lengths == 0,
                "no_image",
                np.where(lengths > limits.max_member_bytes, "member_too_large", ""),
            )
            bad = np.flatnonzero(reasons != "")
            if len(bad):
                keys = out.column("key").to_pylist()
                for i in bad:
                    chunks.drop(keys[i], str(reasons[i]))
                out = out.filter(pa.array(reasons == ""))
            yield from chunks.add_table(out)
    yield chunks.finish()


def _parquet_rows(
    batch: pa.RecordBatch,
    src: dict[str, str | None],
    img_name: str,
    is_struct: bool,
    offset: int,
) -> pa.Table:
    """A record batch of an image table as META_COLUMNS + `image` (no key: the row number)."""
    import pyarrow.compute as pc

    n = batch.num_rows

    def strings(out: str) -> pa.Array:
        c = src[out]
        return batch.column(c).cast(pa.string()) if c else pa.nulls(n, pa.string())

    def ints(out: str) -> pa.Array:
        c = src[out]
        return pc.cast(batch.column(c), pa.int32(), safe=False) if c else pa.nulls(n, pa.int32())

    img = batch.column(img_name)
    if is_struct:
        img = pc.struct_field(img, "bytes")
    keys = (
        strings("key")
        if src["key"]
        else pa.array([f"{i:09d}" for i in range(offset, offset + n)], pa.string())
    )
    return pa.table(
        {
            "key": keys,
            "uid": strings("uid") if src["uid"] else keys,
            "url": strings("url"),
            "text": strings("text"),
            "original_width": ints("original_width"),
            "original_height": ints("original_height"),
            "image": img.cast(pa.binary()),
        }
    )


def read_parquet_images(
    url: str,
    limits: ImageLimits | None = None,
    image_column: str | None = None,
    shard: str | None = None,
) -> ImageShard:
    """Read a whole Parquet table with an image-bytes column into an `ImageShard`.

    Rows whose image is null or empty are dropped as `no_image`, rows whose bytes exceed
    `max_member_bytes` as `member_too_large`. Streamed: `iter_image_shard`.
    """
    name = shard if shard is not None else fsio.shard_name(url)
    return _collect(_iter_parquet(url, name, limits or ImageLimits(), image_column, _COLLECT_ROWS))


# ----------------------------------------------------------------------------------------------
# Decoding


class PixelTransform:
    """The PIL part of an open_clip eval transform: resize, crop, RGB → uint8 `(H, W, 3)`.

    open_clip's preprocessing is `[Resize, CenterCrop, convert RGB, ToTensor, Normalize]`.
    Everything before `ToTensor` works on PIL images and is run here, in CPU decode workers;
    `ToTensor` + `Normalize` are `x / 255` then `(x - mean) / std` and run on the scorer's
    device (`curation.stages.score`). Together they give exactly open_clip's `preprocess(img)`.
    """

    def __init__(self, size: int, interpolation: str, resize_mode: str) -> None:
        self.size = int(size)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self._fn: Callable[[Any], Any] | None = None

    def _build(self) -> Callable[[Any], Any]:
        from open_clip.transform import image_transform

        full = image_transform(
            self.size,
            is_train=False,
            interpolation=self.interpolation,
            resize_mode=self.resize_mode,
        )
        steps = []
        for t in full.transforms:
            if type(t).__name__ in ("ToTensor", "MaybeToTensor"):
                break
            steps.append(t)
        steps.append(lambda im: im.convert("RGB") if im.mode != "RGB" else im)

        def run(im: Any) -> Any:
            for s in steps:
                im = s(im)
            return im

        return run

    def __call__(self, im: Any) -> np.ndarray:
        if self._fn is None:
            self._fn = self._build()
        out = np.asarray(self._fn(im), dtype=np.uint8)
        if out.shape != (self.size, self.size, 3):
            raise ValueError(
                f"transform gave shape {out.shape}, expected {(self.size,) * 2 + (3,)}"
            )
        return out

    def __reduce__(self) -> tuple:
        return (PixelTransform, (self.size, self.interpolation, self.resize_mode))


def _open_header(data: bytes, limits: ImageLimits) -> Any:
    """Open an image and check its declared size; only the header is read, no pixel decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UnidentifiedImageError("empty image bytes")
    with warnings.catch_warnings():
        # Our own limit is checked next; Pillow's hard limit (DecompressionBombError at twice
        # Image.MAX_IMAGE_PIXELS, about 179M pixels) still applies on top of it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    w, h = im.size
    if w * h > limits.max_pixels:
        raise _TooLarge(f"{w}x{h} = {w * h:,} pixels > max_pixels {limits.max_pixels:,}")
    return im


def _open_bounded(data: bytes, limits: ImageLimits) -> Any:
    """Open an image, checking the declared size before any pixel is decoded."""
    im = _open_header(data, limits)
    im.load()
    return im


class _TooLarge(Exception):
    pass


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What opening or decoding a bad image raises (each is quarantined, see `_failure`)."""
    from PIL import Image

    return (_TooLarge, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError)


def _failure(exc: BaseException) -> tuple[str, str]:
    """The quarantine `(reason, detail)` of an error from `_decode_errors()`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, (_TooLarge, Image.DecompressionBombError)):
        return "image_too_large", str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image", f"not one of {', '.join(IMAGE_FORMATS)}"
    return "decode_error", _stable(f"{type(exc).__name__}: {exc}")


def _stable(msg: str) -> str:
    """An error message without object addresses, so quarantine files are reproducible."""
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", msg)


def decode_images(
    images: pa.Array | pa.ChunkedArray | Sequence[bytes],
    transform: Callable[[Any], np.ndarray],
    limits: ImageLimits | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Decode and transform images: `(pixels[n_ok, H, W, 3] uint8, ok[n], failures, sizes)`.

    `sizes[n_ok, 2]` (int32) holds each decoded image's width and height before the transform.

    `failures` holds `(reason, detail)` for each row with `ok == False`, in row order:
    `image_too_large` (declared pixels over the limit, or Pillow's own bomb check),
    `not_an_image` (no allowed decoder recognises the bytes) or `decode_error` (truncated or
    corrupt data). Decoding is inherently one image at a time; everything after it is batched.
    """
    limits = limits or ImageLimits()
    blobs = images.to_pylist() if isinstance(images, (pa.Array, pa.ChunkedArray)) else images
    n = len(blobs)
    ok = np.zeros(n, dtype=bool)
    out: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    failures: list[tuple[str, str]] = []
    for i, data in enumerate(blobs):
        try:
            im = _open_bounded(data, limits)
            out.append(transform(im))
            sizes.append(im.size)
            ok[i] = True
        except _decode_errors() as exc:
            failures.append(_failure(exc))
    if out:
        pixels = np.stack(out)
    else:
        size = getattr(transform, "size", 0)
        pixels = np.zeros((0, size, size, 3), dtype=np.uint8)
    return pixels, ok, failures, np.asarray(sizes, dtype=np.int32).reshape(-1, 2)


def probe_images(
    images: pa.Array | pa.ChunkedArray | Sequence[bytes],
    limits: ImageLimits | None = None,
) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray, list[tuple[str, str]]]:
    """Read only the headers of images: `(ok[n], failures, sizes, kinds)`, no pixel decoded.

    The same checks, in the same order and with the same reasons, as `decode_images` makes
    before it decodes (`not_an_image`, `image_too_large`, `decode_error` for a broken header);
    damage in the pixel data is only found by decoding. `sizes[n_ok, 2]` (int32) are the
    declared width and height, `kinds[n_ok]` Pillow's `(format, mode)`, e.g. `("JPEG", "RGB")`.
    """
    limits = limits or ImageLimits()
    blobs = images.to_pylist() if isinstance(images, (pa.Array, pa.ChunkedArray)) else images
    ok = np.zeros(len(blobs), dtype=bool)
    sizes: list[tuple[int, int]] = []
    kinds: list[tuple[str, str]] = []
    failures: list[tuple[str, str]] = []
    for i, data in enumerate(blobs):
        try:
            im = _open_header(data, limits)
            sizes.append(im.size)
            kinds.append((str(im.format), str(im.mode)))
            ok[i] = True
        except _decode_errors() as exc:
            failures.append(_failure(exc))
    return ok, failures, np.asarray(sizes, dtype=np.int32).reshape(-1, 2), kinds
