"""The column-wise WAT extraction gives exactly what the per-pair one gives: `_resolve_column`
is `urljoin` (through `_resolve`), the RE2 patterns match what their Python patterns match,
Arrow's whitespace trim is `str.strip`, `_uids` is `uids_of_urls`, and `_WatPairs` makes the
pairs, counts and order of `Ingestor._extract` on nasty records."""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import urljoin

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_ingest_fastpath import BASES, URL_PIECES

from curation.core.text import uids_of_urls
from curation.stages import ingest
from curation.stages.ingest import (
    _NOT_BRACKETS,
    _PLAIN_NET_REF,
    _PLAIN_PATH_REF,
    _PLAIN_URL,
    _RE2_PLAIN_NET_REF,
    _RE2_PLAIN_URL,
    _RE2_RELATIVE_PATH,
    _RE2_ROOTED_PATH,
    Ingestor,
    _normalize_texts,
    _resolve_column,
    _str_array,
    _uids,
    _WatPairs,
)

PAGES = [
    *BASES,
    "https://site.example/a/b/page.html?x=1",
    "https://site.example",
    "https://site.example?q",
    "https://site.example/",
    "http://h.example/a//b/c",
    "http://h.example/a/./b/c",
    "http://h.example/a/b/c;p",
    "http://h.example/a/b;p/c",
    "http://h.example/a/;p",
    "http://h.example/a/b/",
    "http://h.example/é/x",
    "http://h.example:8o/x/y",
]
IMG_HEADS = ["", "../", "../../", "../../../../", "./", "/", "//", "http://", "https://", "?"]
urls = st.lists(st.sampled_from(URL_PIECES) | st.text(max_size=4), max_size=10).map("".join)
imgs = st.builds(lambda a, b: a + b, st.sampled_from(IMG_HEADS), urls).filter(bool)
pages = (
    st.sampled_from(PAGES)
    | st.none()
    | st.builds(
        lambda a, b: a + b, st.sampled_from(["http://", "https://", "http://h.example/"]), urls
    )
)


def _expected(page: str | None, img: str) -> str | None:
    if not isinstance(page, str):
        return img
    try:
        return urljoin(page, img)
    except ValueError:
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_list=st.lists(pages, min_size=1, max_size=4),
    links=st.lists(st.tuples(st.integers(0, 3), imgs), min_size=1, max_size=8),
)
@example(page_list=["http://a.com/b/c/d"], links=[(0, "../../../../x?y")])
@example(page_list=["http://a.com/b/c/"], links=[(0, "../x/")])
@example(page_list=["http://a.com"], links=[(0, "../x")])
@example(page_list=["http://a.com/b/c"], links=[(0, "x/y?")])
@example(page_list=["http://a.com/b/c"], links=[(0, "/x/y ")])
@example(page_list=["http://a.com/b/c"], links=[(0, "x?a/.b")])
@example(page_list=["http://a.com/b;p/c;q"], links=[(0, "x"), (0, "../x")])
@example(page_list=["http://a.com/b/c"], links=[(0, "x ")])
def test_resolve_column_is_urljoin(page_list: list, links: list) -> None:
    link_page = [i % len(page_list) for i, _ in links]
    img_list = [img for _, img in links]
    resolved, ok = _resolve_column(pa.array(img_list), np.array(link_page), page_list)
    got = [v if k else None for v, k in zip(resolved.to_pylist(), ok.tolist(), strict=True)]
    want = [_expected(page_list[p], img) for p, img in zip(link_page, img_list, strict=True)]
    assert got == want


def test_resolve_column_takes_the_column_path_for_common_urls(monkeypatch) -> None:
    def no_resolve(*_a: object) -> str:
        raise AssertionError("_resolve called")

    monkeypatch.setattr(ingest, "_resolve", no_resolve)
    page = ["https://site.example/a/b/page.html?x=1"]
    cases = {
        "https://cdn.example/i/1.jpg?w=300&h=2": "https://cdn.example/i/1.jpg?w=300&h=2",
        "//cdn.example/i/1.jpg": "https://cdn.example/i/1.jpg",
        "/wp-content/2.png": "https://site.example/wp-content/2.png",
        "img/3.gif?v=2": "https://site.example/a/b/img/3.gif?v=2",
        "../4.webp": "https://site.example/a/4.webp",
        "../../../5.webp": "https://site.example/5.webp",
        "6 7.jpg": "https://site.example/a/b/6 7.jpg",
    }
    resolved, ok = _resolve_column(pa.array(list(cases)), np.zeros(len(cases), int), page)
    assert ok.all() and resolved.to_pylist() == list(cases.values())


