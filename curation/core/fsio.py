"""Filesystem helpers on fsspec: input expansion, atomic writes, JSON files.

Every path may be any fsspec URL (local, s3://, gs://, memory://). Nothing here assumes a local
path is visible to other nodes.
"""

from __future__ import annotations

import contextlib
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


def _outer_group(pattern: str) -> tuple[int, int, list[str]] | None:
    """First outermost balanced `{...}` group: (start, end, its comma-separated parts)."""
    depth, start, parts, last = 0, -1, [], 0
    for i, ch in enumerate(pattern):
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
    return None


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces like bash: `a{1..3}`, `{00..02}`, `a{x,y}`, nested groups."""
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


def expand_inputs(
    inputs: Iterable[str], suffixes: tuple[str, ...] | None = None, allow_missing: bool = False
) -> list[str]:
    """Expand files, globs, brace patterns and directories into a sorted, de-duplicated list.

    Directories are walked recursively and filtered by `suffixes` (when given). A glob that
    matches nothing is an error naming the pattern, so a typo never silently reads zero shards.
    With `allow_missing`, a literal file path that does not exist is kept (the reader then
    quarantines it as a missing file and the run goes on).
    """
    found: list[str] = []
    for raw in inputs:
        for pattern in expand_braces(str(raw)):
            fs, path = url_to_fs(pattern)
            if any(ch in path for ch in "*?["):
                matches = sorted(fs.glob(path))
            elif fs.isdir(path):
                matches = sorted(
                    p for p in fs.find(path) if suffixes is None or p.endswith(suffixes)
                )
            elif fs.exists(path) or (allow_missing and not _looks_like_dir(pattern)):
                matches = [path]
            else:
                raise FileNotFoundError(f"input {pattern!r} does not exist")
            if not matches:
                raise FileNotFoundError(f"input {pattern!r} matched no files")
            found.extend(full_url(fs, p) for p in matches)
    seen: set[str] = set()
    unique = [p for p in found if not (p in seen or seen.add(p))]
    return sorted(unique)


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


def _tmp_path(path: str) -> str:
    """A unique temporary sibling of `path` (stale ones are found by the `.tmp-` in the name)."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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

    - Local files: write a temporary sibling (`<path>.tmp-<pid>-<rand>`), rename it into place
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
    suffixes = (".gz", ".zst", ".warc", ".wat", ".parquet", ".jsonl", ".json", ".tar")
    stripped = True
    while stripped:
        stripped = False
        for suffix in suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                stripped = True
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "shard"
    return name
