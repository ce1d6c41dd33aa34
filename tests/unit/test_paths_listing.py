"""CommonCrawl paths listings (`curation ingest --paths`): parsing, joining, bounds, errors.

No Ray here: the CLI checks (`--paths` with INPUTS, a bad line) fail before Ray starts.
"""

from __future__ import annotations

import gzip
import hashlib

import pytest
from click.testing import CliRunner

from curation.io.paths_listing import (
    COMMONCRAWL_BASE_URL,
    ListingError,
    decompress_bounded,
    join_url,
    parse_listing,
    read_paths_listing,
)

P1 = "crawl-data/CC-MAIN-2024-10/segments/1707947473347.0/wat/CC-MAIN-1-00000.warc.wat.gz"
P2 = "crawl-data/CC-MAIN-2024-10/segments/1707947473347.0/wat/CC-MAIN-1-00001.warc.wat.gz"
P3 = "crawl-data/CC-MAIN-2024-10/segments/1707947473871.23/wat/CC-MAIN-2-00000.warc.wat.gz"


def _write(tmp_path, lines: list[str], name: str = "wat.paths.gz", gz: bool = True) -> str:
    data = "".join(line + "\n" for line in lines).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


@pytest.mark.parametrize(
    "base",
    [
        "https://data.commoncrawl.org/",
        "https://data.commoncrawl.org",
        "https://data.commoncrawl.org//",
        "s3://commoncrawl/",
        "s3://commoncrawl",
    ],
)
def test_join_puts_exactly_one_slash(base):
    url = join_url(base, P1)
    scheme, rest = url.split("://", 1)
    assert "//" not in rest and rest.endswith(P1)
    assert url == base.rstrip("/") + "/" + P1


def test_join_local_base(tmp_path):
    assert join_url(str(tmp_path) + "/", P1) == f"{tmp_path}/{P1}"
    assert join_url("/mirror", P1) == f"/mirror/{P1}"


def test_parse_keeps_order_skips_blank_and_repeated_lines():
    data = f"\n{P3}\r\n   \n{P1}\n{P3}\n\t{P2}  \n".encode()
    assert parse_listing(data, "l") == [P3, P1, P2]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("https://evil.example/x.warc.wat.gz", "absolute URL"),
        ("s3://bucket/x.warc.wat.gz", "absolute URL"),
        ("//evil.example/x.warc.wat.gz", "absolute URL"),
        ("file:/etc/passwd", "absolute URL"),
        ("/etc/passwd", "absolute path"),
        ("crawl-data/../../etc/passwd", "'..' segment"),
        ("..", "'..' segment"),
        ("crawl-data\\..\\x.wat.gz", "'..' segment"),
        ("crawl-data/a\x00b.wat.gz", "control characters"),
    ],
)
def test_bad_line_is_refused_naming_the_line(line, words):
    data = f"{P1}\n\n{line}\n{P2}\n".encode()
    with pytest.raises(ListingError, match="line 3") as err:
        parse_listing(data, "my.paths.gz")
    assert words in str(err.value) and "my.paths.gz" in str(err.value)


def test_non_utf8_line_is_refused():
    with pytest.raises(ListingError, match="line 2 is not UTF-8"):
        parse_listing(P1.encode() + b"\n\xff\xfe\n", "l")


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n", gzip.compress(b"\n")])
def test_empty_listing_is_an_error(tmp_path, data):
    path = tmp_path / "empty.paths.gz"
    path.write_bytes(data)
    with pytest.raises(ListingError, match="empty"):
        read_paths_listing(str(path), "https://h/")


def test_read_joins_limits_and_describes(tmp_path):
    src = _write(tmp_path, [P3, P1, P2])
    full = read_paths_listing(src, "https://data.commoncrawl.org/")
    assert full.urls == [f"https://data.commoncrawl.org/{p}" for p in (P3, P1, P2)]
    two = read_paths_listing(src, "https://data.commoncrawl.org", limit=2)
    assert two.urls == full.urls[:2]  # the first N in listing order
    raw = (tmp_path / "wat.paths.gz").read_bytes()
    assert two.describe() == {
        "source": src,
        "base_url": "https://data.commoncrawl.org",
        "limit": 2,
        "sha256": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "paths_in_listing": 3,
        "inputs": 2,
    }
    assert read_paths_listing(src, limit=10).urls == full.urls  # limit past the end: all
    assert COMMONCRAWL_BASE_URL == "https://data.commoncrawl.org/"


