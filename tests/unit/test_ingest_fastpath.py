"""The WAT fast paths give exactly what the slow ones give: `_resolve` is `urljoin`, and
`_loads_wat` is `json.loads` (same result or same exception, and no lone surrogate when it says
there is none). Inputs are built from the pieces that make urlsplit/urljoin and the JSON parsers
differ."""

from __future__ import annotations

import json
from urllib.parse import urljoin

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from curation.stages.ingest import _loads_wat, _PageBase, _resolve

URL_PIECES = [
    "http:", "https:", "HTTP:", "Https:", "ftp:", "file:", "mailto:", "javascript:", "data:",
    "//", "///", "/", "\\", "\\\\", ".", "..", "./", "../", "/./", "/../", "/.", "/..",
    "?", "#", ";", ";x", "?;", "&", "=", ":", "::", "@", ":80", ":8o", "%2e", "%2F", "%",
    "[", "]", "[::1]", "[v1.x]", "[1.2.3.4]", "[bad",
    " ", "  ", "\t", "\n", "\r", "\x00", "\x01", "\x1f", "\x7f", "\x0b", "\x0c",
    "\u00a0", "\u2100", "\uff0f", "\u3002", "é", "ß", "\u200b", "\ufeff", "\U0001f600",
    "a", "b", "img", "x.jpg", "h", "www.example.com", "cdn.x", "A", "Z9", "+", "-",
]  # fmt: skip
BASES = [
    "", "http://a.com", "http://a.com/", "https://a.com/b/c", "http://a.com/b/c/",
    "http://a.com/b/c?q=1#f", "http://a.com/b;p?q", "http://a.com//b//c", "http://a.com/./b/../c",
    "http://a.com/../..", "http://u:p@a.com:8080/x/y.html", "HTTP://A.COM/X", "https://a.com",
    "http:///p/q", "http:p/q", "http:", "ftp://f.com/a/b", "file:///tmp/a", "mailto:x@y",
    "//a.com/p", "/p/q", "p/q", "", "http://[::1]/x/", "http://[bad/x", "http://\u2100/x",
    " http://a.com/x", "\thttp://a.com/x/", "http://a.com/x\n/y", "http://a.com/é/ü",
    "javascript:void(0)", "http://a.com/.", "http://a.com/..",
]  # fmt: skip

urls = st.lists(st.sampled_from(URL_PIECES) | st.text(max_size=4), max_size=10).map("".join)
bases = st.sampled_from(BASES) | st.lists(st.sampled_from(URL_PIECES), max_size=8).map("".join)
likely = st.builds(
    lambda a, b: a + b,
    st.sampled_from(["http://", "https://", "//", "/", "../", "./", "", "img/", "http://h/"]),
    urls,
)


def _urljoin(base: str, url: str) -> tuple[str, str]:
    try:
        return ("ok", urljoin(base, url))
    except ValueError:
        return ("ValueError", "")


def _fast(base: str, url: str) -> tuple[str, str]:
    try:
        return ("ok", _resolve(base, url, _PageBase(base) if base else None))
    except ValueError:
        return ("ValueError", "")


@settings(max_examples=6000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=bases, url=st.one_of(urls, likely).filter(bool))
@example(base="http://a.com/b/", url="HTTP://x.com/a")
@example(base="http://a.com/b/", url="http://x.com/a/../b")
@example(base="http://a.com/b/", url="http://x.com")
@example(base="http://a.com/b/", url="http://x.com/a;")
@example(base="http://a.com/b/", url="http://x.com/a?")
@example(base="http://a.com/b/", url="http://x.com/a#")
@example(base="http://a.com/b/", url="http:///a")
@example(base="http://a.com/b/", url="http://[bad/a")
@example(base="http://[bad/", url="http://x.com/a")
@example(base="http://a.com/./b/../c/", url="d/e.jpg")
@example(base="http://a.com//b//c/", url="../../d.jpg")
@example(base="http://a.com/b/c", url="img:1.jpg")
@example(base="http://a.com/b/c", url="a?b:c")
@example(base="http://a.com/b/c", url="?q")
@example(base="http:p/q", url="r")
@example(base="http://a.com/b", url="x/..")
@example(base="http://a.com/b", url=" x")
@example(base="http://a.com/b", url="x\ty")
def test_resolve_is_urljoin(base: str, url: str) -> None:
    assert _fast(base, url) == _urljoin(base, url)


