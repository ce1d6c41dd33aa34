"""A real multi-node Ray cluster and a real S3-compatible store (moto's server): the demo job on
`s3://`, a worker node killed mid-run, S3 throttling and dropped connections, two drivers on one
output, and the refusal of an output folder that some node does not see.

The cluster (`s3_fixture.RayCluster`: a head and two worker nodes, 1 CPU each, in a process of
its own) and the store (`s3_fixture.FaultyS3Server`, a thread of this process) are started once
for the module; every `curation run` is a subprocess connected with `--address`. Credentials
and the endpoint reach the CLI and every Ray worker through the environment only (`AWS_*`,
`AWS_ENDPOINT_URL_S3`): the URLs on the command line are plain `s3://bucket/...`. This
process reads the store with its own s3fs instance (explicit arguments), so its environment,
and the session cluster the other tests use, are left as they are.

Each run's outputs are compared with the same job run in-process on the single-node session
cluster into a local folder: every file, byte for byte, once the output location written into
markers, `_stage.json`, the manifest and the quarantine is replaced by `<OUT>`. The one other
difference is legitimate: `_stage.json` records each input's S3 ETag (local files have none).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, cli_env, curation_exe

pytest.importorskip("s3fs")
pytest.importorskip("moto.moto_server.werkzeug_app")

from .s3_fixture import FaultPlan, FaultyS3Server, RayCluster, s3_env, s3_filesystem  # noqa: E402

BUCKET = "curation-it"
SHARDS, PAIRS = 6, 2000


# -- fixtures --------------------------------------------------------------------------------------
@dataclass
class Store:
    server: FaultyS3Server
    endpoint: str
    fs: Any

    def tree(self, prefix: str) -> dict[str, bytes]:
        """{relative path: bytes} of every object under `prefix` (a fresh listing)."""
        self.fs.invalidate_cache()
        root = f"{BUCKET}/{prefix}"
        return {p[len(root) + 1 :]: self.fs.cat_file(p) for p in sorted(self.fs.find(root))}

    def count(self, prefix: str) -> int:
        self.fs.invalidate_cache()
        try:
            return len(self.fs.ls(f"{BUCKET}/{prefix}", refresh=True))
        except FileNotFoundError:
            return 0

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(f"{BUCKET}/{key}")


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    server = FaultyS3Server()
    endpoint = server.start()
    fs = s3_filesystem(endpoint)
    fs.mkdir(BUCKET)
    try:
        yield Store(server, endpoint, fs)
    finally:
        server.stop()


@dataclass
class Cluster:
    ray: RayCluster
    env: dict[str, str]  # a CLI subprocess's environment (store credentials and endpoint)

    @property
    def address(self) -> str:
        return self.ray.address


@pytest.fixture(scope="module")
def cluster(store: Store) -> Iterator[Cluster]:
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths
    env = cli_env(tmp, **s3_env(store.endpoint))
    rc = RayCluster(tmp, env, workers=2)
    assert rc.start_nodes == 3
    try:
        yield Cluster(rc, env)
    finally:
        rc.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory: pytest.TempPathFactory) -> str:
    """jobs/demo.yaml with a smaller pool (6 x 2,000 pairs; same seed, metadata, t)."""
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["input"]["synth"].update(shards=SHARDS, pairs_per_shard=PAIRS)
    spec.pop("output", None)
    path = tmp_path_factory.mktemp("cluster_s3") / "demo_small.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=True))
    return str(path)


@pytest.fixture(scope="module")
def reference(demo_job: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job run in-process on the single-node session cluster, into a local folder."""
    from curation.config.job import load_job
    from curation.flows.job import run_job

    out = tmp_path_factory.mktemp("cluster_s3_ref") / "ref"
    run_job(load_job(demo_job), str(out), progress=False)
    return out


# -- helpers ---------------------------------------------------------------------------------------
def _cmd(job: str, out: str, address: str) -> list[str]:
    return [curation_exe(), "run", job, "-o", out, "--address", address, "--quiet"]


