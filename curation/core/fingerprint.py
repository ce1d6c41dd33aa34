"""Fingerprints: what a stage's output depends on, so a resume never reuses stale parts.

A stage fingerprint holds its parameters, the package version (added by
`io.parts.prepare_stage_dir`), an identity of every input shard (`file_identity`: size plus the
store's etag / generation / mtime) and the content hash of every small asset it reads
(`asset_digest`: metadata, centroids, target embeddings, checkpoints, LID models).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from typing import Any

from curation import __version__
from curation.core import fsio
from curation.core.redact import redact_url

#: fs.info keys derived from an object's content (S3 ETag, GCS md5Hash / crc32c), preferred.
_CONTENT_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "ContentMD5")
#: fs.info keys holding a modification time (local mtime, S3 LastModified, GCS updated).
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def modified_time(info: dict[str, Any]) -> float | None:
    """An `fs.info` / `fs.ls(detail=True)` entry's modification time as POSIX seconds."""
    for key in _MTIME_KEYS:
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def file_identity(url: str) -> dict[str, Any] | None:
    """Size and, where the store gives one, a content tag (ETag / md5 / crc32c) of a file;
    None when it does not exist.

    Deterministic for the same bytes, so it can go into a stage fingerprint. Where there is no
    content tag (local disks), a file rewritten after its output was written is found by
    modification time instead (`io.parts.done_and_todo`).
    """
    fs, path = fsio.url_to_fs(url)
    try:
        return _identity(fs.info(path))
    except FileNotFoundError:
        return None


def _identity(info: dict[str, Any]) -> dict[str, Any]:
    """`file_identity` from an `fs.info` entry."""
    out: dict[str, Any] = {"size": info.get("size")}
    for key in _CONTENT_KEYS:
        if info.get(key) is not None:
            out["etag"] = str(info[key]).strip('"')
            break
    return out


_DIGESTS: dict[tuple[str, str], str] = {}


def asset_digest(url: str) -> str | None:
    """sha256 of a small asset's bytes (None when it does not exist).

    Cached per process by (url, size, content tag, modification time).
    """
    fs, path = fsio.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    key = (url, json.dumps([_identity(info), modified_time(info)]))
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def assets_fingerprint(urls: Sequence[str]) -> list[list[Any]]:
    """[url, content sha256] of each asset (the job gives their paths; contents decide).

    The url is recorded with its secrets redacted (`core.redact.redact_url`).
    """
    return [[redact_url(u), asset_digest(u)] for u in urls]


def relative_to(url: str, root: str | None) -> str:
    """`url` relative to the run folder when it lies inside it (so a moved folder resumes)."""
    if root:
        base = root.rstrip("/") + "/"
        if url.startswith(base):
            return "./" + url[len(base) :]
    return url


def inputs_fingerprint(urls: Sequence[str], root: str | None = None) -> list[list[Any]]:
    """[url (run-relative when inside `root`, secrets redacted), identity] of each input shard.

    A signed URL's rotating token is redacted, so a new signature of the same object keeps the
    fingerprint; the identity (size, content tag) still tells a changed object.
    """
    return [[redact_url(relative_to(u, root)), file_identity(u)] for u in urls]


def content_inputs(inputs: list[dict]) -> list[list]:
    """Inputs as (file name, sha256) for downstream fingerprints: content, not location."""
    return [[i["url"].rsplit("/", 1)[-1], i["sha256"]] for i in inputs]


def versions() -> dict[str, str]:
    """Versions of the package and the libraries whose behaviour shapes the outputs."""
    import importlib.metadata as im

    out = {"curation": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pyarrow", "polars", "ray", "pyahocorasick", "fastwarc", "fsspec"):
        try:
            out[pkg] = im.version(pkg)
        except im.PackageNotFoundError:
            out[pkg] = "missing"
    return out
