"""The driver of `curation run` is SIGKILLed mid-run; a rerun finishes with identical bytes.

The CLI runs in its own session (start_new_session=True) with its own Ray temp dir, so killing its
process group takes down its driver, GCS, raylet and workers and nothing else: the session
cluster of the other tests keeps working, and no `ray stop` (which would kill every Ray on the
machine) is needed. Named to run last anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import ray

from .conftest import (
    assert_same_tree,
    cli_env,
    curation_exe,
    run_cli,
    session_processes,
    short_ray_tmp,
    wait_no_session_processes,
)


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append((int(pid), cmd[:160]))
    return out


def _start_and_kill_mid_run(cli_job, ray_tmp: str, log_path) -> subprocess.Popen:
    """Start `curation run` in its own session; SIGKILL its process group once a match shard
    is done. Returns the (dead) process."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                curation_exe(),
                "run",
                cli_job.job,
                "-o",
                str(cli_job.out),
                "--num-cpus",
                "2",
                "--quiet",
            ],
            env=cli_env(ray_tmp),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        match_done = cli_job.out / "match" / "_done"
        while time.monotonic() < deadline and proc.poll() is None:
            if match_done.is_dir() and any(match_done.glob("*.json")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"run ended (rc {proc.returncode}) before a match shard was done: "
            + log_path.read_text()[-3000:]
        )
        assert any(match_done.glob("*.json")), "no match marker within 180 s"
        assert len(session_processes(proc.pid)) > 2  # driver + Ray's own processes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc


def test_driver_killed_mid_run_then_rerun_gives_identical_bytes(cli_job, tmp_path):
    ray_tmp = short_ray_tmp()
    proc = _start_and_kill_mid_run(cli_job, ray_tmp, tmp_path / "killed-run.log")
    assert proc.returncode == -signal.SIGKILL
    assert not (cli_job.out / "manifest.json").exists(), "the kill came too late to test resume"

    # nothing of that run survives: no process of its session, none using its Ray temp dir
    assert wait_no_session_processes(proc.pid) == []
    assert _processes_mentioning(ray_tmp) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # and the session cluster of the other tests is untouched
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    assert all(n["Alive"] for n in ray.nodes())

    # the folder is a partial run; status says so
    st = json.loads(run_cli(["status", cli_job.out]).stdout)
    assert st.get("complete", st.get("manifest")) is False
    done = {k: v["done"] for k, v in st["stages"].items()}
    assert done["input"] == 4 and done["ingest"] == 4 and 1 <= done["match"] <= 4
    assert done.get("balance", 0) < 4

    # rerun to completion: same bytes as a clean run
    ray_tmp = short_ray_tmp()
    try:
        cli_job.run("--num-cpus", "2", env=cli_env(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    resumed = cli_job.move_aside("resumed-after-kill")
    assert_same_tree(resumed, cli_job.clean)