def run_cli(cluster: Cluster, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


class Background:
    """A `curation run` subprocess in its own session (killed by its process group at the end)."""

    def __init__(self, cluster: Cluster, args: list[str], log: Path) -> None:
        self.log = log
        self._f = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, env=cluster.env, cwd=REPO, stdout=self._f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._f.close()
        return rc, self.log.read_text(errors="replace")


def _norm(data: bytes, out: str) -> bytes:
    return data.replace(out.encode(), b"<OUT>")


def _drop_etags(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_etags(v) for k, v in obj.items() if k != "etag"}
    if isinstance(obj, list):
        return [_drop_etags(v) for v in obj]
    return obj


def assert_same_as_reference(store: Store, prefix: str, ref: Path) -> dict[str, bytes]:
    """Every object under `prefix` equals the reference folder's file of the same name."""
    got = store.tree(prefix)
    want = {str(p.relative_to(ref)): p.read_bytes() for p in sorted(ref.rglob("*")) if p.is_file()}
    assert sorted(got) == sorted(want), (
        f"file sets differ: only on S3: {sorted(set(got) - set(want))}; "
        f"only local: {sorted(set(want) - set(got))}"
    )
    s3_out, local_out = f"s3://{BUCKET}/{prefix}", str(ref)
    etags = 0
    for name in got:
        a, b = _norm(got[name], s3_out), _norm(want[name], local_out)
        if name.endswith("_stage.json"):
            ja, jb = json.loads(a), json.loads(b)
            etags += json.dumps(ja).count('"etag"')
            assert _drop_etags(ja) == jb, f"{name} differs beyond the inputs' S3 ETags"
        else:
            assert a == b, f"{name} differs from the reference run's"
    assert etags > 0  # the S3 run did record its inputs' ETags
    return got


def assert_accounting(manifest: dict[str, Any]) -> None:
    for name in ("ingest", "match", "balance"):
        st = manifest["stages"][name]
        assert st["rows_read"] == st["rows_written"] + sum(st["rows_dropped"].values()), name
    assert manifest["stages"]["ingest"]["rows_read"] > 0


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


# -- tests -----------------------------------------------------------------------------------------
def test_demo_job_on_s3_across_three_nodes_equals_a_local_run(
    store: Store, cluster: Cluster, demo_job: str, reference: Path
) -> None:
    proc = run_cli(cluster, _cmd(demo_job, f"s3://{BUCKET}/run1", cluster.address))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"curated:  s3://{BUCKET}/run1/balance/" in proc.stdout
    got = assert_same_as_reference(store, "run1", reference)
    manifest = json.loads(got["manifest.json"])
    assert_accounting(manifest)
    assert manifest["stages"]["ingest"]["shards"] == SHARDS
    assert not [n for n in got if n.startswith("_lease") or "sentinel" in n or ".tmp-" in n]


def test_a_worker_node_killed_mid_run(
    store: Store, cluster: Cluster, demo_job: str, reference: Path, tmp_path: Path
) -> None:
    job = Background(
        cluster, _cmd(demo_job, f"s3://{BUCKET}/run2", cluster.address), tmp_path / "run.log"
    )
    killed_at = None

    def partly_done() -> bool:
        nonlocal killed_at
        if job.proc.poll() is not None:
            return True
        for stage in ("ingest", "match", "balance"):
            n = store.count(f"run2/{stage}/_done")
            if 0 < n < SHARDS:
                killed_at = (stage, n)
                return True
        return False

    try:
        wait_for(partly_done, 240, "some but not all markers of a stage", step=0.05)
        assert killed_at is not None, "the job finished before a node could be killed"
        killed = cluster.ray.command("kill")
        cluster.ray.command("add")  # a fresh node, so the cluster keeps 3 for the next tests
    finally:
        rc, log = job.wait()
    assert rc == 0, log[-4000:]
    assert cluster.ray.command("nodes")["nodes"] == 3
    assert killed["busy"], "no task was running on the worker nodes when one was to be killed"
    got = assert_same_as_reference(store, "run2", reference)
    assert_accounting(json.loads(got["manifest.json"]))
    print(
        f"worker node killed with {killed_at[1]}/{SHARDS} {killed_at[0]} markers written, "
        f"while running {killed['busy']}"
    )


def test_s3_throttling_and_dropped_connections(
    store: Store, cluster: Cluster, demo_job: str, reference: Path
) -> None:
    # the first request of each (method, key) gets 503 SlowDown; every 7th request loses its
    # connection before the store sees it, every 11th after the store did it (the answer is lost)
    store.server.faults(FaultPlan(first_slowdown=True, drop_before=7, drop_after=11))
    try:
        proc = run_cli(cluster, _cmd(demo_job, f"s3://{BUCKET}/run3", cluster.address))
        counts = store.server.counts()
    finally:
        store.server.faults(None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert counts.get("slowdown", 0) > 50, counts
    assert counts.get("drop_before", 0) > 20 and counts.get("drop_after", 0) > 20, counts
    got = assert_same_as_reference(store, "run3", reference)  # quarantine.jsonl included
    manifest = json.loads(got["manifest.json"])
    assert_accounting(manifest)
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["quarantined"] == ref_manifest["quarantined"]
    print(f"faults injected: {counts}")


def test_a_second_driver_on_the_same_output_is_refused(
    store: Store, cluster: Cluster, demo_job: str, reference: Path, tmp_path: Path
) -> None:
    out = f"s3://{BUCKET}/run4"
    first = Background(cluster, _cmd(demo_job, out, cluster.address), tmp_path / "first.log")
    try:
        wait_for(lambda: store.exists("run4/_lease.json") or first.proc.poll() is not None, 120,
                 "the first driver's lease")  # fmt: skip
        assert first.proc.poll() is None, "the first run ended before the second started"
        second = run_cli(cluster, _cmd(demo_job, out, cluster.address))
        still_running = first.proc.poll() is None
    finally:
        rc, log = first.wait()
    assert second.returncode == 1, second.stderr[-3000:]
    assert re.search(r"Error: .*run4 is being written by pid \d+ on host", second.stderr)
    assert "remove s3://" in second.stderr and "_lease.json" in second.stderr
    assert still_running, "the second driver was not refused while the first one ran"
    assert rc == 0, log[-4000:]
    got = assert_same_as_reference(store, "run4", reference)
    assert_accounting(json.loads(got["manifest.json"]))


_RACE = textwrap.dedent(
    """
    import json, os, sys, time
    from curation.io.parts import LeaseError, OutputLease
    url, start, flag = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    time.sleep(max(0.0, start - time.time()))
    lease = OutputLease(url, refresh_s=0)
    tried = time.time()
    try:
        lease.acquire()
    except LeaseError:
        print(json.dumps({"won": False, "tried": tried}), flush=True)
        sys.exit(0)
    print(json.dumps({"won": True, "tried": tried}), flush=True)
    deadline = time.time() + 120
    while not os.path.exists(flag) and time.time() < deadline:  # hold it: the others try
        time.sleep(0.05)
    lease.release()
    """
)


def test_racing_drivers_get_one_lease_on_s3(store: Store, cluster: Cluster, tmp_path: Path) -> None:
    """Drivers that try at the same instant: the conditional PUT (`If-None-Match: *`) lets one
    in (a check-then-write lease would let several). The winner holds the lease until every
    other has tried."""
    url = f"s3://{BUCKET}/race/out"
    flag = tmp_path / "release"
    start = time.time() + 4.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, url, str(start), str(flag)],
            env=cluster.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    try:
        lines = [p.stdout.readline() for p in procs]  # type: ignore[union-attr]
    finally:
        flag.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(line) for line in lines]
    assert sorted(r["won"] for r in results) == [False, False, False, True]
    assert not store.exists("race/out/_lease.json")
    spread = max(r["tried"] for r in results) - min(r["tried"] for r in results)
    print(f"4 drivers tried within {spread * 1000:.0f} ms; one lease")


