"""Filesystem helpers on fsspec: input expansion, atomic writes, JSON files.

Every path may be any fsspec URL (local, s3://, gs://, memory://). Nothing here assumes a local
path is visible to other nodes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

#: Characters that `expand_inputs` reads as brace / glob syntax, and `\` that escapes them.
_SPECIAL = "[]{}*?,\\"
_ESCAPED = re.compile(r"\\([\[\]{}*?,\\])")


def escape_glob(path: str) -> str:
    """`path` with its brace and glob characters backslash-escaped, so that `expand_inputs`
    reads it as the literal name (`a[1].tar` → `a\\[1\\].tar`)."""
    return re.sub(r"([\[\]{}*?,\\])", r"\\\1", path)


def _unescape(pattern: str) -> str:
    return _ESCAPED.sub(r"\1", pattern)


def _unescaped(pattern: str, chars: str) -> bool:
    """True when one of `chars` occurs in `pattern` without a backslash before it."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern) and pattern[i + 1] in _SPECIAL:
            i += 2
            continue
        if pattern[i] in chars:
            return True
        i += 1
    return False


def _glob_pattern(pattern: str) -> str:
    """An fsspec glob with each escaped character turned into a one-character class."""
    return _ESCAPED.sub(lambda m: m[1] if m[1] in "{},\\" else f"[{m[1]}]", pattern)


def _outer_group(pattern: str) -> tuple[int, int, list[str]] | None:
    """First outermost balanced `{...}` group: (start, end, its comma-separated parts).

    A backslash-escaped `\\{`, `\\}` or `\\,` is a plain character, never group syntax.
    """
    depth, start, parts, last = 0, -1, [], 0
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and pattern[i + 1] in _SPECIAL:
            i += 2
            continue
        if ch == "{":
            if depth == 0:
                start, parts, last = i, [], i + 1
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                parts.append(pattern[last:i])
                if len(parts) > 1 or re.fullmatch(r"-?\d+\.\.-?\d+", parts[0]):
                    return start, i + 1, parts
        elif ch == "," and depth == 1:
            parts.append(pattern[last:i])
            last = i + 1
        i += 1
    return None


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces like bash: `a{1..3}`, `{00..02}`, `a{x,y}`, nested groups.

    Backslash-escaped characters (`\\{`, `\\}`, `\\,`, `\\[`, ...) are kept as they are (still
    escaped) for `expand_inputs` to read literally.
    """
    group = _outer_group(pattern)
    if group is None:
        return [pattern]
    start, end, parts = group
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", parts[0]) if len(parts) == 1 else None
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = [o for part in parts for o in expand_braces(part)]
    out: list[str] = []
    for opt in options:
        out.extend(expand_braces(pattern[:start] + opt + pattern[end:]))
    return out


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an fs-relative path back into a URL that `url_to_fs` accepts."""
    proto = _protocol(fs)
    if proto in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


class InputError(OSError):
    """An input that cannot be listed or opened (unreachable URL, looping symlink, missing
    filesystem package); the message names the input and what to do."""


#: fsspec protocol -> the pip package that provides it (named when it is not installed).
FS_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp", "hf": "huggingface_hub",
}  # fmt: skip
#: Top-level modules whose exceptions are network / storage-service failures.
_NETWORK_MODULES = ("aiohttp", "requests", "urllib3", "botocore", "google", "azure")

#: Object-store filesystems whose listing cache is turned off. Ray workers write parts and
#: markers after the driver listed their folder; with fsspec's default `use_listings_cache`
#: the driver would go on answering `exists` / `ls` from the old listing and miss them (a job
#: on s3:// then fails right after its first stage: "none of the inputs exist").
NO_LISTINGS_CACHE = ("s3", "s3a", "gs", "gcs", "abfs", "az")
for _proto in NO_LISTINGS_CACHE:
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)


