"""Ingest: WAT extraction by MetaCLIP's rules, Parquet/JSONL pair tables, and bad input handling.

WAT files are built here by hand (one gzip member per record, as CommonCrawl writes them) or with
warcio's WARCWriter, so every expectation is derived from the input, not from the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from urllib.parse import urljoin

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from curation.core.stage import Shard, Source, StageOutput
from curation.core.text import uid_of_url, uids_of_urls
from curation.stages.ingest import PAIR_SCHEMA, Ingestor, detect_format
from curation.synth.wat import write_synthetic_pool

PAGE = "http://example.com/dir/sub/page.html"


# -- builders ------------------------------------------------------------------------------------


def wat_doc(page_url: str | None, links, warc_type: str = "response") -> bytes:
    header = {"WARC-Type": warc_type}
    if page_url is not None:
        header["WARC-Target-URI"] = page_url
    return json.dumps(
        {
            "Container": {"Filename": "x.warc.gz", "Compressed": True},
            "Envelope": {
                "Format": "WARC",
                "WARC-Header-Metadata": header,
                "Payload-Metadata": {
                    "Actual-Content-Type": "application/http; msgtype=response",
                    "HTTP-Response-Metadata": {"HTML-Metadata": {"Links": links}},
                },
            },
        }
    ).encode()


def member(payload: bytes, record_type: str = "metadata", target: str = PAGE) -> bytes:
    """One WARC record as its own gzip member (the layout of CommonCrawl WAT files)."""
    head = (
        f"WARC/1.0\r\nWARC-Type: {record_type}\r\nWARC-Target-URI: {target}\r\n"
        "WARC-Date: 2024-01-01T00:00:00Z\r\n"
        "WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000000>\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return gzip.compress(head + payload + b"\r\n\r\n", mtime=0)


def warcinfo() -> bytes:
    body = b"software: unit-test\r\nformat: WARC File Format 1.0\r\n"
    head = (
        "WARC/1.0\r\nWARC-Type: warcinfo\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
        "WARC-Record-ID: <urn:uuid:11111111-0000-0000-0000-000000000000>\r\n"
        f"Content-Type: application/warc-fields\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return gzip.compress(head + body + b"\r\n\r\n", mtime=0)


def img(url, alt=None, path: str = "IMG@/src", **extra) -> dict:
    link = {"path": path, "url": url}
    if alt is not None:
        link["alt"] = alt
    link.update(extra)
    return link


def write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def ingest(url: str, shard: str = "s", **kw) -> StageOutput:
    return Ingestor(**kw).process_shard(url, shard)


def rows(result: StageOutput) -> list[tuple]:
    t = result.table
    return list(
        zip(
            t.column("url").to_pylist(),
            t.column("text").to_pylist(),
            t.column("text_key").to_pylist(),
            strict=True,
        )
    )


def reasons(result: StageOutput) -> list[str]:
    return [q["reason"] for q in result.quarantine]


def sha_uid(url: str) -> str:
    return hashlib.sha224(url.replace("\t", "").replace(" ", "").encode()).hexdigest()[:24]


def check_invariants(result: StageOutput, shard: str = "s") -> None:
    """What every StageOutput must satisfy, whatever the input."""
    c = result.counts
    assert result.table.schema == PAIR_SCHEMA
    assert c["rows_written"] == result.table.num_rows
    dropped = sum(v for k, v in c.items() if k.startswith("rows_dropped_"))
    assert c["rows_read"] == c["rows_written"] + dropped, dict(c)
    t = result.table
    if t.num_rows:
        assert set(t.column("source_shard").to_pylist()) == {shard}
        assert t.column("url").null_count == 0 and t.column("text").null_count == 0
        assert all(len(x) > 0 for x in t.column("text").to_pylist())
    for q in result.quarantine:
        assert q["stage"] == "ingest" and q["shard"] == shard and q["reason"]


# -- uid rule ------------------------------------------------------------------------------------


def test_uid_of_url_is_metaclip_rule():
    url = "http://ex ample.com/a\tb c.jpg"
    want = hashlib.sha224(b"http://example.com/abc.jpg").hexdigest()[:24]
    assert uid_of_url(url) == want
    assert len(want) == 24
    assert uid_of_url("http://example.com/abc.jpg") == want
    assert (
        uid_of_url("http://例え.jp/画像.jpg")
        == (hashlib.sha224("http://例え.jp/画像.jpg".encode()).hexdigest()[:24])
    )
    # newlines are not stripped by the rule
    assert uid_of_url("http://a/\nb.jpg") != uid_of_url("http://a/b.jpg")


def test_uids_of_urls_agrees_and_keeps_nulls():
    urls = ["http://a.com/1.jpg", None, "http://a .com/\t2.jpg", "", "http://例え.jp/画.jpg"]
    got = uids_of_urls(pa.array(urls, pa.string()))
    assert got.type == pa.string()
    assert got.to_pylist() == [None if u is None else uid_of_url(u) for u in urls]
    assert got[1].as_py() is None
    chunked = pa.chunked_array([urls[:2], urls[2:]], pa.string())
    assert uids_of_urls(chunked).to_pylist() == got.to_pylist()
    assert len(uids_of_urls(pa.array([], pa.string()))) == 0


# -- WAT extraction ------------------------------------------------------------------------------


def test_wat_metaclip_extraction_rules(tmp_path):
    links = [
        img("http://img.com/1.jpg", "a cat", title="the title", **{"data-image-title": "dit"}),
        img("http://img.com/2.jpg", "line\none\r\ntwo  "),
        img("http://img.com/3.jpg", "   "),  # whitespace alt: no pair
        img("http://img.com/4.jpg", "\r\n"),
        img("http://img.com/5.jpg", "", title="only title"),
        img("http://img.com/6.jpg"),  # no text at all
        img("http://img.com/7.jpg", "srcset alt", path="IMG@/srcset"),  # startswith IMG@/src
        img("http://img.com/8.jpg", "data-src alt", path="IMG@/data-src"),
        img("http://img.com/9.jpg", "anchor", path="A@/href"),
        {"url": "http://img.com/10.jpg", "alt": "no path"},
        img("http://img.com/11.jpg", None, **{"data-image-title": "  spaced  "}),
        img("http://img.com/12.jpg", 42, title=None),  # non-string values skipped
        "not a dict",
        None,
    ]
    url = write(tmp_path, "a.warc.wat.gz", warcinfo() + member(wat_doc(PAGE, links)))
    result = ingest(url)
    assert rows(result) == [
        ("http://img.com/1.jpg", "a cat", "alt"),
        ("http://img.com/1.jpg", "the title", "title"),
        ("http://img.com/1.jpg", "dit", "data-image-title"),
        ("http://img.com/2.jpg", "line one  two", "alt"),
        ("http://img.com/5.jpg", "only title", "title"),
        ("http://img.com/7.jpg", "srcset alt", "alt"),
        ("http://img.com/11.jpg", "spaced", "data-image-title"),
    ]
    t = result.table
    assert set(t.column("page_url").to_pylist()) == {PAGE}
    assert t.column("source_row").to_pylist() == list(range(7))
    assert t.column("uid").to_pylist() == [sha_uid(u) for u in t.column("url").to_pylist()]
    assert result.quarantine == []
    assert result.counts["rows_read"] == 7
    check_invariants(result)


@pytest.mark.parametrize(
    "link",
    [
        {"path": "IMG@/src", "alt": "missing url"},
        {"path": "IMG@/src", "url": None, "alt": "null url"},
        {"path": "IMG@/src", "url": "", "alt": "empty url", "title": "t"},
        {"path": "IMG@/src", "url": 17, "alt": "numeric url"},
    ],
    ids=["missing", "null", "empty", "number"],
)
def test_wat_link_without_url_yields_nothing(tmp_path, link):
    # MetaCLIP's urljoin(page, "") would return the page URL; that pairing must never happen.
    good = img("http://img.com/ok.jpg", "ok")
    url = write(tmp_path, "a.wat.gz", member(wat_doc(PAGE, [link, good])))
    result = ingest(url)
    assert rows(result) == [("http://img.com/ok.jpg", "ok", "alt")]
    assert PAGE not in result.table.column("url").to_pylist()
    assert result.counts["image_links_without_url"] == 1
    check_invariants(result)


@pytest.mark.parametrize(
    "page, src, resolved",
    [
        (PAGE, "/a.jpg", "http://example.com/a.jpg"),
        (PAGE, "../b.png", "http://example.com/dir/b.png"),
        (PAGE, "c.gif", "http://example.com/dir/sub/c.gif"),
        (PAGE, "//cdn.x/c.jpg", "http://cdn.x/c.jpg"),
        ("https://secure.org/p/", "//cdn.x/c.jpg", "https://cdn.x/c.jpg"),
        (PAGE, "https://other.net/d.webp?x=1", "https://other.net/d.webp?x=1"),
        (PAGE, "?v=2", "http://example.com/dir/sub/page.html?v=2"),
        (None, "/rel.jpg", "/rel.jpg"),  # no page URL: kept as written
    ],
)
def test_wat_relative_urls_resolved_against_page(tmp_path, page, src, resolved):
    url = write(tmp_path, "a.wat.gz", member(wat_doc(page, [img(src, "x")])))
    result = ingest(url)
    assert result.table.column("url").to_pylist() == [resolved]
    assert result.table.column("page_url").to_pylist() == [page]
    assert result.table.column("uid").to_pylist() == [sha_uid(resolved)]


def test_wat_uid_of_url_with_spaces(tmp_path):
    src = "http://img.com/my photo\t1.jpg"
    url = write(tmp_path, "a.wat.gz", member(wat_doc(PAGE, [img(src, "x")])))
    t = ingest(url).table
    # urljoin (as in MetaCLIP) already drops the tab; the space stays in the URL
    assert t.column("url").to_pylist() == [urljoin(PAGE, src)] == ["http://img.com/my photo1.jpg"]
    assert t.column("uid").to_pylist() == [
        hashlib.sha224(b"http://img.com/myphoto1.jpg").hexdigest()[:24]
    ]


def test_wat_non_response_and_linkless_records_skipped(tmp_path):
    request = wat_doc(PAGE, [img("http://img.com/req.jpg", "from request")], warc_type="request")
    metadata = wat_doc(PAGE, [img("http://img.com/meta.jpg", "from metadata")], "metadata")
    no_links = json.dumps(
        {"Envelope": {"WARC-Header-Metadata": {"WARC-Type": "response"}, "Payload-Metadata": {}}}
    ).encode()
    links_not_list = wat_doc(PAGE, {"oops": 1})
    no_envelope = b'{"Container": {}}'
    not_object = b"[1, 2, 3]"
    data = (
        warcinfo()
        + member(request)
        + member(metadata)
        + member(no_links)
        + member(links_not_list)
        + member(no_envelope)
        + member(not_object)
        # a WARC-level request record (not metadata) is not even read
        + member(b"GET / HTTP/1.1\r\n\r\n", record_type="request")
        + member(wat_doc(PAGE, [img("http://img.com/last.jpg", "last")]))
    )
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert rows(result) == [("http://img.com/last.jpg", "last", "alt")]
    assert result.quarantine == []
    c = result.counts
    assert c["records_skipped_not_response"] == 2
    assert c["records_skipped_no_links"] == 2
    assert c["records_skipped_no_envelope"] == 2
    check_invariants(result)


def test_wat_bad_json_and_bad_utf8_quarantined_and_run_goes_on(tmp_path):
    data = (
        member(wat_doc(PAGE, [img("http://img.com/1.jpg", "first")]))
        + member(b'{"Envelope": {"WARC-Header-Metadata": ')
        + member(b'{"Envelope": "\xff\xfe bad bytes"}')
        + member(b"not json at all")
        + member(wat_doc(PAGE, [img("http://img.com/2.jpg", "second")]))
    )
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert rows(result) == [
        ("http://img.com/1.jpg", "first", "alt"),
        ("http://img.com/2.jpg", "second", "alt"),
    ]
    assert reasons(result) == ["bad_json", "bad_utf8", "bad_json"]
    assert [q["record"] for q in result.quarantine] == [1, 2, 3]
    assert result.counts["records_dropped_bad_json"] == 2
    assert result.counts["records_dropped_bad_utf8"] == 1
    assert result.counts["records_read"] == 5
    assert all(len(q["detail"]) <= 300 for q in result.quarantine)
    check_invariants(result)


def test_wat_huge_alt_text_truncated(tmp_path):
    huge = "é" * 5_000_000  # 10 MB of UTF-8; truncation counts characters, not bytes
    links = [img("http://img.com/huge.jpg", huge), img("http://img.com/small.jpg", "small")]
    url = write(tmp_path, "a.wat.gz", member(wat_doc(PAGE, links)))
    result = ingest(url, max_text_chars=1000)
    texts = result.table.column("text").to_pylist()
    assert texts == ["é" * 1000, "small"]
    assert result.counts["texts_truncated"] == 1
    assert result.quarantine == []
    check_invariants(result)
    # a smaller cap cuts more texts
    result = ingest(url, max_text_chars=3)
    assert result.table.column("text").to_pylist() == ["ééé", "sma"]
    assert result.counts["texts_truncated"] == 2


def test_wat_record_too_large_quarantined(tmp_path):
    big = wat_doc(PAGE, [img("http://img.com/big.jpg", "b" * 5000)])
    data = (
        member(wat_doc(PAGE, [img("http://img.com/1.jpg", "before")]))
        + member(big)
        + member(wat_doc(PAGE, [img("http://img.com/2.jpg", "after")]))
    )
    result = ingest(write(tmp_path, "a.wat.gz", data), max_record_bytes=2048)
    assert [r[1] for r in rows(result)] == ["before", "after"]
    assert reasons(result) == ["record_too_large"]
    assert result.quarantine[0]["record"] == 1
    assert result.counts["records_dropped_too_large"] == 1
    check_invariants(result)
    # with the default limit the same record is read
    assert [r[1] for r in rows(ingest(write(tmp_path, "b.wat.gz", data)))] == [
        "before",
        "b" * 1000,
        "after",
    ]


def test_ingestor_rejects_bad_limits():
    with pytest.raises(ValueError):
        Ingestor(max_text_chars=0)
    with pytest.raises(ValueError):
        Ingestor(max_record_bytes=10)


def _pages(n: int) -> list[bytes]:
    return [
        member(wat_doc(f"http://site{i}.com/", [img(f"/img{i}.jpg", f"alt number {i} " * 8)]))
        for i in range(n)
    ]


def test_wat_truncated_in_half_keeps_pairs_before_cut(tmp_path):
    members = _pages(10)
    data = b"".join(members)
    full = ingest(write(tmp_path, "full.wat.gz", data))
    assert full.table.num_rows == 10 and full.quarantine == []
    cut = len(data) // 2
    complete = 0
    while sum(len(m) for m in members[: complete + 1]) <= cut:
        complete += 1
    assert 0 < complete < 10
    result = ingest(write(tmp_path, "half.wat.gz", data[:cut]))
    assert "truncated_shard" in reasons(result)
    assert result.counts["shards_truncated"] == 1
    assert rows(result) == rows(full)[:complete]
    assert result.extra["input_bytes"] == cut
    check_invariants(result)


def test_wat_truncated_at_many_points_never_loses_earlier_pairs(tmp_path):
    members = _pages(4)
    data = b"".join(members)
    full_rows = rows(ingest(write(tmp_path, "full.wat.gz", data)))
    bounds = [sum(len(m) for m in members[:i]) for i in range(len(members) + 1)]
    start = bounds[2]
    for cut in range(start + 1, bounds[3], 7):  # cuts inside the third record
        result = ingest(write(tmp_path, f"c{cut}.wat.gz", data[:cut]))
        assert rows(result)[:2] == full_rows[:2], cut
        assert result.table.num_rows <= 3
        assert result.quarantine, cut  # a cut file is never accepted silently
        check_invariants(result)
    # a cut exactly at a record boundary is a valid, shorter file
    result = ingest(write(tmp_path, "boundary.wat.gz", data[: bounds[2]]))
    assert rows(result) == full_rows[:2] and result.quarantine == []


def _cut_where(member_bytes: bytes, want, avoid) -> int:
    """Smallest prefix length of a gzip member whose inflated bytes contain `want`, not `avoid`."""
    for k in range(1, len(member_bytes)):
        out = zlib.decompressobj(31).decompress(member_bytes[:k])
        if want in out and avoid not in out:
            return k
    raise AssertionError("no such cut")


@pytest.mark.parametrize(
    "want, avoid",
    [
        (b"WARC-Type: metadata\r\n", b"Content-Length"),  # cut inside the header block
        (b"WA", b"WARC/1.0"),  # cut inside the version line
    ],
    ids=["in_header_block", "in_version_line"],
)
def test_wat_truncated_inside_record_header_is_truncated_shard(tmp_path, want, avoid):
    members = _pages(3)
    cut = _cut_where(members[2], want, avoid)
    data = members[0] + members[1] + members[2][:cut]
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert result.table.num_rows == 2
    # the shard is truncated; the cut record is not a JSON error nor a corrupt shard
    assert reasons(result) == ["truncated_shard"], result.quarantine
    assert result.counts["records_dropped_bad_json"] == 0
    check_invariants(result)


def test_wat_garbage_gzip_is_corrupt_shard(tmp_path):
    garbage = b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8
    result = ingest(write(tmp_path, "g.wat.gz", garbage))
    assert reasons(result) == ["corrupt_shard"]
    assert result.counts["shards_corrupt"] == 1
    assert result.table.num_rows == 0
    assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(garbage).hexdigest()
    check_invariants(result)


def test_wat_garbage_after_good_records_keeps_good_pairs(tmp_path):
    data = b"".join(_pages(2)) + b"\x1f\x8b\x08\x00" + b"\x00\xff" * 300
    result = ingest(write(tmp_path, "g.wat.gz", data))
    assert result.table.num_rows == 2
    assert result.quarantine and set(reasons(result)) <= {"corrupt_shard", "truncated_shard"}
    check_invariants(result)


def test_wat_not_gzip_not_warc_is_corrupt(tmp_path):
    result = ingest(write(tmp_path, "t.wat", b"hello, this is not a WARC file\n" * 20))
    assert reasons(result) == ["corrupt_shard"]
    check_invariants(result)


def test_wat_uncompressed_is_read(tmp_path):
    payload = wat_doc(PAGE, [img("/u.jpg", "plain")])
    raw = gzip.decompress(member(payload)) + gzip.decompress(member(payload))
    result = ingest(write(tmp_path, "a.warc.wat", raw))
    assert rows(result) == [("http://example.com/u.jpg", "plain", "alt")] * 2
    assert result.quarantine == []


@pytest.mark.parametrize("name", ["e.warc.wat.gz", "e.parquet", "e.jsonl"])
def test_empty_file(tmp_path, name):
    result = ingest(write(tmp_path, name, b""))
    assert reasons(result) == ["empty_file"]
    assert result.counts["shards_empty"] == 1
    assert result.table.num_rows == 0
    assert result.extra["input_bytes"] == 0
    assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    check_invariants(result)


@pytest.mark.parametrize("name", ["m.warc.wat.gz", "m.parquet", "m.jsonl"])
def test_missing_file(tmp_path, name):
    result = ingest(str(tmp_path / name))
    assert reasons(result) == ["missing_file"]
    assert result.quarantine[0]["input"] == str(tmp_path / name)
    assert result.counts["shards_missing"] == 1
    assert result.table.schema == PAIR_SCHEMA and result.table.num_rows == 0


def test_input_sha256_and_bytes(tmp_path):
    data = warcinfo() + b"".join(_pages(5))
    result = ingest(write(tmp_path, "a.wat.gz", data))
    assert result.extra["input_bytes"] == len(data)
    assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_warcio_written_wat(tmp_path):
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    writer.write_record(writer.create_warcinfo_record("w.warc.wat.gz", {"software": "t"}))
    pages = [
        ("http://a.org/x/", [img("pic.jpg", "first", title="t1")]),
        ("http://b.org/", [img("//c.org/d.png", "second")]),
    ]
    for page, links in pages:
        payload = wat_doc(page, links)
        rec = writer.create_warc_record(
            page,
            "metadata",
            payload=io.BytesIO(payload),
            length=len(payload),
            warc_content_type="application/json",
        )
        writer.write_record(rec)
    data = buf.getvalue()
    result = ingest(write(tmp_path, "w.warc.wat.gz", data), shard="w")
    assert rows(result) == [
        ("http://a.org/x/pic.jpg", "first", "alt"),
        ("http://a.org/x/pic.jpg", "t1", "title"),
        ("http://c.org/d.png", "second", "alt"),
    ]
    assert result.quarantine == []
    assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
    check_invariants(result, "w")


def test_memory_url_same_as_local(tmp_path):
    data = warcinfo() + b"".join(_pages(3))
    local = ingest(write(tmp_path, "a.wat.gz", data))
    fs = fsspec.filesystem("memory")
    fs.pipe("/ingest-unit/a.warc.wat.gz", data)
    mem = ingest("memory://ingest-unit/a.warc.wat.gz")
    assert mem.table.equals(local.table)
    assert mem.extra["input_sha256"] == local.extra["input_sha256"]
    assert mem.quarantine == []
    # truncation detection works on memory:// too
    fs.pipe("/ingest-unit/t.warc.wat.gz", data[: len(data) - 20])
    assert "truncated_shard" in reasons(ingest("memory://ingest-unit/t.warc.wat.gz"))


# -- Parquet / JSONL -----------------------------------------------------------------------------


def test_parquet_input(tmp_path):
    table = pa.table(
        {
            "url": [
                "http://a/1.jpg",
                None,
                "http://a/3.jpg",
                "",
                "http://a/5.jpg",
                "http://a/6.jpg",
            ],
            "text": ["one", "no url", " \n ", "empty url", "line\nbreak", "six"],
            "uid": ["given-1", None, None, None, None, None],
            "text_key": ["alt", None, None, None, "title", None],
            "extra": [1, 2, 3, 4, 5, 6],
        }
    )
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    result = ingest(str(path), shard="p")
    t = result.table
    assert t.schema == PAIR_SCHEMA
    assert t.column("url").to_pylist() == ["http://a/1.jpg", "http://a/5.jpg", "http://a/6.jpg"]
    assert t.column("text").to_pylist() == ["one", "line break", "six"]
    assert t.column("uid").to_pylist() == [
        "given-1",
        sha_uid("http://a/5.jpg"),
        sha_uid("http://a/6.jpg"),
    ]
    assert t.column("text_key").to_pylist() == ["alt", "title", None]
    assert t.column("source_row").to_pylist() == [0, 4, 5]
    assert t.column("source_shard").to_pylist() == ["p"] * 3
    c = result.counts
    assert c["rows_read"] == 6
    assert c["rows_dropped_missing_url"] == 2
    assert c["rows_dropped_empty_text"] == 1
    assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.extra["input_bytes"] == path.stat().st_size
    check_invariants(result, "p")


def test_parquet_long_text_truncated(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "text": ["x" * 5000]}), path)
    result = ingest(str(path), max_text_chars=1000)
    assert result.table.column("text").to_pylist() == ["x" * 1000]
    assert result.counts["texts_truncated"] == 1


def test_parquet_missing_text_column_is_bad_schema(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "caption": ["c"]}), path)
    result = ingest(str(path))
    assert reasons(result) == ["bad_schema"]
    assert "text" in result.quarantine[0]["detail"]
    assert result.counts["shards_bad_schema"] == 1
    assert result.table.num_rows == 0
    check_invariants(result)


def test_parquet_garbage_is_corrupt(tmp_path):
    result = ingest(write(tmp_path, "p.parquet", b"PAR1 this is not parquet " * 10))
    assert reasons(result) == ["corrupt_shard"]
    check_invariants(result)


JSONL_LINES = [
    json.dumps({"url": "http://a/1.jpg", "text": "one", "uid": "given"}).encode(),
    json.dumps({"url": None, "text": "no url"}).encode(),
    json.dumps({"url": "http://a/3.jpg", "text": "  \n "}).encode(),
    b'{"url": "http://a/4.jpg", "text": ',  # broken JSON
    b'{"url": "http://a/5.jpg", "text": "\xff\xfe"}',  # invalid UTF-8
    json.dumps({"url": "http://a/6.jpg", "text": "six", "page_url": "http://p/"}).encode(),
    b"",
    json.dumps({"text": "missing url key"}).encode(),
    json.dumps({"url": "http://a/8.jpg", "text": None}).encode(),
    json.dumps({"url": "http://a/9.jpg", "text": "ünï\r\ncode"}, ensure_ascii=False).encode(),
]


def _check_jsonl(result: StageOutput) -> None:
    t = result.table
    assert t.column("url").to_pylist() == ["http://a/1.jpg", "http://a/6.jpg", "http://a/9.jpg"]
    assert t.column("text").to_pylist() == ["one", "six", "ünï  code"]
    assert t.column("uid").to_pylist() == [
        "given",
        sha_uid("http://a/6.jpg"),
        sha_uid("http://a/9.jpg"),
    ]
    assert t.column("page_url").to_pylist() == [None, "http://p/", None]
    assert reasons(result) == ["bad_json", "bad_utf8"]
    assert [q["record"] for q in result.quarantine] == [3, 4]
    c = result.counts
    assert c["rows_dropped_bad_json"] == 1
    assert c["rows_dropped_bad_utf8"] == 1
    assert c["rows_dropped_missing_url"] == 2
    assert c["rows_dropped_empty_text"] == 2
    assert c["rows_read"] == 9  # every non-blank line
    check_invariants(result, "j")


def test_jsonl_input(tmp_path):
    data = b"\n".join(JSONL_LINES) + b"\n"
    result = ingest(write(tmp_path, "j.jsonl", data), shard="j")
    _check_jsonl(result)
    assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_jsonl_gz_input(tmp_path):
    data = gzip.compress(b"\n".join(JSONL_LINES), mtime=0)
    result = ingest(write(tmp_path, "j.jsonl.gz", data), shard="j")
    _check_jsonl(result)
    assert result.extra["input_bytes"] == len(data)


def test_jsonl_all_lines_bad(tmp_path):
    result = ingest(write(tmp_path, "b.jsonl", b"{oops\n[1]\n\xff\n"))
    assert reasons(result) == ["bad_json", "bad_json", "bad_utf8"]
    assert result.table.num_rows == 0
    check_invariants(result)


def test_jsonl_without_text_key_is_bad_schema(tmp_path):
    result = ingest(write(tmp_path, "b.jsonl", b'{"url": "http://a/1.jpg", "caption": "c"}\n'))
    assert reasons(result) == ["bad_schema"]


# -- formats and the synthetic pool --------------------------------------------------------------


@pytest.mark.parametrize(
    "url, fmt",
    [
        ("s3://b/CC-1.warc.wat.gz", "wat"),
        ("x.WAT.GZ", "wat"),
        ("x.warc", "wat"),
        ("memory://a/b.parquet", "parquet"),
        ("a.jsonl", "jsonl"),
        ("a.jsonl.gz", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("a.ndjson", "jsonl"),
    ],
)
def test_detect_format(url, fmt):
    assert detect_format(url) == fmt


@pytest.mark.parametrize("url", ["a.csv", "a.txt", "a.gz", "noext", "a.parquet.bak"])
def test_detect_format_unknown_suffix(url):
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(url)


def test_process_shard_unknown_suffix_raises(tmp_path):
    with pytest.raises(ValueError):
        ingest(write(tmp_path, "a.csv", b"url,text\n"))


def test_synthetic_pool_pairs_per_file(tmp_path):
    summary = write_synthetic_pool(str(tmp_path / "pool"), 2, 2000, 11, malformed_rate=0.05)
    assert len(summary.files) == 2
    for f in summary.files:
        result = ingest(f, shard="synth")
        assert result.table.num_rows == summary.pairs_per_file[f] == 2000
        assert result.table.schema == PAIR_SCHEMA
        assert result.counts["texts_truncated"] >= 1  # the 10 MB huge_text pair, capped
        assert max(len(x) for x in result.table.column("text").to_pylist()) <= 1000
        assert set(reasons(result)) <= {"bad_json", "bad_utf8"}
        with open(f, "rb") as fh:
            assert result.extra["input_sha256"] == "sha256:" + hashlib.sha256(fh.read()).hexdigest()
        check_invariants(result, "synth")


# -- the stage contract --------------------------------------------------------------------------


def test_ingestor_is_a_source_with_extra_and_one_quarantine_schema(tmp_path):
    assert issubclass(Ingestor, Source) and Ingestor.name == "ingest"
    data = member(wat_doc(PAGE, [img("http://img.com/1.jpg", "one")])) + member(b"not json")
    url = write(tmp_path, "a.wat.gz", data)
    out = Ingestor().read(Shard(name="a", input=url))
    assert isinstance(out, StageOutput)
    assert out.extra == {
        "input_bytes": len(data),
        "input_sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
    }
    assert rows(out) == [("http://img.com/1.jpg", "one", "alt")]
    [q] = out.quarantine
    assert q == {
        "stage": "ingest",
        "shard": "a",
        "input": url,
        "reason": "bad_json",
        "detail": q["detail"],
        "record": 1,
        "offset": len(data) - len(member(b"not json")),
    }
    # process_shard(url, shard_name) is read(Shard(shard_name, url))
    again = Ingestor().process_shard(url, "a")
    assert again.table.equals(out.table) and again.quarantine == out.quarantine
    missing = Ingestor().read(Shard(name="m", input=str(tmp_path / "m.jsonl")))
    assert missing.quarantine == [
        {
            "stage": "ingest",
            "shard": "m",
            "input": str(tmp_path / "m.jsonl"),
            "reason": "missing_file",
            "detail": missing.quarantine[0]["detail"],
        }
    ]
    assert missing.extra["input_bytes"] == 0


# -- storage errors propagate, only damage is quarantined -----------------------------------------


class _FlakyFile(io.BytesIO):
    """A file whose first read that reaches byte `fail_after` fails with OSError (a transient
    network drop); later reads succeed again, as a remote file's next range request would."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self.fail_after = fail_after
        self.failed = False

    def read(self, size: int | None = -1) -> bytes:
        pos, total = self.tell(), len(self.getbuffer())
        end = total if size is None or size < 0 else min(total, pos + size)
        if end > self.fail_after and not self.failed:
            self.failed = True
            raise OSError(f"injected storage error at byte {self.fail_after}")
        return super().read(size)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class FlakyFileSystem(MemoryFileSystem):
    """memory:// with its own store whose next `failures` opens (after `healthy_opens` good ones)
    give files with one failing read at byte `fail_after`."""

    protocol = "flakytest"
    store: dict = {}
    pseudo_dirs = [""]
    fail_after = 0
    failures = 0
    healthy_opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flakytest://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        cls = FlakyFileSystem
        if mode != "rb":
            return f
        if cls.healthy_opens > 0:
            cls.healthy_opens -= 1
            return f
        if cls.failures <= 0:
            return f
        cls.failures -= 1
        return _FlakyFile(f.getvalue(), cls.fail_after)


