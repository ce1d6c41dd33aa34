"""Tests of the synthetic WAT pool generator against an independent extractor."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections import Counter
from urllib.parse import urljoin

import fsspec
import numpy as np
import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType
from warcio.archiveiterator import ArchiveIterator as WarcioIterator

from curation.synth import wat as synth
from curation.synth.wat import (
    MALFORMED_REASONS,
    default_concepts,
    generate_shard,
    write_synthetic_pool,
)

MAX_CHARS = 1000


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def _links_of(doc: dict) -> list | None:
    env = doc.get("Envelope", {})
    if env.get("WARC-Header-Metadata", {}).get("WARC-Type") != "response":
        return None
    meta = env.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {})
    return meta.get("HTML-Metadata", {}).get("Links")


def extract(data: bytes) -> dict:
    """Independent reference extractor following the rules of `curation.synth.wat`'s docstring."""
    pairs: list[tuple[str, str, str, str]] = []
    stats = Counter()
    for rec in ArchiveIterator(io.BytesIO(data), parse_http=False):
        stats["records"] += 1
        if rec.record_type != WarcRecordType.metadata:
            continue
        raw = rec.reader.read()
        assert len(raw) == int(rec.headers["Content-Length"])
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats["bad_utf8"] += 1
            continue
        except json.JSONDecodeError:
            stats["bad_json"] += 1
            continue
        env = doc["Envelope"]["WARC-Header-Metadata"]
        if env["WARC-Type"] != "response":
            continue
        page = env["WARC-Target-URI"]
        links = _links_of(doc)
        if links is None:
            stats["missing_links"] += 1
            continue
        for link in links:
            if not link.get("path", "").startswith("IMG@/src"):
                continue
            url = link.get("url")
            if not isinstance(url, str) or not url:
                stats["null_url"] += 1
                continue
            for key in synth.TEXT_KEYS:
                value = link.get(key)
                if not isinstance(value, str):
                    continue
                text = value.replace("\n", " ").replace("\r", " ").strip()
                if text:
                    if len(text) > MAX_CHARS:
                        stats["long"] += 1
                        stats["huge_text"] += len(text) >= synth.HUGE_TEXT_CHARS - 10
                    pairs.append((urljoin(page, url), text[:MAX_CHARS], key, page))
    return {"pairs": pairs, "stats": stats}