re_inputs = st.builds(
    lambda a, b: a + b,
    st.sampled_from(["http://", "https://", "//", "/", "../", "", "h"]),
    urls,
).filter(bool)


def _re2(pattern: str, values: list[str]) -> list[bool]:
    return pc.match_substring_regex(pa.array(values, pa.string()), pattern).to_pylist()


@settings(max_examples=3000, deadline=None)
@given(values=st.lists(re_inputs, min_size=1, max_size=8))
@example(values=["http://a.com/\x7f", "http://a\u00e9.com", "//a.com/x ", "http://a.com/x;"])
def test_re2_patterns_match_the_python_ones(values: list[str]) -> None:
    assert _re2(_RE2_PLAIN_URL, values) == [bool(_PLAIN_URL.fullmatch(v)) for v in values]
    assert _re2(_RE2_PLAIN_NET_REF, values) == [bool(_PLAIN_NET_REF.fullmatch(v)) for v in values]
    # the path patterns are parts of _PLAIN_PATH_REF (for a reference not ending in " ")
    for pattern in (_RE2_ROOTED_PATH, _RE2_RELATIVE_PATH):
        for v, hit in zip(values, _re2(pattern, values), strict=True):
            if hit and not v.endswith(" "):
                assert _PLAIN_PATH_REF.fullmatch(v), (pattern, v)


def test_path_ref_ends_in_space_only_by_a_space() -> None:
    # what lets `_resolve_column` spell _PLAIN_PATH_REF's "(?<![\x00-\x20])" as endswith(" ")
    for c in map(chr, range(0x21)):
        assert _PLAIN_PATH_REF.fullmatch("a" + c) is None or c == " "
        assert _PLAIN_PATH_REF.fullmatch("/a" + c) is None or c == " "
        assert _PLAIN_PATH_REF.fullmatch("a?b" + c) is None or c == " "


def test_arrow_trim_is_str_strip_for_every_code_point() -> None:
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for s in (chars, ["x" + c + "x" for c in chars], [c + "x" + c + c for c in chars]):
        got = _normalize_texts(pa.array(s)).to_pylist()
        assert got == [v.replace("\n", " ").replace("\r", " ").strip() for v in s]


@settings(max_examples=500, deadline=None)
@given(texts=st.lists(st.text(max_size=12) | st.none(), max_size=10))
def test_normalize_texts_is_normalize_alt_text(texts: list) -> None:
    got = _normalize_texts(pa.array(texts, pa.string())).to_pylist()
    want = [None if t is None else t.replace("\n", " ").replace("\r", " ").strip() for t in texts]
    assert got == want


@pytest.mark.parametrize(
    "value", [1, 1.5, True, False, None, {}, [], {"a": 1}, [1], 2**70, float("nan")]
)
def test_str_array_nulls_every_json_value_that_is_not_a_string(value: object) -> None:
    assert _str_array(["a", value, "b"]).to_pylist() == ["a", None, "b"]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(urls | st.sampled_from(["a b", "a\tb", "ab", " ", "\t"]), max_size=12))
def test_uids_is_uids_of_urls(values: list[str]) -> None:
    arr = pa.array(values, pa.string())
    assert _uids(arr).equals(uids_of_urls(arr))


LINK_VALUES = [
    None, 1, True, "", " ", "\n", " \r\n ", "alt", "a\nb", "\u3000x\u3000", "x" * 30, [], {},
]  # fmt: skip
link_dicts = st.fixed_dictionaries(
    {},
    optional={
        "path": st.sampled_from(["IMG@/src", "IMG@/srcset", "A@/href", "img@/src", 5, None]),
        "url": st.sampled_from(["", None, 7]) | imgs,
        "alt": st.sampled_from(LINK_VALUES),
        "title": st.sampled_from(LINK_VALUES),
        "data-image-title": st.sampled_from(LINK_VALUES),
    },
)
links_st = st.lists(link_dicts | st.sampled_from([[], "x", 3, None]), max_size=6)
records = st.lists(
    st.fixed_dictionaries(
        {"page": pages | st.sampled_from([3, ["x"]]), "links": links_st | st.sampled_from([{}, 1])}
    ),
    min_size=1,
    max_size=6,
)