@pytest.fixture
def flaky():
    fsspec.register_implementation("flakytest", FlakyFileSystem, clobber=True)
    FlakyFileSystem.store.clear()
    fs = fsspec.filesystem("flakytest")

    def put(name: str, data: bytes, fail_after: int, failures: int = 1, healthy_opens: int = 0):
        fs.pipe(f"/flaky/{name}", data)
        FlakyFileSystem.fail_after = fail_after
        FlakyFileSystem.failures = failures
        FlakyFileSystem.healthy_opens = healthy_opens
        return f"flakytest://flaky/{name}"

    yield put
    FlakyFileSystem.store.clear()
    FlakyFileSystem.failures = FlakyFileSystem.healthy_opens = 0


def _pool_wat(n: int = 200, gz: bool = True) -> bytes:
    pages = _pages(n)
    return b"".join(pages) if gz else b"".join(gzip.decompress(p) for p in pages)


@pytest.mark.parametrize("where", [0.0, 0.1, 0.5, 0.97])
@pytest.mark.parametrize("name", ["a.warc.wat.gz", "a.warc.wat"])
def test_wat_storage_error_mid_stream_raises_not_quarantined(flaky, name, where):
    data = _pool_wat(gz=name.endswith(".gz"))
    full = ingest(flaky(name, data, fail_after=0, failures=0))
    assert full.table.num_rows == 200 and full.quarantine == []
    url = flaky(name, data, fail_after=int(len(data) * where), failures=1)
    # FastWARC reads through the hashing reader; the stream's OSError must come out as it is,
    # not as corrupt_shard with the pairs read so far (a rerun would never retry that shard).
    with pytest.raises(OSError, match="injected storage error"):
        ingest(url)
    retried = ingest(url)  # the executor's retry: the storage is back
    assert retried.table.equals(full.table) and retried.quarantine == []
    assert retried.extra == full.extra