def test_plain_text_listing_and_multi_member_gzip(tmp_path):
    plain = _write(tmp_path, [P1, P2], name="wat.paths", gz=False)
    assert read_paths_listing(plain, "/m").urls == [f"/m/{P1}", f"/m/{P2}"]
    two = tmp_path / "two.paths.gz"
    two.write_bytes(gzip.compress(f"{P1}\n".encode()) + gzip.compress(f"{P2}\n".encode()))
    assert read_paths_listing(str(two), "/m").urls == [f"/m/{P1}", f"/m/{P2}"]


def test_bad_limit_and_base(tmp_path):
    src = _write(tmp_path, [P1])
    with pytest.raises(ListingError, match="--limit"):
        read_paths_listing(src, "/m", limit=0)
    with pytest.raises(ListingError, match="--base-url"):
        read_paths_listing(src, "  ")


def test_missing_listing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.paths.gz"):
        read_paths_listing(str(tmp_path / "nope.paths.gz"), "/m")


def test_decompression_is_bounded(tmp_path):
    bomb = gzip.compress(b"a" * (8 << 20))  # 8 MiB of one byte: a few KB compressed
    assert len(bomb) < 64 << 10
    with pytest.raises(ListingError, match="over 1,048,576 bytes uncompressed"):
        decompress_bounded(bomb, "bomb", max_bytes=1 << 20)
    path = tmp_path / "bomb.paths.gz"
    path.write_bytes(bomb)
    with pytest.raises(ListingError, match="uncompressed"):
        read_paths_listing(str(path), "/m", max_bytes=1 << 20)
    plain = tmp_path / "big.paths"
    plain.write_bytes(b"x\n" * (1 << 20))
    with pytest.raises(ListingError, match="over"):
        read_paths_listing(str(plain), "/m", max_bytes=1 << 20)


def test_line_count_is_bounded():
    data = "".join(f"crawl-data/x/{i}.warc.wat.gz\n" for i in range(11)).encode()
    assert len(parse_listing(data, "l", max_lines=12)) == 11
    with pytest.raises(ListingError, match="more than 10 lines"):
        parse_listing(data, "l", max_lines=10)


def test_cut_or_corrupt_gzip_listing(tmp_path):
    good = gzip.compress(f"{P1}\n{P2}\n".encode() * 50)
    with pytest.raises(ListingError, match="ends early"):
        decompress_bounded(good[: len(good) // 2], "cut")
    bad = good[:10] + bytes(b ^ 0xFF for b in good[10:30]) + good[30:]
    with pytest.raises(ListingError, match="corrupt gzip|ends early"):
        decompress_bounded(bad, "bad")


# -- the CLI: mutually exclusive inputs, errors before any work ------------------------------------
def _cli(args: list[str], tmp_path):
    from curation.cli import main

    return CliRunner().invoke(main, ["ingest", *args], env={"RAY_ADDRESS": "127.0.0.1:1"})


def test_cli_inputs_and_paths_are_mutually_exclusive(tmp_path):
    src = _write(tmp_path, [P1])
    out = tmp_path / "out"
    r = _cli(["x.warc.wat.gz", "--paths", src, "-o", str(out)], tmp_path)
    assert r.exit_code == 2 and "mutually exclusive" in r.output
    r = _cli(["-o", str(out)], tmp_path)
    assert r.exit_code == 2 and "give INPUTS or --paths" in r.output
    r = _cli(["x.warc.wat.gz", "--limit", "2", "-o", str(out)], tmp_path)
    assert r.exit_code == 2 and "--paths only" in r.output
    assert not out.exists()


def test_cli_bad_line_fails_before_any_work(tmp_path):
    src = _write(tmp_path, [P1, "https://evil.example/x.warc.wat.gz"])
    out = tmp_path / "out"
    r = _cli(["--paths", src, "--base-url", str(tmp_path), "-o", str(out)], tmp_path)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "line 2" in lines[0]
    assert "absolute URL" in lines[0] and "Traceback" not in r.output
    assert not out.exists()  # nothing written, Ray never started (its address is unreachable)