_VISIBILITY = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import fsspec, ray
    from fsspec.implementations.local import LocalFileSystem
    from curation.executor.runner import check_output_location

    class DriverOnlyFS(LocalFileSystem):
        # local files under the name driveronly://, known to this process only (never
        # registered in a Ray worker)
        protocol = ("driveronly",)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            if path.startswith("driveronly://"):
                path = path[len("driveronly://") :]
            return LocalFileSystem._strip_protocol(path)

        def unstrip_protocol(self, name):
            return "driveronly://" + self._strip_protocol(name)

    fsspec.register_implementation("driveronly", DriverOnlyFS)
    shared, private = sys.argv[2], sys.argv[3]
    ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
    result = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    if private != "-":  # a tmpfs mounted in this process's own mount namespace
        subprocess.run(["mount", "-t", "tmpfs", "curation-test", private], check=True)
    for key, url in (
        ("shared", shared),
        ("private", private),
        ("driver_only", "driveronly://" + shared + "/other"),
    ):
        if url == "-":
            continue
        try:
            check_output_location(url)
            result[key] = None
        except ValueError as exc:
            result[key] = str(exc)
        result[key + "_left"] = sorted(os.listdir(url.replace("driveronly://", "")))
    print(json.dumps(result))
    """
)


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--fork", "true"], capture_output=True, timeout=20
    )
    return probe.returncode == 0


def test_an_output_some_nodes_do_not_see_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """The visibility probe: a folder every node sees passes; a tmpfs that only the driver has
    mounted (its own mount namespace, as a laptop's disk is to a remote cluster) and a filesystem
    registered only in the driver are refused, naming every node that cannot see them."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "other").mkdir()
    private = tmp_path / "private"
    private.mkdir()
    unshare = _can_unshare()
    args = [sys.executable, "-c", _VISIBILITY, cluster.address, str(shared)]
    if unshare:
        args = ["unshare", "--mount", "--propagation", "private", "--fork", *args, str(private)]
    else:
        args.append("-")
    proc = subprocess.run(
        args, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["nodes"] == 3
    assert res["shared"] is None  # every node sees it: no error
    assert res["shared_left"] == ["other"]  # and the sentinel is gone
    checks = ["driver_only"] + (["private"] if unshare else [])
    for key in checks:
        msg = res[key]
        assert msg is not None, f"{key}: not refused"
        assert "is not visible from every Ray node" in msg
        assert "3 of 3 nodes could not read it back" in msg
        assert len(re.findall(r"\d+\.\d+\.\d+\.\d+ \(node [0-9a-f]{8}\)", msg)) == 3, msg
        assert "write to shared storage (NFS) or an object store (s3://, gs://)" in msg
    if unshare:
        assert "the file is not there" in res["private"]
        assert res["private_left"] == []  # removed, in the driver's view too
        assert list(private.iterdir()) == []  # and nothing written to the host's folder
    assert "driveronly" in res["driver_only"]  # the workers' error: protocol not known
    print("refused:", res["private"] if unshare else res["driver_only"])
    if not unshare:
        pytest.skip("unshare --mount is not allowed here: only the driver-only filesystem ran")


_CACHE_BUG = textwrap.dedent(
    """
    import subprocess, sys
    from curation.core import fsio
    folder = sys.argv[1]
    fsio.atomic_write_bytes(folder + "/a.txt", b"a")
    fs, path = fsio.url_to_fs(folder)
    fs.ls(path)  # e.g. the stage folder listed for stale temporaries
    # another process (a Ray worker) writes a file there
    subprocess.run([sys.executable, "-c",
        "from curation.core import fsio; fsio.atomic_write_bytes(%r, b'b')" % (folder + "/b.txt")],
        check=True)
    print(fsio.exists(folder + "/b.txt"))
    """
)


class StaleListing(AssertionError):
    """The driver did not see a file another process wrote."""


def test_driver_sees_files_workers_wrote_after_it_listed_their_folder(
    store: Store, cluster: Cluster
) -> None:
    """fsspec's s3fs caches listings by default: curation turns that off (`fsio`), else the
    driver misses parts and markers Ray workers wrote after it listed their folder."""
    env = dict(cluster.env)
    proc = subprocess.run(
        [sys.executable, "-c", _CACHE_BUG, f"s3://{BUCKET}/cache-bug"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip() != "True":
        raise StaleListing(f"fsio.exists saw no file another process wrote: {proc.stdout}")
