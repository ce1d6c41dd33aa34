"""Image shards: read webdataset tars and Parquet image tables, decode images with bounds.

Layouts read (any fsspec URL):

- **webdataset tar** (img2dataset / DataComp / `curation synth --images` / `curation images
  fetch`): members `KEY.jpg|jpeg|png|webp|...`, `KEY.txt` (caption), `KEY.json` (metadata with
  `uid`, `url`, `caption`, `original_width`, ...), members of one sample consecutive. A `.parquet`
  beside a tar (same name) is its metadata table and is not read as images.
- **Parquet with an image-bytes column**: a binary column (`jpg`, `png`, `webp`, `image`,
  `image_bytes`, `bytes`) or a struct column with a `bytes` field (the Hugging Face `Image`
  layout), plus a caption column (`text` or `caption`) and `uid` (else `key`).

Safety: tar members are read into memory one at a time from a stream, never extracted to disk;
non-regular members (directories, links, devices) are skipped and counted; a member larger than
`max_member_bytes` is skipped unread; an image whose header declares more than `max_pixels`
pixels is refused before its pixels are decoded; only the formats in `IMAGE_FORMATS` are opened.
Every dropped sample is counted under `rows_dropped_<reason>` and listed in the quarantine with
the shard, key and reason, so `rows_read = rows_written + Σ rows_dropped` holds per shard.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from curation.core import fsio

__all__ = [
    "IMAGE_EXTS",
    "IMAGE_FORMATS",
    "ImageLimits",
    "ImageShard",
    "PixelTransform",
    "check_image_shards",
    "decode_images",
    "list_image_shards",
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
    """One shard's samples: `table` (META_COLUMNS + `image` bytes), counters and quarantine."""

    table: pa.Table
    counts: Counter = field(default_factory=Counter)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


def _drop(shard: ImageShard, url: str, key: str | None, reason: str, detail: str = "") -> None:
    shard.counts[f"rows_dropped_{reason}"] += 1
    rec: dict[str, Any] = {"shard": url, "key": key, "reason": reason}
    if detail:
        rec["detail"] = detail[:300]
    shard.quarantine.append(rec)


def list_image_shards(inputs: Sequence[str]) -> list[str]:
    """Tar shards and Parquet image tables among files / globs / folders, sorted.

    A `.parquet` with a `.tar` of the same name beside it is that tar's metadata, not an
    image table, and is left out.
    """
    urls = fsio.expand_inputs(list(inputs), suffixes=(".tar", ".parquet"))
    tars = {u[: -len(".tar")] for u in urls if u.endswith(".tar")}
    out = [
        u
        for u in urls
        if u.endswith(".tar") or (u.endswith(".parquet") and u[: -len(".parquet")] not in tars)
    ]
    if not out:
        raise FileNotFoundError(f"no .tar or .parquet image shards in {list(inputs)}")
    return out


def read_image_shard(
    url: str, limits: ImageLimits | None = None, image_column: str | None = None
) -> ImageShard:
    """Read a tar or Parquet image shard (by suffix) into an `ImageShard`."""
    limits = limits or ImageLimits()
    if url.endswith(".tar"):
        return read_tar(url, limits)
    if url.endswith(".parquet"):
        return read_parquet_images(url, limits, image_column)
    raise ValueError(f"{url}: an image shard is a .tar (webdataset) or a .parquet image table")


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
        name = _image_column(schema, url, image_column)
        typ = schema.field(name).type
        if pa.types.is_struct(typ):
            typ = typ.field("bytes").type if typ.get_field_index("bytes") >= 0 else typ
        if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            raise ValueError(f"{url}: image column {name!r} is {typ}, not binary")


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
    import gzip

    head = f.read(2)
    f.seek(0)
    return _Tail(gzip.GzipFile(fileobj=f, mode="rb") if head == b"\x1f\x8b" else f, limit)


