"""Output folders are never a hazard to what is already there, or to another run's output.

`--overwrite` removes only what this package wrote; an output inside an input folder (or an input
inside the output folder) is refused; a process-local output URL is refused; only this package's
own temporary files are cleaned; one driver at a time holds an output folder (a lease).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from curation.core import fsio
from curation.executor.runner import check_output_location
from curation.flows import metaclip
from curation.io import parts
from curation.io.parts import LeaseError, OutputLease, check_output_not_in_inputs

FP = {"stage": "x", "params": {"t": 1}}


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- 1. --overwrite removes only what this package wrote -------------------------------------------
def _stage_with_user_files(tmp_path):
    out = tmp_path / "out"
    parts.prepare_stage_dir(str(out), FP, overwrite=False)
    parts.write_marker(str(out), "a", {"shard": "a"})
    (out / "part-a.parquet").write_bytes(b"old part")
    (out / "manifest.json").write_text("{}")
    (out / "quarantine.jsonl").write_text("")
    (out / "part-a.parquet.tmp-curation-1-deadbeef").write_bytes(b"stale")
    (out / "thesis.tex").write_text("my thesis")
    (out / "photos").mkdir()
    (out / "photos" / "part-1.parquet").write_bytes(b"not ours")
    (out / "photos" / "cat.jpg").write_bytes(b"meow")
    (out / "notes.tmp-1").write_text("mine")
    return out


def test_overwrite_removes_only_what_the_tool_wrote(tmp_path):
    out = _stage_with_user_files(tmp_path)
    parts.prepare_stage_dir(str(out), {**FP, "params": {"t": 2}}, overwrite=True)
    assert _files(out) == [
        "_stage.json", "notes.tmp-1", "photos/cat.jpg", "photos/part-1.parquet", "thesis.tex",
    ]  # fmt: skip
    assert json.loads((out / "_stage.json").read_text())["params"] == {"t": 2}
    assert (out / "_done").is_dir() and not list((out / "_done").iterdir())


def test_overwrite_without_a_stage_file_keeps_user_files(tmp_path):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.tex").write_text("my thesis")
    (out / "photos" / "cat.jpg").write_bytes(b"meow")
    parts.prepare_stage_dir(str(out), FP, overwrite=True)
    assert _files(out) == ["_stage.json", "photos/cat.jpg", "thesis.tex"]


def test_overwrite_removes_a_stages_other_outputs_named_by_owned(tmp_path):
    out = tmp_path / "out"
    parts.prepare_stage_dir(str(out), FP, overwrite=False)
    (out / "p-00000.tar").write_bytes(b"x")
    (out / "_work" / "input").mkdir(parents=True)
    (out / "_work" / "input" / "a").write_bytes(b"x")
    (out / "mine.tar").write_bytes(b"x")
    parts.prepare_stage_dir(
        str(out), {"stage": "y"}, overwrite=True, owned=("*-[0-9]*.tar", "_work")
    )
    assert _files(out) == ["_stage.json", "mine.tar"]


# -- 2. output inside an input folder, input inside the output folder -------------------------------
@pytest.fixture
def tree(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "in.jsonl").write_text("{}\n")
    (tmp_path / "data" / "sub" / "b.jsonl").write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize(
    "inputs, out",
    [
        (["data"], "data"),
        (["data/"], "data/out"),
        (["data"], "data/sub/out"),
        (["file://ROOT/data"], "data/out"),  # protocol and relative paths normalized
        (["data/**/*.jsonl"], "data/out"),
        (["data/*.jsonl"], "data"),
        (["data/{in,x}.jsonl"], "data"),
        (["data/in.jsonl"], "data"),  # the input is inside the output folder
        (["data/sub/b.jsonl"], "data"),
    ],
)
def test_output_in_an_input_folder_is_refused(tree, monkeypatch, inputs, out):
    monkeypatch.chdir(tree)
    inputs = [i.replace("ROOT", str(tree)) for i in inputs]
    with pytest.raises(ValueError, match="write elsewhere"):
        check_output_not_in_inputs(out, inputs)


def test_output_in_an_input_folder_is_refused_through_a_symlink(tree):
    (tree / "link").symlink_to(tree / "data")
    with pytest.raises(ValueError, match=r"output folder .* is inside input folder"):
        check_output_not_in_inputs(str(tree / "link" / "out"), [str(tree / "data")])


@pytest.mark.parametrize(
    "inputs, out",
    [
        (["data"], "out"),
        (["data/in.jsonl"], "data-out"),
        (["data/*.jsonl"], "data/out"),  # a one-level glob does not read data/out/
        (["data/sub"], "data/out"),
    ],
)
def test_separate_folders_are_fine(tree, monkeypatch, inputs, out):
    monkeypatch.chdir(tree)
    check_output_not_in_inputs(out, inputs)


def test_a_job_may_read_its_own_run_folder(tree):
    out = tree / "run"
    inputs = [str(out / "input" / "a.wat.gz")]
    with pytest.raises(ValueError, match="inside output folder"):
        check_output_not_in_inputs(str(out), inputs)
    check_output_not_in_inputs(str(out), inputs, inputs_inside_out=True)
    with pytest.raises(ValueError, match="inside input folder"):
        check_output_not_in_inputs(
            str(tree / "data" / "run"), [str(tree / "data")], inputs_inside_out=True
        )


def test_ingest_command_refuses_before_any_work(tree):
    data = tree / "data"
    before = _files(tree)
    with pytest.raises(ValueError, match="inside input folder"):
        metaclip.ingest_command([str(data)], str(data / "out"), overwrite=True, progress=False)
    with pytest.raises(ValueError, match="inside input folder"):
        metaclip.ingest_command([str(data)], str(data), overwrite=True, progress=False)
    assert _files(tree) == before and not (data / "out").exists()


# -- 3. process-local output filesystems -----------------------------------------------------------
def test_memory_output_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Ray worker processes"):
        check_output_location("memory://somewhere/out")
    check_output_location(str(tmp_path / "out"))
    check_output_location(f"file://{tmp_path}/out")


def test_ingest_command_refuses_a_memory_output(tree):
    with pytest.raises(ValueError, match="Ray worker processes"):
        metaclip.ingest_command(
            [str(tree / "data")], f"memory://out-{uuid.uuid4().hex[:8]}", progress=False
        )


# -- 4. temporary files: only this package's own ---------------------------------------------------
def test_temp_names_are_recognisably_ours():
    tmp = fsio._tmp_path("/x/part-a.parquet")
    name = tmp.rsplit("/", 1)[-1]
    assert name.startswith("part-a.parquet.tmp-curation-") and fsio.is_own_temp(name)
    assert fsio.own_temp_base(name) == "part-a.parquet"
    for other in ("notes.tmp-1", "thesis.tex.tmp-12-deadbeef", "a.tmp-curation-x", "b.tmp-"):
        assert not fsio.is_own_temp(other)
    assert fsio.own_temp_base("manifest.json.tmp-12-deadbeef", ("manifest.json",)) == (
        "manifest.json"
    )


def test_stale_temp_cleanup_spares_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = [
        "part-a.parquet.tmp-curation-12-0123abcd",
        "part-b.parquet.tmp-7-deadbeef",  # an older version's temp of a part
        "_done/a.json.tmp-curation-3-0123abcd",
    ]
    theirs = [
        "notes.tmp-1",
        "thesis.tex.tmp-12-deadbeef",
        "backup.tmp-old",
        "photos/part-a.parquet.tmp-curation-1-0123abcd",  # not a folder we write
    ]
    for name in mine + theirs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    parts.prepare_stage_dir(str(out), FP, overwrite=False)
    assert _files(out) == sorted(["_stage.json", *theirs])


def test_lease_cleans_run_folder_temps(tmp_path):
    out = tmp_path / "run"
    (out / "counts").mkdir(parents=True)
    (out / "report").mkdir()
    left = [
        "counts/entry_counts.parquet.tmp-curation-9-0123abcd",
        "report/summary.md.tmp-curation-9-0123abcd",
        "manifest.json.tmp-curation-9-0123abcd",
        "quarantine.jsonl.tmp-3-deadbeef",
    ]
    kept = ["counts/notes.tmp-1", "report/draft.tmp-2", "mine.tmp-3-deadbeef"]
    for name in left + kept:
        (out / name).write_bytes(b"x")
    with OutputLease(str(out), refresh_s=0):
        pass
    assert _files(out) == sorted(kept)


# -- 5. one driver per output folder ------------------------------------------------------------
def _write_lease(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    body = {
        "host": socket.gethostname(),
        "pid": os.getppid(),  # alive, and not us
        "token": "t" * 32,
        "started": time.time() - 5,
        "heartbeat": time.time(),
        **fields,
    }
    (out / parts.LEASE_FILE).write_text(json.dumps(body))
    return body


def test_a_live_lease_refuses_a_second_driver(tmp_path):
    out = tmp_path / "out"
    body = _write_lease(out)
    with pytest.raises(LeaseError) as exc, OutputLease(str(out), refresh_s=0):
        pass
    msg = str(exc.value)
    assert f"pid {body['pid']} on host {body['host']}" in msg
    assert f"remove {out}/_lease.json" in msg
    assert json.loads((out / parts.LEASE_FILE).read_text())["token"] == "t" * 32  # untouched


def test_two_leases_in_one_folder_exclude_each_other(tmp_path):
    out = str(tmp_path / "out")
    first = OutputLease(out, refresh_s=0)
    first.acquire()
    try:
        # what a second process would see: the same file, another pid on this host
        lease = json.loads((tmp_path / "out" / parts.LEASE_FILE).read_text())
        lease["pid"] = os.getppid()
        (tmp_path / "out" / parts.LEASE_FILE).write_text(json.dumps(lease))
        parts._HELD.clear()  # forget that this process holds it
        with pytest.raises(LeaseError, match="is being written by"):
            OutputLease(out, refresh_s=0).acquire()
        parts._HELD[first._key] = 1
    finally:
        first.release()
    assert not (tmp_path / "out" / parts.LEASE_FILE).exists()


def test_a_stale_lease_is_taken_over(tmp_path):
    out = tmp_path / "out"
    _write_lease(out, heartbeat=time.time() - 10_000)
    with OutputLease(str(out), refresh_s=0) as lease:
        assert json.loads((out / parts.LEASE_FILE).read_text())["token"] == lease.token
    assert not (out / parts.LEASE_FILE).exists()


def test_a_lease_of_a_dead_local_pid_is_taken_over(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    _write_lease(out, pid=int(dead))
    with OutputLease(str(out), refresh_s=0):
        assert json.loads((out / parts.LEASE_FILE).read_text())["pid"] == os.getpid()


def test_another_hosts_recent_lease_is_live(tmp_path):
    out = tmp_path / "out"
    _write_lease(out, host="elsewhere", pid=1)
    with pytest.raises(LeaseError, match="on host elsewhere"):
        OutputLease(str(out), refresh_s=0).acquire()


def test_the_lease_is_removed_when_the_run_fails_and_is_reentrant(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), OutputLease(str(out), refresh_s=0):
        assert (out / parts.LEASE_FILE).exists()
        with OutputLease(str(out), refresh_s=0):  # nested in one process: no conflict
            pass
        assert (out / parts.LEASE_FILE).exists()
        raise RuntimeError("boom")
    assert not out.exists()  # it created the folder and wrote nothing else: gone again


def test_the_heartbeat_is_refreshed(tmp_path):
    out = tmp_path / "out"
    with OutputLease(str(out), refresh_s=0.01):
        first = json.loads((out / parts.LEASE_FILE).read_text())["heartbeat"]
        beat, done = first, threading.Event()
        for _ in range(500):
            if done.wait(0.01):
                break
            beat = json.loads((out / parts.LEASE_FILE).read_text())["heartbeat"]
            if beat > first:
                break
        assert beat > first
    assert _files(out) == []


def test_object_store_lease_is_best_effort_but_excludes(tmp_path):
    out = f"memory://lease-{uuid.uuid4().hex[:8]}/out"
    with OutputLease(out, refresh_s=0):
        data = fsio.read_json(fsio.join(out, parts.LEASE_FILE))
        fsio.atomic_write_json(fsio.join(out, parts.LEASE_FILE), {**data, "host": "elsewhere"})
        parts._HELD.clear()
        with pytest.raises(LeaseError, match="elsewhere"):
            OutputLease(out, refresh_s=0).acquire()
        parts._HELD[fsio.url_key(out)] = 1
        fsio.atomic_write_json(fsio.join(out, parts.LEASE_FILE), data)
    assert not fsio.exists(fsio.join(out, parts.LEASE_FILE))


def test_leased_flows_hold_the_lease(tmp_path):
    out = tmp_path / "out"
    seen = []

    @parts.leased("out")
    def flow(inputs, out):
        seen.append((tmp_path / "out" / parts.LEASE_FILE).exists())
        return 7

    assert flow([], str(out)) == 7 and seen == [True]
    _write_lease(out)
    with pytest.raises(LeaseError):
        flow([], out=str(out))


def test_a_lease_of_a_killed_but_unreaped_driver_is_taken_over(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie
    try:
        _write_lease(out, pid=proc.pid)
        with OutputLease(str(out), refresh_s=0):
            assert json.loads((out / parts.LEASE_FILE).read_text())["pid"] == os.getpid()
    finally:
        proc.wait()


def test_resume_lists_done_markers_once_and_drops_leftover_marker_temps(tmp_path, monkeypatch):
    """Resuming 10^5 shards on an object store: `_done/` is listed once (not once to clean
    temporaries and again to find markers), and a crashed writer's temporary marker is removed
    in that listing, never taken for a done shard."""
    from curation.core.stage import Shard

    out = tmp_path / "out"
    parts.prepare_stage_dir(str(out), FP, overwrite=False)
    parts.write_marker(str(out), "a", {"shard": "a"})
    (out / "_done" / "b.json.tmp-curation-3-0123abcd").write_bytes(b"{")
    listed = []
    real_ls = parts._ls

    def counting_ls(fs, folder):  # noqa: ANN001, ANN202
        listed.append(folder.rstrip("/").rsplit("/", 1)[-1])
        return real_ls(fs, folder)

    monkeypatch.setattr(parts, "_ls", counting_ls)
    shards = [Shard("a", str(tmp_path / "a")), Shard("b", str(tmp_path / "b"))]
    done, todo = parts.done_and_todo(str(out), shards, FP, overwrite=False, check_inputs=False)
    assert list(done) == ["a"] and todo == [shards[1]]
    assert listed.count("_done") == 1
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["a.json"]
