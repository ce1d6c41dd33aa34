"""Secrets in input URLs (passwords, signed-URL tokens) never reach what a run writes."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from curation.core import fingerprint
from curation.core.accounting import quarantine_record, write_quarantine, write_stage_manifest
from curation.core.redact import redact, redact_url
from curation.core.stage import Shard
from curation.io.parts import finish_part, marker_url

PASSWORD = "PASSWORD123"
SIG = "a1b2c3d4e5f6SIGNATURE"
CRED = "AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
TOKEN = "FwoGZXIvYXdzSESSIONTOKEN"
SECRETS = (PASSWORD, SIG, CRED, TOKEN, "AKIAEXAMPLE")

BASIC = f"http://alice:{PASSWORD}@host.example/in.jsonl"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/crawl/part-0.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential={CRED}&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
    f"&X-Amz-Security-Token={TOKEN}&X-Amz-SignedHeaders=host&X-Amz-Signature={SIG}"
)
URLS = (BASIC, PRESIGNED)


def no_secret(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"secret {s!r} written: {text[:500]}"
    assert "***" in text


@pytest.mark.parametrize(
    ("url", "want"),
    [
        (BASIC, "http://alice:***@host.example/in.jsonl"),
        ("s3://key:secret@bucket/x.parquet", "s3://key:***@bucket/x.parquet"),
        ("https://u:p@ss:w@h:8080/x?a=1", "https://u:***@h:8080/x?a=1"),
        (
            "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4&X-Goog-Signature=ff00#frag",
            "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4&X-Goog-Signature=***#frag",
        ),
        (
            "https://acct.blob.core.windows.net/c/b.tar?sv=2022-11-02&sp=r&se=2030&sig=abc%3D",
            "https://acct.blob.core.windows.net/c/b.tar?sv=2022-11-02&sp=r&se=2030&sig=***",
        ),
        (
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIA&Expires=1&Signature=zz",
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Expires=1&Signature=***",
        ),
        (
            "https://h/x?TOKEN=t&access_token=u&keep=1",
            "https://h/x?TOKEN=***&access_token=***&keep=1",
        ),
        ("simplecache::https://u:pw@h/x", "simplecache::https://u:***@h/x"),
        ("read 'https://u:pw@h/x' failed: 403", "read 'https://u:***@h/x' failed: 403"),
        # nothing to redact: unchanged
        ("s3://bucket/crawl/part-0.jsonl", "s3://bucket/crawl/part-0.jsonl"),
        ("ssh://alice@host/x", "ssh://alice@host/x"),
        ("/local/path/x.parquet", "/local/path/x.parquet"),
        ("https://h/x?signature_version=2&tokens=3", "https://h/x?signature_version=2&tokens=3"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url, want):
    assert redact_url(url) == want


def test_redact_walks_dicts_lists_and_tuples():
    obj = {"a": [BASIC, {"b": (PRESIGNED, 3)}], "n": 1.5, "none": None, BASIC: "key kept"}
    out = redact(obj)
    assert out["a"][0] == redact_url(BASIC)
    assert out["a"][1]["b"] == (redact_url(PRESIGNED), 3)
    assert out["n"] == 1.5 and out["none"] is None and out[BASIC] == "key kept"
    assert obj["a"][0] == BASIC  # the input is not changed


@pytest.mark.parametrize("url", URLS)
def test_quarantine_record_and_file(tmp_path, url):
    q = quarantine_record("ingest", "s0", url, "unreadable", f"GET {url}: 403 Forbidden")
    no_secret(json.dumps(q))
    write_quarantine(str(tmp_path), [{"s0": {"quarantine": [q]}}])
    no_secret((tmp_path / "quarantine.jsonl").read_text())


@pytest.mark.parametrize("url", URLS)
def test_write_stage_manifest(tmp_path, url):
    summary = {"shards": 1, "inputs": [{"url": url, "bytes": 10}], "_private": url}
    write_stage_manifest(str(tmp_path), "score", summary, params={"input": url, "n": [url]})
    no_secret((tmp_path / "manifest.json").read_text())


@pytest.mark.parametrize("url", URLS)
def test_finish_part_marker(tmp_path, url):
    stage_dir = str(tmp_path / "stage")
    marker = finish_part(stage_dir, Shard(name="s0", input=url), pa.table({"x": [1]}), {})
    no_secret(json.dumps(marker))
    with open(marker_url(stage_dir, "s0")) as f:
        no_secret(f.read())


@pytest.mark.parametrize("url", URLS)
def test_inputs_and_assets_fingerprints(monkeypatch, url):
    monkeypatch.setattr(
        fingerprint, "file_identities", lambda us: [{"size": 1, "etag": "e"} for _ in us]
    )
    monkeypatch.setattr(fingerprint, "asset_digest", lambda u: "sha256:00")
    no_secret(json.dumps(fingerprint.inputs_fingerprint([url])))
    no_secret(json.dumps(fingerprint.assets_fingerprint([url])))


def test_a_new_signature_of_the_same_object_keeps_the_fingerprint(monkeypatch):
    monkeypatch.setattr(
        fingerprint, "file_identities", lambda us: [{"size": 1, "etag": "e"} for _ in us]
    )
    again = PRESIGNED.replace(SIG, "ffff0000OTHER")
    assert fingerprint.inputs_fingerprint([PRESIGNED]) == fingerprint.inputs_fingerprint([again])
