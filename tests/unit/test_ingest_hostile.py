"""Ingest against hostile input: one bad record is set aside alone with its reason, the rest of
the shard is read and counted, and memory stays bounded (caps on records and shards)."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import (
    PAGE,
    check_invariants,
    img,
    ingest,
    member,
    reasons,
    rows,
    warcinfo,
    wat_doc,
    write,
)

NESTED = b"[" * 100_000


def _jsonl(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


def _pair(i: int, **kw) -> bytes:
    return json.dumps({"url": f"http://a/{i}.jpg", "text": f"t{i}", **kw}).encode()


def _wat_record(alt: str) -> bytes:
    return member(wat_doc(PAGE, [img("http://img.com/x.jpg", alt)]))


def _metadata_head(content_length: int) -> bytes:
    return (
        f"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: {PAGE}\r\n"
        "WARC-Record-ID: <urn:uuid:22222222-0000-0000-0000-000000000000>\r\n"
        f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode()


# -- 1. deeply nested JSON -----------------------------------------------------------------------


def test_wat_deeply_nested_record_is_bad_json_and_later_records_read(tmp_path):
    data = _wat_record("before") + member(NESTED) + _wat_record("after")
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert [r[1] for r in rows(result)] == ["before", "after"]
    assert reasons(result) == ["bad_json"]
    assert result.quarantine[0]["record"] == 1
    assert result.counts["records_dropped_bad_json"] == 1
    assert result.counts["shards_corrupt"] == 0
    check_invariants(result)


@pytest.mark.parametrize("name", ["j.jsonl", "j.jsonl.gz"])
def test_jsonl_deeply_nested_line_is_bad_json_and_others_read(tmp_path, name):
    data = _jsonl(_pair(0), NESTED, _pair(2))
    data = gzip.compress(data, mtime=0) if name.endswith(".gz") else data
    result = ingest(write(tmp_path, name, data))
    assert result.table.column("url").to_pylist() == ["http://a/0.jpg", "http://a/2.jpg"]
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [("bad_json", 1)]
    assert result.counts["rows_read"] == 3
    assert result.counts["rows_dropped_bad_json"] == 1
    check_invariants(result)


# -- 2. lone surrogates --------------------------------------------------------------------------


@pytest.mark.parametrize("page", [12345, ["http://a/"], {"u": 1}, True])
def test_wat_page_url_that_is_not_a_string_quarantines_the_record(tmp_path, page):
    """A WARC-Target-URI that is not a JSON string (a number, a list, ...) sets the record
    aside as `bad_page_url`, on the column path and on the per-pair (surrogate) path."""
    bad = wat_doc(PAGE, [img("http://img.com/1.jpg", "lost")]).replace(
        json.dumps(PAGE).encode(), json.dumps(page).encode()
    )
    surrogate = json.loads('"bad \\ud800 alt"')
    bad_slow = wat_doc(PAGE, [img("http://img.com/2.jpg", surrogate)]).replace(
        json.dumps(PAGE).encode(), json.dumps(page).encode()
    )
    data = _wat_record("before") + member(bad) + member(bad_slow) + _wat_record("after")
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert [r[1] for r in rows(result)] == ["before", "after"]
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [
        ("bad_page_url", 1),
        ("bad_page_url", 2),
    ]
    assert "WARC-Target-URI is a JSON" in result.quarantine[0]["detail"]
    assert result.counts["records_dropped_bad_page_url"] == 2
    assert result.counts["records_with_links"] == 2
    check_invariants(result)


def test_wat_lone_surrogate_drops_only_that_pair(tmp_path):
    bad = json.loads('"bad \\ud800 alt"')
    links = [img("http://img.com/1.jpg", bad), img("http://img.com/2.jpg", "good")]
    raw_surrogate = wat_doc(PAGE, [img("http://img.com/3.jpg", "x")]).replace(
        b"http://img.com/3.jpg", b"http://img.com/\xed\xa0\x80.jpg"
    )
    data = member(wat_doc(PAGE, links)) + member(raw_surrogate) + _wat_record("after")
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert [r[1] for r in rows(result)] == ["good", "after"]
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [
        ("bad_unicode", 0),
        ("bad_unicode", 1),
    ]
    assert "'alt'" in result.quarantine[0]["detail"]
    assert "'url'" in result.quarantine[1]["detail"]
    assert result.counts["rows_dropped_bad_unicode"] == 2
    assert result.counts["rows_read"] == 4
    check_invariants(result)
    result.quarantine[0]["detail"].encode("utf-8")  # writable


def test_jsonl_lone_surrogate_drops_only_that_line(tmp_path):
    data = _jsonl(
        _pair(0),
        b'{"url": "http://a/1.jpg", "text": "\\ud800"}',
        b'{"url": "http://a/2.jpg", "text": "ok", "uid": "u\\uDFFF"}',
        b'{"url": "http://a/3.jpg", "text": "raw \xed\xa0\x80"}',
        b'{"url": "http://a/4.jpg", "text": "pair \\ud83d\\ude00"}',  # a valid pair: kept
        _pair(5),
    )
    result = ingest(write(tmp_path, "j.jsonl", data))
    assert result.table.column("url").to_pylist() == [
        "http://a/0.jpg",
        "http://a/4.jpg",
        "http://a/5.jpg",
    ]
    assert result.table.column("text").to_pylist()[1] == "pair \U0001f600"
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [
        ("bad_unicode", 1),
        ("bad_unicode", 2),
        ("bad_unicode", 3),
    ]
    assert "'uid'" in result.quarantine[1]["detail"]
    assert result.counts["rows_dropped_bad_unicode"] == 3
    check_invariants(result)


# -- 3. a Content-Length past the end of the file ------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_wat_huge_content_length_is_reported_not_silent(tmp_path, gz):
    liar = _metadata_head(10 * 10**9) + b'{"short": 1}' + b"\r\n\r\n"
    data = _wat_record("before") + gzip.compress(liar, mtime=0) + _wat_record("after")
    if not gz:
        data = gzip.decompress(data)
    result = ingest(write(tmp_path, "a.wat.gz" if gz else "a.warc.wat", data))
    got = [r[1] for r in rows(result)]
    # FastWARC cannot resync after the length (it reads the next records as this one's body):
    # the record after it is lost, so the shard must say it was cut.
    assert got[0] == "before"
    if got != ["before", "after"]:
        assert reasons(result) == ["truncated_shard"]
        assert result.quarantine[0]["record"] == 1
        assert result.counts["shards_truncated"] == 1
    check_invariants(result)


def test_wat_record_numbers_count_every_warc_record(tmp_path):
    data = warcinfo() + _wat_record("first") + member(b"not json") + _wat_record("last")
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert [r[1] for r in rows(result)] == ["first", "last"]
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [("bad_json", 2)]
    assert result.counts["records_read"] == 3  # metadata records


# -- 4. Parquet column types ---------------------------------------------------------------------


def test_parquet_binary_text_with_invalid_utf8_drops_those_rows(tmp_path):
    n = 20_000
    texts = [f"t{i}".encode() for i in range(n)]
    texts[7] = b"\xff bad"
    texts[15_000] = b"ok \xc3"
    urls = [f"http://a/{i}.jpg".encode() for i in range(n)]
    urls[9] = b"http://a/\xfe.jpg"
    table = pa.table({"url": pa.array(urls, pa.binary()), "text": pa.array(texts, pa.binary())})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=5000)
    result = ingest(str(tmp_path / "p.parquet"))
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [
        ("bad_utf8", 7),
        ("bad_utf8", 9),
        ("bad_utf8", 15_000),
    ]
    assert result.counts["rows_dropped_bad_utf8"] == 3
    assert result.counts["rows_read"] == n
    assert result.table.num_rows == n - 3
    src = result.table.column("source_row").to_pylist()
    assert 7 not in src and 9 not in src and 15_000 not in src and src[7] == 8
    assert result.table.column("text").to_pylist()[0] == "t0"
    check_invariants(result)


@pytest.mark.parametrize(
    "column",
    [
        pa.array([["a", "b"]], pa.list_(pa.string())),
        pa.array([{"x": "a"}]),
        pa.array([3], pa.int64()),
    ],
)
def test_parquet_text_of_wrong_type_is_bad_schema(tmp_path, column):
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "text": column}), tmp_path / "p.parquet")
    result = ingest(str(tmp_path / "p.parquet"))
    assert reasons(result) == ["bad_schema"]
    assert "'text'" in result.quarantine[0]["detail"]
    assert result.counts["shards_bad_schema"] == 1
    check_invariants(result)


# -- 5. JSONL fields that are not strings --------------------------------------------------------


def test_jsonl_non_string_fields_are_refused_per_line(tmp_path):
    data = _jsonl(
        _pair(0),
        json.dumps({"url": "http://a/1.jpg", "text": ["a", "b"]}).encode(),
        json.dumps({"url": "http://a/2.jpg", "text": 2.5}).encode(),
        json.dumps({"url": {"u": 1}, "text": "x"}).encode(),
        json.dumps({"url": "http://a/4.jpg", "text": "x", "uid": 7}).encode(),
        json.dumps({"url": "http://a/5.jpg", "text": "x", "other": [1]}).encode(),
    )
    result = ingest(write(tmp_path, "j.jsonl", data))
    assert result.table.column("url").to_pylist() == ["http://a/0.jpg", "http://a/5.jpg"]
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [
        ("bad_field", i) for i in (1, 2, 3, 4)
    ]
    details = [q["detail"] for q in result.quarantine]
    assert "'text'" in details[0] and "list" in details[0]
    assert "'url'" in details[2] and "'uid'" in details[3]
    assert result.counts["rows_dropped_bad_field"] == 4
    check_invariants(result)


# -- 6. memory -----------------------------------------------------------------------------------


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_jsonl_gz_bomb_stops_at_the_shard_cap_without_inflating_it(tmp_path):
    line = _pair(0, page_url="http://p/" + "p" * 1000) + b"\n"
    bomb = gzip.compress(line * ((64 << 20) // len(line)), mtime=0)  # ~64 MiB inflated
    url = write(tmp_path, "b.jsonl.gz", bomb)
    result, peak = _peak(lambda: ingest(url, max_shard_bytes=4 << 20))
    assert peak < 32 << 20
    assert reasons(result) == ["shard_too_large"]
    assert result.counts["shards_too_large"] == 1
    assert 0 < result.counts["rows_read"] <= (4 << 20) // len(line)
    assert result.table.num_rows == result.counts["rows_read"]
    assert result.extra["input_bytes"] == len(bomb)  # the whole file is still hashed
    check_invariants(result)


@pytest.mark.parametrize("gz", [True, False])
def test_jsonl_over_long_line_is_skipped_without_holding_it(tmp_path, gz):
    huge = b'{"url": "http://a/1.jpg", "text": "' + b"x" * (48 << 20) + b'"}'
    data = _jsonl(_pair(0), huge, _pair(2), b"", _pair(4))
    data = gzip.compress(data, mtime=1) if gz else data
    url = write(tmp_path, "j.jsonl.gz" if gz else "j.jsonl", data)
    del data, huge
    result, peak = _peak(lambda: ingest(url, max_record_bytes=1 << 20))
    assert peak < 24 << 20
    assert result.table.column("source_row").to_pylist() == [0, 2, 4]
    assert [(q["reason"], q["record"]) for q in result.quarantine] == [("record_too_large", 1)]
    assert result.counts["rows_dropped_too_large"] == 1
    assert result.counts["rows_read"] == 4
    check_invariants(result)


def test_plain_jsonl_over_the_shard_cap_stops_and_counts(tmp_path):
    data = _jsonl(*(_pair(i) for i in range(100_000)))
    result = ingest(write(tmp_path, "j.jsonl", data), max_shard_bytes=1 << 20)
    assert reasons(result) == ["shard_too_large"]
    assert 0 < result.table.num_rows < 100_000
    assert result.table.column("source_row").to_pylist() == list(range(result.table.num_rows))
    assert result.extra["input_bytes"] == len(data)
    check_invariants(result)


def test_parquet_declaring_too_many_bytes_is_refused_unread(tmp_path):
    texts = [("x" * 1000) + str(i) for i in range(30_000)]
    table = pa.table({"url": [f"http://a/{i}.jpg" for i in range(30_000)], "text": texts})
    pq.write_table(table, tmp_path / "p.parquet", use_dictionary=False, compression="zstd")
    assert (tmp_path / "p.parquet").stat().st_size < 2 << 20
    result = ingest(str(tmp_path / "p.parquet"), max_shard_bytes=8 << 20)
    assert reasons(result) == ["shard_too_large"]
    assert "declare" in result.quarantine[0]["detail"]
    assert result.counts["rows_read"] == 0
    check_invariants(result)


def test_parquet_dictionary_bomb_stops_at_the_cap(tmp_path):
    n = 50_000
    text = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array(["y" * 1000]))
    table = pa.table({"url": pa.array([f"http://a/{i}" for i in range(n)]), "text": text})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=n)
    assert (tmp_path / "p.parquet").stat().st_size < 1 << 20
    result = ingest(str(tmp_path / "p.parquet"), max_shard_bytes=20 << 20)
    assert reasons(result) == ["shard_too_large"]
    assert 0 < result.counts["rows_read"] < n
    assert result.table.num_rows == result.counts["rows_read"]
    assert result.table.column("text").to_pylist()[0] == "y" * 1000
    check_invariants(result)


def test_jsonl_gz_cut_short_keeps_the_lines_before_the_cut(tmp_path):
    data = gzip.compress(_jsonl(*(_pair(i, page_url="p" * 500) for i in range(2000))), mtime=0)
    result = ingest(write(tmp_path, "j.jsonl.gz", data[: len(data) // 2]))
    assert reasons(result) == ["truncated_shard"]
    n = result.table.num_rows
    assert 0 < n < 2000
    assert result.table.column("source_row").to_pylist() == list(range(n))
    assert result.quarantine[0]["record"] == n  # the line being read when the file ended
    assert result.counts["shards_truncated"] == 1
    check_invariants(result)
