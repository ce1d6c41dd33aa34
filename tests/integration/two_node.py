"""A two-node Ray cluster on this machine for tests of what crosses nodes (shipped files).

`ray.cluster_utils.Cluster` starts a head and a worker node, 1 CPU each. The worker node is
started from `root/b`, another working directory than the driver's (`root/a`), so its workers
resolve a driver-relative path against a folder that lacks the file; the head's CPU is held by
an actor, so tasks run on the worker node. Test modules run their scenario in a subprocess
(the module run as a script, `run_scenario`), since the test process is connected to the
session cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def two_node_cluster(root: Path, worker_gpus: int = 0) -> Iterator[dict[str, Any]]:
    """Connects this process to a fresh two-node cluster, cwd `root/a`; yields
    `{"nodes": alive nodes, "head": head node id, "hold": the actor holding the head's CPU}`
    (kill `hold` to let tasks run on the head again)."""
    import ray
    from ray.cluster_utils import Cluster

    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "b").mkdir(parents=True, exist_ok=True)
    os.chdir(root / "a")
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_cpu": 1}}
    )
    try:
        os.chdir(root / "b")  # the worker node's processes start here
        cluster.add_node(num_cpus=1, num_gpus=worker_gpus)
        os.chdir(root / "a")
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()

        @ray.remote(num_cpus=1, resources={"head_cpu": 1})
        class HoldHeadCpu:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        hold = HoldHeadCpu.remote()
        head = ray.get(hold.node.remote())  # the head's one CPU is taken: tasks run elsewhere
        yield {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "head": head, "hold": hold}
    finally:
        ray.shutdown()
        cluster.shutdown()


def attempt(fn: Any) -> str:
    """`"ok"` when `fn()` returns, else the error as text (for a scenario to report)."""
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
        return f"{type(exc).__name__}: {exc}"[:2000]


def run_scenario(script: str, root: Path, timeout: float = 420, **env_extra: str) -> dict:
    """Runs `script` (a test module whose `__main__` prints its scenario's JSON as the last
    line) with `root` in a subprocess of its own process group and Ray temp dir; returns the
    JSON, or fails the test with the subprocess's output."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CURATION_SHIP_ASSETS")}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=ray_tmp,
        # the repo (curation) and tests/ (`integration.*`, as pytest imports the test modules)
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
        **env_extra,
    )
    proc = subprocess.Popen(
        [sys.executable, script, str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: killed as one if it hangs
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
    return json.loads(stdout.strip().splitlines()[-1])