@pytest.fixture(scope="module")
def clean_pool(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean"))
    return out, write_synthetic_pool(out, 2, 1500, seed=11)


@pytest.fixture(scope="module")
def dirty_pool(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dirty"))
    return out, write_synthetic_pool(out, 2, 1500, seed=12, malformed_rate=0.1)


@pytest.fixture(scope="module")
def big_texts():
    data, truth = generate_shard(5, 0, 20_000)
    pairs = extract(data)["pairs"]
    assert len(pairs) == truth.pairs == 20_000
    return [t for _, t, _, _ in pairs]


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = write_synthetic_pool(str(tmp_path / "a"), 2, 400, seed=3, malformed_rate=0.05)
    b = write_synthetic_pool(str(tmp_path / "b"), 2, 400, seed=3, malformed_rate=0.05)
    c = write_synthetic_pool(str(tmp_path / "c"), 2, 400, seed=4, malformed_rate=0.05)
    for fa, fb, fc in zip(a.files, b.files, c.files, strict=True):
        assert _read(fa) == _read(fb)
        assert _read(fa) != _read(fc)
    assert (tmp_path / "a" / "synth_truth.json").read_bytes().replace(b"/a/", b"/b/") == (
        tmp_path / "b" / "synth_truth.json"
    ).read_bytes()


def test_shard_depends_only_on_seed_and_index(tmp_path):
    pool = write_synthetic_pool(str(tmp_path), 3, 300, seed=9)
    alone, truth = generate_shard(9, 2, 300)
    assert _read(pool.files[2]) == alone
    assert truth.pairs == pool.pairs_per_file[pool.files[2]]
    assert generate_shard(9, 1, 300)[0] != alone


def test_gzip_members_have_no_time_or_name(clean_pool):
    _, summary = clean_pool
    for url in summary.files:
        data = _read(url)
        members = 0
        while data:
            assert data[:4] == b"\x1f\x8b\x08\x00"  # deflate, no FNAME / FEXTRA / FCOMMENT
            assert struct.unpack("<I", data[4:8])[0] == 0  # mtime
            d = zlib.decompressobj(31)
            d.decompress(data)
            assert d.eof
            data = d.unused_data
            members += 1
        assert members == summary.records_per_file[url]  # one gzip member per record


@pytest.mark.parametrize("pool", ["clean_pool", "dirty_pool"])
def test_fastwarc_and_warcio_read_every_record(pool, request):
    _, summary = request.getfixturevalue(pool)
    for url in summary.files:
        data = _read(url)
        fw = [
            (r.record_type, r.headers["Content-Length"], r.reader.read())
            for r in ArchiveIterator(io.BytesIO(data), parse_http=False)
        ]
        wa = [
            (r.rec_type, r.rec_headers.get_header("Content-Length"), r.content_stream().read())
            for r in WarcioIterator(io.BytesIO(data))
        ]
        assert len(fw) == len(wa) == summary.records_per_file[url]
        assert fw[0][0] == WarcRecordType.warcinfo and wa[0][0] == "warcinfo"
        assert all(t == WarcRecordType.metadata for t, _, _ in fw[1:])
        assert all(t == "metadata" for t, _, _ in wa[1:])
        for (_, n_fw, body_fw), (_, n_wa, body_wa) in zip(fw, wa, strict=True):
            assert body_fw == body_wa
            assert int(n_fw) == int(n_wa) == len(body_fw)
        # Pages come as request / response / metadata triples (where the JSON parses).
        kinds = []
        for _, _, body in fw[1:]:
            try:
                kinds.append(json.loads(body)["Envelope"]["WARC-Header-Metadata"]["WARC-Type"])
            except ValueError:
                kinds.append(None)
        for i in range(0, len(kinds), 3):
            assert kinds[i] in ("request", None)
            assert kinds[i + 1] in ("response", None)
            assert kinds[i + 2] in ("metadata", None)


def test_clean_pool_truth_matches_independent_extractor(clean_pool):
    out, summary = clean_pool
    truth = json.loads(_read(f"{out}/synth_truth.json"))
    assert truth["files"] == summary.files
    assert truth["pairs_per_file"] == summary.pairs_per_file
    assert truth["seed"] == 11 and truth["params"]["pairs_per_shard"] == 1500
    for url in summary.files:
        got = extract(_read(url))
        assert len(got["pairs"]) == summary.pairs_per_file[url] == 1500
        assert summary.malformed_per_file[url] == dict.fromkeys(MALFORMED_REASONS, 0)
        for reason in ("bad_json", "bad_utf8", "missing_links", "null_url", "huge_text"):
            assert got["stats"][reason] == 0


def test_dirty_pool_truth_matches_independent_extractor(dirty_pool):
    _, summary = dirty_pool
    for url in summary.files:
        got = extract(_read(url))
        bad = summary.malformed_per_file[url]
        assert len(got["pairs"]) == summary.pairs_per_file[url] == 1500
        assert got["stats"]["bad_json"] == bad["bad_json"]
        assert got["stats"]["bad_utf8"] == bad["bad_utf8"]
        assert got["stats"]["missing_links"] == bad["missing_links"]
        assert got["stats"]["null_url"] == bad["null_url"]
        assert got["stats"]["huge_text"] == bad["huge_text"] == 1
        n_bad = sum(v for k, v in bad.items() if k != "huge_text")
        pages = (summary.records_per_file[url] - 1) // 3
        assert 0.04 * pages < n_bad < 0.2 * pages  # roughly malformed_rate of the pages


def test_link_variety(clean_pool):
    _, summary = clean_pool
    data = _read(summary.files[0])
    docs = []
    for rec in ArchiveIterator(io.BytesIO(data), record_types=WarcRecordType.metadata):
        links = _links_of(json.loads(rec.reader.read()))
        if links:
            docs.append(links)
    links = [link for page in docs for link in page]
    paths = Counter(link["path"] for link in links)
    assert {"A@/href", "IMG@/src", "IMG@/data-src"} <= set(paths)
    imgs = [link for link in links if link["path"] == "IMG@/src"]
    urls = [link["url"] for link in imgs]
    assert any(u.startswith("//") for u in urls)
    assert any(u.startswith("/") and not u.startswith("//") for u in urls)
    assert any(u.startswith("../") for u in urls)
    assert any(u.startswith("https://") for u in urls)
    assert any(not set(synth.TEXT_KEYS) & set(link) for link in imgs)  # no text at all
    assert any(link.get("alt") == "" for link in imgs)
    assert any(link.get("alt", "x").isspace() for link in imgs)
    alts = [link["alt"] for link in imgs if "alt" in link]
    assert any("\n" in a.strip() or "\r" in a.strip() for a in alts)
    assert any("\t" in a.strip() for a in alts)
    assert any("data-image-title" in link for link in imgs)
    assert any(re.fullmatch(r"(IMG_|DSC)\d+\.(JPG|jpg)", a) for a in alts)
    assert max(Counter(urls).values()) > 1  # popular images recur
    assert sum(len(p) for p in docs) / len(docs) > 5


def test_texts_multilingual_punctuated_and_long(big_texts):
    joined = "\n".join(big_texts)
    assert re.search(r"[\u4e00-\u9fff]", joined)  # CJK
    assert re.search(r"[\u3040-\u30ff]", joined)  # kana
    assert re.search(r"[äöüßéèàñ]", joined)
    for mark in (",", ".", ";", ":", "?", "!", "``", "`", '"'):
        assert mark in joined
    assert any(t != t.lower() for t in big_texts) and any(t.isupper() for t in big_texts)
    assert sum(len(t) == MAX_CHARS for t in big_texts) >= 1  # truncated long captions


def test_languages_false_is_english_only():
    data, truth = generate_shard(5, 0, 3000, languages=False)
    texts = [t for _, t, _, _ in extract(data)["pairs"]]
    assert len(texts) == truth.pairs == 3000
    assert not any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", t) for t in texts)


def _mention_counts(texts: list[str], concepts: list[str]) -> np.ndarray:
    """MetaCLIP-style mentions: punctuation split off, counted per text occurrence."""
    grams: Counter = Counter()
    for text in texts:
        toks = re.sub(r"([,.;:?!`\"])", r" \1 ", text).split()
        for n in (1, 2, 3):
            grams.update(zip(*(toks[i:] for i in range(n)), strict=False))
    return np.array([grams[tuple(c.split())] for c in concepts])


def test_concept_mentions_are_zipf_skewed(big_texts):
    concepts = default_concepts()
    assert len(concepts) > 20_000 and concepts == default_concepts()
    assert {"new york", "york city", "new york city", "hot dog", "ice cream"} <= set(concepts)
    counts = _mention_counts(big_texts, concepts)
    seen = np.sort(counts[counts > 0])[::-1]
    assert seen[0] > 100 * np.median(seen)  # heavy head
    assert (seen == 1).sum() > 0.2 * len(seen)  # long tail of single mentions
    assert counts[concepts.index("new york")] > 0


def test_custom_concepts_follow_zipf():
    concepts = [f"zq{i}concept" for i in range(5000)]
    data, _ = generate_shard(8, 0, 20_000, concepts=concepts)
    texts = [t for _, t, _, _ in extract(data)["pairs"]]
    counts = _mention_counts([t.lower() for t in texts], concepts)
    seen = np.sort(counts[counts > 0])[::-1]
    assert seen[0] > 50 * np.median(seen)
    assert len(seen) > 1000
    assert counts[:10].sum() > counts[1000:].sum() / 10  # head carries real mass


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_tiny_shards_exact(n):
    data, truth = generate_shard(1, 0, n, malformed_rate=0.5)
    assert len(extract(data)["pairs"]) == truth.pairs == n


def test_memory_filesystem():
    out = "memory://synth-test-pool"
    try:
        summary = write_synthetic_pool(out, 2, 200, seed=1, malformed_rate=0.05)
        assert len(summary.files) == 2 and summary.files == sorted(summary.files)
        assert all(f.startswith("memory://") for f in summary.files)
        for url in summary.files:
            assert len(extract(_read(url))["pairs"]) == summary.pairs_per_file[url] == 200
        truth = json.loads(_read(f"{out}/synth_truth.json"))
        assert truth["pairs_per_file"] == summary.pairs_per_file
        assert summary.seconds > 0
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists("/synth-test-pool"):
            fs.rm("/synth-test-pool", recursive=True)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_pool(str(tmp_path), 1, -1, seed=0)
    with pytest.raises(ValueError):
        write_synthetic_pool(str(tmp_path), 1, 10, seed=0, malformed_rate=1.5)
    with pytest.raises(ValueError):
        generate_shard(0, 0, 10, concepts=["", "  "])
