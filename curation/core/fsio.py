"""Filesystem helpers on fsspec: input expansion, atomic writes, JSON files.

Every path may be any fsspec URL (local, s3://, gs://, memory://). Nothing here assumes a local
path is visible to other nodes.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.core import url_to_fs


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


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename into place: readers never see a partial file."""
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def atomic_write_json(url: str, obj: Any) -> None:
    atomic_write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def atomic_write_parquet(url: str, table: Any, **kwargs: Any) -> None:
    """Write an Arrow table as Parquet atomically (temp + rename). Deterministic bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    kwargs.setdefault("compression", "zstd")
    pq.write_table(table, sink, **kwargs)
    atomic_write_bytes(url, sink.getvalue().to_pybytes())


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
