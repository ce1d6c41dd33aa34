"""Output folders on the session Ray cluster: what a run may remove, where it may write, and one
driver per folder."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from curation.config.job import parse_job
from curation.flows import metaclip
from curation.flows.job import run_job
from curation.io.parts import LEASE_FILE, LeaseError
from curation.synth.wat import write_synthetic_pool

from .conftest import assert_same_tree, job_dict, tree_digest

SHARDS, PAIRS = 2, 200


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pool") / "data"
    write_synthetic_pool(str(d), SHARDS, PAIRS, 3, malformed_rate=0.0)
    return d


def _ingest(pool: Path, out: Path, **kwargs) -> dict:
    return metaclip.ingest_command([str(pool)], str(out), progress=False, **kwargs)


def _job(metadata: str, out: Path, **kwargs) -> dict:
    spec = parse_job(job_dict(metadata, shards=2, pairs_per_shard=400, seed=3))
    return run_job(spec, str(out), progress=False, **kwargs)


def test_overwrite_keeps_what_the_tool_did_not_write(pool, tmp_path):
    out = tmp_path / "mydir"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.tex").write_text("four years")
    (out / "photos" / "cat.jpg").write_bytes(b"meow")
    (out / "draft.tmp-1").write_text("mine")
    first = _ingest(pool, out)
    assert first["rows_written"] == SHARDS * PAIRS
    again = _ingest(pool, out, max_text_chars=500, overwrite=True)  # another fingerprint
    assert again["rows_written"] == SHARDS * PAIRS
    assert (out / "thesis.tex").read_text() == "four years"
    assert (out / "photos" / "cat.jpg").read_bytes() == b"meow"
    assert (out / "draft.tmp-1").read_text() == "mine"
    assert json.loads((out / "_stage.json").read_text())["params"] == {"max_text_chars": 500}
    assert not (out / LEASE_FILE).exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_the_input_folder_is_refused_before_any_work(pool, where):
    out = pool if where == "same" else pool / "out"
    before = tree_digest(pool)
    with pytest.raises(ValueError, match="inside input folder .*write elsewhere"):
        _ingest(pool, out, overwrite=True)
    assert tree_digest(pool) == before and not (pool / "out").exists()


def test_a_process_local_output_is_refused(pool, small_metadata):
    with pytest.raises(ValueError, match="Ray worker processes"):
        _ingest(pool, f"memory://out-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ValueError, match="Ray worker processes"):
        _job(small_metadata, f"memory://run-{uuid.uuid4().hex[:8]}")


def test_a_resumed_run_folder_equals_a_clean_one(small_metadata, tmp_path):
    """A partial temp of the counts (a disk-full run) is cleaned; a user's *.tmp-* stays."""
    out = tmp_path / "run"
    _job(small_metadata, out)
    clean = tree_digest(out)
    assert LEASE_FILE not in clean
    partial = out / "counts" / "entry_counts.parquet.tmp-curation-4242-0123abcd"
    partial.write_bytes(b"half")
    (out / "report" / "summary.md.tmp-curation-4242-0123abcd").write_bytes(b"half")
    (out / "ingest" / "part-synth-00000.parquet.tmp-curation-4242-0123abcd").write_bytes(b"x")
    (out / "notes.tmp-1").write_text("mine")
    _job(small_metadata, out)
    (out / "notes.tmp-1").unlink()
    assert tree_digest(out) == clean


def test_a_second_driver_is_refused_and_a_dead_ones_lease_taken_over(small_metadata, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lease = {
        "host": socket.gethostname(),
        "pid": os.getppid(),  # a live process that is not this one
        "token": "x" * 32,
        "started": time.time(),
        "heartbeat": time.time(),
    }
    (out / LEASE_FILE).write_text(json.dumps(lease))
    with pytest.raises(LeaseError, match=f"pid {lease['pid']} on host .* remove .*_lease.json"):
        _job(small_metadata, out)
    assert sorted(p.name for p in out.iterdir()) == [LEASE_FILE]  # nothing was written
    (out / LEASE_FILE).write_text(json.dumps({**lease, "heartbeat": time.time() - 1e6}))
    _job(small_metadata, out)
    assert not (out / LEASE_FILE).exists()
    moved = tmp_path / "moved"
    out.rename(moved)
    _job(small_metadata, out)  # a clean run at the same path (run folders embed their path)
    assert_same_tree(out, moved)
