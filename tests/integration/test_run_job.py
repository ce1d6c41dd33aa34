"""Whole jobs: `run_job` in-process on the session cluster, and the CLI in subprocesses.

In-process runs share a small pool (3 shards x 3,000 pairs); CLI runs that start their own Ray
cluster use `cli_job` (4 x 4,000) and are compared byte for byte with its clean run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.config.job import parse_job
from curation.core.metadata import load_metadata, write_metadata_json
from curation.flows.job import run_job
from curation.io.parts import ResumeError

from .conftest import (
    assert_same_tree,
    cli_env,
    job_dict,
    read_parts,
    run_cli,
    short_ray_tmp,
    tree_digest,
)

T, SEED = 20, 1
STAGES = ("ingest", "match", "balance")


def run(metadata: str, out: Path, *, overwrite: bool = False, **kwargs) -> dict:
    return run_job(
        parse_job(job_dict(metadata, **kwargs)), str(out), overwrite=overwrite, progress=False
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_metadata):
    """One finished in-process run at t = 20 (read-only for the tests, except resume ones that
    leave it as they found it)."""
    out = tmp_path_factory.mktemp("base") / "out"
    manifest = run(small_metadata, out, t=T, seed=SEED)
    return out, manifest


def curated_keys(out: Path, stage: str = "balance") -> set[tuple[str, int]]:
    t = read_parts(out / stage, ["source_shard", "source_row"])
    cols = (t.column("source_shard").to_pylist(), t.column("source_row").to_pylist())
    return set(zip(*cols, strict=True))


def curated_uids(out: Path) -> set[str]:
    return set(read_parts(out / "balance", ["uid"]).column("uid").to_pylist())


def mtimes(out: Path) -> dict[str, int]:
    """mtime of every shard-level artifact: inputs, parts, markers, stage fingerprints."""
    res = {}
    for stage in ("input", *STAGES):
        for p in (out / stage).rglob("*"):
            if p.is_file():
                res[str(p.relative_to(out))] = p.stat().st_mtime_ns
    return res


# -- manifest and counts -----------------------------------------------------------------------
def test_manifest_reconciles_at_every_stage(base):
    out, m = base
    assert json.loads((out / "manifest.json").read_text()) == m
    st = m["stages"]
    assert st["synth"] == {"shards": 3, "pairs": 9000}
    for stage in STAGES:
        s = st[stage]
        assert s["shards"] == 3
        assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values()), stage
        # and per shard, from the markers on disk
        for marker in (out / stage / "_done").glob("*.json"):
            c = json.loads(marker.read_text())["counts"]
            dropped = sum(v for k, v in c.items() if k.startswith("rows_dropped_"))
            assert c["rows_read"] == c["rows_written"] + dropped, (stage, marker.name)
        # the parts hold exactly rows_written rows
        assert read_parts(out / stage, ["uid"]).num_rows == s["rows_written"], stage
    # stages chain: every stage reads what the one before wrote
    assert st["ingest"]["rows_read"] == st["synth"]["pairs"]
    assert st["match"]["rows_read"] == st["ingest"]["rows_written"]
    assert st["balance"]["rows_read"] == st["match"]["rows_written"]
    assert st["ingest"]["rows_dropped"] == {} and st["match"]["rows_dropped"] == {}
    bal = st["balance"]
    assert set(bal["rows_dropped"]) == {"no_match", "not_sampled"}
    assert bal["rows_dropped"]["no_match"] == (
        st["match"]["rows_read"] - st["match"]["counters"]["rows_with_match"]
    )
    assert bal["rows_dropped"]["not_sampled"] > 0 and bal["rows_written"] > 0
    # curated rows all have a match; the quarantine count matches the file
    ids = read_parts(out / "balance", ["entry_ids"]).column("entry_ids")
    assert pc.min(pc.list_value_length(ids)).as_py() >= 1
    q = (out / "quarantine.jsonl").read_text().splitlines()
    assert m["quarantined"] == len(q) > 0
    assert m["balance"]["t"] == T and m["balance"]["seed"] == SEED
    md = load_metadata(m["job"]["metadata"])
    assert m["metadata"] == {
        "path": m["job"]["metadata"],
        "entries": len(md),
        "checksum": md.checksum,
    }
    for key in ("curated", "counts", "report", "quarantine"):
        assert os.path.exists(m["outputs"][key]), key
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary


def test_entry_counts(base, small_metadata):
    out, m = base
    md = load_metadata(small_metadata)
    t = pq.read_table(out / "counts" / "entry_counts.parquet")
    assert t.schema.names == ["entry_id", "entry", "count"]
    assert [f.type for f in t.schema] == [pa.uint32(), pa.string(), pa.uint64()]
    assert t.num_rows == len(md)
    assert t.column("entry_id").to_pylist() == list(range(len(md)))
    assert tuple(t.column("entry").to_pylist()) == md.entries
    counts = t.column("count").to_numpy()
    ids = read_parts(out / "match", ["entry_ids"]).column("entry_ids")
    assert int(counts.sum()) == int(pc.sum(pc.list_value_length(ids)).as_py())
    flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    assert np.array_equal(counts, np.bincount(flat, minlength=len(md)))
    assert (
        int(counts.sum())
        == m["stages"]["count"]["matches"]
        == (m["stages"]["match"]["counters"]["matches"])
    )
    after = pq.read_table(out / "counts" / "entry_counts_balanced.parquet").column("count")
    kept = read_parts(out / "balance", ["entry_ids"]).column("entry_ids")
    assert int(pc.sum(after).as_py()) == int(pc.sum(pc.list_value_length(kept)).as_py())
    # balancing flattens the head: no entry keeps far more than t matches
    assert int(pc.max(after).as_py()) <= int(counts.max())


# -- nesting ---------------------------------------------------------------------------------------
def test_larger_t_keeps_a_superset(base, small_metadata, tmp_path):
    out20, _ = base
    out5, out80 = tmp_path / "t5", tmp_path / "t80"
    run(small_metadata, out5, t=5, seed=SEED)
    run(small_metadata, out80, t=80, seed=SEED)
    k5, k20, k80 = curated_keys(out5), curated_keys(out20), curated_keys(out80)
    assert k5 < k20 < k80, (len(k5), len(k20), len(k80))
    assert curated_uids(out5) <= curated_uids(out20) <= curated_uids(out80)
    # ingest and match do not depend on t: identical parts
    for stage in ("ingest", "match"):
        for p in (out20 / stage).glob("part-*.parquet"):
            assert p.read_bytes() == (out5 / stage / p.name).read_bytes(), p


# -- resume ----------------------------------------------------------------------------------------
def test_rerun_of_finished_folder_redoes_nothing(base, small_metadata):
    out, m = base
    before = mtimes(out)
    manifest_bytes = (out / "manifest.json").read_bytes()
    digest = tree_digest(out)
    m2 = run(small_metadata, out, t=T, seed=SEED)
    assert mtimes(out) == before
    assert m2 == m
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert tree_digest(out) == digest


def test_moved_run_folder_resumes_without_redoing_work(base, small_metadata, tmp_path):
    out, m = base
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    before = mtimes(moved)
    m2 = run(small_metadata, moved, t=T, seed=SEED)
    assert mtimes(moved) == before  # no shard of any stage was redone
    assert m2["stages"]["balance"] == m["stages"]["balance"]
    assert curated_keys(moved) == curated_keys(out)


def test_rerun_redoes_only_unfinished_shards(base, small_metadata):
    out, m = base
    digest = tree_digest(out)
    # one shard's match and another's balance never finished (part present, marker missing)
    (out / "match" / "_done" / "synth-00001.json").unlink()
    (out / "balance" / "_done" / "synth-00002.json").unlink()
    (out / "balance" / "part-synth-00002.parquet").write_bytes(b"half-written garbage")
    (out / "balance" / "part-synth-00000.parquet.tmp-1-deadbeef").write_bytes(b"stale temp")
    before = mtimes(out)
    run(small_metadata, out, t=T, seed=SEED)
    after = mtimes(out)
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == [
        "balance/_done/synth-00002.json",
        "balance/part-synth-00002.parquet",
        "match/_done/synth-00001.json",
        "match/part-synth-00001.parquet",
    ]
    assert tree_digest(out) == digest  # same bytes as before, temp file gone


def test_changed_spec_refuses_to_resume(base, small_metadata, tmp_path):
    out, _ = base
    digest = tree_digest(out)
    with pytest.raises(ResumeError, match="--overwrite") as exc:
        run(small_metadata, out, t=40, seed=SEED)
    assert "balance" in str(exc.value)
    with pytest.raises(ResumeError, match="--overwrite") as exc:
        run(small_metadata, out, t=T, seed=SEED + 1, synth_seed=SEED)
    assert "balance" in str(exc.value)
    md = load_metadata(small_metadata)
    other_md = str(tmp_path / "other_metadata.json")
    write_metadata_json(list(md.entries[:10_000]), other_md)
    with pytest.raises(ResumeError, match="--overwrite") as exc:
        run(other_md, out, t=T, seed=SEED)
    assert "match" in str(exc.value)
    assert tree_digest(out) == digest  # refused before touching anything


def test_overwrite_replaces_a_different_job(base, small_metadata, tmp_path):
    base_out, base_m = base
    out = tmp_path / "out"
    run(small_metadata, out, t=80, seed=SEED)
    with pytest.raises(ResumeError):
        run(small_metadata, out, t=T, seed=SEED)
    m = run(small_metadata, out, t=T, seed=SEED, overwrite=True)
    # now it is the base job: same parts, same manifest (modulo the folder's own path)
    for stage in ("input", *STAGES):
        for p in sorted((base_out / stage).glob("part-*.parquet")):
            assert p.read_bytes() == (out / stage / p.name).read_bytes(), p
    assert json.dumps(m, sort_keys=True) == json.dumps(base_m, sort_keys=True).replace(
        str(base_out), str(out)
    )
    # a different metadata file: refused, then replaced from the match stage on
    md = load_metadata(small_metadata)
    other_md = str(tmp_path / "other_metadata.json")
    write_metadata_json(list(md.entries[:10_000]), other_md)
    ingest_mtimes = {k: v for k, v in mtimes(out).items() if k.startswith(("input", "ingest"))}
    with pytest.raises(ResumeError, match="--overwrite"):
        run(other_md, out, t=T, seed=SEED)
    m2 = run(other_md, out, t=T, seed=SEED, overwrite=True)
    assert m2["metadata"]["entries"] == 10_000
    assert pq.read_metadata(out / "counts" / "entry_counts.parquet").num_rows == 10_000
    ids = read_parts(out / "match", ["entry_ids"]).column("entry_ids")
    assert pc.max(pc.list_flatten(ids)).as_py() < 10_000
    assert {k: v for k, v in mtimes(out).items() if k in ingest_mtimes} == ingest_mtimes


# -- CLI -------------------------------------------------------------------------------------------
def test_status_cli(base):
    out, m = base
    proc = run_cli(["status", out])
    st = json.loads(proc.stdout)
    # the finished-run flag is "complete" (older builds: "manifest")
    assert st.get("complete", st.get("manifest")) is True
    for stage in ("input", *STAGES):
        assert st["stages"][stage]["done"] == 3, stage
        assert st["stages"][stage].get("pending", 0) == 0, stage
        assert st["stages"][stage].get("parts_without_marker", 0) == 0, stage
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert st["quarantined"] == dict(Counter(x["reason"] for x in lines))
    assert sum(st["quarantined"].values()) == m["quarantined"]


def test_cli_step_by_step_equals_run(base, small_metadata, tmp_path, ray_cluster):
    """ingest → match → count → balance as separate commands (connected to the session cluster
    with --address, so no extra Ray start) give the same counts and curated rows as `run`."""
    out, m = base
    c = tmp_path / "chain"
    addr = ["--address", ray_cluster]
    run_cli(["ingest", str(out / "input" / "*.warc.wat.gz"), "-o", c / "ingest", "--quiet", *addr])
    run_cli(["match", c / "ingest", "-m", small_metadata, "-o", c / "match", "--quiet", *addr])
    run_cli(["count", c / "match", "-m", small_metadata, "-o", c / "counts.parquet", *addr])
    run_cli(
        [
            "balance",
            c / "match",
            "--counts",
            c / "counts.parquet",
            "--t",
            str(T),
            "--seed",
            str(SEED),
            "-o",
            c / "curated",
            "--quiet",
            *addr,
        ]
    )
    assert (c / "counts.parquet").read_bytes() == (
        out / "counts" / "entry_counts.parquet"
    ).read_bytes()
    for stage, cstage in (("ingest", "ingest"), ("match", "match"), ("balance", "curated")):
        parts = sorted(p.name for p in (out / stage).glob("part-*.parquet"))
        assert parts == sorted(p.name for p in (c / cstage).glob("part-*.parquet"))
        for name in parts:
            assert (out / stage / name).read_bytes() == (c / cstage / name).read_bytes(), name
    assert curated_keys(out) == curated_keys(c, stage="curated")
    q = [json.loads(x) for x in (c / "ingest" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == m["quarantined"]


def test_cli_num_cpus_1_and_2_give_identical_bytes(cli_job):
    ray_tmp = short_ray_tmp()
    try:
        cli_job.run("--num-cpus", "1", env=cli_env(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    one = cli_job.move_aside("clean-1cpu")
    digest = assert_same_tree(one, cli_job.clean)
    for want in (
        "manifest.json",
        "quarantine.jsonl",
        "report/summary.json",
        "counts/entry_counts.parquet",
        "input/_stage.json",
        "balance/_stage.json",
    ):
        assert want in digest, want
    assert sum(1 for k in digest if k.startswith("balance/part-")) == 4


FAULTS = Path(__file__).resolve().parent.parent / "faults"


def test_cli_worker_killed_mid_shard_gives_identical_bytes(cli_job, tmp_path):
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    ray_tmp = short_ray_tmp()
    try:
        proc = cli_job.run(
            "--num-cpus",
            "2",
            env=cli_env(ray_tmp, CURATION_FAULT_DIR=str(fault_dir), PYTHONPATH=str(FAULTS)),
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # every (stage, shard) task crashed its worker once, and was retried
    shards = [f"synth-{i:05d}" for i in range(4)]
    assert sorted(os.listdir(fault_dir)) == sorted(
        f"{stage}-{s}" for stage in STAGES for s in shards
    )
    # (a sentinel is written just before os._exit(1), so each one is a crash); Ray says so too
    assert "will be retried" in proc.stdout + proc.stderr
    faulty = cli_job.move_aside("faulty")
    assert_same_tree(faulty, cli_job.clean)


def test_count_takes_metadata_from_the_match_stage(base, small_metadata, tmp_path):
    from curation.flows.metaclip import match_metadata

    out, _ = base
    assert match_metadata(str(out / "match"), None) == small_metadata
    assert match_metadata(str(out / "match"), small_metadata) == small_metadata
    other = tmp_path / "other.json"
    write_metadata_json(["x", "y"], str(other))
    with pytest.raises(ValueError, match="not the metadata"):
        match_metadata(str(out / "match"), str(other))


def test_a_stage_that_does_not_see_every_part_fails_loudly(small_metadata, tmp_path, monkeypatch):
    """On a cluster a local output path lists only the driver's parts; the handoff check (the
    previous stage's markers say what was written) turns that silent loss into an error."""
    import curation.flows.metaclip as metaclip

    real = metaclip.parts_of

    def driver_sees_some(folder):  # like a listing on one node of a multi-node cluster
        shards = real(folder)
        return shards[1:] if folder.endswith("ingest") else shards

    monkeypatch.setattr(metaclip, "parts_of", driver_sees_some)
    with pytest.raises(RuntimeError, match=r"match read \d+ shard.*not read: \['synth-00000'\]"):
        run(small_metadata, tmp_path / "out", t=T, seed=SEED)


def test_resumed_job_reads_its_persisted_counts_instead_of_counting_again(
    base, small_metadata, monkeypatch
):
    """Counting is a pass over the whole pool: a finished job run again reads the counts it
    persisted (keyed by the counted parts' identity), and a changed key counts again."""
    from curation.flows import metaclip

    out, m = base

    def no_count(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the pool was counted again")

    monkeypatch.setattr(metaclip, "count", no_count)
    assert run(small_metadata, out, t=T, seed=SEED) == m
    key = out / "counts" / "entry_counts.parquet.counted-from"
    saved = key.read_bytes()
    key.write_text('"sha256:other"')
    try:
        with pytest.raises(AssertionError, match="counted again"):
            run(small_metadata, out, t=T, seed=SEED)
    finally:
        key.write_bytes(saved)
