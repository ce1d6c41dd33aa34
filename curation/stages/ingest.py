"""Ingest: CommonCrawl WAT shards and Parquet/JSONL pair tables → pair tables.

One input shard becomes one Arrow table with the columns of `PAIR_SCHEMA` (`Ingestor` is the
`Source` of a flow: `read(shard)`). Every record and row is accounted for: the output's `counts`
say how many pairs were read, written and dropped per reason, its `quarantine` lists each
set-aside record or shard with its reason, and its `extra` has the input's size and checksum.

Only damaged data is set aside (bad gzip or WARC framing, a truncated file, broken JSON); an error
of the storage itself (an `OSError` from S3/GCS mid-stream) propagates, so that the executor
retries the shard instead of marking a partial shard done. A missing file is quarantined.

`http://` / `https://` inputs are streamed in one GET (`Accept-Encoding: identity`, no overall
time limit, a read timeout per chunk). A network failure while reading (a transfer cut before
Content-Length bytes, a dropped connection, an HTTP 5xx), which aiohttp raises as a
`ClientError` that is not an `OSError`, is raised as `RemoteReadError` (an `OSError`, with the
original message and the original as its cause): the shard is retried, never quarantined. A
file that is truncated on the server itself (whole transfer, gzip cut short) is still
`truncated_shard`.

WAT extraction follows MetaCLIP's WAT parser: for each response metadata record, links of
`Envelope/Payload-Metadata/HTTP-Response-Metadata/HTML-Metadata/Links` whose `path` starts with
`IMG@/src` and that have a non-empty `url`; each non-empty `alt`, `title`, `data-image-title`
(newlines and CRs replaced by spaces, stripped) is one pair. Image URLs are resolved against the
page URL. A link without a URL yields nothing.

Locators in quarantine entries are 0-based: `record` is the index of the WARC record in the WAT
file (every record counts, the leading `warcinfo` included), the line of a JSONL file (blank
lines included; the same number as the pair's `source_row`) or the row of a Parquet file.

Memory is bounded per shard: a WARC record or a JSONL line over `max_record_bytes` is set aside
without being held (`record_too_large`), and a JSONL or Parquet shard over `max_shard_bytes`
(uncompressed: bytes of JSONL, the row groups' declared size and the decoded columns of Parquet)
stops with `shard_too_large`, keeping and counting what was read before. Parquet is read in
batches of rows. A text that is not valid Unicode (invalid UTF-8, a lone surrogate from a `\\ud800`
JSON escape) or a JSONL field that is not a string drops that pair only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import sys
import zlib
from collections import Counter
from itertools import compress, repeat
from typing import Any
from urllib.parse import urljoin, urlparse

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from curation.core.accounting import quarantine_record
from curation.core.stage import Shard, Source, StageOutput
from curation.core.text import UID_HEX_DIGITS, uids_of_urls

PAIR_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("text_key", pa.string()),
        ("page_url", pa.string()),
        ("source_shard", pa.string()),
        ("source_row", pa.int64()),
    ]
)
TEXT_KEYS = ("alt", "title", "data-image-title")
WAT_SUFFIXES = (".wat.gz", ".wat", ".warc.gz", ".warc")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
INPUT_SUFFIXES = WAT_SUFFIXES + TABLE_SUFFIXES
# A record bigger than this is set aside unread: it bounds memory per record (decompression bomb).
DEFAULT_MAX_RECORD_BYTES = 64 << 20
# A JSONL/Parquet shard bigger than this once uncompressed is cut there (bomb, runaway file).
DEFAULT_MAX_SHARD_BYTES = 16 << 30
#: The string columns read from Parquet and JSONL inputs.
TABLE_COLUMNS = ("uid", "url", "text", "text_key", "page_url")
_PARQUET_BATCH_ROWS = 8192
_JSONL_FLUSH_ROWS = 65536
_READ_CHUNK = 1 << 20
DEFAULT_MAX_TEXT_CHARS = 1000


class RemoteReadError(OSError):
    """A network failure while reading an input (a transfer cut mid-body, a dropped
    connection, an HTTP error status), raised for a client error that is not an `OSError`
    (aiohttp's `ClientPayloadError`, `ServerDisconnectedError`, ...) so that the executor
    retries the shard. Keeps the original's message; the original is its `__cause__`."""


#: Top-level modules whose exceptions are network / storage-service failures.
_NETWORK_MODULES = ("aiohttp", "requests", "urllib3", "botocore", "google", "azure")
#: Per-request timeouts of an HTTP input stream (no overall limit: WAT files are large).
_HTTP_CONNECT_TIMEOUT_S = 60.0
_HTTP_READ_TIMEOUT_S = 120.0


def _storage_error(exc: BaseException) -> OSError | None:
    """`exc` as an `OSError` when it is a storage / network failure that is not one already
    (None otherwise: an `OSError` as it is, or an error that is not the storage's)."""
    if isinstance(exc, OSError):
        return None
    import asyncio

    is_timeout = isinstance(exc, asyncio.TimeoutError)  # not an OSError before Python 3.11
    if is_timeout or any(c.__module__.split(".")[0] in _NETWORK_MODULES for c in type(exc).__mro__):
        err = RemoteReadError(f"{type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    return None


def _is_http(fs: Any) -> bool:
    from fsspec.implementations.http import HTTPFileSystem

    return isinstance(fs, HTTPFileSystem)


def _open_input(url: str, start: int = 0) -> Any:
    """`url` opened for reading from byte `start` (a binary file object). An HTTP URL is one
    streamed GET (a Range request from `start`); a missing file raises `FileNotFoundError`, a
    network failure `RemoteReadError`."""
    fs, path = url_to_fs(url)
    if not _is_http(fs):
        f = fs.open(path, "rb")
        if start:
            f.seek(start)
        return f
    import aiohttp
    from fsspec.asyn import sync
    from fsspec.implementations.http import HTTPStreamFile

    kw = dict(fs.kwargs)
    headers = {**kw.pop("headers", {}), "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    kw.setdefault(
        "timeout",
        aiohttp.ClientTimeout(
            total=None, sock_connect=_HTTP_CONNECT_TIMEOUT_S, sock_read=_HTTP_READ_TIMEOUT_S
        ),
    )
    try:
        session = sync(fs.loop, fs.set_session)
        f = HTTPStreamFile(
            fs, path, mode="rb", loop=fs.loop, session=session, headers=headers, **kw
        )
    except FileNotFoundError:
        raise
    except Exception as exc:
        mapped = _storage_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    status = f.r.status
    if start and status == 416:  # nothing from `start` on
        f.close()
        return io.BytesIO(b"")
    if start and status != 206:  # the server sent the whole file: skip to `start`
        left = start
        while left > 0:
            chunk = _read_mapped(f, min(left, _READ_CHUNK))
            if not chunk:
                break
            left -= len(chunk)
    return f


def _read_mapped(f: Any, size: int = -1) -> bytes:
    """`f.read(size)`, a network failure raised as `RemoteReadError`."""
    try:
        return f.read(size)
    except Exception as exc:
        mapped = _storage_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


class _HashingReader(io.RawIOBase):
    """Wraps a binary stream; hashes and counts the bytes read (input checksum for the manifest).

    An exception raised by the stream itself (a storage error) is kept in `error` and raised
    again on every later read: FastWARC raises `OSError` for damaged data too, so the caller
    tells a storage error from damage by `error`, not by the exception's type. A network
    failure that is not an `OSError` (aiohttp's) is kept and raised as `RemoteReadError`.
    `head` holds the first two bytes of the stream (the gzip magic, for `_gzip_tail_state`).
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.error: BaseException | None = None
        self.head = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.nbytes

    def seek(self, offset: int, whence: int = 0) -> int:
        # FastWARC asks for the position; only no-op seeks are allowed (the hash needs order).
        if (whence == 1 and offset == 0) or (whence == 0 and offset == self.nbytes):
            return self.nbytes
        raise io.UnsupportedOperation("seek")

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        try:
            data = self._raw.read(size)
        except BaseException as exc:
            mapped = _storage_error(exc)
            if mapped is None:
                self.error = exc
                raise
            self.error = mapped
            raise mapped from exc
        if len(self.head) < 2:
            self.head = (self.head + data[: 2 - len(self.head)])[:2]
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _name_part(url: str) -> str:
    """`url` without the query and fragment of an HTTP URL (`?X-Amz-Signature=...`)."""
    if url[:8].lower().startswith(("http://", "https://")):
        return url.split("#", 1)[0].split("?", 1)[0]
    return url


def detect_format(url: str) -> str:
    lower = _name_part(url).lower()
    if lower.endswith(WAT_SUFFIXES):
        return "wat"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    raise ValueError(
        f"cannot tell the format of {url!r}: expected one of {', '.join(INPUT_SUFFIXES)}"
    )


class Ingestor(Source):
    """Reads one input shard into a pair table (the source of a flow: `read(shard)`)."""

    name = "ingest"

    def __init__(
        self,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        if max_record_bytes < 1024:
            raise ValueError(f"max_record_bytes must be >= 1024, got {max_record_bytes}")
        if max_shard_bytes < 1024:
            raise ValueError(f"max_shard_bytes must be >= 1024, got {max_shard_bytes}")
        self.max_text_chars = max_text_chars
        self.max_record_bytes = max_record_bytes
        self.max_shard_bytes = max_shard_bytes

    def setup(self) -> None:
        """Nothing to load; present so every stage has the same shape."""

    def read(self, shard: Shard) -> StageOutput:
        """The pairs of `shard.input` (any fsspec URL); `extra` has "input_bytes" and
        "input_sha256" (of the whole file).

        Bad data is counted and quarantined, never raised; an error of the storage (an `OSError`
        while reading) propagates, so that the shard is retried rather than marked done half read.
        """
        url, shard_name = shard.input, shard.name
        fmt = detect_format(url)
        result = StageOutput(
            table=PAIR_SCHEMA.empty_table(), extra={"input_bytes": 0, "input_sha256": ""}
        )
        try:
            f = _open_input(url)
        except FileNotFoundError as exc:
            result.counts["shards_missing"] += 1
            result.quarantine.append(self._q(shard_name, url, "missing_file", str(exc)))
            return result
        with f:
            reader = _HashingReader(f)
            if fmt == "wat":
                pairs = self._read_wat(reader, url, shard_name, result)
                result.counts["rows_read"] += pairs.num_rows  # pairs dropped are counted already
                table = pairs.table(shard_name)
            elif fmt == "parquet":
                table = self._read_parquet(reader, url, shard_name, result)
            else:
                table = self._read_jsonl(reader, url, shard_name, result)
            # drain so the checksum covers the whole file
            while reader.read(1 << 20):
                pass
        result.extra["input_bytes"] = reader.nbytes
        result.extra["input_sha256"] = "sha256:" + reader.sha.hexdigest()
        if reader.nbytes == 0:
            result.counts["shards_empty"] += 1
            result.quarantine.append(self._q(shard_name, url, "empty_file", "file has 0 bytes"))
        table, truncated = self._cap_text(table)
        result.counts["texts_truncated"] += truncated
        result.table = table
        result.counts["rows_written"] += table.num_rows
        return result

    def process_shard(self, url: str, shard_name: str) -> StageOutput:
        """`read(Shard(shard_name, url))`: one input file by its URL."""
        return self.read(Shard(name=shard_name, input=url))

    def _damaged(
        self,
        reader: Any,
        exc: BaseException,
        is_cut: Any,
        shard: str,
        url: str,
        result: StageOutput,
        record: int,
    ) -> None:
        """A stream that failed mid-shard: the storage's own error propagates (the executor
        retries it); real damage is quarantined as `truncated_shard` (`is_cut`, a bool or a
        callable asked only then) or
        `corrupt_shard`, keeping what was read before it."""
        if reader.error is exc:
            raise exc
        if reader.error is not None:
            raise reader.error from exc
        cut = bool(is_cut()) if callable(is_cut) else bool(is_cut)
        result.counts["shards_truncated" if cut else "shards_corrupt"] += 1
        result.quarantine.append(
            self._q(
                shard,
                url,
                "truncated_shard" if cut else "corrupt_shard",
                f"{type(exc).__name__}: {exc}",
                record=record,
            )
        )

    def _q(self, shard: str, url: str, reason: str, detail: str, **extra: Any) -> dict[str, Any]:
        return quarantine_record(self.name, shard, url, reason, detail, **extra)

    # -- WAT ---------------------------------------------------------------------------------
    def _read_wat(
        self, reader: _HashingReader, url: str, shard: str, result: StageOutput
    ) -> _WatPairs:
        """The pairs of a WAT shard, in record order."""
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        counts = result.counts
        pairs = _WatPairs(counts)
        deep = sys.getrecursionlimit() // 2  # see `_loads_wat`
        record_no = -1  # index of the WARC record in the file, whatever its type
        last_pos, stopped = 0, False
        metadata, max_record_bytes = WarcRecordType.metadata, self.max_record_bytes
        hold, orjson_loads, translate = pairs.hold, orjson.loads, bytes.translate
        try:
            it = ArchiveIterator(
                reader, record_types=WarcRecordType.any_type, parse_http=False, stream_detect=True
            )
            for record in it:
                record_no += 1
                last_pos = record.stream_pos
                if record.record_type != metadata:
                    continue
                counts["records_read"] += 1
                content_length = record.content_length
                too_large = content_length > max_record_bytes
                if too_large:
                    # Read through rather than let FastWARC skip it: a length that runs past the
                    # end of the file swallows the records after it, which is a truncation.
                    got = 0
                    while chunk := record.reader.read(_READ_CHUNK):
                        got += len(chunk)
                    payload = b""
                else:
                    payload = record.reader.read()
                    got = len(payload)
                # FastWARC's length is 0 without a Content-Length header (test_ingest_speedpath):
                # the header map is looked at only then
                missing = not content_length and "Content-Length" not in record.headers
                if got < content_length or missing:
                    counts["records_dropped_truncated"] += 1
                    counts["shards_truncated"] += 1
                    result.quarantine.append(
                        self._q(
                            shard,
                            url,
                            "truncated_shard",
                            f"record {record_no} has {got} of "
                            f"{record.content_length} bytes; file ends early",
                            record=record_no,
                            offset=record.stream_pos,
                        )
                    )
                    stopped = True
                    break
                if too_large:
                    counts["records_dropped_too_large"] += 1
                    result.quarantine.append(
                        self._q(
                            shard,
                            url,
                            "record_too_large",
                            f"{record.content_length} bytes",
                            record=record_no,
                            offset=record.stream_pos,
                        )
                    )
                    continue
                try:
                    try:  # `_loads_wat`'s common case, inlined
                        doc, may_have_surrogate = orjson_loads(payload), False
                    except orjson.JSONDecodeError:
                        doc, may_have_surrogate = _loads_wat(payload, deep)
                    else:
                        # as `_loads_wat`: `deep` brackets or more go to json (counted in one
                        # pass that keeps only the brackets)
                        if (
                            len(payload) >= deep
                            and len(translate(payload, None, _NOT_BRACKETS)) >= deep
                        ):
                            doc = json.loads(payload)
                except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                    reason = "bad_utf8" if isinstance(exc, UnicodeDecodeError) else "bad_json"
                    detail = "JSON nested too deeply" if isinstance(exc, RecursionError) else exc
                    counts[f"records_dropped_{reason}"] += 1
                    result.quarantine.append(
                        self._q(
                            shard,
                            url,
                            reason,
                            str(detail),
                            record=record_no,
                            offset=record.stream_pos,
                        )
                    )
                    continue
                dropped: list[str] = []
                try:
                    if not may_have_surrogate:
                        hold(doc)  # extracted with the records around it, on whole columns
                        continue
                    self._extract(doc, pairs.slow_columns(), counts, dropped)
                except _BadPageUrl as exc:
                    counts["records_dropped_bad_page_url"] += 1
                    result.quarantine.append(
                        self._q(
                            shard,
                            url,
                            "bad_page_url",
                            str(exc),
                            record=record_no,
                            offset=record.stream_pos,
                        )
                    )
                    continue
                for detail in dropped:
                    result.quarantine.append(
                        self._q(
                            shard,
                            url,
                            "bad_unicode",
                            detail,
                            record=record_no,
                            offset=record.stream_pos,
                        )
                    )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 corrupt/truncated gzip or WARC framing
            # (FastWARC may raise a pyo3 PanicException, a BaseException); keep what was read.
            # FastWARC raises OSError for damaged data too: a storage error is told apart by the
            # reader having seen it, and propagates as the stream raised it.
            stopped = True
            self._damaged(
                reader, exc, lambda: _gzip_tail_state(url, last_pos, reader.head) == "truncated",
                shard, url, result, record_no + 1,
            )  # fmt: skip
        if reader.error is not None:  # the stream failed and FastWARC stopped quietly
            raise reader.error
        tail = "complete" if stopped else _gzip_tail_state(url, last_pos, reader.head)
        if tail != "complete":
            reason = "truncated_shard" if tail == "truncated" else "corrupt_shard"
            counts["shards_truncated" if tail == "truncated" else "shards_corrupt"] += 1
            result.quarantine.append(
                self._q(
                    shard,
                    url,
                    reason,
                    f"file ends inside a record ({tail} gzip member after the last record)",
                    record=record_no + 1,
                    offset=last_pos,
                )
            )
        pairs.flush()
        return pairs

    @staticmethod
    def _extract(
        doc: Any, cols: tuple[list, list, list, list], counts: Counter, dropped: list | None = None
    ) -> None:
        """Appends the record's pairs to `cols` (image URLs, texts, text keys, page URLs). When
        `dropped` is given, a pair with a string that is not valid Unicode (a lone surrogate) is
        left out, counted as read and dropped (`rows_dropped_bad_unicode`) and described in
        `dropped`."""
        found = _record_links(doc, counts)
        if found is not None:
            Ingestor._extract_links(found[0], found[1], cols, counts, dropped)

    @staticmethod
    def _extract_links(
        page_url: Any,
        links: list,
        cols: tuple[list, list, list, list],
        counts: Counter,
        dropped: list | None = None,
    ) -> None:
        """The pairs of one record's `links` (page URL `page_url`), one by one: see `_extract`."""
        # a plain http(s) page URL parses (no link raises for it); it is parsed further
        # (`_PageBase`) only when a link is not a plain absolute URL
        page_plain = isinstance(page_url, str) and _PLAIN_URL.fullmatch(page_url) is not None
        base: _PageBase | None = None
        urls, texts, keys, pages = cols
        plain_url = _PLAIN_URL.fullmatch
        for link in links:
            if not isinstance(link, dict):
                continue
            path = link.get("path")
            if not isinstance(path, str) or not path.startswith("IMG@/src"):
                continue
            img = link.get("url")
            if not isinstance(img, str) or not img:
                counts["image_links_without_url"] += 1
                continue
            if page_plain and img[0] == "h" and plain_url(img) is not None and "/." not in img:
                resolved = img  # the first case of `_resolve`, inlined
            else:
                if base is None and isinstance(page_url, str) and page_url:
                    base = _PageBase(page_url)
                try:
                    resolved = _resolve(page_url, img, base)
                except ValueError:  # unparseable (e.g. "http://[bad"): MetaCLIP drops the link
                    counts["image_links_bad_url"] += 1
                    continue
            counts["image_links"] += 1
            for key in TEXT_KEYS:
                value = link.get(key)
                if not isinstance(value, str):
                    continue
                text = value.replace("\n", " ").replace("\r", " ").strip()  # normalize_alt_text
                if not text:
                    continue
                if dropped is not None:
                    bad = _first_bad_unicode(
                        {"url": resolved, key: text, "page_url": page_url}.items()
                    )
                    if bad is not None:
                        counts["rows_read"] += 1
                        counts["rows_dropped_bad_unicode"] += 1
                        dropped.append(bad)
                        continue
                urls.append(resolved)
                texts.append(text)
                keys.append(key)
                pages.append(page_url)

    # -- Parquet / JSONL -----------------------------------------------------------------------
    def _shard_too_large(
        self, shard: str, url: str, result: StageOutput, detail: str, **extra: Any
    ) -> None:
        result.counts["shards_too_large"] += 1
        result.quarantine.append(
            self._q(
                shard, url, "shard_too_large", f"{detail}; limit {self.max_shard_bytes}", **extra
            )
        )

    def _read_parquet(
        self, reader: _HashingReader, url: str, shard: str, result: StageOutput
    ) -> pa.Table:
        import pyarrow.parquet as pq

        counts = result.counts
        # The file is held (compressed) for random access; a storage error propagates from
        # here, before any parsing.
        data = bytearray()
        while chunk := reader.read(16 * _READ_CHUNK):
            data += chunk
            if len(data) > self.max_shard_bytes:
                self._shard_too_large(shard, url, result, f"file over {len(data)} bytes")
                return PAIR_SCHEMA.empty_table()
        if not data:
            return PAIR_SCHEMA.empty_table()
        # Parsing works on bytes in memory, so whatever it raises is damage.
        try:
            pf = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)))
            schema = pf.schema_arrow
            declared = sum(
                pf.metadata.row_group(i).total_byte_size for i in range(pf.num_row_groups)
            )
        except Exception as exc:
            counts["shards_corrupt"] += 1
            result.quarantine.append(
                self._q(shard, url, "corrupt_shard", f"{type(exc).__name__}: {exc}")
            )
            return PAIR_SCHEMA.empty_table()
        problem = _schema_problem(schema)
        if problem:
            counts["shards_bad_schema"] += 1
            result.quarantine.append(self._q(shard, url, "bad_schema", problem))
            return PAIR_SCHEMA.empty_table()
        if declared > self.max_shard_bytes:
            self._shard_too_large(
                shard, url, result, f"row groups declare {declared} uncompressed bytes"
            )
            return PAIR_SCHEMA.empty_table()
        columns = [c for c in TABLE_COLUMNS if c in schema.names]
        tables: list[pa.Table] = []
        row0 = decoded = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                decoded += _decoded_nbytes(batch)
                if decoded > self.max_shard_bytes:
                    self._shard_too_large(
                        shard, url, result, f"columns decode to over {decoded} bytes", record=row0
                    )
                    break
                n = batch.num_rows
                rows = pa.array(np.arange(row0, row0 + n, dtype=np.int64))
                tables.append(self._pairs(batch, rows, shard, url, result.counts, result))
                row0 += n
        except (OSError, pa.ArrowException) as exc:  # a damaged page or row group
            counts["shards_corrupt"] += 1
            result.quarantine.append(
                self._q(shard, url, "corrupt_shard", f"{type(exc).__name__}: {exc}", record=row0)
            )
        return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()

    def _read_jsonl(
        self, reader: _HashingReader, url: str, shard: str, result: StageOutput
    ) -> pa.Table:
        """Streams the lines of a JSONL file (gzipped or not); see the module docstring."""
        counts = result.counts
        pair_counts: Counter = Counter()  # kept only when the file has url and text fields
        src: Any = (
            gzip.GzipFile(fileobj=reader, mode="rb")
            if _name_part(url).lower().endswith(".gz")
            else reader
        )
        cols: dict[str, list] = {c: [] for c in TABLE_COLUMNS}
        lines: list[int] = []
        seen: set[str] = set()
        tables: list[pa.Table] = []

        def flush() -> None:
            if lines:
                t = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
                tables.append(self._pairs(t, pa.array(lines, pa.int64()), shard, url, pair_counts))
                for v in cols.values():
                    v.clear()
                lines.clear()

        def drop(i: int, reason: str, detail: str, counter: str | None = None) -> None:
            counts["rows_read"] += 1
            counts[counter or f"rows_dropped_{reason}"] += 1
            result.quarantine.append(self._q(shard, url, reason, detail, record=i))

        pos = [0]  # the line being read, for the locator of a shard-level entry
        try:
            for line_no, line in self._jsonl_lines(src, pos):
                if line is None:
                    drop(
                        line_no,
                        "record_too_large",
                        f"line over {self.max_record_bytes} bytes",
                        "rows_dropped_too_large",
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except RecursionError:
                    drop(line_no, "bad_json", "JSON nested too deeply")
                    continue
                except ValueError as exc:  # UnicodeDecodeError is a ValueError too
                    reason = "bad_utf8" if isinstance(exc, UnicodeDecodeError) else "bad_json"
                    drop(line_no, reason, str(exc))
                    continue
                if not isinstance(obj, dict):
                    drop(line_no, "bad_json", "line is not an object")
                    continue
                values = {c: obj.get(c) for c in TABLE_COLUMNS}
                wrong = next(
                    (c for c, v in values.items() if v is not None and not isinstance(v, str)),
                    None,
                )
                if wrong is not None:
                    kind = type(values[wrong]).__name__
                    drop(line_no, "bad_field", f"field {wrong!r} is a {kind}, not a string")
                    continue
                if _may_have_surrogate(line):
                    bad = _first_bad_unicode(values.items())
                    if bad is not None:
                        drop(line_no, "bad_unicode", bad)
                        continue
                seen.update(c for c in TABLE_COLUMNS if c in obj)
                for c, v in values.items():
                    cols[c].append(v)
                lines.append(line_no)
                if len(lines) >= _JSONL_FLUSH_ROWS:
                    flush()
        except _ShardTooLarge as exc:
            self._shard_too_large(
                shard, url, result, f"over {exc.args[0]} bytes uncompressed", record=pos[0]
            )
        except (OSError, EOFError, zlib.error) as exc:  # bad or cut gzip, or the storage's error
            self._damaged(reader, exc, isinstance(exc, EOFError), shard, url, result, pos[0])
        flush()
        missing = [c for c in ("url", "text") if c not in seen]
        if tables and missing:
            counts["shards_bad_schema"] += 1
            result.quarantine.append(
                self._q(
                    shard,
                    url,
                    "bad_schema",
                    f"missing field(s) {missing}; have {sorted(seen)}",
                )
            )
            return PAIR_SCHEMA.empty_table()
        counts.update(pair_counts)
        return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()

    def _jsonl_lines(self, src: Any, pos: list[int]) -> Any:
        """(line number, bytes) of each line, or (line number, None) for a line over
        `max_record_bytes` (reported once, skipped without being held); raises `_ShardTooLarge`
        past `max_shard_bytes`. `pos[0]` is the number of the line being read."""
        buf = bytearray()
        line_no = total = 0
        skipping = False
        # read1: what gzip inflated before a cut is returned, not lost with the exception
        read = getattr(src, "read1", src.read)
        while chunk := read(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_shard_bytes:
                raise _ShardTooLarge(total)
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                end = len(chunk) if nl < 0 else nl
                if not buf and not skipping and nl >= 0 and nl - start <= self.max_record_bytes:
                    yield line_no, chunk[start:nl]  # the common case: a whole line in the chunk
                else:
                    if not skipping:
                        buf += chunk[start:end]
                        if len(buf) > self.max_record_bytes:
                            buf.clear()
                            skipping = True
                            yield line_no, None
                    if nl < 0:
                        break
                    if not skipping:
                        yield line_no, bytes(buf)
                    buf.clear()
                    skipping = False
                line_no += 1
                pos[0] = line_no
                start = nl + 1
        if buf and not skipping:
            yield line_no, bytes(buf)

    def _pairs(
        self,
        raw: pa.Table | pa.RecordBatch,
        source_row: pa.Array,
        shard: str,
        url: str,
        counts: Counter,
        result: StageOutput | None = None,
    ) -> pa.Table:
        """The pairs of one batch of string/binary columns (`TABLE_COLUMNS`): rows read,
        dropped by reason, text normalized and capped. A row with invalid UTF-8 in a binary
        column is dropped (`bad_utf8`) and quarantined in `result`."""
        n = raw.num_rows
        counts["rows_read"] += n
        col: dict[str, pa.Array] = {}
        invalid = np.zeros(n, dtype=bool)
        first_bad: dict[int, str] = {}  # row -> the first column not valid UTF-8
        for name in TABLE_COLUMNS:
            if name not in raw.schema.names:
                col[name] = pa.nulls(n, pa.string())
                continue
            arr, bad = _as_utf8(raw.column(name))
            if bad is not None:
                for i in np.flatnonzero(bad & ~invalid):
                    first_bad[int(i)] = name
                invalid |= bad
            col[name] = arr
        counts["rows_dropped_bad_utf8"] += len(first_bad)
        if result is not None:
            for i in sorted(first_bad):
                result.quarantine.append(
                    self._q(
                        shard,
                        url,
                        "bad_utf8",
                        f"column {first_bad[i]!r} is not valid UTF-8",
                        record=source_row[i].as_py(),
                    )
                )
        url_col, text_col = col["url"], col["text"]
        bad_url = pc.fill_null(pc.equal(pc.utf8_length(url_col), 0), True)
        text_norm = pc.utf8_trim_whitespace(
            pc.replace_substring(pc.replace_substring(text_col, "\n", " "), "\r", " ")
        )
        if invalid.any():
            bad_url = pc.and_(bad_url, pa.array(~invalid))
        bad_text = pc.and_(
            pc.invert(bad_url), pc.fill_null(pc.equal(pc.utf8_length(text_norm), 0), True)
        )
        if invalid.any():
            bad_text = pc.and_(bad_text, pa.array(~invalid))
        counts["rows_dropped_missing_url"] += pc.sum(bad_url).as_py() or 0
        counts["rows_dropped_empty_text"] += pc.sum(bad_text).as_py() or 0
        keep = pc.invert(pc.or_(pc.or_(bad_url, bad_text), pa.array(invalid)))
        given = col["uid"]
        uid = pc.if_else(pc.is_null(given), uids_of_urls(url_col), given)
        table = pa.Table.from_arrays(
            [
                uid,
                url_col,
                text_norm,
                col["text_key"],
                col["page_url"],
                pa.array(np.full(n, shard, dtype=object), pa.string()),
                source_row,
            ],
            schema=PAIR_SCHEMA,
        ).filter(keep)
        table, truncated = self._cap_text(table)
        counts["texts_truncated"] += truncated
        return table

    def _cap_text(self, table: pa.Table) -> tuple[pa.Table, int]:
        text = table.column("text")
        # a text of at most max_text_chars bytes has at most that many characters
        if (pc.max(pc.binary_length(text)).as_py() or 0) <= self.max_text_chars:
            return table, 0
        too_long = pc.greater(pc.utf8_length(text), self.max_text_chars)
        n = pc.sum(too_long).as_py() or 0
        if n:
            cut = pc.utf8_slice_codeunits(text, 0, self.max_text_chars)
            table = table.set_column(table.schema.get_field_index("text"), "text", cut)
        return table, n


def _gzip_tail_state(url: str, start: int, magic: bytes | None = None) -> str:
    """ "complete", "truncated" or "corrupt": are the bytes of `url` from `start` whole gzip members?

    FastWARC stops quietly when a gzipped WAT is cut near a record boundary; this re-reads only
    the last record's member(s) so such a truncation is reported, not silently accepted.
    `magic`: the file's first two bytes when already read (else they are read here). Over HTTP
    the tail is one Range request; a network failure raises `RemoteReadError`.
    """
    if magic is None:
        with _open_input(url) as f:
            magic = _read_mapped(f, 2)
    if magic != b"\x1f\x8b":
        return "complete"
    with _open_input(url, start) as f:
        parts = []
        while chunk := _read_mapped(f, _READ_CHUNK):
            parts.append(chunk)
    rest = b"".join(parts)
    while rest:
        d, buf = zlib.decompressobj(31), rest
        try:
            while buf and not d.eof:
                d.decompress(buf, 1 << 20)
                buf = d.unconsumed_tail
        except zlib.error:
            return "corrupt"
        if not d.eof:
            return "truncated"
        rest = d.unused_data
    return "complete"


def _record_links(doc: Any, counts: Counter) -> tuple[str | None, list] | None:
    """A WAT record's (page URL, links), counted as `records_with_links`; None, counted by
    reason, when it is not a response with a links list. Raises `_BadPageUrl` for a page URL
    that is neither a string nor missing."""
    env = doc.get("Envelope") if isinstance(doc, dict) else None
    if not isinstance(env, dict):
        counts["records_skipped_no_envelope"] += 1
        return None
    header = env.get("WARC-Header-Metadata") or {}
    if header.get("WARC-Type") != "response":
        counts["records_skipped_not_response"] += 1
        return None
    page_url = header.get("WARC-Target-URI")
    try:
        links = env["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"]
    except (KeyError, TypeError):
        counts["records_skipped_no_links"] += 1
        return None
    if not isinstance(links, list):
        counts["records_skipped_no_links"] += 1
        return None
    if page_url is not None and not isinstance(page_url, str):
        _check_page_url(page_url)
    counts["records_with_links"] += 1
    return page_url, links


class _BadPageUrl(ValueError):
    """A record whose `WARC-Target-URI` is not a string: quarantined (`bad_page_url`)."""


def _check_page_url(page_url: Any) -> None:
    """Raise `_BadPageUrl` unless `page_url` is a string or missing (null)."""
    if page_url is not None and not isinstance(page_url, str):
        shown = json.dumps(page_url)[:200] if isinstance(page_url, (int, float, bool)) else ""
        raise _BadPageUrl(
            f"WARC-Target-URI is a JSON {type(page_url).__name__}, not a string {shown}".rstrip()
        )


class _ShardTooLarge(Exception):
    """A JSONL shard grew past `max_shard_bytes` uncompressed (args: bytes seen)."""


# Image URLs resolved without `urljoin` when they match a conservative pattern; every other URL
# goes to urljoin. What the patterns leave out is what urlsplit/urlunsplit would change or reject:
# tab/CR/LF (removed), other control characters and leading or trailing spaces (stripped by some
# Pythons), backslashes, a fragment, an empty `;params` (dropped), a netloc that is not plain
# ASCII or has brackets (IPv6 checks, NFKC check), an empty netloc; a relative reference has no
# ":" (a scheme) and no ";" in its path (params). Tested against urljoin in test_ingest_fastpath.
_NETLOC = r"[^\x00-\x20\x7f-\U0010ffff/?#\[\]\\]+"
# a path ("/" or "/..." not ending in ";" or a space) and a non-empty query
_TAIL = (
    r"(?:/(?:[^\x00-\x1f\x7f?#\\]*[^\x00-\x20\x7f?#\\;])?)?"
    r"(?:\?[^\x00-\x1f\x7f#\\]*[^\x00-\x20\x7f#\\])?"
)
#: An absolute http(s) URL that urljoin returns as it is, for any base that urlsplit accepts.
_PLAIN_URL = re.compile(r"https?://" + _NETLOC + _TAIL)
#: A network-path reference ("//host/path"): the base's scheme, ":", the reference.
_PLAIN_NET_REF = re.compile(r"//" + _NETLOC + _TAIL)
#: An absolute-path ("/a/b") or relative-path ("../a", "a/b") reference with an optional query.
_PLAIN_PATH_REF = re.compile(
    r"(?:/(?!/)[^\x00-\x1f\x7f?#\\;]*|[^\x00-\x20\x7f/?#\\:;][^\x00-\x1f\x7f?#\\:;]*)"
    r"(?:\?[^\x00-\x1f\x7f#\\]*)?(?<![\x00-\x20])"
)


class _PageBase:
    """The parts of a page URL that `urljoin(page_url, ref)` uses, parsed once per record.
    `fast` is False when the page URL is not http(s) or does not parse: every link then goes
    to urljoin itself (which raises for each link when the page URL does not parse)."""

    __slots__ = ("fast", "scheme", "netloc", "dir_parts", "dir_dots")

    def __init__(self, page_url: str) -> None:
        self.fast = False
        try:
            base = urlparse(page_url, "")
        except ValueError:
            return
        if base.scheme not in ("http", "https"):
            return
        self.fast = True
        self.scheme, self.netloc = base.scheme, base.netloc
        parts = base.path.split("/")
        if parts[-1] != "":  # the last segment is not a directory
            del parts[-1]
        self.dir_parts = parts
        self.dir_dots = "." in parts or ".." in parts


def _resolve(page_url: Any, img: str, base: _PageBase | None) -> str:
    """`urljoin(page_url, img)` (`img` itself when the page URL is not a string), as MetaCLIP
    resolves image URLs, computed here for URLs of the plain patterns above; raises ValueError
    as urljoin does for an unparseable URL."""
    if not isinstance(page_url, str):
        return img
    if base is None or not base.fast:
        return urljoin(page_url, img)
    if img[0] == "h" and _PLAIN_URL.fullmatch(img) is not None and "/." not in img:
        return img
    if img[:2] == "//":
        if _PLAIN_NET_REF.fullmatch(img) is not None and "/." not in img:
            return base.scheme + ":" + img
        return urljoin(page_url, img)
    if _PLAIN_PATH_REF.fullmatch(img) is None:
        return urljoin(page_url, img)
    path, _, query = img.partition("?")
    # urljoin's own path resolution (RFC 3986 with Python's quirks), on the base parsed once
    if path[0] == "/":
        segments = path.split("/")
    else:
        segments = base.dir_parts + path.split("/")
        segments[1:-1] = filter(None, segments[1:-1])
    if "." in path or (base.dir_dots and path[0] != "/"):
        resolved: list[str] = []
        for seg in segments:
            if seg == "..":
                if resolved:
                    resolved.pop()
            elif seg != ".":
                resolved.append(seg)
        if segments[-1] in (".", ".."):
            resolved.append("")
        segments = resolved
    out = "/".join(segments) or "/"
    netloc = base.netloc
    # urlunsplit, for a scheme that uses a netloc
    if netloc or out[:2] != "//":
        if out[:1] != "/":
            out = "/" + out
        out = "//" + netloc + out
    out = base.scheme + ":" + out
    return out + "?" + query if query else out


# -- WAT pairs on whole columns ----------------------------------------------------------------
# `_PLAIN_URL` and `_PLAIN_NET_REF` in RE2's syntax (Arrow's regex kernels); test_ingest_speedpath
# checks that each matches what its Python pattern matches.
_RE2_NETLOC = r"[^\x00-\x20\x{7f}-\x{10ffff}/?#\[\]\\]+"
_RE2_PLAIN_URL = r"\Ahttps?://" + _RE2_NETLOC + _TAIL + r"\z"
_RE2_PLAIN_NET_REF = r"\A//" + _RE2_NETLOC + _TAIL + r"\z"
# Image URLs whose resolution `_resolve_column` computes: an absolute path and a relative one
# (after any "../"), both of segments that are not empty and do not start with ".", with no
# empty query (both match `_PLAIN_PATH_REF` when they do not end in " ", which is checked apart).
_RE2_SEGMENT = r"[^\x00-\x1f\x7f?#\\;/.][^\x00-\x1f\x7f?#\\;/]*"
_RE2_REL_SEGMENT = r"[^\x00-\x1f\x7f?#\\:;/.][^\x00-\x1f\x7f?#\\:;/]*"
_RE2_QUERY = r"(?:\?[^\x00-\x1f\x7f#\\]+)?\z"
_RE2_ROOTED_PATH = r"\A(?:/" + _RE2_SEGMENT + r")+/?" + _RE2_QUERY
_RE2_RELATIVE_PATH = (
    r"\A(?:\.\./)*[^\x00-\x20\x7f?#\\:;/.][^\x00-\x1f\x7f?#\\:;/]*(?:/"
    + _RE2_REL_SEGMENT
    + r")*/?"
    + _RE2_QUERY
)
#: Scheme, netloc and path of a plain page URL (`_RE2_PLAIN_URL`, which has no fragment).
_RE2_PAGE_PARTS = r"\A(?P<scheme>https?)://(?P<netloc>[^/?]*)(?P<path>[^?]*)"
_IMG_PATH = "IMG@/src"
#: Every byte but "[" and "{" (`bytes.translate` deletes them: what is left are the brackets).
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[{")))
_digest = type(hashlib.sha224()).digest
# arguments of `map` (a `repeat` without a count never runs out, so one serves every call)
_PATH, _NONE, _IMG = repeat("path"), repeat(""), repeat(_IMG_PATH)
_LINK_KEYS = ("url", *TEXT_KEYS)
_LINK_TYPE = pa.struct([(k, pa.string()) for k in _LINK_KEYS])
_KEY_ARRAY = pa.array(TEXT_KEYS, pa.string())
#: Links held before their pairs are extracted (bounds what a shard holds at once).
_FLUSH_LINKS = 1 << 16
#: Image links held as they are (dicts) before their url and texts become string columns.
_CONVERT_LINKS = 2048
#: Bytes of text held before a flush (the texts of a flush stay one string array, < 2 GiB).
_FLUSH_TEXT_BYTES = 1 << 30


def _concat(parts: list) -> pa.Array | pa.ChunkedArray:
    """String columns (arrays or chunked arrays) as one array, or as a chunked array past
    what one string array holds (2 GiB)."""
    arrays = [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
    try:
        return pa.concat_arrays(arrays)
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        return pa.chunked_array(arrays, pa.string())


def _str_array(values: list) -> pa.Array | pa.ChunkedArray:
    """`values` (JSON values) as a string column: a value that is not a string is null, as
    `isinstance(v, str)` skips it. `pa.array` refuses every other type a JSON parser gives
    (number, bool, list, dict: tested), so the per-value check runs only when it does."""
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([v if type(v) is str else None for v in values], pa.string())


def _mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column as a NumPy mask, null as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _normalize_texts(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`normalize_alt_text` on a column: newlines and CRs become spaces, then strip (Arrow's
    whitespace is `str.isspace`'s, checked for every code point in test_ingest_speedpath)."""
    if isinstance(values, pa.ChunkedArray):  # pa.array's answer for over 2 GiB of text
        return pa.chunked_array([_normalize_texts(c) for c in values.chunks], pa.string())
    data = values.buffers()[2]
    if data is not None and len(data):
        # "\n" and "\r" are single bytes that no other UTF-8 character holds: each becomes a
        # space in place, as replace_substring does, without looking for them string by string
        view = np.frombuffer(data, np.uint8)
        newline = (view == 10) | (view == 13)
        if newline.any():
            view = view.copy()
            view[newline] = 32
            offsets, validity = values.buffers()[1], values.buffers()[0]
            values = pa.StringArray.from_buffers(
                len(values), offsets, pa.py_buffer(view), validity, values.null_count, values.offset
            )
    return pc.utf8_trim_whitespace(values)


def _has_bytes(values: pa.Array, chars: bytes) -> bool:
    """Whether the data of string column `values` may hold one of the ASCII `chars` (a look at
    its whole data buffer, which may also hold bytes outside the column's slice)."""
    data = values.buffers()[2]
    if data is None:
        return False
    view = np.frombuffer(data, np.uint8)
    return any(bool((view == c).any()) for c in chars)


def _resolve_column(
    imgs: pa.Array, link_page: np.ndarray, pages: list
) -> tuple[pa.Array, np.ndarray]:
    """`_resolve(page, img, base)` for each image URL of `imgs` (no nulls, none empty) with
    page URL `pages[link_page[i]]` (a string or None), and the mask of those that resolved
    (False: urljoin raised ValueError, the link is dropped).

    For a plain http(s) page (`_PLAIN_URL`, parsed here without urlparse) and an image URL of
    one of `_resolve`'s plain kinds, the result is what `_resolve` computes, on whole columns:
    the URL itself (absolute), the page's scheme + ":" + it ("//host/..."), the page's
    "scheme://netloc" + it ("/path" without "." or ".." segments or empty query), or that and
    the page's directory less one segment per leading "../" + the rest (a relative path without
    other dot segments, empty segments or empty query, for a page path without dot or empty
    segments either). Every other pair goes to `_resolve`, one by one. Tested against urljoin
    in test_ingest_speedpath."""
    n = len(imgs)
    page_arr = pa.array(pages, pa.string())
    plain_page = _mask(pc.match_substring_regex(page_arr, _RE2_PLAIN_URL))
    parts = pc.extract_regex(pc.if_else(pa.array(plain_page), page_arr, ""), _RE2_PAGE_PARTS)
    scheme, netloc, path = (parts.field(k) for k in ("scheme", "netloc", "path"))
    net_prefix = pc.binary_join_element_wise(scheme, ":", "")
    abs_prefix = pc.binary_join_element_wise(scheme, "://", netloc, "")
    directory = pc.if_else(
        pc.equal(pc.binary_length(path), 0),
        "/",
        pc.replace_substring_regex(path, r"[^/]*\z", ""),
    )
    rel_prefix = pc.binary_join_element_wise(abs_prefix, directory, "")
    plain_dir = plain_page & ~_mask(pc.match_substring_regex(path, r"//|/\."))

    dots = _mask(pc.match_substring_regex(imgs, r"/\."))
    space_end = _mask(pc.ends_with(imgs, " "))
    on_plain = plain_page[link_page]
    as_is = _mask(pc.is_null(page_arr))[link_page] | (
        on_plain & ~dots & _mask(pc.match_substring_regex(imgs, _RE2_PLAIN_URL))
    )
    net = on_plain & ~dots & _mask(pc.match_substring_regex(imgs, _RE2_PLAIN_NET_REF))
    root = on_plain & ~space_end & _mask(pc.match_substring_regex(imgs, _RE2_ROOTED_PATH))
    rel = (
        (on_plain & ~space_end)
        & plain_dir[link_page]
        & _mask(pc.match_substring_regex(imgs, _RE2_RELATIVE_PATH))
    )
    up = rel & _mask(pc.starts_with(imgs, "../"))
    rel &= ~up
    # index into [net prefixes, abs prefixes, rel prefixes, ""]: the prefix of each URL
    m = len(pages)
    which = np.full(n, 3 * m, dtype=np.int64)
    which[net] = link_page[net]
    which[root] = m + link_page[root]
    which[rel] = 2 * m + link_page[rel]
    prefixes = pa.concat_arrays(
        [net_prefix, abs_prefix, rel_prefix, pa.array([""], pa.string())]
    ).take(pa.array(which))
    resolved = pc.binary_join_element_wise(prefixes, imgs, "")
    ok = np.ones(n, dtype=bool)
    up_links = np.flatnonzero(up)
    slow = np.flatnonzero(~(as_is | net | root | rel | up))
    if not len(up_links) and not len(slow):
        return resolved, ok
    values: dict[int, str | None] = {}
    if len(up_links):
        dirs, abs_prefixes = directory.to_pylist(), abs_prefix.to_pylist()
        img_list = imgs.take(pa.array(up_links)).to_pylist()
        for i, img in zip(up_links.tolist(), img_list, strict=True):
            r = link_page[i]
            rest = img.lstrip("./")  # the leading "../"s: the rest starts with neither
            k = (len(img) - len(rest)) // 3
            values[i] = abs_prefixes[r] + dirs[r].rsplit("/", k + 1)[0] + "/" + rest
    if len(slow):
        bases: dict[int, _PageBase | None] = {}
        img_list = imgs.take(pa.array(slow)).to_pylist()
        for i, img in zip(slow.tolist(), img_list, strict=True):
            r = link_page[i]
            page = pages[r]
            if r not in bases:
                bases[r] = _PageBase(page) if isinstance(page, str) and page else None
            try:
                values[i] = _resolve(page, img, bases[r])
            except ValueError:  # unparseable (e.g. "http://[bad"): MetaCLIP drops the link
                values[i] = None
                ok[i] = False
    replaced = np.zeros(n, dtype=bool)
    at = np.fromiter(values, np.int64, len(values))
    replaced[at] = True
    new = pa.array([values[i] for i in np.sort(at).tolist()], pa.string())
    return pc.replace_with_mask(resolved, pa.array(replaced), new), ok


class _WatPairs:
    """The pairs of a WAT shard, in record order, as `Ingestor._extract` gives them.

    `hold(doc)` keeps, per record, its page URL and its image links (picked with C loops:
    `map(dict.get, ...)`, `compress`); every `_CONVERT_LINKS` links, their `url` and texts
    become string columns (one `pa.array` of structs) while they are still in the CPU's caches;
    `flush` makes the pairs of the held records on whole columns (Arrow kernels: URL
    resolution, text normalization, dropping empty texts). A record that may hold a lone
    surrogate goes to `Ingestor._extract`, pair by pair, into `slow_columns()` after the held
    records are flushed; so does one whose links are not all objects with a string or missing
    `path`. A page URL that is neither a string nor missing raises `_BadPageUrl` (the record is
    quarantined) before anything of the record is held. No held link can raise, so
    deferring its extraction changes nothing but the time it takes."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        #: (image URLs, texts, text keys, page URLs) per run of records: Arrow arrays or lists
        self.chunks: list[tuple[Any, Any, Any, Any]] = []
        self.num_rows = 0
        self._pages: list[str | None] = []  # per held record with image links
        self._n_img: list[int] = []  # its number of image links
        self._links: list[dict] = []  # image links held as they are
        # `url` and TEXT_KEYS of the image links held before, as string columns in parts (the
        # texts normalized)
        self._columns: tuple[list, ...] = ([], [], [], [])
        self._held = self._text_bytes = 0  # image links held, bytes of their texts
        self._slow: tuple[list, list, list, list] | None = None

    def hold(self, doc: Any) -> None:
        """Counts the record and holds its image links (`Ingestor._extract`'s checks, in its
        order)."""
        counts = self.counts
        found = _record_links(doc, counts)
        if found is None:
            return
        page_url, links = found
        try:
            # dict.get and str.startswith raise TypeError for a link that is not a dict and
            # for a path that is not a string (missing: "")
            is_img = map(str.startswith, map(dict.get, links, _PATH, _NONE), _IMG)
            img_links = list(compress(links, is_img))
        except TypeError:
            Ingestor._extract_links(page_url, links, self.slow_columns(), counts)
            return
        if img_links:
            self._links += img_links
            self._pages.append(page_url)
            self._n_img.append(len(img_links))
            if len(self._links) >= _CONVERT_LINKS:
                self._convert()
                if self._held >= _FLUSH_LINKS or self._text_bytes >= _FLUSH_TEXT_BYTES:
                    self.flush()

    def _convert(self) -> None:
        """Moves the `url` and texts of the held links to string columns while the links are
        still in the CPU's caches (at `flush`, each would be read from memory again)."""
        links = self._links
        self._held += len(links)
        try:  # one C++ pass: a missing key or None is null, any other non-string refused
            values = pa.array(links, _LINK_TYPE)
            columns = [pc.struct_field(values, [k]) for k in range(len(_LINK_KEYS))]
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # not a string: null, as `_extract` skips it
            columns = [_str_array(list(map(dict.get, links, repeat(k)))) for k in _LINK_KEYS]
        self._columns[0].append(columns[0])
        for parts, texts in zip(self._columns[1:], columns[1:], strict=True):
            parts.append(_normalize_texts(texts))
            self._text_bytes += parts[-1].nbytes
        self._links = []

    def slow_columns(self) -> tuple[list, list, list, list]:
        """Lists to append pairs to one by one, after the held records' pairs."""
        self.flush()
        if self._slow is None:
            self._slow = ([], [], [], [])
            self.chunks.append(self._slow)
        return self._slow

    def flush(self) -> None:
        """Makes the pairs of the held records."""
        if self._slow is not None:
            self.num_rows += len(self._slow[0])
            self._slow = None
        if not self._pages:
            return
        self._convert()
        pages, n_img, columns, total = self._pages, self._n_img, self._columns, self._held
        self._pages, self._n_img, self._columns = [], [], ([], [], [], [])
        self._held = self._text_bytes = 0
        counts = self.counts
        imgs = _concat(columns[0])
        link_page = np.repeat(np.arange(len(pages)), n_img)
        has_url = _mask(pc.greater(pc.binary_length(imgs), 0))
        links = None  # the image links kept (indices into raw), None: all
        if not has_url.all():
            counts["image_links_without_url"] += len(has_url) - int(has_url.sum())
            links = np.flatnonzero(has_url)
            imgs = imgs.take(pa.array(links))
            link_page = link_page[links]
        if not len(imgs):
            return
        resolved, ok = _resolve_column(imgs, link_page, pages)
        if not ok.all():
            counts["image_links_bad_url"] += len(ok) - int(ok.sum())
            keep = np.flatnonzero(ok)
            links = keep if links is None else links[keep]
            resolved = resolved.take(pa.array(keep))
            link_page = link_page[keep]
        n = len(resolved)
        if not n:
            return
        counts["image_links"] += n
        # every text of the held links, key k of link i at k * total + i
        texts = _concat(columns[1] + columns[2] + columns[3])  # normalized
        has_text = _mask(pc.greater(pc.binary_length(texts), 0)).reshape(len(TEXT_KEYS), total)
        kept = np.arange(total) if links is None else links
        # pairs link by link, keys in order: (kept link j, key k) at j * 3 + k
        rows = np.flatnonzero(has_text[:, kept].T)
        if not len(rows):
            return
        link, key = rows // len(TEXT_KEYS), rows % len(TEXT_KEYS)
        self.chunks.append(
            (
                resolved.take(pa.array(link)),
                texts.take(pa.array(key * total + kept[link])),
                _KEY_ARRAY.take(pa.array(key)),
                pa.array(pages, pa.string()).take(pa.array(link_page[link])),
            )
        )
        self.num_rows += len(rows)

    def table(self, shard: str) -> pa.Table:
        """The pairs as a `PAIR_SCHEMA` table (`source_row`: the pair's index in the shard)."""
        self.flush()
        if not self.num_rows:
            return PAIR_SCHEMA.empty_table()
        cols = []
        for k in range(4):
            parts = [
                pa.array(c[k], pa.string()) if isinstance(c[k], list) else c[k] for c in self.chunks
            ]
            cols.append(parts[0] if len(parts) == 1 else _concat(parts))
        n = self.num_rows
        return pa.Table.from_arrays(
            [
                _uids(cols[0]),
                *cols,
                pa.repeat(pa.scalar(shard, pa.string()), n),
                pa.array(np.arange(n, dtype=np.int64)),
            ],
            schema=PAIR_SCHEMA,
        )


def _uids(urls: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`uids_of_urls(urls)` for a column without nulls: each distinct URL is hashed once and
    the digests are hex-encoded together (tested equal in test_ingest_speedpath)."""
    if isinstance(urls, pa.ChunkedArray):
        return pa.chunked_array([_uids(chunk) for chunk in urls.chunks], pa.string())
    if not len(urls):
        return pa.array([], pa.string())
    enc = urls.dictionary_encode()
    keys = enc.dictionary
    if _has_bytes(keys, b"\t "):
        keys = pc.replace_substring(pc.replace_substring(keys, "\t", ""), " ", "")
    digests = b"".join(map(_digest, map(hashlib.sha224, keys.cast(pa.binary()).to_pylist())))
    m = len(keys)
    head = np.frombuffer(digests, np.uint8).reshape(m, 28)[:, : UID_HEX_DIGITS // 2]
    hexed = head.tobytes().hex().encode("ascii")
    offsets = np.arange(0, UID_HEX_DIGITS * m + 1, UID_HEX_DIGITS, dtype=np.int32)
    uids = pa.StringArray.from_buffers(m, pa.py_buffer(offsets), pa.py_buffer(hexed))
    return uids.take(enc.indices)


def _loads_wat(payload: bytes, deep: int) -> tuple[Any, bool]:
    """`json.loads(payload)`, and whether the result may hold a lone surrogate.

    orjson parses first; json (with its exceptions and its result) decides whenever orjson
    refuses the input, which covers every input the two treat differently: lone surrogates
    (escaped or as UTF-8 bytes, which json lets through), NaN/Infinity, a BOM, UTF-16/32, and
    nesting over 1024. orjson's other differences do not reach a row: an integer over 64 bits
    is a float (a number either way, never read), and duplicate keys keep the last value in
    both. json's nesting limit is the interpreter's recursion limit less the stack in use, so a
    payload with `deep` or more brackets is left to json, so that it fails exactly as before.
    What orjson accepts is valid UTF-8 without surrogates: no pair needs the Unicode check.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload), _may_have_surrogate(payload)
    if len(payload) >= deep and payload.count(b"[") + payload.count(b"{") >= deep:
        return json.loads(payload), False
    return doc, False


def _may_have_surrogate(data: bytes) -> bool:
    """Can JSON text `data` decode to a lone surrogate? Only through a `\\u` escape or the
    bytes ED A0-BF (UTF-8 of a surrogate, which `json.loads` of bytes lets through)."""
    return b"\\u" in data or b"\xed" in data


def _first_bad_unicode(items: Any) -> str | None:
    """A detail naming the first (field, value) whose string is not valid Unicode, else None."""
    for name, v in items:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"field {name!r} is not valid Unicode (lone surrogate): {ascii(v[:80])}"
    return None


def _schema_problem(schema: pa.Schema) -> str:
    """Why a Parquet file's schema cannot be read as pairs ("" when it can)."""
    missing = [c for c in ("url", "text") if c not in schema.names]
    if missing:
        return f"missing column(s) {missing}; have {schema.names}"
    for name in TABLE_COLUMNS:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (
            pa.types.is_null(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
        ):
            return f"column {name!r} is {t}, not a string"
    return ""


def _decoded_nbytes(batch: pa.RecordBatch) -> int:
    """The bytes of `batch` once its dictionary columns are decoded (a dictionary of one long
    string repeated on every row is small until then)."""
    total = 0
    for arr in batch.columns:
        if pa.types.is_dictionary(arr.type) and len(arr):
            lengths = pc.binary_length(arr.dictionary)
            total += (pc.sum(pc.take(lengths, arr.indices)).as_py() or 0) + arr.indices.nbytes
        else:
            total += arr.nbytes
    return total


def _as_utf8(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """A string/binary column as `string`, and the mask of rows that are not valid UTF-8 (set
    to null), or None when all are valid. Bad rows are found by halving: one cast per part."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string()), None
    try:
        return arr.cast(pa.string()), None
    except pa.ArrowInvalid:
        pass
    bad = np.zeros(len(arr), dtype=bool)
    parts = [(0, len(arr))]
    while parts:
        lo, hi = parts.pop()
        try:
            arr.slice(lo, hi - lo).cast(pa.string())
            continue
        except pa.ArrowInvalid:
            pass
        if hi - lo == 1:
            bad[lo] = True
        else:
            mid = (lo + hi) // 2
            parts += [(lo, mid), (mid, hi)]
    cleaned = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
    return cleaned.cast(pa.string()), bad