def test_wat_storage_error_every_time_raises(flaky):
    url = flaky("a.warc.wat.gz", _pool_wat(), fail_after=5000, failures=100)
    for _ in range(3):
        with pytest.raises(OSError, match="injected"):
            ingest(url)


def test_wat_storage_error_in_the_tail_check_raises(flaky):
    # the first open reads the whole file; the second one (the gzip tail check) fails
    data = _pool_wat(20)
    url = flaky("a.warc.wat.gz", data, fail_after=len(data) // 2, healthy_opens=1)
    with pytest.raises(OSError, match="injected"):
        ingest(url)


def test_wat_damage_is_still_quarantined_though_fastwarc_raises_oserror(flaky):
    # FastWARC reports bad gzip as an OSError too; with no storage error seen it is damage.
    garbage = b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8
    result = ingest(flaky("g.wat.gz", garbage, fail_after=0, failures=0))
    assert reasons(result) == ["corrupt_shard"]
    assert "OSError" in result.quarantine[0]["detail"]


@pytest.mark.parametrize("name", ["j.jsonl", "j.jsonl.gz", "p.parquet"])
def test_table_storage_error_raises_not_quarantined(flaky, tmp_path, name):
    if name.endswith(".parquet"):
        pq.write_table(
            pa.table({"url": ["http://a/1.jpg"] * 500, "text": ["t"] * 500}), tmp_path / name
        )
        data = (tmp_path / name).read_bytes()
    else:
        lines = b"\n".join(
            json.dumps({"url": f"http://a/{i}.jpg", "text": "t"}).encode() for i in range(500)
        )
        data = gzip.compress(lines, mtime=0) if name.endswith(".gz") else lines
    url = flaky(name, data, fail_after=len(data) // 2)
    with pytest.raises(OSError, match="injected"):
        ingest(url)
    assert ingest(url).table.num_rows == 500


def test_hashing_reader_keeps_raising_the_stream_error():
    from curation.stages.ingest import _HashingReader

    reader = _HashingReader(_FlakyFile(b"x" * 100, fail_after=10))
    assert reader.read(5) == b"xxxxx"
    with pytest.raises(OSError) as first:
        reader.read(50)
    with pytest.raises(OSError) as second:
        reader.read(1)
    assert reader.error is first.value is second.value
    assert reader.nbytes == 5


# -- JSONL columns -------------------------------------------------------------------------------


def test_jsonl_columns_from_all_records_not_the_first_thousand(tmp_path):
    records = [{"url": f"http://a/{i}.jpg", "text": f"t{i}"} for i in range(1500)]
    records[1200]["uid"] = "given-uid"
    records[1300]["text_key"] = "title"
    records[1400]["page_url"] = "http://page/"
    data = b"\n".join(json.dumps(r).encode() for r in records)
    t = ingest(write(tmp_path, "late.jsonl", data)).table
    assert t.num_rows == 1500
    uids = t.column("uid").to_pylist()
    assert uids[1200] == "given-uid"
    assert uids[1199] == sha_uid("http://a/1199.jpg") and uids[1201] == sha_uid("http://a/1201.jpg")
    assert t.column("text_key").to_pylist()[1300] == "title"
    assert t.column("text_key").null_count == 1499
    assert t.column("page_url").to_pylist()[1400] == "http://page/"
