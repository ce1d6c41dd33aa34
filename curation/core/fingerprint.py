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


#: Attempts (with backoff from 0.5 s) to ask a remote store for a file's identity when the
#: answer is a transient error rather than "absent".
IDENTITY_ATTEMPTS = 4


def _remote_identity(fs: Any, path: str) -> dict[str, Any] | None:
    """`_identity(fs.info(path))`, None when the file is absent, retried on transient errors.

    fsspec's HTTP filesystem reports *any* failure of its HEAD-then-GET probe as
    FileNotFoundError (a 503 or a reset connection included), with the real error as its
    cause: only a 404/410 is absence here; anything else is retried and then raised as an
    OSError, so a throttled store never records an input as missing in a stage fingerprint.
    """
    from curation.core.retry import with_backoff

    def probe() -> dict[str, Any] | None:
        try:
            return _identity(fs.info(path))
        except FileNotFoundError as exc:
            cause = exc.__cause__
            protos = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
            http = bool(protos & {"http", "https"})
            if not http or cause is None or getattr(cause, "status", None) in (404, 410):
                return None  # object stores and disks say "absent" only when it is
            raise _NotReallyMissing(cause) from exc

    def give_up(exc: Exception, _: int) -> OSError:
        err = exc.args[0] if isinstance(exc, _NotReallyMissing) else exc
        return OSError(f"{redact_url(path)}: {type(err).__name__}: {err}")

    return with_backoff(
        probe,
        attempts=IDENTITY_ATTEMPTS,
        first_delay_s=0.5,
        transient=lambda e: isinstance(e, (OSError, _NotReallyMissing)),
        give_up=give_up,
    )


class _NotReallyMissing(Exception):
    """fsspec's HTTP "not found" that was a transient failure (its cause)."""


def file_identity(url: str) -> dict[str, Any] | None:
    """Size and, where the store gives one, a content tag (ETag / md5 / crc32c) of a file;
    None when it does not exist.

    Deterministic for the same bytes, so it can go into a stage fingerprint. Where there is no
    content tag (local disks), a file rewritten after its output was written is found by
    modification time instead (`io.parts.done_and_todo`).
    """
    fs, path = fsio.url_to_fs(url)
    return _remote_identity(fs, path)


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
    return [
        [redact_url(relative_to(u, root)), ident]
        for u, ident in zip(urls, file_identities(urls), strict=True)
    ]


#: A folder holding at least this many of the wanted files is listed once instead of asking
#: for each file (`fs.info`); the entries of a listing and of `fs.info` carry the same keys.
LIST_MIN_FILES = 4
#: Concurrent `fs.info` requests for files on a remote store that are not listed.
INFO_THREADS = 32


def file_identities(urls: Sequence[str]) -> list[dict[str, Any] | None]:
    """`file_identity` of each of `urls`, with one listing per folder instead of a storage
    call per file (10^5 CommonCrawl WAT files are ~100 listings), and the rest (http(s)://,
    which cannot be listed, or lone files) asked for concurrently on remote stores. Local files
    are stat'ed one by one (cheaper than a listing, which stats every entry anyway)."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    out: list[dict[str, Any] | None] = [None] * len(urls)
    by_url_folder: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        folder, sep, _ = url.rpartition("/")
        by_url_folder.setdefault(folder if sep else ".", []).append(i)
    singles: list[tuple[int, Any, str]] = []
    for folder_url, members in by_url_folder.items():
        fs, folder = fsio.url_to_fs(folder_url)
        folder = folder.rstrip("/")
        items = [(i, folder + "/" + urls[i].rpartition("/")[2]) for i in members]
        if isinstance(fs, LocalFileSystem):
            for i, path in items:
                try:
                    out[i] = {"size": os.stat(path).st_size}  # what `_identity(fs.info)` gives
                except FileNotFoundError:
                    out[i] = None
            continue
        protos = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if len(items) < LIST_MIN_FILES or protos & {"http", "https"}:
            singles += [(i, fs, fsio.url_to_fs(urls[i])[1]) for i, _ in items]
            continue
        try:
            listing = {e["name"].rstrip("/"): e for e in fs.ls(folder, detail=True)}
        except FileNotFoundError:
            listing = {}
        for i, path in items:
            entry = listing.get(path)
            if entry is not None and entry.get("type", "file") == "file":
                out[i] = _identity(entry)
            else:  # not in the listing as a file: ask for it (absent, a folder, a name quirk)
                singles.append((i, fs, fsio.url_to_fs(urls[i])[1]))

    def info(item: tuple[int, Any, str]) -> dict[str, Any] | None:
        _, fs, path = item
        return _remote_identity(fs, path)

    if singles:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(INFO_THREADS, len(singles))) as pool:
            for it, ident in zip(singles, pool.map(info, singles), strict=True):
                out[it[0]] = ident
    return out


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
