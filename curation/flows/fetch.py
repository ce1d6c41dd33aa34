"""Download a curated subset's images into webdataset shards keyed by `uid`, with img2dataset.

`fetch(CURATED, OUT)` writes, per img2dataset shard of a curated part `NAME`:

```
OUT/NAME-00000.tar       members <uid>.jpg, <uid>.txt (caption), <uid>.json (uid, url, caption, ...)
OUT/NAME-00000.parquet   one row per input row of that shard: uid, key (= uid), url, caption,
                         status, reason, error_message, width, height, original_*, sha256, exif
OUT/_done/NAME-00000.json  the shard's counters (rows read / written / dropped by reason)
OUT/_stage.json          the job's fingerprint (a different job refuses to resume)
```

How it works:

1. The curated parts' uid columns are read once to check them and find duplicate uids
   (`SeenUids`: whole columns, a few bytes per distinct uid), then the parts are staged (uid,
   url, text; duplicates dropped and counted) into `OUT/_work/input/`, one file per part, and
   img2dataset's `download()` runs on that folder in its incremental mode into
   `OUT/_work/img2dataset/` (numeric keys, `00000.tar`). Shards done by an earlier run are
   skipped (`_done` marker, or img2dataset's own `<id>_stats.json`).
2. Each finished img2dataset shard is re-keyed by one Ray task: the tar is streamed member by
   member (never extracted to disk) into `OUT/NAME-k.tar`, in input row order, with `<uid>.<ext>`
   names and fixed headers (mtime 0, uid/gid 0, no user names), so the bytes depend only on the
   images; its Parquet is rewritten with a `reason` class per failed row. Both are written under a
   temporary name and renamed; the marker comes last.

Decoding is bounded: img2dataset checks `max_image_area` only after `cv2.imdecode` decoded the
whole image (a 20000x20000 PNG of 50 KB takes 1.4 GB and 3 s; an RGBA one of 1.5 MB was OOM-killed
at 23 GB by its float64 alpha matting), so its `Resizer` is replaced, for the duration of the
call, by `BoundedResizer`, which first reads the declared size from the image header (Pillow,
lazily) and rejects bombs and non-images before any pixel is decoded. A format Pillow cannot
identify fails as `not_an_image`, even if OpenCV could decode it.

Rows: duplicates of a uid (the same image URL on several pages) are downloaded once, for the
first row, and counted as `duplicate_uid` in the summary (they have no Parquet row); a null URL
fails as `invalid_url`. Every other input row has exactly one Parquet row. Reason classes are in
`REASONS` (`other` when none matches).

`resize_mode="no"` with img2dataset's `skip_reencode` keeps JPEG bytes exactly as downloaded
(other formats are re-encoded to JPEG: the member extension is one per run); img2dataset still
decodes every image in that mode, so corrupt images fail as `decode_error`.

Distributor: img2dataset's `ray` distributor works with an already initialised Ray (tested: the
same bytes as `multiprocessing`), so it is the default: one task (1 CPU) per img2dataset shard
over the whole cluster. It ignores `processes` and does not retry a failed shard; such a shard has
no result and the run ends with an error saying to rerun. `multiprocessing` runs a spawn pool of
`processes` on the driver machine and retries shards once. Either way OUT must be storage that
every worker sees (img2dataset writes its shards there directly).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import signal
import tarfile
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.core import fsio
from curation.core.accounting import summarize, write_stage_manifest
from curation.core.arrow import string_buffers
from curation.core.fingerprint import inputs_fingerprint
from curation.core.stage import Shard
from curation.executor.runner import check_output_location, run_tasks
from curation.io.parts import (
    check_output_not_in_inputs,
    done_markers,
    leased,
    parts_of,
    prepare_stage_dir,
    shard_names,
    write_marker,
)

__all__ = [
    "DISTRIBUTORS",
    "REASONS",
    "RESIZE_MODES",
    "BoundedResizer",
    "FetchOptions",
    "SeenUids",
    "classify_errors",
    "fetch",
    "header_error",
    "prepare_environment",
    "rekey_tar",
]

DISTRIBUTORS = ("ray", "multiprocessing")
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
WORK_DIR = "_work"
IMAGE_EXT = "jpg"  # img2dataset's encode_format: one extension per run
UID_RE = re.compile(r"[A-Za-z0-9_-]{1,95}")  # a webdataset key: no dots or slashes; fits ustar
# Environment for processes that import img2dataset: albumentations (imported by it) asks PyPI
# for a newer version on import unless told not to.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}

# (reason, regex on img2dataset's / BoundedResizer's error message), first match wins.
REASONS: tuple[tuple[str, str], ...] = (
    ("http_404", r"HTTP Error 404"),
    ("http_error", r"HTTP Error \d{3}"),
    ("timeout", r"(?i)timed? ?out"),
    ("invalid_url", r"(?i)unknown url type|no host given|invalid url|url can't contain"),
    ("image_too_large", r"(?i)image area too large|CV_IO_MAX_IMAGE_PIXELS|decompression ?bomb"),
    ("not_an_image", r"^not an image"),
    ("image_filtered", r"^(image too small|aspect ratio too large)"),
    ("disallowed", r"X-Robots-Tag"),
    (
        "connection_error",
        r"(?i)urlopen error|connection (refused|reset|aborted)|remote ?end ?closed|"
        r"remotedisconnected|incompleteread|badstatusline|name or service|ssl|certificate",
    ),
    ("decode_error", r"(?i)image decoding error|unreadable image header|image file is truncated"),
)


@dataclass(frozen=True)
class FetchOptions:
    """What `fetch` passes to img2dataset; checked when built.

    `max_image_area` (pixels, from the image header, before decoding) bounds memory per decode;
    the default 25 MP lets 6000x4000 photos through. Pillow's own bomb limit (about 179 MP) caps
    it. `timeout` (seconds) is per socket operation; `retries` are extra download attempts.
    """

    processes: int | None = None
    threads: int = 64
    timeout: float = 10.0
    retries: int = 0
    max_image_area: int = 25_000_000
    samples_per_shard: int = 10_000
    resize_mode: str = "no"
    image_size: int = 256
    distributor: str = "ray"

    def __post_init__(self) -> None:
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor must be one of {DISTRIBUTORS}, not {self.distributor!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        for name in ("threads", "max_image_area", "samples_per_shard", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.processes is not None and self.processes < 1:
            raise ValueError("processes must be at least 1 (or None for all CPUs)")
        if self.timeout <= 0 or self.retries < 0:
            raise ValueError(f"need timeout > 0 and retries >= 0 ({self.timeout}, {self.retries})")

    def fingerprint_params(self) -> dict[str, Any]:
        """The options that decide the output bytes (timeouts, retries and workers do not)."""
        return {
            "max_image_area": self.max_image_area,
            "samples_per_shard": self.samples_per_shard,
            "resize_mode": self.resize_mode,
            "image_size": self.image_size,
        }


# -- bounded decoding (runs inside img2dataset's workers) ---------------------------------------
def prepare_environment() -> None:
    """Set `WORKER_ENV` in this process (inherited by processes and a local Ray started later)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)


