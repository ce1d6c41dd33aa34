"""`curation.flows.metaclip.ingest` on a synthetic WAT pool, on the session Ray cluster.

The synthetic pool's `synth_truth.json` says exactly how many pairs each shard must yield and which
malformed records were injected; ingest must reconcile with it exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.flows import metaclip as pipeline
from curation.synth.wat import write_synthetic_pool

from .conftest import assert_same_tree, tree_digest

SHARDS, PAIRS, SEED = 3, 3000, 1  # seed 1 injects both bad_json and bad_utf8 records
GZ_MEMBER_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # synth's fixed gzip header


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    summary = write_synthetic_pool(str(d), SHARDS, PAIRS, SEED, malformed_rate=0.02)
    truth = json.loads((d / "synth_truth.json").read_text())
    return d, summary, truth


@pytest.fixture(scope="module")
def ingested(pool, tmp_path_factory):
    d, summary, _ = pool
    out = tmp_path_factory.mktemp("ingest") / "out"
    s = pipeline.ingest(list(summary.files), str(out), progress=False)
    return out, s


def by_basename(mapping: dict) -> dict:
    return {os.path.basename(k): v for k, v in mapping.items()}


def test_rows_per_shard_match_truth(pool, ingested):
    _, summary, truth = pool
    out, s = ingested
    markers = s["_markers"]
    assert len(markers) == SHARDS
    want = by_basename(truth["pairs_per_file"])
    assert want == by_basename(summary.pairs_per_file)
    got_marker = {
        os.path.basename(m["input"]): m["counts"]["rows_written"] for m in markers.values()
    }
    assert got_marker == want
    # the parts hold exactly those rows, named after the input shard
    got_parts = {}
    for name, m in markers.items():
        part = out / f"part-{name}.parquet"
        t = pq.read_table(part)
        got_parts[os.path.basename(m["input"])] = t.num_rows
        assert set(t.column("source_shard").to_pylist()) == {name}
        assert t.column("source_row").to_pylist() == list(range(t.num_rows))
        assert t.column("uid").null_count == 0 and t.column("url").null_count == 0
    assert got_parts == want
    assert s["rows_written"] == truth["total_pairs"] == SHARDS * PAIRS
    # one completion marker per shard on disk, and the stage fingerprint
    assert sorted(p.name for p in (out / "_done").iterdir()) == sorted(f"{n}.json" for n in markers)
    assert (out / "_stage.json").exists()


def test_quarantine_matches_injected_faults(pool, ingested):
    _, _, truth = pool
    out, s = ingested
    malformed = by_basename(truth["malformed_per_file"])
    injected = Counter()
    for m in s["_markers"].values():
        want = malformed[os.path.basename(m["input"])]
        got = Counter(q["reason"] for q in m["quarantine"])
        assert got == Counter({k: want[k] for k in ("bad_json", "bad_utf8") if want[k]}), m["shard"]
        assert m["counts"].get("records_dropped_bad_json", 0) == want["bad_json"]
        assert m["counts"].get("records_dropped_bad_utf8", 0) == want["bad_utf8"]
        # the other injected faults are counted, not quarantined: links without a URL, pages
        # without links, and one 10 MB alt-text per shard (cut to max_text_chars, still a pair)
        assert m["counts"].get("image_links_without_url", 0) == want["null_url"]
        assert m["counts"].get("records_skipped_no_links", 0) == want["missing_links"]
        assert m["counts"].get("texts_truncated", 0) >= want["huge_text"]
        for q in m["quarantine"]:
            assert q["shard"] == m["shard"] and q["input"] == m["input"] and q["stage"] == "ingest"
        injected.update({k: want[k] for k in ("bad_json", "bad_utf8")})
    assert injected["bad_json"] > 0 and injected["bad_utf8"] > 0, "pick a seed that injects both"
    # the quarantine file lists the same records
    n = pipeline.write_quarantine(str(out), [s["_markers"]])
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert n == len(lines) == sum(injected.values())
    assert Counter(x["reason"] for x in lines) == +injected
    texts = pq.read_table(out / f"part-{next(iter(s['_markers']))}.parquet", columns=["text"])
    assert max(len(x) for x in texts.column("text").to_pylist()) <= 1000


def test_counts_reconcile(ingested):
    _, s = ingested
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())
    for m in s["_markers"].values():
        c = m["counts"]
        dropped = sum(v for k, v in c.items() if k.startswith("rows_dropped_"))
        assert c["rows_read"] == c["rows_written"] + dropped
        assert m["input_bytes"] == os.path.getsize(m["input"])
        assert m["input_sha256"].startswith("sha256:")


def test_glob_brace_and_folder_give_the_same_result(pool, ingested, tmp_path):
    d, _, _ = pool
    out, _ = ingested
    ref = tree_digest(out)
    ref.pop("quarantine.jsonl", None)  # written by the test above, not by pipeline.ingest
    variants = {
        "glob": [str(d / "*.warc.wat.gz")],
        "brace": [str(d / f"synth-{{00000..{SHARDS - 1:05d}}}.warc.wat.gz")],
        "folder": [str(d)],
    }
    for name, inputs in variants.items():
        o = tmp_path / name
        s = pipeline.ingest(inputs, str(o), progress=False)
        assert s["shards"] == SHARDS, name
        assert tree_digest(o) == ref, name
    assert_same_tree(tmp_path / "glob", tmp_path / "brace")


def _next_member(data: bytes, start: int) -> int:
    """Offset of the first gzip member (= WARC record) starting at or after `start`."""
    pos = data.find(GZ_MEMBER_HEADER, start)
    assert pos > 0
    zlib.decompressobj(31).decompress(data[pos : pos + 65536])  # really a member start
    return pos


def _pool_with_truncated_shard(pool, folder: Path, cut_from_member: int) -> tuple[Path, str]:
    d, summary, _ = pool
    folder.mkdir()
    for f in summary.files:
        shutil.copy(f, folder)
    data = Path(summary.files[0]).read_bytes()
    cut = _next_member(data, len(data) // 2) + cut_from_member
    bad = folder / "synth-00099.warc.wat.gz"
    bad.write_bytes(data[:cut])
    return bad, "synth-00099"


def test_truncated_extra_shard_is_quarantined_rest_succeeds(pool, tmp_path):
    _, summary, truth = pool
    # cut 100 bytes before a record boundary: inside the previous record's payload
    _, bad_name = _pool_with_truncated_shard(pool, tmp_path / "in", -100)
    s = pipeline.ingest([str(tmp_path / "in")], str(tmp_path / "out"), progress=False)
    markers = s["_markers"]
    assert len(markers) == SHARDS + 1
    bad = markers[bad_name]
    reasons = Counter(q["reason"] for q in bad["quarantine"])
    assert reasons["truncated_shard"] + reasons["corrupt_shard"] == 1, reasons
    assert bad["counts"].get("shards_truncated", 0) + bad["counts"].get("shards_corrupt", 0) == 1
    # what was read before the cut is kept, and accounted for
    assert 0 < bad["counts"]["rows_written"] < PAIRS
    # every other shard is complete
    want = by_basename(truth["pairs_per_file"])
    for name, m in markers.items():
        if name != bad_name:
            assert m["counts"]["rows_written"] == want[os.path.basename(m["input"])]
            assert "truncated_shard" not in {q["reason"] for q in m["quarantine"]}
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())


@pytest.mark.parametrize(
    "cut_from_member", [-4, 5, 40], ids=["gzip-trailer", "gzip-header", "warc-header"]
)
def test_shard_truncated_near_record_boundary_is_quarantined(pool, tmp_path, cut_from_member):
    bad_path, bad_name = _pool_with_truncated_shard(pool, tmp_path / "in", cut_from_member)
    s = pipeline.ingest([str(bad_path)], str(tmp_path / "out"), progress=False)
    bad = s["_markers"][bad_name]
    reasons = {q["reason"] for q in bad["quarantine"]}
    assert reasons & {"truncated_shard", "corrupt_shard"}, (reasons, bad["counts"])


FAULTS = Path(__file__).resolve().parent.parent / "faults"


def test_storage_error_mid_stream_is_retried_not_quarantined(pool, ingested, tmp_path):
    """An OSError halfway through every shard (a storage blip) is retried: all pairs arrive,
    nothing is quarantined, and the parts equal those of an undisturbed run."""
    from .conftest import cli_env, run_cli, short_ray_tmp

    d, summary, truth = pool
    flaky_dir = tmp_path / "flaky"
    flaky_dir.mkdir()
    size = min(os.path.getsize(f) for f in summary.files)
    ray_tmp = short_ray_tmp()
    out = tmp_path / "out"
    env = cli_env(
        ray_tmp,
        PYTHONPATH=str(FAULTS),
        CURATION_FLAKY_DIR=str(flaky_dir),
        CURATION_FLAKY_AFTER=str(size // 2),
        CURATION_IO_BACKOFF_S="0.01",
    )
    try:
        run_cli(
            ["ingest", *[f"flaky://{f}" for f in summary.files], "-o", out, "--quiet",
             "--num-cpus", "2"],
            env=env,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(os.listdir(flaky_dir)) == SHARDS  # every shard hit an error once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["rows_written"] == truth["total_pairs"]
    reasons = Counter(json.loads(x)["reason"] for x in (out / "quarantine.jsonl").open())
    assert "corrupt_shard" not in reasons and "truncated_shard" not in reasons
    ref, _ = ingested
    for name in manifest["summary"]["per_shard"]:
        a = pq.read_table(out / f"part-{name}.parquet").drop_columns(["source_shard"])
        b = pq.read_table(ref / f"part-{name}.parquet").drop_columns(["source_shard"])
        assert a.equals(b)
