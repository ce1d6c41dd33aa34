"""Assets a worker opens: which are shared, and a content-addressed local cache for the rest.

A stage names the files its `setup()` opens (`Stage.assets()`: metadata, checkpoints, LID
models, target embeddings). One on shared storage (`s3://`, `gs://`, `https://`, ...) or
bundled with the package (`bundled:metadata_en`) is opened by every worker where it is. A local
path (or `file://` URL) exists on the driver's disk only: on a cluster of several machines the
executor reads it once on the driver (`read_asset`, refused above `max_asset_bytes()`), sends
the bytes through Ray's object store, and each worker process writes them once into
`cache_dir()/<sha256>/<basename>` (`materialize`: written to a temp file, verified, renamed;
a file already there is used when its sha256 matches, else replaced) and opens that copy
(`Stage.use_assets`). The basename is kept, so a loader that looks at the suffix
(`.safetensors`, `.json`, `.npz`) sees the same one.

Nothing here knows Ray: the executor (`curation.executor.runner`) ships and fetches.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.core.metadata import BUNDLED_PREFIX

#: Default largest asset shipped through the object store (bytes); CURATION_MAX_ASSET_BYTES.
DEFAULT_MAX_ASSET_BYTES = 8 << 30
#: Protocols of the local disk: an asset named so is on the driver's disk only.
LOCAL_PROTOCOLS = frozenset({"", "file", "local"})
_BLOCK = 1 << 22


class AssetTooLarge(ValueError):
    """A local asset larger than may be shipped through the object store."""


@dataclass(frozen=True)
class AssetBlob:
    """One local asset as shipped: where the driver read it, its file name, size and sha256."""

    name: str
    source: str
    basename: str
    size: int
    sha256: str  # hex digest of the bytes


def max_asset_bytes() -> int:
    """The largest asset shipped through the object store (CURATION_MAX_ASSET_BYTES, 8 GiB)."""
    return int(os.environ.get("CURATION_MAX_ASSET_BYTES", DEFAULT_MAX_ASSET_BYTES))


def protocol(url: str) -> str:
    """The URL's protocol (`s3`, `https`, `file`, ...), `""` for a plain path."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and "/" not in head else ""


def is_shared(url: str) -> bool:
    """True when every worker can open `url` itself: a package resource (`bundled:...`) or a
    URL of a remote store (s3://, gs://, https://, ...); False for a local path or file://."""
    return url.startswith(BUNDLED_PREFIX) or protocol(url) not in LOCAL_PROTOCOLS


def local_path(url: str) -> str:
    """The absolute local path of a plain path or `file://` / `local://` URL (on this host)."""
    if protocol(url):
        url = url.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(url))


def read_asset(name: str, url: str, max_bytes: int | None = None) -> tuple[AssetBlob, np.ndarray]:
    """The bytes of the local asset `url` (a uint8 array, read once) and their description.

    Raises `AssetTooLarge` above `max_bytes` (default `max_asset_bytes()`) before reading, and
    `FileNotFoundError` when it is not a file here.
    """
    path = local_path(url)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"asset {name} {url!r} is not a file on this host")
    limit = max_asset_bytes() if max_bytes is None else max_bytes
    size = os.path.getsize(path)
    if size > limit:
        raise AssetTooLarge(
            f"asset {name} {url!r} is {size:,} bytes, more than the {limit:,} that are shipped "
            "to workers through Ray's object store (CURATION_MAX_ASSET_BYTES); put it on "
            "storage every node reads (s3://, gs://, https://) or raise the limit"
        )
    data = np.empty(size, dtype=np.uint8)
    h = hashlib.sha256()
    view = memoryview(data)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            n = f.readinto(view[pos : pos + _BLOCK])
            if not n:
                raise OSError(f"asset {name} {url!r} shrank while it was read")
            h.update(view[pos : pos + n])
            pos += n
        if f.read(1):
            raise OSError(f"asset {name} {url!r} grew while it was read")
    base = os.path.basename(path) or "asset"
    return AssetBlob(name, url, base, size, h.hexdigest()), data


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The asset cache: `root`, else CURATION_ASSET_CACHE, else `$TMPDIR/curation-assets`."""
    if root is not None:
        return Path(root)
    env = os.environ.get("CURATION_ASSET_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "curation-assets"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


#: Copies this process has verified: cache path -> (size, mtime_ns) when it was verified.
_VERIFIED: dict[str, tuple[int, int]] = {}


def _still_verified(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return _VERIFIED.get(str(path)) == (st.st_size, st.st_mtime_ns)


def _mark_verified(path: Path) -> None:
    st = path.stat()
    _VERIFIED[str(path)] = (st.st_size, st.st_mtime_ns)


def materialize(
    blob: AssetBlob, fetch: Callable[[], Any], root: str | os.PathLike | None = None
) -> str:
    """The local path of `blob`'s bytes in the cache, written there when missing or wrong.

    `cache_dir(root)/<sha256>/<basename>`. A file already there whose sha256 matches is used
    as it is (verified once per process; `fetch` is not called); otherwise `fetch()` gives the
    bytes (any buffer), they are checked against the sha256, written to a temp file beside the
    target and renamed over it, so a reader never sees a partial file and concurrent writers
    (several workers of one node) each install the same bytes.
    """
    if len(blob.sha256) != 64 or not all(c in "0123456789abcdef" for c in blob.sha256):
        raise ValueError(f"asset {blob.name}: bad sha256 {blob.sha256!r}")
    base = os.path.basename(blob.basename)
    if base in ("", ".", ".."):
        base = "asset"
    folder = cache_dir(root) / blob.sha256
    target = folder / base
    if _still_verified(target):
        return str(target)
    if (
        target.is_file()
        and target.stat().st_size == blob.size
        and file_sha256(target) == blob.sha256
    ):
        _mark_verified(target)
        return str(target)
    data = memoryview(fetch()).cast("B")
    if len(data) != blob.size or hashlib.sha256(data).hexdigest() != blob.sha256:
        raise ValueError(
            f"asset {blob.name} ({blob.source}): the bytes received do not match its sha256 "
            f"{blob.sha256} ({len(data):,} bytes, expected {blob.size:,})"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{base}.tmp-curation-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _mark_verified(target)
    return str(target)
