"""A real S3-compatible store (moto's server) with fault injection, and a multi-node Ray cluster
on this machine, for tests/integration/test_cluster_s3.py.

- `FaultyS3Server`: moto's S3 server on 127.0.0.1 and a free port, from a thread of the test
  process, behind a WSGI layer that can fail requests the way S3 and networks do: `503
  SlowDown` before the request reaches the store, the connection dropped before it does, or
  the connection dropped after the store has done the request (the client never sees the
  answer and sends it again). Faults are off until `faults(...)` turns them on.
- `python s3_fixture.py cluster TMPDIR`: a `ray.cluster_utils.Cluster` (a head node and worker
  nodes, 1 CPU each) in a process of its own, so its environment (the S3 endpoint and
  credentials every Ray worker inherits, `RAY_TMPDIR`) never touches the test process and
  its address file never lands in /tmp/ray (where a plain `ray.init()` would find it). It
  prints one JSON line with the GCS address, then obeys stdin lines: `kill` (a worker node
  running a task, killed without grace), `add` (a fresh 1-CPU node), `nodes` (alive count);
  EOF shuts it down.
  `RayCluster` drives it from the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ACCESS_KEY = "curation-test-key"
SECRET_KEY = "curation-test-secret"
REGION = "us-east-1"


# -- the store -------------------------------------------------------------------------------------
@dataclass
class FaultPlan:
    """Which requests fail. Every request is counted; `first_slowdown` fails the first request of
    each (method, path) with 503 SlowDown; then every `drop_before`-th request has its connection
    dropped unanswered and every `drop_after`-th is done by the store and its answer dropped
    (0 = never)."""

    first_slowdown: bool = True
    drop_before: int = 0
    drop_after: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)
    n: int = 0


class FaultInjector:
    """WSGI middleware in front of moto's app (see the module doc)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.plan: FaultPlan | None = None
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _decide(self, environ: dict[str, Any]) -> str:
        with self.lock:
            self.counts["requests"] += 1
            plan = self.plan
            if plan is None:
                return "pass"
            plan.n += 1
            key = (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
            if plan.first_slowdown and key not in plan.seen:
                plan.seen.add(key)
                return "slowdown"
            if plan.drop_before and plan.n % plan.drop_before == 0:
                return "drop_before"
            if plan.drop_after and plan.n % plan.drop_after == 0:
                return "drop_after"
            return "pass"

    @staticmethod
    def _drop(environ: dict[str, Any]) -> None:
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        what = self._decide(environ)
        if what != "pass":
            with self.lock:
                self.counts[what] += 1
        if what == "slowdown":
            _read_body(environ)
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message>"
                b"<RequestId>fault</RequestId></Error>"
            )
            start_response(
                "503 Slow Down",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
            )
            return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]
        if what == "drop_before":
            self._drop(environ)
            start_response("500 Dropped", [("Content-Length", "0")])
            return [b""]
        if what == "drop_after":
            out = b"".join(self.app(environ, lambda *a, **k: None))  # the store does it...
            self._drop(environ)  # ...and the answer is lost
            start_response("500 Dropped", [("Content-Length", "0")])
            return [out[:0]]
        return self.app(environ, start_response)


def _read_body(environ: dict[str, Any]) -> None:
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    length = environ.get("CONTENT_LENGTH")
    try:
        if length:
            stream.read(int(length))
        elif environ.get("wsgi.input_terminated"):
            stream.read()
    except (OSError, ValueError):
        pass


class FaultyS3Server:
    """moto's S3 server with a `FaultInjector`, on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        self.injector: FaultInjector | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.injector = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, self.injector, threaded=True, request_handler=Quiet
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def faults(self, plan: FaultPlan | None) -> None:
        assert self.injector is not None
        with self.injector.lock:
            self.injector.plan = plan
            self.injector.counts.clear()

    def counts(self) -> dict[str, int]:
        assert self.injector is not None
        with self.injector.lock:
            return dict(self.injector.counts)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the store with plain `s3://bucket/...` URLs: credentials
    and the endpoint, through the environment only (botocore reads `AWS_ENDPOINT_URL_S3`)."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def s3_filesystem(endpoint: str) -> Any:
    """An s3fs filesystem on the store for the test process itself (explicit arguments, so the
    test process's environment stays as it is)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        endpoint_url=endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
    )


# -- the cluster -----------------------------------------------------------------------------------
HEAD_SYSTEM_CONFIG = {
    # a killed node is noticed in seconds, not the default ~30 s
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


#: Titles of a raylet's children that are not workers running a task.
_NOT_TASKS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _busy_workers(raylet_pid: int) -> list[str]:
    """Titles of the raylet's worker processes that run a task (`ray::<task>`, not IDLE)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != raylet_pid:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith("ray::") and not title.startswith(_NOT_TASKS):
            out.append(title)
    return out


def _busy_node(nodes: list[Any], timeout: float) -> tuple[Any, list[str]]:
    """A worker node with a task running on it right now (the first one, if none shows up)."""
    from ray._private import ray_constants

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
            busy = _busy_workers(raylet)
            if busy:
                return node, busy
        time.sleep(0.02)
    return nodes[0], []


def _cluster_main(tmp: str, workers: int) -> None:
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 1, "include_dashboard": False, "object_store_memory": 200 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "_system_config": HEAD_SYSTEM_CONFIG},
    )
    nodes = [cluster.add_node(**node_args) for _ in range(workers)]
    cluster.wait_for_nodes()

    def alive() -> int:
        return sum(1 for n in cluster.global_state.node_table() if n["Alive"])

    print(json.dumps({"address": cluster.address, "nodes": alive()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "kill":
            node, busy = _busy_node(nodes, timeout=30)
            nodes.remove(node)
            cluster.remove_node(node, allow_graceful=False)
            print(json.dumps({"killed": node.node_id, "busy": busy}), flush=True)
        elif cmd == "add":
            nodes.append(cluster.add_node(**node_args))
            cluster.wait_for_nodes()
            print(json.dumps({"added": nodes[-1].node_id}), flush=True)
        elif cmd == "nodes":
            print(json.dumps({"nodes": alive()}), flush=True)
    cluster.shutdown()


class RayCluster:
    """The cluster process (`_cluster_main`), in its own session (killed by its process group at
    the end, never with `ray stop`)."""

    def __init__(self, tmp: str, env: dict[str, str], workers: int = 2) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "cluster", tmp, str(workers)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(tmp, "cluster.log"), "wb"),  # noqa: SIM115
            text=True,
            start_new_session=True,
        )
        first = self._reply(timeout=180)
        self.address: str = first["address"]
        self.start_nodes: int = first["nodes"]

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith("{"):
                    return json.loads(line)
            elif self.proc.poll() is not None:
                break
        with open(os.path.join(self.tmp, "cluster.log"), errors="replace") as f:
            log = f.read()[-4000:]
        raise RuntimeError(f"the Ray cluster process did not answer:\n{log}")

    def command(self, cmd: str, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # whatever of its session is left (raylets, workers): by its process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "cluster":
        _cluster_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} cluster TMPDIR WORKERS")