def header_error(stream: IO[bytes], max_area: float) -> str | None:
    """Why an image must not be decoded (bomb, not an image), from its header alone; else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as im:  # lazy: parses the header, decodes no pixels
                width, height = im.size
    except Image.DecompressionBombError as err:
        return f"image area too large: {err}"
    except UnidentifiedImageError:
        return "not an image: no known image header"
    except Exception as err:  # noqa: BLE001 - any parser failure is this sample's error
        return f"unreadable image header: {type(err).__name__}: {err}"
    finally:
        stream.seek(0)
    if width * height > max_area:
        return (
            f"image area too large: header declares {width}x{height} = {width * height} pixels "
            f"> max_image_area {max_area:g}"
        )
    return None


class BoundedResizer:
    """img2dataset's Resizer behind a header check: refuses what it would otherwise fully decode.

    img2dataset calls its resizer as `resizer(img_stream, bbox_list)` and reads nothing else
    from it; `wrap` is what replaces its `Resizer` class while `download()` builds one.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.max_image_area = inner.max_image_area

    @classmethod
    def wrap(cls, resizer_class: type) -> Any:
        """A factory with `resizer_class`'s signature that returns it wrapped."""
        return functools.partial(_build_bounded, cls, resizer_class)

    def __call__(self, img_stream: IO[bytes], blurring_bbox_list: Any = None) -> tuple:
        err = header_error(img_stream, self.max_image_area)
        if err is not None:
            return None, None, None, None, None, err
        return self.inner(img_stream, blurring_bbox_list)