def _input_fs(pattern: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`url_to_fs(pattern)`, with a missing filesystem package named as what to install."""
    try:
        return url_to_fs(pattern)
    except ImportError as exc:
        proto = pattern.split("://", 1)[0] if "://" in pattern else "file"
        pkg = FS_PACKAGES.get(proto)
        what = f"pip install {pkg}" if pkg else f"install the fsspec filesystem for {proto}://"
        raise ImportError(f"input {pattern!r}: {exc}; {what}") from exc


def is_storage_error(exc: BaseException) -> bool:
    """An error of the storage or its client (I/O, network, credentials), not a bug."""
    if isinstance(exc, FileNotFoundError):
        return False
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.split(".")[0] in _NETWORK_MODULES for c in type(exc).__mro__)


def _check_links(fs: fsspec.AbstractFileSystem, paths: list[str], pattern: str) -> None:
    """Refuse local symbolic links that loop (`a -> a`) with their name, before any work."""
    if not isinstance(fs, LocalFileSystem):
        return
    for p in paths:
        if os.path.islink(p):
            try:
                os.stat(p)
            except FileNotFoundError:
                continue  # dangling: read (and quarantined) as a missing file
            except OSError as exc:
                raise InputError(
                    f"input {pattern!r}: {p!r} is a symbolic link that cannot be followed "
                    f"({exc.strerror}); remove it or name the files to read"
                ) from exc


def _expand_one(pattern: str, suffixes: tuple[str, ...] | None, allow_missing: bool) -> list[str]:
    """The files one brace-expanded pattern names (see `expand_inputs`)."""
    fs, path = _input_fs(pattern)
    literal = _unescape(path)
    try:
        if _unescaped(path, "*?["):
            matches = sorted(fs.glob(_glob_pattern(path)))
        elif fs.isdir(literal):
            matches = sorted(
                p for p in fs.find(literal) if suffixes is None or p.endswith(suffixes)
            )
        elif fs.exists(literal) or (allow_missing and not _looks_like_dir(pattern)):
            matches = [literal]
        else:
            raise FileNotFoundError(f"input {_unescape(pattern)!r} does not exist")
        _check_links(fs, matches, pattern)
    except (FileNotFoundError, InputError):
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        err = InputError(f"cannot list input {_unescape(pattern)!r}: {type(exc).__name__}: {exc}")
        err.errno = getattr(exc, "errno", None)
        raise err from exc
    if not matches:
        raise FileNotFoundError(f"input {_unescape(pattern)!r} matched no files")
    return [full_url(fs, p) for p in matches]


def expand_inputs(
    inputs: Iterable[str],
    suffixes: tuple[str, ...] | None = None,
    allow_missing: bool = False,
    literal: bool = False,
) -> list[str]:
    """Expand files, globs, brace patterns and directories into a sorted, de-duplicated list.

    Directories are walked recursively and filtered by `suffixes` (when given). A glob that
    matches nothing is an error naming the pattern, so a typo never silently reads zero shards.
    With `allow_missing`, a literal file path that does not exist is kept (the reader then
    quarantines it as a missing file and the run goes on).

    Names with brace or glob characters: a path that exists as written is taken as it is;
    otherwise escape them with a backslash (`'a\\[1\\].tar'`, `'\\{x\\}.jsonl'`), or pass
    `literal=True` (the CLI's `--no-glob`) to expand nothing at all. Unreachable URLs,
    symbolic links that loop and missing filesystem packages raise `InputError` /
    `ImportError` naming the input.

    `http://` / `https://` URLs are taken as they are (no braces, globs or folder listing: `?`
    starts a query there); they are checked concurrently (HEAD, else GET headers). One that
    does not exist (HTTP 404/410) is a `FileNotFoundError` naming it (kept with
    `allow_missing`); a folder URL (ending in `/`) or one that cannot be reached is an
    `InputError`.
    """
    found: list[str] = []
    http: list[str] = []
    for raw in map(str, inputs):
        if is_http_url(raw):
            http.append(raw)  # taken as it is: HTTP has no globs, no folders to list
            continue
        if literal:
            patterns = [escape_glob(raw)]
        elif "\\" not in raw and _unescaped(raw, "*?[{") and _literal_exists(raw):
            patterns = [escape_glob(raw)]  # e.g. `a[1].tar` as already expanded once
        else:
            patterns = expand_braces(raw)
        for pattern in patterns:
            found.extend(_expand_one(pattern, suffixes, allow_missing))
    if http:
        found.extend(_check_http(http, allow_missing))
    seen: set[str] = set()
    unique = [p for p in found if not (p in seen or seen.add(p))]
    return sorted(unique)


def is_http_url(url: str) -> bool:
    """True for an `http://` or `https://` URL."""
    return url[:8].lower().startswith(("http://", "https://"))


#: Concurrent existence checks of HTTP inputs.
_HTTP_CHECKS = 32


def _check_http(urls: list[str], allow_missing: bool) -> list[str]:
    """The HTTP inputs `urls` as they are, once each is known to exist (see `expand_inputs`)."""
    for u in urls:
        if u.split("?", 1)[0].endswith("/"):
            raise InputError(
                f"input {u!r} is a folder URL: folders cannot be listed over HTTP; name the "
                "files, or give a paths listing (curation ingest --paths LISTING --base-url URL)"
            )
    fs, _ = _input_fs(urls[0])
    from fsspec.asyn import sync

    async def probe(url: str, sem: Any) -> BaseException | None:
        async with sem:
            try:
                await fs._info(url)
            except Exception as exc:  # fsspec: FileNotFoundError from the GET's error
                return exc
            return None

    async def probe_all() -> list[BaseException | None]:
        import asyncio

        sem = asyncio.Semaphore(_HTTP_CHECKS)
        return await asyncio.gather(*(probe(u, sem) for u in urls))

    out = []
    for url, exc in zip(urls, sync(fs.loop, probe_all), strict=True):
        if exc is None:
            out.append(url)
            continue
        cause = exc.__cause__ or exc
        status = getattr(cause, "status", None)
        if status in (404, 410):
            if allow_missing:
                out.append(url)
                continue
            raise FileNotFoundError(f"input {url!r} does not exist (HTTP {status})") from exc
        what = f"HTTP {status}" if status else f"{type(cause).__name__}: {cause}"
        err = InputError(f"cannot reach input {url!r}: {what}")
        err.errno = getattr(cause, "errno", None)
        raise err from exc
    return out


def _literal_exists(raw: str) -> bool:
    fs, path = _input_fs(raw)
    try:
        return bool(fs.exists(path))
    except Exception as exc:
        if is_storage_error(exc):
            return False  # reported with the input's name when it is listed
        raise


def _looks_like_dir(pattern: str) -> bool:
    return pattern.endswith("/")


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


#: The mark of this package's temporary files: `<name>.tmp-curation-<pid>-<8 hex>`.
TMP_MARK = ".tmp-curation-"
_OWN_TMP = re.compile(r"^(?P<base>.+)\.tmp-curation-\d+-[0-9a-f]{8}$")
_LEGACY_TMP = re.compile(r"^(?P<base>.+)\.tmp-\d+-[0-9a-f]{8}$")


def _tmp_path(path: str) -> str:
    """A unique temporary sibling of `path`: `<path>.tmp-curation-<pid>-<8 hex>`.

    The name is specific enough (`is_own_temp`) that cleaning stale temporaries never touches
    a user's `notes.tmp-1` in the same folder.
    """
    return f"{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def own_temp_base(name: str, legacy_bases: tuple[str, ...] = ()) -> str | None:
    """The final name a temporary file of this package stands for, else None.

    `name` is a file name (no folder). Temporaries of older versions (`<name>.tmp-<pid>-<8
    hex>`) count only when their final name matches one of the `fnmatch` patterns
    `legacy_bases` (names this package writes in that folder).
    """
    m = _OWN_TMP.match(name)
    if m:
        return m["base"]
    m = _LEGACY_TMP.match(name)
    if m and any(fnmatch.fnmatchcase(m["base"], pat) for pat in legacy_bases):
        return m["base"]
    return None


def is_own_temp(name: str) -> bool:
    """True when the file name `name` is one of this package's temporary files."""
    return own_temp_base(name) is not None


def url_key(url: str) -> tuple[str, str]:
    """(protocol, absolute path) of `url`, to tell whether two URLs name the same place.

    Local paths are made absolute with symbolic links resolved; trailing slashes are dropped.
    """
    fs, path = url_to_fs(url)
    proto = _protocol(fs)
    if isinstance(fs, LocalFileSystem):
        proto, path = "file", os.path.realpath(path)
    return proto, "/" + path.strip("/") if path.strip("/") else "/"


def is_within(url: str, folder: str) -> bool:
    """True when `url` is `folder` or inside it (same filesystem, normalized paths)."""
    (pa_, a), (pb, b) = url_key(url), url_key(folder)
    return pa_ == pb and (a == b or a.startswith(b.rstrip("/") + "/"))


def _discard(f: Any) -> None:
    """Drop an unfinished object-store upload: abort it and never let `close()` commit it."""
    try:
        discard = getattr(f, "discard", None)
        if callable(discard):
            discard()
    finally:
        # AbstractBufferedFile.close() (also run by __exit__ and __del__) would upload the
        # buffered rest and complete the upload: mark the file closed so it never does.
        f.closed = True


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[BinaryIO]:
    """Open `url` for binary writing so that readers see the whole file or nothing.

    - Local files: write a temporary sibling (`<path>.tmp-curation-<pid>-<rand>`), rename it into place
      when the block ends (removed if it raises).
    - Object stores whose files are `fsspec.spec.AbstractBufferedFile` (s3fs, gcsfs, adlfs, ...):
      write under the final name. The upload (a PUT, or a multipart upload's completion) is only
      committed when the file closes, so there is no temporary object to copy and delete; if the
      block raises, the upload is discarded and nothing is committed.
    - Other filesystems (e.g. `memory://`): a temporary sibling, then `fs.mv` into place.
    """
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_path(path)
    if isinstance(fs, LocalFileSystem):
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    # Opening a file for writing sends nothing yet on object stores: open the temporary name,
    # and if the file object commits only on close, discard it and write the final name.
    f = fs.open(tmp, "wb")
    if isinstance(f, AbstractBufferedFile):
        _discard(f)
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            _discard(f)
            raise
        f.close()
        return
    try:
        with f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically (`atomic_open`): readers never see a partial file."""
    with atomic_open(url) as f:
        f.write(data)


def atomic_write_json(url: str, obj: Any) -> None:
    """Write `obj` as indented JSON with sorted keys (the same object gives the same bytes)."""
    atomic_write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    """Parse the JSON file at `url`."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def atomic_write_parquet(url: str, table: Any, **kwargs: Any) -> None:
    """Write an Arrow table as Parquet atomically (`atomic_open`), streamed row group by row
    group into the file rather than built in memory first.

    `kwargs` are `pyarrow.parquet.write_table`'s (`compression` defaults to `"zstd"`); the
    bytes are deterministic and the same as `write_table(table, sink, compression="zstd",
    **kwargs)` gives.
    """
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    # As pq.write_table: row_group_size (or its old name chunk_size) goes to write_table().
    row_group_size = kwargs.pop("row_group_size", None)
    row_group_size = kwargs.pop("chunk_size", row_group_size)
    with atomic_open(url) as f, pq.ParquetWriter(f, table.schema, **kwargs) as writer:
        writer.write_table(table, row_group_size=row_group_size)


def shard_name(url: str) -> str:
    """Stable shard name from an input URL: the file name without compression/format suffixes."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    suffixes = (".gz", ".tgz", ".zst", ".warc", ".wat", ".parquet", ".jsonl", ".json", ".tar")
    stripped = True
    while stripped:
        stripped = False
        for suffix in suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                stripped = True
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "shard"
    return name
