"""Hostile `.json` members of score tars and quarantine writing: one bad sample is dropped alone."""

from __future__ import annotations

import json

from test_images import jpeg, sample, write_tar

from curation.core.accounting import write_quarantine
from curation.io.images import read_tar


def _check(shard) -> None:
    c = shard.counts
    dropped = sum(v for k, v in c.items() if k.startswith("rows_dropped_"))
    assert c["rows_read"] == shard.table.num_rows + dropped, dict(c)


def test_lone_surrogate_in_json_uid_drops_that_sample_only(tmp_path):
    bad_uid = b'{"uid": "u\\ud800x", "url": "https://a/1.jpg"}'  # valid JSON, lone surrogate
    bad_caption = b'{"caption": "\\udfff", "url": "https://a/2.jpg"}'
    samples = [
        sample("k0"),
        ("k1", {"jpg": jpeg(), "txt": b"t", "json": bad_uid}),
        ("k2", {"jpg": jpeg(), "json": bad_caption}),
        sample("k3"),
    ]
    shard = read_tar(write_tar(tmp_path / "a.tar", samples))
    assert shard.table.column("key").to_pylist() == ["k0", "k3"]
    assert shard.counts["rows_dropped_bad_unicode"] == 2
    assert [(q["key"], q["reason"]) for q in shard.quarantine] == [
        ("k1", "bad_unicode"),
        ("k2", "bad_unicode"),
    ]
    assert "'uid'" in shard.quarantine[0]["detail"]
    _check(shard)
    # the quarantine (detail holds the surrogate escaped) can be written
    write_quarantine(str(tmp_path / "out"), [{"a": {"quarantine": shard.quarantine}}])


def test_deeply_nested_json_member_is_bad_json(tmp_path):
    samples = [sample("k0"), ("k1", {"jpg": jpeg(), "json": b"[" * 100_000}), sample("k2")]
    shard = read_tar(write_tar(tmp_path / "a.tar", samples))
    assert shard.table.column("key").to_pylist() == ["k0", "k2"]
    assert [(q["key"], q["reason"]) for q in shard.quarantine] == [("k1", "bad_json")]
    _check(shard)


def test_write_quarantine_escapes_lone_surrogates(tmp_path):
    q = {"stage": "ingest", "reason": "bad_unicode", "detail": "x\ud800y", "key": "k\udcff"}
    out = tmp_path / "out"
    assert write_quarantine(str(out), [{"s": {"quarantine": [q]}}]) == 1
    line = (out / "quarantine.jsonl").read_bytes()
    line.decode("utf-8")  # valid UTF-8
    back = json.loads(line)
    assert back["detail"] == "x\ud800y" and back["key"] == "k\udcff"
    assert back["stage"] == "ingest"