def _build_bounded(cls: type, resizer_class: type, *args: Any, **kwargs: Any) -> Any:
    return cls(resizer_class(*args, **kwargs))


# -- error classes ----------------------------------------------------------------------------
def classify_errors(
    status: pa.Array | pa.ChunkedArray, errors: pa.Array | pa.ChunkedArray
) -> pa.Array:
    """A reason class per row (see `REASONS`; `other` if none matches), null where status is success."""
    errors = pc.fill_null(pc.cast(errors, pa.string()), "")
    reason = pa.array(["other"] * len(errors), pa.string())
    for name, pattern in reversed(REASONS):
        reason = pc.if_else(pc.match_substring_regex(errors, pattern), name, reason)
    ok = pc.fill_null(pc.equal(status, "success"), False)
    return pc.if_else(ok, pa.scalar(None, pa.string()), reason)


# -- re-keying --------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_open(url: str) -> Iterator[IO[bytes]]:
    """A file written under a temporary sibling name and renamed into place when closed."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def rekey_tar(
    src: str, dst: str, key_to_uid: dict[str, str], order: Sequence[str]
) -> dict[str, int]:
    """Copy webdataset tar `src` to `dst` with members renamed `<key>.<ext>` → `<uid>.<ext>`.

    Samples come out in `order` (uids), their members sorted by extension, with fixed headers;
    the tar is read member by member from its file object (nothing is extracted, only one member
    is in memory), non-regular members and keys not in `key_to_uid` are skipped, and `.json`
    members get `key` set to the uid. Returns {uid: number of members written}.
    """
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(src)
    written: dict[str, int] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tin:
        by_uid: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
        for info in tin.getmembers():
            base = info.name.rsplit("/", 1)[-1]
            if not info.isreg() or "." not in base:
                continue
            key, ext = base.split(".", 1)
            uid = key_to_uid.get(key)
            if uid is not None:
                by_uid.setdefault(uid, []).append((ext, info))
        with (
            _atomic_open(dst) as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tout,
        ):
            for uid in order:
                for ext, info in sorted(by_uid.get(uid, ()), key=lambda m: m[0]):
                    member = tin.extractfile(info)
                    data = member.read() if member is not None else b""
                    if ext == "json":
                        meta = json.loads(data)
                        meta["key"] = uid
                        data = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
                    tout.addfile(_tar_info(f"{uid}.{ext}", len(data)), io.BytesIO(data))
                    written[uid] = written.get(uid, 0) + 1
    return written


# -- planning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Planned:
    """One output shard: img2dataset shard `i2d_id` = rows [start, end) of staged part `staged`."""

    name: str
    i2d_id: int
    staged: str
    start: int
    end: int


def _input_parts(curated: str | Sequence[str]) -> list[Shard]:

    items = [curated] if isinstance(curated, str) else list(curated)
    if len(items) == 1 and not any(ch in items[0] for ch in "*?[{"):
        return parts_of(items[0])
    urls = fsio.expand_inputs(items, suffixes=(".parquet",))
    return [Shard(s.name.removeprefix("part-"), s.input) for s in shard_names(urls)]


def _read_uids(url: str) -> pa.Array:
    """The `uid` column of a curated part as strings, after checking its columns and uids."""
    schema = pq.read_schema(url)
    missing = [c for c in ("uid", "url", "text") if c not in schema.names]
    if missing:
        raise ValueError(
            f"{url} has no column(s) {', '.join(missing)}; fetch needs uid, url and text "
            "(the output of `curation balance`, or any Parquet with those columns)"
        )
    uid = pc.cast(pq.read_table(url, columns=["uid"]).column("uid"), pa.string()).combine_chunks()
    ok = pc.fill_null(pc.match_substring_regex(uid, f"^{UID_RE.pattern}$"), False)
    if len(uid) and not pc.all(ok).as_py():
        bad = uid.filter(pc.invert(ok))[0].as_py()
        raise ValueError(
            f"{url}: uid {bad!r} cannot be a webdataset key (needs 1-95 of [A-Za-z0-9_-]); "
            "recompute uids with `curation ingest`"
        )
    return uid


def _read_part(url: str) -> pa.Table:
    """uid, url (null as empty) and text of a curated part (checked by `_read_uids`)."""
    t = pq.read_table(url, columns=["uid", "url", "text"])
    return pa.table(
        {
            "uid": pc.cast(t.column("uid"), pa.string()),
            "url": pc.fill_null(pc.cast(t.column("url"), pa.string()), ""),
            "text": pc.cast(t.column("text"), pa.string()),
        }
    )


class SeenUids:
    """The uids seen so far, to keep only the first row of each uid over a sequence of columns.

    Works on whole columns: each column's uids become a NumPy array of fixed-width bytes (`S<w>`,
    w = the longest uid so far in bytes rounded up to 8, NUL-padded, so a uid must not end with
    NUL; fetch's uids are `[A-Za-z0-9_-]`), looked up with `searchsorted` in sorted runs of the
    distinct uids seen so far. A run is merged into the one before it while that one is at most
    twice its size, so there are at most log2(n) + 1 runs. Memory is about w bytes per distinct
    uid (24 for `curation ingest` uids), twice that while the two largest runs merge; no Python
    object is made per row.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._width = 8

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def first_seen(self, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """A mask of the rows of `uids` whose uid no earlier row (here or in an earlier call) had.

        The uids it keeps are recorded, so later calls drop them. Nulls are refused.
        """
        values = self._fixed_width(uids)
        if not len(values):
            return np.zeros(0, dtype=bool)
        # Sort on the uids as big-endian 64-bit words (the same order as the bytes, and several
        # times faster than sorting `S<w>`); stable, so the first row of each uid comes first.
        order = np.lexsort(values.view(">u8").reshape(len(values), -1).T[::-1])
        ordered = values[order]
        starts = np.ones(len(values), dtype=bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        distinct, first = ordered[starts], order[starts]
        new = np.ones(len(distinct), dtype=bool)
        for run in self._runs:
            pos = np.searchsorted(run, distinct)
            pos[pos == len(run)] = 0
            new &= run[pos] != distinct
        keep = np.zeros(len(values), dtype=bool)
        keep[first[new]] = True
        if new.any():
            self._add(distinct[new])
        return keep

    def _fixed_width(self, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        arr = pc.cast(uids, pa.large_binary())
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        if arr.null_count:
            raise ValueError(f"{arr.null_count} null uid(s); every row needs a uid")
        n = len(arr)
        if n == 0:
            return np.zeros(0, dtype=f"S{self._width}")
        chars, offsets = string_buffers(arr)
        lengths = np.diff(offsets)
        width = -(-int(lengths.max()) // 8) * 8  # whole 64-bit words
        if width > self._width:  # widening pads with NUL: the order and equality are unchanged
            self._width = width
            self._runs = [r.astype(f"S{width}") for r in self._runs]
        width = self._width
        out = np.zeros((n, width), dtype=np.uint8)
        out[np.arange(width) < lengths[:, None]] = chars
        return out.view(f"S{width}").ravel()

    def _add(self, distinct: np.ndarray) -> None:
        """Append a sorted run of uids not seen before, then merge runs of similar size."""
        runs = self._runs
        runs.append(distinct)
        while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
            b = runs.pop()
            a = runs.pop()
            runs.append(np.insert(a, np.searchsorted(a, b), b))  # disjoint sorted runs


@dataclass
class _Staging:
    """The output shards of a run and how to stage their inputs.

    `staged` maps each staged file to (its curated part, the part's rows to keep: None for all);
    a mask is kept only for parts with duplicates, bit-packed (1 bit per row of the part).
    """

    planned: list[_Planned]
    counts: Counter
    staged: dict[str, tuple[str, pa.BooleanArray | None]]


def _plan_inputs(parts: Sequence[Shard], staged_dir: str, per_shard: int) -> _Staging:
    """Check every part's columns and uids, find duplicate uids, and plan the output shards.

    Reads only the `uid` column. The first row of a uid, in input order (parts in order, rows in
    order), is kept; later rows of the same uid are counted as `rows_dropped_duplicate_uid`.
    """
    seen = SeenUids()
    planned: list[_Planned] = []
    counts: Counter = Counter()
    staged: dict[str, tuple[str, pa.BooleanArray | None]] = {}
    i2d_id = 0
    for index, part in enumerate(parts):
        keep = seen.first_seen(_read_uids(part.input))
        kept = int(np.count_nonzero(keep))
        counts["rows_read"] += len(keep)
        counts["rows_dropped_duplicate_uid"] += len(keep) - kept
        if not kept:
            continue
        url = fsio.join(staged_dir, f"{index:06d}.parquet")
        staged[url] = (part.input, None if kept == len(keep) else pa.array(keep, pa.bool_()))
        for k, start in enumerate(range(0, kept, per_shard)):
            end = min(start + per_shard, kept)
            planned.append(_Planned(f"{part.name}-{k:05d}", i2d_id, url, start, end))
            i2d_id += 1
    return _Staging(planned, counts, staged)


def _stage_inputs(staging: _Staging) -> None:
    """Write the staged parts (uid, url, text; duplicates dropped) that img2dataset reads."""
    for url, (source, keep) in staging.staged.items():
        table = _read_part(source)
        if keep is not None:
            if len(keep) != table.num_rows:
                raise RuntimeError(f"{source} changed while fetch was reading it; rerun fetch")
            table = table.filter(keep)
        fsio.atomic_write_parquet(url, table)


# -- img2dataset --------------------------------------------------------------------------------
def _i2d_name(i2d_id: int) -> str:
    return f"{i2d_id:05d}"  # img2dataset's shard name (oom_shard_count=5)


def _run_img2dataset(staged_dir: str, i2d_dir: str, options: FetchOptions) -> None:
    """img2dataset's `download()` over the staged parts, with `BoundedResizer`, restoring state."""
    import importlib
    import multiprocessing

    from img2dataset.logger import LoggerProcess

    # The package re-exports a function named `main`, so `import img2dataset.main as m` gives that.
    i2d_main = importlib.import_module("img2dataset.main")

    prepare_environment()
    previous_sigint = signal.getsignal(signal.SIGINT)
    original_resizer = i2d_main.Resizer
    i2d_main.Resizer = BoundedResizer.wrap(original_resizer)
    try:
        i2d_main.download(
            url_list=staged_dir,
            output_folder=i2d_dir,
            input_format="parquet",
            url_col="url",
            caption_col="text",
            save_additional_columns=["uid"],
            output_format="webdataset",
            distributor=options.distributor,
            processes_count=options.processes or os.cpu_count() or 1,
            thread_count=options.threads,
            number_sample_per_shard=options.samples_per_shard,
            timeout=options.timeout,
            retries=options.retries,
            resize_mode=options.resize_mode,
            image_size=options.image_size,
            skip_reencode=True,
            encode_format=IMAGE_EXT,
            max_image_area=options.max_image_area,
            enable_wandb=False,
            incremental_mode="incremental",
        )
    except SystemExit as exc:  # img2dataset's SIGINT handler exits with status 0
        raise KeyboardInterrupt("fetch interrupted; rerun the same command to resume") from exc
    finally:
        i2d_main.Resizer = original_resizer
        signal.signal(signal.SIGINT, previous_sigint)
        for child in multiprocessing.active_children():  # its logger, if download() raised
            if isinstance(child, LoggerProcess):
                child.terminate()
                child.join()


def _finalize_task(shard: Shard, out: str, plans: dict[str, dict]) -> dict:
    """Ray task: re-key one finished img2dataset shard into OUT/NAME.tar + .parquet, then mark it."""
    from fsspec.core import url_to_fs

    p = plans[shard.name]
    i2d = fsio.join(p["i2d_dir"], _i2d_name(p["i2d_id"]))
    staged = pq.read_table(p["staged"]).slice(p["start"], p["end"] - p["start"])
    order = staged.column("uid").to_pylist()
    got = pq.read_table(i2d + ".parquet")
    got = got.drop_columns([c for c in ("url", "caption") if c in got.column_names])
    success = got.filter(pc.equal(got.column("status"), "success"))
    written = rekey_tar(
        i2d + ".tar",
        fsio.join(out, f"{shard.name}.tar"),
        dict(
            zip(success.column("key").to_pylist(), success.column("uid").to_pylist(), strict=True)
        ),
        order,
    )
    # One row per staged row, in input order; a row img2dataset never wrote, or a success whose
    # image is not in the tar, fails as `failed_no_result`.
    staged = staged.rename_columns(["uid", "url", "caption"])
    staged = staged.append_column("_row", pa.array(range(staged.num_rows), pa.int64()))
    table = staged.join(got, "uid", join_type="left outer", use_threads=False).sort_by("_row")
    table = table.drop_columns(["_row"])
    status, errors = table.column("status"), table.column("error_message")
    in_tar = pc.is_in(table.column("uid"), value_set=pa.array(list(written), pa.string()))
    lost = pc.or_(pc.is_null(status), pc.and_(pc.equal(status, "success"), pc.invert(in_tar)))
    status = pc.if_else(lost, "failed_no_result", status)
    errors = pc.if_else(lost, "img2dataset left no result for this sample", errors)
    reason = classify_errors(status, errors)
    for name, column in (
        ("key", table.column("uid")),
        ("status", status),
        ("error_message", errors),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, column)
    table = table.add_column(table.schema.get_field_index("status") + 1, "reason", reason)
    fsio.atomic_write_parquet(fsio.join(out, f"{shard.name}.parquet"), table)
    counts = Counter(rows_read=table.num_rows)
    counts["rows_written"] = reason.null_count
    for vc in pc.value_counts(reason.drop_null()).to_pylist():
        counts[f"rows_dropped_{vc['values']}"] += vc["counts"]
    stats = {
        "shard": shard.name,
        "img2dataset_shard": _i2d_name(p["i2d_id"]),
        "counts": dict(sorted(counts.items())),
    }
    write_marker(out, shard.name, stats)
    fs, path = url_to_fs(i2d)
    for suffix in (".tar", ".parquet"):
        if fs.exists(path + suffix):
            fs.rm(path + suffix)
    return stats


def fetch(
    curated: str | Sequence[str],
    out: str,
    options: FetchOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Download the images of `curated` (parts with uid, url, text) into uid-keyed shards in `out`.

    Resumable: finished shards are skipped; results of a different job (other inputs or options
    that change the bytes) need `overwrite`. Needs Ray initialised (`runner.ensure_ray`) and must
    run in the main thread (img2dataset installs a SIGINT handler). Returns the summary
    (`pipeline.summarize`: rows read = written + dropped by reason, `duplicate_uid` included).
    """
    from fsspec.core import url_to_fs

    options = options or FetchOptions()
    out_fs, out_path = url_to_fs(out)
    out = fsio.full_url(out_fs, out_path)  # absolute: img2dataset and workers resolve it alike
    parts = _input_parts(curated)
    fp = {
        "stage": "fetch",
        "params": options.fingerprint_params(),
        "inputs": inputs_fingerprint([p.input for p in parts]),
    }
    work = fsio.join(out, WORK_DIR)
    staged_dir, i2d_dir = fsio.join(work, "input"), fsio.join(work, "img2dataset")
    # inputs are checked (and duplicates found) before anything is written
    staging = _plan_inputs(parts, staged_dir, options.samples_per_shard)
    planned, input_counts = staging.planned, staging.counts
    prepare_stage_dir(out, fp, overwrite, owned=("*-[0-9]*.tar", "*-[0-9]*.parquet", WORK_DIR))
    finished_markers = done_markers(out)
    todo = {p.name for p in planned if p.name not in finished_markers}
    fs, i2d_path = url_to_fs(i2d_dir)

    def i2d_done(p: _Planned) -> bool:
        return fs.exists(f"{i2d_path}/{_i2d_name(p.i2d_id)}_stats.json")

    if todo:
        _stage_inputs(staging)
    if any(p.name in todo and not i2d_done(p) for p in planned):
        fs.makedirs(i2d_path, exist_ok=True)
        for p in planned:  # img2dataset skips shards that have a stats file
            if p.name not in todo and not i2d_done(p):
                fsio.atomic_write_json(
                    fsio.join(i2d_dir, f"{_i2d_name(p.i2d_id)}_stats.json"),
                    finished_markers[p.name],
                )
        _run_img2dataset(staged_dir, i2d_dir, options)
    finished = [p for p in planned if p.name not in todo or i2d_done(p)]
    plans = {p.name: {**asdict(p), "i2d_dir": i2d_dir} for p in finished if p.name in todo}
    markers = run_tasks(
        "fetch",
        out,
        [Shard(p.name, p.staged) for p in finished],
        _finalize_task,
        (plans,),  # through the object store once, not copied into every task
        fp=fp,
        progress=progress,
    )
    missing = [p.name for p in planned if p.name not in markers]
    if missing:
        raise RuntimeError(
            f"img2dataset did not finish {len(missing)} shard(s) ({', '.join(missing[:5])}); "
            "rerun the same command to retry them"
        )
    work_path = url_to_fs(work)[1]
    if out_fs.exists(work_path):
        out_fs.rm(work_path, recursive=True)
    dup = input_counts["rows_dropped_duplicate_uid"]
    staging = {"counts": {"rows_read": dup, "rows_dropped_duplicate_uid": dup}} if dup else {}
    summary = summarize("fetch", {**markers, "_staging": staging})
    summary["shards"] = len(markers)
    summary["inputs"] = [p.input for p in parts]
    if summary["rows_read"] != input_counts["rows_read"]:
        raise RuntimeError(
            f"fetch: {summary['rows_read']} rows accounted for, {input_counts['rows_read']} read"
        )
    return summary


@leased("out")
def fetch_command(
    curated: str | Sequence[str], out: str, options: FetchOptions, **kwargs: Any
) -> dict[str, Any]:
    """`curation images fetch`: `fetch`, then `OUT/manifest.json`."""
    check_output_location(out)
    check_output_not_in_inputs(out, [curated] if isinstance(curated, str) else curated)
    import importlib.metadata

    summary = fetch(curated, out, options, **kwargs)
    write_stage_manifest(
        out,
        "fetch",
        summary,
        options=asdict(options),
        img2dataset=importlib.metadata.version("img2dataset"),
    )
    return summary