def test_resolve_takes_the_fast_path_for_common_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    import curation.stages.ingest as ingest

    def no_urljoin(*_a: object) -> str:
        raise AssertionError("urljoin called")

    monkeypatch.setattr(ingest, "urljoin", no_urljoin)
    base = _PageBase("https://site.example/a/b/page.html?x=1")
    page = "https://site.example/a/b/page.html?x=1"
    cases = {
        "https://cdn.example/i/1.jpg?w=300&h=2": "https://cdn.example/i/1.jpg?w=300&h=2",
        "//cdn.example/i/1.jpg": "https://cdn.example/i/1.jpg",
        "/wp-content/2.png": "https://site.example/wp-content/2.png",
        "img/3.gif?v=2": "https://site.example/a/b/img/3.gif?v=2",
        "../4.webp": "https://site.example/a/4.webp",
        "./5 6.jpg": "https://site.example/a/b/5 6.jpg",
    }
    for url, want in cases.items():
        assert _resolve(page, url, base) == want


JSON_PIECES = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b'"a"', b'"url"', b"1", b"-0", b"1e400", b"1.5",
    b"123456789012345678901234567890", b"NaN", b"Infinity", b"-Infinity", b"true", b"null",
    b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\u0000", b"\\n", b"\\", b"\xed\xa0\x80",
    b"\xef\xbb\xbf", b"\xc3\xa9", b"\xff", b"\xc0\xaf", b"\x00", b"\x01", b" ", b"\t", b"\n",
    b"\x0c", b"\x7f", b"\xe2\x80\xa8",
]  # fmt: skip


def _json(data: bytes) -> tuple:
    try:
        return ("ok", json.loads(data))
    except (ValueError, RecursionError) as exc:
        return (type(exc).__name__, str(exc))


def _orjson(data: bytes) -> tuple:
    try:
        doc, may_have_surrogate = _loads_wat(data, 500)
    except (ValueError, RecursionError) as exc:
        return (type(exc).__name__, str(exc))
    if not may_have_surrogate:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return ("ok", doc)


def _same(a: tuple, b: tuple) -> bool:
    # numbers are never read by the extractor: an int over 64 bits may come back as a float
    if a[0] != b[0] or a[0] != "ok":
        return a == b
    return json.dumps(a[1], default=str, allow_nan=True) == json.dumps(b[1], allow_nan=True) or (
        _shape(a[1]) == _shape(b[1])
    )


def _shape(v: object) -> object:
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_shape(x) for x in v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return ("number", bool(v))
    return v


json_docs = st.lists(st.sampled_from(JSON_PIECES), max_size=16).map(b"".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c, max_size=4),
    max_leaves=20,
).map(lambda v: json.dumps(v).encode())


@settings(max_examples=3000, deadline=None)
@given(data=json_docs | json_values)
@example(data=b'{"a": 1, "a": "x"}')
@example(data=b'{"a": "\\ud800"}')
@example(data=b'"\xed\xa0\x80"')
@example(data=b'\xef\xbb\xbf{"a": 1}')
@example(data=b"[" * 800 + b"]" * 800)
@example(data=b"[" * 1024 + b"]" * 1024)
@example(data=b"[" * 100_000)
@example(data='{"a": 1}'.encode("utf-16"))
def test_loads_wat_is_json_loads(data: bytes) -> None:
    assert _same(_orjson(data), _json(data))
