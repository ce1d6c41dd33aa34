"""Write a folder of hostile inputs, generated from code (no binary blobs in the repository).

    python tests/hostile/make_corpus.py OUT

OUT/wat, OUT/jsonl and OUT/parquet are inputs of `curation ingest`; OUT/images of `curation
score`; OUT/jobs/alias_bomb.yaml of `curation run`; OUT/metadata/deep.json of `-m`. Each file
and the reason the reader should give it are listed in OUT/expected.json ({file: [reasons]}).
The README section "Bad input: what each kind gets" says what each kind gets.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

#: A JSON nesting far past Python's recursion limit.
DEPTH = 100_000
#: Uncompressed size of the gzip bomb line: over the reader's 64 MiB record limit.
BOMB_BYTES = 70 << 20


def _links(alts: list[str]) -> dict:
    links = [{"path": "IMG@/src", "url": f"/img/{i}.jpg", "alt": a} for i, a in enumerate(alts)]
    return {
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "response"},
            "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": links}}},
        }
    }


def _record(payload: bytes, length: int | None = None, kind: str = "metadata") -> bytes:
    head = (
        f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: https://example.com/page\r\n"
        "WARC-Date: 2024-01-01T00:00:00Z\r\n"
        "WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000000>\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload) if length is None else length}\r\n\r\n"
    )
    return gzip.compress(head.encode() + payload + b"\r\n\r\n", mtime=0)


def write_wat(d: Path) -> dict[str, list[str]]:
    d.mkdir(parents=True, exist_ok=True)
    good = json.dumps(_links(["a red bicycle", "a blue boat"])).encode()
    deep = b'{"Envelope":' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    surrogate = json.dumps(_links(["ok text"])).replace("ok text", "bad \\ud800 text").encode()
    (d / "nested.warc.wat.gz").write_bytes(
        _record(good) + _record(deep) + _record(surrogate) + _record(good)
    )
    # A header that declares a terabyte where a few bytes follow.
    (d / "huge_length.warc.wat.gz").write_bytes(_record(good) + _record(good, length=10**12))
    return {
        "wat/nested.warc.wat.gz": ["bad_json", "bad_unicode"],
        "wat/huge_length.warc.wat.gz": ["record_too_large|truncated_shard|corrupt_shard"],
    }


def write_jsonl(d: Path) -> dict[str, list[str]]:
    d.mkdir(parents=True, exist_ok=True)
    ok = {"url": "https://example.com/a.jpg", "text": "a cat on a mat"}
    lines = [
        json.dumps(ok),
        json.dumps({"url": 5, "text": "number url"}),
        json.dumps({"url": "https://example.com/b.jpg", "text": ["a", "list"]}),
        json.dumps({"url": "https://example.com/c.jpg", "text": {"nested": {"deep": 1}}}),
        json.dumps({"url": "https://example.com/d.jpg", "text": True}),
    ]
    (d / "fields.jsonl").write_text("\n".join(lines) + "\n")
    long_text = "word " * 400_000  # a 2 MB line: kept, cut to --max-text-chars
    (d / "long_line.jsonl").write_text(
        json.dumps({"url": "https://example.com/l.jpg", "text": long_text}) + "\n"
    )
    (d / "unicode.jsonl").write_bytes(
        json.dumps(ok).encode()
        + b"\n"
        + b'{"url": "https://example.com/s.jpg", "text": "lone \\ud800 surrogate"}\n'
        + b'{"url": "https://example.com/u.jpg", "text": "bad \xff\xfe utf8"}\n'
        + b'{"url": "https://example.com/t.jpg", "text": "tr'  # last line cut: bad JSON
    )
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb", compresslevel=9, mtime=0) as g:
        g.write(b'{"url": "https://example.com/bomb.jpg", "text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(BOMB_BYTES >> 20):
            g.write(chunk)
        g.write(b'"}\n')
    (d / "bomb.jsonl.gz").write_bytes(bomb.getvalue())
    return {
        "jsonl/fields.jsonl": ["bad_field"],
        "jsonl/unicode.jsonl": ["bad_unicode", "bad_utf8", "bad_json"],
        "jsonl/bomb.jsonl.gz": ["record_too_large"],
    }


def write_parquet(d: Path) -> dict[str, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    urls = [f"https://example.com/p{i}.jpg" for i in range(3)]
    texts = pa.array([b"fine text", b"bad \xff\xfe bytes", b"more text"], pa.binary())
    pq.write_table(pa.table({"url": urls, "text": texts}), d / "binary_text.parquet")
    lists = pa.array([["a", "b"], ["c"], []], pa.list_(pa.string()))
    pq.write_table(pa.table({"url": urls, "text": lists}), d / "list_text.parquet")
    return {
        "parquet/binary_text.parquet": ["bad_utf8"],
        "parquet/list_text.parquet": ["bad_schema"],
    }


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_images(d: Path) -> dict[str, list[str]]:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")  # 400 Mpx in ~50 kB
    bomb = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for key, ext, data in (
            ("ok", "jpg", jpeg),
            ("bomb", "png", bomb),
            ("trunc", "jpg", jpeg[: len(jpeg) // 3]),
            ("../evil", "jpg", jpeg),
        ):
            _add(tf, f"{key}.{ext}", data)
            _add(tf, f"{key}.txt", f"caption of {key}".encode())
            _add(tf, f"{key}.json", json.dumps({"uid": key, "url": f"https://x/{key}"}).encode())
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        _add(tf, "link.txt", b"caption of a symlink")
    (d / "hostile.tar").write_bytes(out.getvalue())
    return {"images/hostile.tar": ["image_too_large", "decode_error"]}


def write_job(d: Path) -> dict[str, list[str]]:
    d.mkdir(parents=True, exist_ok=True)
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines += ["name: bomb", "input: pool/", "output: out/", "metadata: bundled:metadata_en"]
    (d / "alias_bomb.yaml").write_text("\n".join(lines) + "\n")
    return {"jobs/alias_bomb.yaml": ["refused up front"]}


def write_metadata(d: Path) -> dict[str, list[str]]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "deep.json").write_text("[" * DEPTH + "]" * DEPTH)
    return {"metadata/deep.json": ["refused up front"]}


def make_corpus(out: str | Path) -> dict[str, list[str]]:
    """Write the corpus under `out`; returns (and writes to expected.json) {file: reasons}."""
    out = Path(out)
    expected: dict[str, list[str]] = {}
    expected.update(write_wat(out / "wat"))
    expected.update(write_jsonl(out / "jsonl"))
    expected.update(write_parquet(out / "parquet"))
    expected.update(write_images(out / "images"))
    expected.update(write_job(out / "jobs"))
    expected.update(write_metadata(out / "metadata"))
    (out / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    return expected


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    make_corpus(sys.argv[1])