def _tar_samples(
    f: Any, url: str, limits: ImageLimits, shard: ImageShard
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
                shard.counts["members_skipped_not_regular"] += 1
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


def _sample_row(
    key: str, parts: dict[str, bytes], url: str, shard: ImageShard
) -> dict[str, Any] | None:
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if "_oversize" in parts:
        _drop(shard, url, key, "member_too_large")
        return None
    if img_ext is None:
        _drop(shard, url, key, "no_image", f"members: {sorted(parts)}")
        return None
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            _drop(shard, url, key, "bad_json", str(exc))
            return None
    text = meta.get("caption")
    if "txt" in parts:
        try:
            text = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            _drop(shard, url, key, "bad_utf8", str(exc))
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


def read_tar(url: str, limits: ImageLimits | None = None) -> ImageShard:
    """Read a webdataset tar (plain or gzip) into memory, member by member, never to disk.

    A tar that cannot be read to its end is quarantined as `corrupt_shard`, one holding more
    than `max_shard_bytes` uncompressed as `shard_too_large` (the samples read before are kept
    and counted; the rest of the shard is unknown and said so).
    """
    limits = limits or ImageLimits()
    shard = ImageShard(table=_table([]))
    rows: list[dict[str, Any]] = []
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            for key, parts in _tar_samples(f, url, limits, shard):
                shard.counts["rows_read"] += 1
                row = _sample_row(key, parts, url, shard)
                if row is not None:
                    rows.append(row)
    except (*_CORRUPT, _ShardTooLarge) as exc:
        reason = "shard_too_large" if isinstance(exc, _ShardTooLarge) else "corrupt_shard"
        shard.counts[f"shards_{reason}"] += 1
        shard.quarantine.append(
            {
                "shard": url,
                "reason": reason,
                "detail": f"{type(exc).__name__}: {exc}"[:300],
                "samples_before_error": shard.counts["rows_read"],
            }
        )
    shard.table = _table(rows)
    return shard


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


def read_parquet_images(
    url: str, limits: ImageLimits | None = None, image_column: str | None = None
) -> ImageShard:
    """Read a Parquet table with an image-bytes column into an `ImageShard`.

    Rows whose image is null or empty are dropped as `no_image`, rows whose bytes exceed
    `max_member_bytes` as `member_too_large`; the rest is done on whole columns.
    """
    import pyarrow.compute as pc

    limits = limits or ImageLimits()
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except pa.ArrowInvalid as exc:  # not Parquet / damaged; I/O errors propagate (retried)
        shard = ImageShard(table=_table([]))
        shard.counts["shards_corrupt_shard"] += 1
        shard.quarantine.append({"shard": url, "reason": "corrupt_shard", "detail": str(exc)[:300]})
        return shard
    col_name = _image_column(table.schema, url, image_column)
    img = table.column(col_name)
    if pa.types.is_struct(img.type):
        img = pc.struct_field(img, "bytes")
    if not (pa.types.is_binary(img.type) or pa.types.is_large_binary(img.type)):
        raise ValueError(f"{url}: image column {col_name!r} is {img.type}, not binary")
    n = table.num_rows
    keys = (
        table.column("key").cast(pa.string())
        if "key" in table.column_names
        else pa.array([f"{i:09d}" for i in range(n)], pa.string())
    )
    uids = table.column("uid").cast(pa.string()) if "uid" in table.column_names else keys
    text_col = next((c for c in ("text", "caption") if c in table.column_names), None)
    null_str = pa.nulls(n, pa.string())

    def ints(*names: str) -> pa.ChunkedArray | pa.Array:
        for c in names:
            if c in table.column_names:
                return pc.cast(table.column(c), pa.int32(), safe=False)
        return pa.nulls(n, pa.int32())

    out = pa.table(
        {
            "key": keys,
            "uid": uids,
            "url": table.column("url").cast(pa.string())
            if "url" in table.column_names
            else null_str,
            "text": table.column(text_col).cast(pa.string()) if text_col else null_str,
            "original_width": ints("original_width", "width"),
            "original_height": ints("original_height", "height"),
            "image": img.cast(pa.binary()),
        }
    )
    shard = ImageShard(table=out)
    shard.counts["rows_read"] = n
    lengths = pc.fill_null(pc.binary_length(out.column("image")), 0).to_numpy(zero_copy_only=False)
    reasons = np.where(
        lengths == 0,
        "no_image",
        np.where(lengths > limits.max_member_bytes, "member_too_large", ""),
    )
    bad = np.flatnonzero(reasons != "")
    key_list = out.column("key").to_pylist() if len(bad) else []
    for i in bad:
        _drop(shard, url, key_list[i], str(reasons[i]))
    if len(bad):
        shard.table = out.filter(pa.array(reasons == ""))
    return shard


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


def _open_bounded(data: bytes, limits: ImageLimits) -> Any:
    """Open an image, checking the declared size before any pixel is decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        # Our own limit is checked next; Pillow's hard limit (DecompressionBombError at twice
        # Image.MAX_IMAGE_PIXELS, about 179M pixels) still applies on top of it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    w, h = im.size
    if w * h > limits.max_pixels:
        raise _TooLarge(f"{w}x{h} = {w * h:,} pixels > max_pixels {limits.max_pixels:,}")
    im.load()
    return im


class _TooLarge(Exception):
    pass


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
    from PIL import Image, UnidentifiedImageError

    limits = limits or ImageLimits()
    blobs = images.to_pylist() if isinstance(images, (pa.Array, pa.ChunkedArray)) else images
    n = len(blobs)
    ok = np.zeros(n, dtype=bool)
    out: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    failures: list[tuple[str, str]] = []
    for i, data in enumerate(blobs):
        try:
            if not data:
                raise UnidentifiedImageError("empty image bytes")
            im = _open_bounded(data, limits)
            out.append(transform(im))
            sizes.append(im.size)
            ok[i] = True
        except (_TooLarge, Image.DecompressionBombError) as exc:
            failures.append(("image_too_large", str(exc)))
        except UnidentifiedImageError:
            failures.append(("not_an_image", f"not one of {', '.join(IMAGE_FORMATS)}"))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            failures.append(("decode_error", _stable(f"{type(exc).__name__}: {exc}")))
    if out:
        pixels = np.stack(out)
    else:
        size = getattr(transform, "size", 0)
        pixels = np.zeros((0, size, size, 3), dtype=np.uint8)
    return pixels, ok, failures, np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
