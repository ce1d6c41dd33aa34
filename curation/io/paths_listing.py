"""CommonCrawl paths listings: `wat.paths.gz` → the input URLs of `curation ingest --paths`.

A listing is a text file (gzipped or not), one path per line relative to the crawl's base URL,
e.g. `crawl-data/CC-MAIN-2024-10/segments/1707947473347.0/wat/CC-MAIN-...-00000.warc.wat.gz`.
It may itself be any fsspec URL (local, s3://, gs://, https://).

- Each input is `base_url` + `/` + the line (exactly one slash between them).
- Blank lines (and surrounding whitespace, `\\r` included) are skipped; repeated lines are kept
  once (the first).
- `limit`: the first N paths, in listing order.
- A line that is an absolute URL or path, has a `..` segment or control characters, or is not
  UTF-8, is refused with a `ListingError` naming the line (1-based) before anything is read.
- Reading is bounded: at most `max_bytes` uncompressed (a decompression bomb stops there with
  an error) and `max_lines` lines.
- An empty listing (no paths) is an error.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field

from fsspec.core import url_to_fs

from curation.core.fsio import InputError

#: Bounds of one listing (a CommonCrawl wat.paths.gz is ~100,000 lines, ~15 MB uncompressed).
MAX_LISTING_BYTES = 64 << 20
MAX_LISTING_LINES = 1_000_000
#: CommonCrawl's own base URL, the default of `--base-url`.
COMMONCRAWL_BASE_URL = "https://data.commoncrawl.org/"
_READ_ATTEMPTS = 3
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ListingError(ValueError):
    """A paths listing that cannot be used (a bad line, too big, empty); names the listing."""


@dataclass(frozen=True)
class PathsListing:
    """The inputs a listing names, and what they came from (for the manifest)."""

    source: str
    base_url: str
    limit: int | None
    sha256: str
    lines: int
    urls: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """The listing's provenance (no URLs): source, base URL, limit, checksum, counts."""
        return {
            "source": self.source,
            "base_url": self.base_url,
            "limit": self.limit,
            "sha256": self.sha256,
            "paths_in_listing": self.lines,
            "inputs": len(self.urls),
        }


def join_url(base_url: str, path: str) -> str:
    """`base_url` and a relative `path` with exactly one `/` between them."""
    if not base_url:
        raise ListingError("--base-url is empty")
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def _line_problem(line: str) -> str:
    """Why `line` (stripped, not empty) is not a relative path, else ""."""
    if _CONTROL.search(line):
        return "has control characters"
    if _SCHEME.match(line) or line.startswith("//"):
        return "is an absolute URL; lines must be paths relative to the base URL"
    if line.startswith(("/", "\\")):
        return "is an absolute path; lines must be paths relative to the base URL"
    if any(seg == ".." for seg in re.split(r"[/\\]", line)):
        return "has a '..' segment"
    return ""


def parse_listing(
    data: bytes,
    source: str = "listing",
    *,
    max_lines: int = MAX_LISTING_LINES,
) -> list[str]:
    """The relative paths of an uncompressed listing, in order (blank and repeated lines
    skipped); a bad line raises `ListingError` naming `source` and the line number."""
    paths: list[str] = []
    seen: set[str] = set()
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if n > max_lines:
            raise ListingError(f"paths listing {source}: more than {max_lines:,} lines")
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise ListingError(f"paths listing {source}: line {n} is not UTF-8 ({exc})") from None
        if not line:
            continue
        problem = _line_problem(line)
        if problem:
            raise ListingError(f"paths listing {source}: line {n} {line[:200]!r} {problem}")
        if line not in seen:
            seen.add(line)
            paths.append(line)
    if not paths:
        raise ListingError(f"paths listing {source} is empty: no paths in it")
    return paths


def decompress_bounded(data: bytes, source: str, max_bytes: int = MAX_LISTING_BYTES) -> bytes:
    """`data` gunzipped (every gzip member) when it is gzip, as it is otherwise; more than
    `max_bytes` uncompressed, or a cut / corrupt gzip stream, raises `ListingError`."""
    if data[:2] != b"\x1f\x8b":
        if len(data) > max_bytes:
            raise ListingError(f"paths listing {source} is over {max_bytes:,} bytes")
        return data
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(31)
            buf = rest
            while buf and not d.eof:
                out += d.decompress(buf, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    raise ListingError(
                        f"paths listing {source} is over {max_bytes:,} bytes uncompressed"
                    )
                buf = d.unconsumed_tail
            if not d.eof:
                raise ListingError(f"paths listing {source}: gzip stream ends early (cut file)")
            rest = d.unused_data
            if rest[:2] != b"\x1f\x8b":
                break  # trailing padding after the last member (as gzip(1) ignores it)
    except zlib.error as exc:
        raise ListingError(f"paths listing {source}: corrupt gzip data ({exc})") from None
    return bytes(out)


def _read_bytes(source: str, max_bytes: int) -> bytes:
    """The bytes of `source` (at most `max_bytes` + 1 are read); transient storage errors are
    tried again, then raised as `InputError` naming the listing."""
    from curation.core.retry import oserror_not_missing, with_backoff

    fs, path = url_to_fs(source)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            data = bytearray()
            while chunk := f.read(1 << 20):
                data += chunk
                if len(data) > max_bytes:
                    raise ListingError(f"paths listing {source} is over {max_bytes:,} bytes")
            return bytes(data)

    return with_backoff(
        read,
        attempts=_READ_ATTEMPTS,
        first_delay_s=0.5,
        transient=lambda e: (
            not isinstance(e, ListingError)
            and (oserror_not_missing(e) or (not isinstance(e, OSError) and _is_network_error(e)))
        ),
        give_up=lambda exc, _: InputError(
            f"cannot read paths listing {source!r}: {type(exc).__name__}: {exc}"
        ),
    )


def _is_network_error(exc: BaseException) -> bool:
    return any(
        c.__module__.split(".")[0] in ("aiohttp", "requests", "urllib3", "botocore", "google")
        for c in type(exc).__mro__
    )


def read_paths_listing(
    source: str,
    base_url: str = COMMONCRAWL_BASE_URL,
    limit: int | None = None,
    *,
    max_bytes: int = MAX_LISTING_BYTES,
    max_lines: int = MAX_LISTING_LINES,
) -> PathsListing:
    """Read, check and join the listing at `source`: its input URLs (the first `limit`)."""
    if limit is not None and limit < 1:
        raise ListingError(f"--limit must be >= 1, got {limit}")
    if not base_url or not base_url.strip():
        raise ListingError("--base-url is empty")
    try:
        raw = _read_bytes(source, max_bytes)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"paths listing {source!r} does not exist") from exc
    text = decompress_bounded(raw, source, max_bytes)
    paths = parse_listing(text, source, max_lines=max_lines)
    chosen = paths[:limit] if limit is not None else paths
    return PathsListing(
        source=source,
        base_url=base_url,
        limit=limit,
        sha256="sha256:" + hashlib.sha256(raw).hexdigest(),
        lines=len(paths),
        urls=[join_url(base_url, p) for p in chosen],
    )