def _doc(rec: dict) -> dict:
    return {
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": rec["page"]},
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {"HTML-Metadata": {"Links": rec["links"]}}
            },
        }
    }


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recs=records,
    convert_every=st.sampled_from([1, 2, 1 << 16]),
    flush_every=st.sampled_from([1, 3, 1 << 16]),
)
def test_wat_pairs_are_extract_pairs(recs: list, convert_every: int, flush_every: int) -> None:
    docs = [json.loads(json.dumps(_doc(r))) for r in recs]
    cols: tuple[list, list, list, list] = ([], [], [], [])
    want_counts: Counter = Counter()
    want_bad = []  # records refused for their page URL (quarantined by the caller)
    for i, doc in enumerate(docs):
        try:
            Ingestor._extract(doc, cols, want_counts)
        except ingest._BadPageUrl:
            want_bad.append(i)
    got_counts: Counter = Counter()
    got_bad = []
    pairs = _WatPairs(got_counts)
    old = ingest._CONVERT_LINKS, ingest._FLUSH_LINKS
    ingest._CONVERT_LINKS, ingest._FLUSH_LINKS = convert_every, flush_every
    try:
        for i, doc in enumerate(docs):
            try:
                pairs.hold(doc)
            except ingest._BadPageUrl:
                got_bad.append(i)
        pairs.flush()
    finally:
        ingest._CONVERT_LINKS, ingest._FLUSH_LINKS = old
    assert dict(got_counts) == dict(want_counts)
    assert got_bad == want_bad
    got: tuple[list, list, list, list] = ([], [], [], [])
    for chunk in pairs.chunks:
        for column, values in zip(got, chunk, strict=True):
            column.extend(values if isinstance(values, list) else values.to_pylist())
    assert got == cols
    assert pairs.num_rows == len(cols[0])


def test_pairs_past_one_string_array_are_the_same(tmp_path, monkeypatch) -> None:
    # over 2 GiB of strings, pa.array answers a chunked array: every step takes one
    from curation.synth.wat import write_synthetic_pool

    pool = write_synthetic_pool(str(tmp_path / "pool"), 1, 400, 3, malformed_rate=0.05)
    shard = pool.files[0]
    want = Ingestor().process_shard(shard, "s")
    str_array, struct_field = ingest._str_array, pc.struct_field

    def halves(arr: pa.Array) -> pa.ChunkedArray:
        return pa.chunked_array([arr.slice(0, len(arr) // 2), arr.slice(len(arr) // 2)])

    monkeypatch.setattr(ingest, "_str_array", lambda values: halves(str_array(values)))
    monkeypatch.setattr(pc, "struct_field", lambda values, i: halves(struct_field(values, i)))
    monkeypatch.setattr(ingest, "_CONVERT_LINKS", 50)
    monkeypatch.setattr(ingest, "_FLUSH_LINKS", 120)
    monkeypatch.setattr(ingest, "_FLUSH_TEXT_BYTES", 3000)
    got = Ingestor().process_shard(shard, "s")
    assert got.table.equals(want.table)
    assert dict(got.counts) == dict(want.counts)
    assert got.quarantine == want.quarantine


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=64)
    | st.lists(st.sampled_from([b"[", b"{", b"]", b"x", b"\xff"])).map(b"".join)
)
def test_bracket_count_by_translate(data: bytes) -> None:
    assert len(data.translate(None, _NOT_BRACKETS)) == data.count(b"[") + data.count(b"{")


@pytest.mark.parametrize("gz", [False, True])
def test_fastwarc_length_is_zero_without_a_content_length_header(gz: bool) -> None:
    # what lets `_read_wat` look at the header map only for a record of length 0
    import gzip
    import io

    from fastwarc.warc import ArchiveIterator

    def record(head: str) -> bytes:
        data = f"WARC/1.0\r\nWARC-Type: metadata\r\n{head}\r\n".encode() + b"{}\r\n\r\n"
        return gzip.compress(data) if gz else data

    heads = ["Content-Length: 2\r\n", "", "Content-Length: 2\r\n", "content-length: 2\r\n", ""]
    seen = []
    try:
        for r in ArchiveIterator(io.BytesIO(b"".join(map(record, heads))), parse_http=False):
            seen.append((r.content_length, "Content-Length" in r.headers))
    except OSError:
        pass  # FastWARC gives up after a record without a length
    assert seen and all(has or length == 0 for length, has in seen), seen
