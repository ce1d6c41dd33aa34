"""Integration tests: a real local Ray cluster (2 CPUs), real files, the real CLI.

One Ray cluster is started for all of them (`ray_cluster`, autouse) and used in-process by
`curation.flows.metaclip`. CLI runs that must start their own cluster (`--num-cpus`, fault injection,
driver kills) run as subprocesses with their own `RAY_TMPDIR`, so they never touch the session
cluster, and they are killed by process group, never with `ray stop`.

Run folders embed their own absolute path (input URLs in markers, `_stage.json` and the manifest),
so runs whose bytes are compared are all made at the same path (`CliJob.out`) and then moved
aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
METADATA_ENTRIES = 20_000
# The pool every subprocess `curation run` uses: small enough to be quick on 2 cores, large enough
# that a driver kill lands mid-run.
CLI_SYNTH = {"shards": 4, "pairs_per_shard": 4000, "seed": 2, "malformed_rate": 0.01}
CLI_T = 20
CLI_SEED = 2

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def curation_exe() -> str:
    exe = Path(sys.executable).with_name("curation")
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "curation"
    return str(exe)


# -- Ray -------------------------------------------------------------------------------------------
@pytest.fixture(scope="package", autouse=True)
def ray_cluster() -> Iterator[str]:
    """A local 2-CPU Ray cluster for all integration tests; yields its GCS address.

    Package scope (this folder is a package) is the session for these tests, and it is shut down
    before tests/unit runs in the same pytest session, whose guard against starting Ray must not
    be bypassed by an already-initialized cluster (`ensure_ray` returns early then).
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
        started = True
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


# -- inputs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def small_metadata(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 20,000 entries of metadata/metadata_en.json, written to a temp file."""
    from curation.core.metadata import load_metadata, write_metadata_json

    md = load_metadata(str(REPO / "metadata" / "metadata_en.json"))
    path = tmp_path_factory.mktemp("metadata") / "metadata_small.json"
    write_metadata_json(list(md.entries[:METADATA_ENTRIES]), str(path))
    return str(path)


def job_dict(
    metadata: str,
    *,
    t: float = 20,
    seed: int = 1,
    shards: int = 3,
    pairs_per_shard: int = 3000,
    malformed_rate: float = 0.02,
    synth_seed: int | None = None,
    name: str = "it",
) -> dict[str, Any]:
    """A job spec mapping: a synthetic pool, the given metadata, balance at `t`."""
    return {
        "name": name,
        "seed": seed,
        "input": {
            "synth": {
                "shards": shards,
                "pairs_per_shard": pairs_per_shard,
                "seed": seed if synth_seed is None else synth_seed,
                "malformed_rate": malformed_rate,
            }
        },
        "metadata": metadata,
        "ingest": {"max_text_chars": 1000},
        "match": {"engine": "auto"},
        "balance": {"t": t},
    }


def write_job(path: Path, metadata: str, **kwargs: Any) -> str:
    """Write a job YAML (see `job_dict`) to `path`; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job_dict(metadata, **kwargs), sort_keys=True))
    return str(path)


# -- run folders -----------------------------------------------------------------------------------
def tree_digest(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same_tree(a: str | Path, b: str | Path) -> dict[str, str]:
    """Same file set, same bytes (nothing ignored). Returns the digest."""
    da, db = tree_digest(a), tree_digest(b)
    assert sorted(da) == sorted(db), (
        f"file sets differ: only in {a}: {sorted(set(da) - set(db))}; "
        f"only in {b}: {sorted(set(db) - set(da))}"
    )
    differ = [k for k in da if da[k] != db[k]]
    assert not differ, f"files differ between {a} and {b}: {differ}"
    assert not [k for k in da if ".tmp-" in k], "temporary files left behind"
    return da


def read_parts(folder: str | Path, columns: list[str] | None = None):
    """All part-*.parquet of a stage folder as one table (shard order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(folder).glob("part-*.parquet"))
    assert files, f"{folder} has no parts"
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


# -- subprocess CLI --------------------------------------------------------------------------------
def cli_env(ray_tmp: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: never the session cluster's address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONUNBUFFERED"] = "1"
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = ray_tmp
    env.update(extra)
    return env


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [curation_exe(), *map(str, args)],
        env=env or cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"curation {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def short_ray_tmp() -> str:
    """A short temp dir for a subprocess's Ray session (unix socket paths are length-limited)."""
    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


def session_processes(sid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of session `sid`: (pid, command line)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[3]) == sid:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append((int(d.name), cmd[:160]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def wait_no_session_processes(sid: int, timeout: float = 20) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    left = session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_processes(sid)
    return left


@dataclass
class CliJob:
    """The shared job for subprocess `curation run`s.

    Every run writes to `out` (one fixed path, so the bytes are comparable) and is then moved
    aside; `clean` is the reference: a clean run with --num-cpus 2.
    """

    job: str
    out: Path
    root: Path
    clean: Path

    def run(
        self, *extra: str, env: dict[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess:
        return run_cli(
            ["run", self.job, "-o", self.out, "--quiet", *extra], env=env, timeout=timeout
        )

    def move_aside(self, name: str) -> Path:
        dest = self.root / name
        assert not dest.exists()
        shutil.move(str(self.out), str(dest))
        return dest


@pytest.fixture(scope="session")
def cli_job(tmp_path_factory: pytest.TempPathFactory, small_metadata: str) -> Iterator[CliJob]:
    root = tmp_path_factory.mktemp("cli")
    job = write_job(
        root / "job.yaml",
        small_metadata,
        t=CLI_T,
        seed=CLI_SEED,
        **{
            "shards": CLI_SYNTH["shards"],
            "pairs_per_shard": CLI_SYNTH["pairs_per_shard"],
            "synth_seed": CLI_SYNTH["seed"],
            "malformed_rate": CLI_SYNTH["malformed_rate"],
        },
    )
    cj = CliJob(job=job, out=root / "out", root=root, clean=root / "clean-2cpu")
    ray_tmp = short_ray_tmp()
    try:
        cj.run("--num-cpus", "2", env=cli_env(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    cj.move_aside(cj.clean.name)
    manifest = json.loads((cj.clean / "manifest.json").read_text())
    assert manifest["stages"]["balance"]["rows_written"] > 0
    yield cj
