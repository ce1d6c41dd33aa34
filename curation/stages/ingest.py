"""Ingest: CommonCrawl WAT shards and Parquet/JSONL pair tables → pair tables.

One input shard becomes one Arrow table with the columns of `PAIR_SCHEMA` (`Ingestor` is the
`Source` of a flow: `read(shard)`). Every record and row is accounted for: the output's `counts`
say how many pairs were read, written and dropped per reason, its `quarantine` lists each
set-aside record or shard with its reason, and its `extra` has the input's size and checksum.

Only damaged data is set aside (bad gzip or WARC framing, a truncated file, broken JSON); an error
of the storage itself (an `OSError` from S3/GCS mid-stream) propagates, so that the executor
retries the shard instead of marking a partial shard done. A missing file is quarantined.

WAT extraction follows MetaCLIP's WAT parser: for each response metadata record, links of
`Envelope/Payload-Metadata/HTTP-Response-Metadata/HTML-Metadata/Links` whose `path` starts with
`IMG@/src` and that have a non-empty `url`; each non-empty `alt`, `title`, `data-image-title`
(newlines and CRs replaced by spaces, stripped) is one pair. Image URLs are resolved against the
page URL. A link without a URL yields nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections import Counter
from typing import Any
from urllib.parse import urljoin

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from curation.core.accounting import quarantine_record
from curation.core.stage import Shard, Source, StageOutput
from curation.core.text import normalize_alt_text, uids_of_urls

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
DEFAULT_MAX_TEXT_CHARS = 1000


class _HashingReader(io.RawIOBase):
    """Wraps a binary stream; hashes and counts the bytes read (input checksum for the manifest).

    An exception raised by the stream itself (a storage error) is kept in `error` and raised
    again on every later read: FastWARC raises `OSError` for damaged data too, so the caller
    tells a storage error from damage by `error`, not by the exception's type.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.error: BaseException | None = None

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
            self.error = exc
            raise
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def detect_format(url: str) -> str:
    lower = url.lower()
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
    ) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        if max_record_bytes < 1024:
            raise ValueError(f"max_record_bytes must be >= 1024, got {max_record_bytes}")
        self.max_text_chars = max_text_chars
        self.max_record_bytes = max_record_bytes

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
        fs, path = url_to_fs(url)
        result = StageOutput(
            table=PAIR_SCHEMA.empty_table(), extra={"input_bytes": 0, "input_sha256": ""}
        )
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError as exc:
            result.counts["shards_missing"] += 1
            result.quarantine.append(self._q(shard_name, url, "missing_file", str(exc)))
            return result
        with f:
            reader = _HashingReader(f)
            if fmt == "wat":
                rows = self._read_wat(reader, url, shard_name, result)
                result.counts["rows_read"] += len(rows)
                table = self._wat_rows_to_table(rows, shard_name)
            else:
                table = self._read_table(reader, fmt, url, shard_name, result)
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

    def _q(self, shard: str, url: str, reason: str, detail: str, **extra: Any) -> dict[str, Any]:
        return quarantine_record(self.name, shard, url, reason, detail, **extra)

    # -- WAT ---------------------------------------------------------------------------------
    def _read_wat(
        self, reader: _HashingReader, url: str, shard: str, result: StageOutput
    ) -> list[tuple]:
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        counts = result.counts
        rows: list[tuple] = []
        record_no = -1
        last_pos, stopped = 0, False
        try:
            it = ArchiveIterator(
                reader, record_types=WarcRecordType.metadata, parse_http=False, stream_detect=True
            )
            for record in it:
                record_no += 1
                last_pos = record.stream_pos
                counts["records_read"] += 1
                if record.content_length > self.max_record_bytes:
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
                payload = record.reader.read()
                if "Content-Length" not in record.headers or len(payload) < record.content_length:
                    counts["records_dropped_truncated"] += 1
                    counts["shards_truncated"] += 1
                    result.quarantine.append(
                        self._q(
                            shard,
                            url,
                            "truncated_shard",
                            f"record {record_no} has {len(payload)} of "
                            f"{record.content_length} bytes; file ends early",
                            record=record_no,
                            offset=record.stream_pos,
                        )
                    )
                    stopped = True
                    break
                try:
                    doc = json.loads(payload)
                except ValueError as exc:  # UnicodeDecodeError is a ValueError too
                    reason = "bad_utf8" if isinstance(exc, UnicodeDecodeError) else "bad_json"
                    counts[f"records_dropped_{reason}"] += 1
                    result.quarantine.append(
                        self._q(
                            shard, url, reason, str(exc), record=record_no, offset=record.stream_pos
                        )
                    )
                    continue
                self._extract(doc, rows, counts)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 corrupt/truncated gzip or WARC framing
            # (FastWARC may raise a pyo3 PanicException, a BaseException); keep what was read.
            # FastWARC raises OSError for damaged data too: a storage error is told apart by the
            # reader having seen it, and propagates as the stream raised it.
            if reader.error is exc:
                raise
            if reader.error is not None:
                raise reader.error from exc
            stopped = True
            cut = _gzip_tail_state(url, last_pos) == "truncated"
            counts["shards_truncated" if cut else "shards_corrupt"] += 1
            result.quarantine.append(
                self._q(
                    shard,
                    url,
                    "truncated_shard" if cut else "corrupt_shard",
                    f"{type(exc).__name__}: {exc}",
                    record=record_no + 1,
                )
            )
        if reader.error is not None:  # the stream failed and FastWARC stopped quietly
            raise reader.error
        tail = "complete" if stopped else _gzip_tail_state(url, last_pos)
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
        return rows

    @staticmethod
    def _extract(doc: Any, rows: list[tuple], counts: Counter) -> None:
        env = doc.get("Envelope") if isinstance(doc, dict) else None
        if not isinstance(env, dict):
            counts["records_skipped_no_envelope"] += 1
            return
        header = env.get("WARC-Header-Metadata") or {}
        if header.get("WARC-Type") != "response":
            counts["records_skipped_not_response"] += 1
            return
        page_url = header.get("WARC-Target-URI")
        try:
            links = env["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"]
        except (KeyError, TypeError):
            counts["records_skipped_no_links"] += 1
            return
        if not isinstance(links, list):
            counts["records_skipped_no_links"] += 1
            return
        counts["records_with_links"] += 1
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
            try:
                resolved = urljoin(page_url, img) if isinstance(page_url, str) else img
            except ValueError:  # unparseable URL (e.g. "http://[bad"): MetaCLIP drops the link
                counts["image_links_bad_url"] += 1
                continue
            counts["image_links"] += 1
            for key in TEXT_KEYS:
                value = link.get(key)
                if not isinstance(value, str):
                    continue
                text = normalize_alt_text(value)
                if not text:
                    continue
                rows.append((resolved, text, key, page_url))

    @staticmethod
    def _wat_rows_to_table(rows: list[tuple], shard: str) -> pa.Table:
        if not rows:
            return PAIR_SCHEMA.empty_table()
        urls, texts, keys, pages = zip(*rows, strict=True)
        url_arr = pa.array(urls, pa.string())
        n = len(rows)
        return pa.Table.from_arrays(
            [
                uids_of_urls(url_arr),
                url_arr,
                pa.array(texts, pa.string()),
                pa.array(keys, pa.string()),
                pa.array(pages, pa.string()),
                pa.array(np.full(n, shard, dtype=object), pa.string()),
                pa.array(np.arange(n, dtype=np.int64)),
            ],
            schema=PAIR_SCHEMA,
        )

    # -- Parquet / JSONL -----------------------------------------------------------------------
    def _read_table(
        self, reader: _HashingReader, fmt: str, url: str, shard: str, result: StageOutput
    ) -> pa.Table:
        counts = result.counts
        data = reader.read()  # a storage error propagates from here, before any parsing
        if not data:
            return PAIR_SCHEMA.empty_table()
        # Parsing works on bytes in memory, so whatever it raises is damage (gzip's BadGzipFile
        # is an OSError too).
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                raw = pq.read_table(pa.BufferReader(data))
            else:
                raw = self._parse_jsonl(data, url, shard, result)
        except Exception as exc:
            counts["shards_corrupt"] += 1
            result.quarantine.append(
                self._q(shard, url, "corrupt_shard", f"{type(exc).__name__}: {exc}")
            )
            return PAIR_SCHEMA.empty_table()
        missing = [c for c in ("url", "text") if c not in raw.column_names]
        if missing:
            counts["shards_bad_schema"] += 1
            result.quarantine.append(
                self._q(
                    shard,
                    url,
                    "bad_schema",
                    f"missing column(s) {missing}; have {raw.column_names}",
                )
            )
            return PAIR_SCHEMA.empty_table()
        n = raw.num_rows
        counts["rows_read"] += n
        url_col = pc.cast(raw.column("url"), pa.string())
        text_col = pc.cast(raw.column("text"), pa.string())
        # source_row: the row of a Parquet file, the line number (0-based) of a JSONL file
        source_row = (
            raw.column("__line")
            if "__line" in raw.column_names
            else pa.array(np.arange(n, dtype=np.int64))
        )
        bad_url = pc.fill_null(pc.equal(pc.utf8_length(url_col), 0), True)
        text_norm = pc.utf8_trim_whitespace(
            pc.replace_substring(pc.replace_substring(text_col, "\n", " "), "\r", " ")
        )
        bad_text = pc.and_(
            pc.invert(bad_url), pc.fill_null(pc.equal(pc.utf8_length(text_norm), 0), True)
        )
        counts["rows_dropped_missing_url"] += pc.sum(bad_url).as_py() or 0
        counts["rows_dropped_empty_text"] += pc.sum(bad_text).as_py() or 0
        keep = pc.invert(pc.or_(bad_url, bad_text))
        if "uid" in raw.column_names:
            given = pc.cast(raw.column("uid"), pa.string())
            uid = pc.if_else(pc.is_null(given), uids_of_urls(url_col), given)
        else:
            uid = uids_of_urls(url_col)
        text_key = (
            pc.cast(raw.column("text_key"), pa.string())
            if "text_key" in raw.column_names
            else pa.nulls(n, pa.string())
        )
        page_url = (
            pc.cast(raw.column("page_url"), pa.string())
            if "page_url" in raw.column_names
            else pa.nulls(n, pa.string())
        )
        table = pa.Table.from_arrays(
            [
                uid,
                url_col,
                text_norm,
                text_key,
                page_url,
                pa.array(np.full(n, shard, dtype=object), pa.string()),
                source_row,
            ],
            schema=PAIR_SCHEMA,
        )
        return table.filter(keep)

    def _parse_jsonl(self, data: bytes, url: str, shard: str, result: StageOutput) -> pa.Table:
        if url.lower().endswith(".gz"):
            import gzip

            data = gzip.decompress(data)
        lines = data.split(b"\n")
        records = []
        keys: set[str] = set()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                reason, detail = (
                    (None, "") if isinstance(obj, dict) else ("bad_json", "line is not an object")
                )
            except ValueError as exc:  # UnicodeDecodeError is a ValueError too
                reason = "bad_utf8" if isinstance(exc, UnicodeDecodeError) else "bad_json"
                detail = str(exc)
            if reason is not None:
                result.counts[f"rows_dropped_{reason}"] += 1
                result.quarantine.append(self._q(shard, url, reason, detail, record=i))
                continue
            keys.update(obj)
            obj["__line"] = i
            records.append(obj)
        bad = len(result.quarantine)
        result.counts["rows_read"] += (
            sum(1 for q in result.quarantine if q["reason"] in ("bad_utf8", "bad_json"))
            if bad
            else 0
        )
        if not records:
            return pa.table({"url": pa.array([], pa.string()), "text": pa.array([], pa.string())})
        # a column is present when any record has it, however late in the file
        cols = ("uid", "url", "text", "text_key", "page_url")
        present = [c for c in cols if c in keys] or ["url", "text"]
        table = {c: pa.array([_as_str(r.get(c)) for r in records], pa.string()) for c in present}
        table["__line"] = pa.array([r["__line"] for r in records], pa.int64())
        return pa.table(table)

    def _cap_text(self, table: pa.Table) -> tuple[pa.Table, int]:
        text = table.column("text")
        too_long = pc.greater(pc.utf8_length(text), self.max_text_chars)
        n = pc.sum(too_long).as_py() or 0
        if n:
            cut = pc.utf8_slice_codeunits(text, 0, self.max_text_chars)
            table = table.set_column(table.schema.get_field_index("text"), "text", cut)
        return table, n


def _gzip_tail_state(url: str, start: int) -> str:
    """ "complete", "truncated" or "corrupt": are the bytes of `url` from `start` whole gzip members?

    FastWARC stops quietly when a gzipped WAT is cut near a record boundary; this re-reads only
    the last record's member(s) so such a truncation is reported, not silently accepted.
    """
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return "complete"
        f.seek(start)
        rest = f.read()
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


def _as_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return str(v)
