"""The one place that knows Ray: maps stages over shards, resumably, with bounded memory.

- `run_stage(stage, shards, stage_dir)`: one Ray task per shard not yet done. In the worker the
  stage is set up once and cached (keyed by the object-store copy of this run's stage, so a
  worker that serves many shards loads its automaton or model once), the shard is read
  (`stage.load(shard)` when the stage has one, else the Parquet part; a `Source` reads its
  input itself), `process` runs, and the part is written, then the marker.
- Assets: on a cluster of several nodes, the local files a stage's setup opens
  (`Stage.assets()`) are read once by the driver and shipped through the object store
  (`ship_assets`); each worker writes them once into its node's content-addressed cache and
  the stage opens those copies (`Stage.use_assets`), so no worker needs the driver's disk.
- `run_tasks(task, shards, stage_dir)`: the same scheduling for plain per-shard functions that
  write their own outputs (synthetic pools, img2dataset re-keying).
- `run_actor_stage`: CPU producer tasks feeding a pool of actors (GPU stages, `resources.actor`).
- `reduce_over_shards` / `sum_over_shards`: reductions (entry counts, score histograms)
  computed by a tree of tasks; only the final value reaches the driver.
- `merge_tree`: a tree of tasks over small values naming files (sorted runs merged into one
  file); the driver holds references, the tasks move the data.

Transient storage errors (`OSError`) are retried with exponential backoff inside the task and
then by Ray; they are never recorded as damage, and a shard is marked done only after its part
is in place. Outputs depend only on the shard, so a retry writes identical bytes.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from curation.core.stage import Shard, Source, Stage
from curation.io.parts import done_and_todo, finish_part, read_part

#: Attempts per shard inside one task for transient I/O errors, and the first backoff (s).
IO_ATTEMPTS = int(os.environ.get("CURATION_IO_ATTEMPTS", "4"))
IO_BACKOFF_S = float(os.environ.get("CURATION_IO_BACKOFF_S", "1.0"))
#: Ray-level retries of a task (worker death, exhausted I/O attempts).
TASK_RETRIES = 3
_CACHE_SIZE = 4
_WORKER_CACHE: collections.OrderedDict[str, Any] = collections.OrderedDict()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray cluster if neither is given."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


#: fsspec protocols whose files live in one process's memory: a Ray worker's writes there are
#: lost to the driver and to every other worker.
PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})


def check_output_location(url: str) -> None:
    """Refuse an output URL whose filesystem is not shared between processes (`memory://`), or
    (when Ray is initialized with more than one alive node) that some node does not see
    (`check_output_visible`).

    Parts are written by Ray workers, which are always processes of their own: on a
    process-local filesystem the run would finish and keep nothing.
    """
    from fsspec.core import url_to_fs
    from fsspec.implementations.memory import MemoryFileSystem

    fs, _ = url_to_fs(url)
    protos = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if isinstance(fs, MemoryFileSystem) or protos & PROCESS_LOCAL_PROTOCOLS:
        raise ValueError(
            f"output {url}: {type(fs).__name__} keeps files in one process's memory, and "
            "parts are written by Ray worker processes, so nothing would be kept; write to a "
            "local folder (one machine) or an object store (s3://, gs://)"
        )
    check_output_visible(url)


#: Seconds the visibility probe waits for every node's answer.
VISIBILITY_TIMEOUT_S = float(os.environ.get("CURATION_VISIBILITY_TIMEOUT_S", "120"))
_SENTINEL = ".curation-sentinel"


def _probe_sentinel(url: str, expected: str) -> tuple[bool, str]:
    """On one node: (True, "") when `url` is there with the text `expected`, else (False, what
    was seen instead)."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as f:
            got = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return False, "the file is not there"
    except Exception as exc:  # no credentials, package or mount on that node: not visible
        return False, f"{type(exc).__name__}: {exc}"[:300]
    return (True, "") if got == expected else (False, "the file there has other content")


def _node_label(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {str(node.get('NodeID', '?'))[:8]})"


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_output_visible(url: str, timeout_s: float | None = None) -> None:
    """Refuse an output folder that some alive Ray node does not see.

    The driver writes `OUT/.curation-sentinel.tmp-curation-<pid>-<hex>` (a temporary name:
    the lease removes it if the driver dies before it does) holding a random token, and a
    zero-CPU task pinned to each alive node (`NodeAffinitySchedulingStrategy(soft=False)`)
    reads it back. A local folder on a multi-machine cluster, or credentials or an endpoint
    that only the driver has, fail here, before any work, instead of parts written where the
    driver never reads them. Nothing is done when Ray is not initialized or has one alive node
    (one cheap call). A node that leaves meanwhile is left out; one that does not answer
    within `timeout_s` counts as not seeing the folder.
    """
    import sys

    if "ray" not in sys.modules:  # never imported: certainly not initialized
        return
    import ray

    if not ray.is_initialized():
        return
    nodes = _alive_nodes()
    if len(nodes) <= 1:
        return
    import contextlib
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from curation.core import fsio

    fs, path = fsio.url_to_fs(url)
    name = f"{_SENTINEL}{fsio.TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sentinel = fsio.full_url(fs, f"{path.rstrip('/')}/{name}")
    token = uuid.uuid4().hex
    fsio.atomic_write_bytes(sentinel, token.encode())
    timeout_s = VISIBILITY_TIMEOUT_S if timeout_s is None else timeout_s
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_sentinel)
    blind: list[str] = []
    try:
        refs = {
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                name="check_output_visible",
            ).remote(sentinel, token): n
            for n in nodes
        }
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ok, why = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if not any(n["NodeID"] == refs[ref]["NodeID"] for n in _alive_nodes()):
                    continue  # the node left the cluster meanwhile: it will write nothing
                ok, why = False, f"the check failed: {type(exc).__name__}"
            if not ok:
                blind.append(f"{_node_label(refs[ref])}: {why}")
        for ref in late:
            with contextlib.suppress(Exception):  # finished or gone meanwhile
                ray.cancel(ref, force=True)
            blind.append(f"{_node_label(refs[ref])}: no answer within {timeout_s:.0f} s")
    finally:
        # if this fails, the next lease on OUT removes it (a temporary name)
        with contextlib.suppress(Exception):
            fs.rm(fsio.url_to_fs(sentinel)[1])
    if blind:
        raise ValueError(
            f"output {url} is not visible from every Ray node: the driver wrote {name} there "
            f"and {len(blind)} of {len(nodes)} nodes could not read it back ("
            + "; ".join(sorted(blind))
            + "); parts written on those nodes would be lost to the run: write to shared "
            "storage (NFS) or an object store (s3://, gs://) that every node reaches, with its "
            "credentials on every node"
        )


def cluster_resources() -> dict[str, float]:
    """The Ray cluster's total resources (CPU, GPU, ...)."""
    import ray

    return dict(ray.cluster_resources())


class TransientIOError(OSError):
    """A storage error that persisted through a task's own retries; Ray retries the task."""


def with_io_retries(fn: Callable[[], Any], what: str) -> Any:
    """`fn()`, retried with exponential backoff on `OSError` (a transient storage error).

    A missing file is not transient: `FileNotFoundError` is raised at once. After the last
    attempt the error propagates (Ray retries the task; then the run fails loudly).
    """
    from curation.core.retry import oserror_not_missing, with_backoff

    return with_backoff(
        fn,
        attempts=IO_ATTEMPTS,
        first_delay_s=IO_BACKOFF_S,
        transient=oserror_not_missing,
        give_up=lambda exc, n: TransientIOError(
            f"{what}: {type(exc).__name__}: {exc} ({n} attempts)"
        ),
    )


#: When local asset files go to the workers through the object store: "auto" (only when the
#: cluster has more than one alive node: one machine's workers read the driver's disk),
#: "always" or "never" (CURATION_SHIP_ASSETS).
SHIP_ASSETS_MODES = ("auto", "always", "never")


def _ship_mode() -> str:
    mode = os.environ.get("CURATION_SHIP_ASSETS", "auto").strip().lower() or "auto"
    if mode not in SHIP_ASSETS_MODES:
        raise ValueError(f"CURATION_SHIP_ASSETS must be one of {SHIP_ASSETS_MODES}, got {mode!r}")
    return mode


def ship_assets(stage: Stage) -> dict[str, tuple[Any, Any]]:
    """The stage's local asset files, each read once here and put in the object store:
    {name: (AssetBlob, ObjectRef of its bytes)}; empty when there is nothing to ship.

    Only local paths (and `file://`) are shipped: shared URLs and `bundled:` resources are
    opened by the workers themselves, and so is a path that is not a file on the driver (it
    may be one on every node). By default (`CURATION_SHIP_ASSETS=auto`) nothing is shipped on
    a one-node cluster, whose workers read the same disk as the driver; a file over
    `core.assets.max_asset_bytes()` is refused with a ValueError. The stage keeps its driver
    paths (its fingerprint is unchanged); workers switch to local copies in `_use_assets`.
    """
    return ship_files(stage.assets())


def ship_files(files: dict[str, str | None]) -> dict[str, tuple[Any, Any]]:
    """`ship_assets` for named files that are not a stage's (a checkpoint `curation eval`
    loads): {name: (AssetBlob, ObjectRef)}, empty on a one-node cluster (by default); a worker
    gets its local copies with `local_files`."""
    from curation.core.assets import is_shared, local_path, read_asset

    mode = _ship_mode()
    if mode == "never":
        return {}
    local = {k: u for k, u in files.items() if u and not is_shared(u)}
    local = {k: u for k, u in local.items() if os.path.isfile(local_path(u))}
    if not local:
        return {}
    import ray

    if mode == "auto" and len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
        return {}
    by_path: dict[str, tuple[Any, Any]] = {}
    out: dict[str, tuple[Any, Any]] = {}
    for name, url in sorted(local.items()):
        path = local_path(url)
        if path not in by_path:
            blob, data = read_asset(name, url)
            by_path[path] = (blob, ray.put(data))
            del data
        blob, ref = by_path[path]
        out[name] = (blob, ref)
    return out


def local_files(shipment: dict[str, tuple[Any, Any]] | None) -> dict[str, str]:
    """In a worker: {name: local path} of the shipped files, each written once into this
    node's cache (`core.assets.materialize`); empty when nothing was shipped."""
    if not shipment:
        return {}
    import ray

    from curation.core.assets import materialize

    return {
        name: materialize(blob, lambda ref=ref: ray.get(ref))
        for name, (blob, ref) in shipment.items()
    }


def _use_assets(stage: Stage, shipment: dict[str, tuple[Any, Any]] | None) -> None:
    """In a worker: the shipped assets written once into this node's cache
    (`core.assets.materialize`) and the stage switched to those copies."""
    if shipment:
        stage.use_assets(local_files(shipment))


def _set_up(box: list[Any]) -> Stage:
    """The stage in `box` (its ObjectRef, boxed so Ray does not resolve it; then the assets
    shipped with it, if any), set up once per worker process and cached by that ref."""
    import ray

    key = box[0].hex()
    stage = _WORKER_CACHE.get(key)
    if stage is None:
        stage = ray.get(box[0])
        _use_assets(stage, box[1] if len(box) > 1 else None)
        stage.setup()
        _WORKER_CACHE[key] = stage
        while len(_WORKER_CACHE) > _CACHE_SIZE:
            _WORKER_CACHE.popitem(last=False)
    else:
        _WORKER_CACHE.move_to_end(key)
    return stage


def _shard_task(shard: Shard, stage_dir: str, box: list[Any], part_options: dict) -> dict:
    """Ray task body: one shard through one stage, then the part and the marker."""
    stage = _set_up(box)

    def body() -> dict:
        if isinstance(stage, Source):
            out = stage.read(shard)
        else:
            load = getattr(stage, "load", None)
            table = load(shard) if load is not None else read_part(shard.input)
            out = stage.process(table)
        return finish_part(
            stage_dir,
            shard,
            out.table,
            out.counts,
            parquet=part_options,
            **({"quarantine": out.quarantine} if out.quarantine else {}),
            **out.extra,
        )

    return with_io_retries(body, f"{stage.name} {shard.input}")


def run_stage(
    stage: Stage,
    shards: Sequence[Shard],
    stage_dir: str,
    *,
    fp: dict[str, Any],
    overwrite: bool = False,
    part_options: dict[str, Any] | None = None,
    max_in_flight: int | None = None,
    progress: bool = True,
    check_inputs: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run `stage` over every shard not yet done; each shard's marker, in shard order.

    The stage object goes to the object store once; every task of this run shares it.
    `check_inputs`: redo a done shard whose input changed after its marker (for inputs from
    outside the run; a job's own earlier stages are fingerprinted upstream instead).
    """
    import ray

    shipment = ship_assets(stage)
    box = [ray.put(stage), *([shipment] if shipment else [])]
    return _schedule(
        stage.name,
        stage_dir,
        shards,
        _shard_task,
        (box, part_options or {}),
        fp=fp,
        overwrite=overwrite,
        num_cpus=stage.resources.cpus,
        num_gpus=stage.resources.gpus,
        max_in_flight=max_in_flight,
        progress=progress,
        check_inputs=check_inputs,
    )


def run_tasks(
    name: str,
    stage_dir: str,
    shards: Sequence[Shard],
    task: Callable[..., dict[str, Any]],
    args: tuple = (),
    *,
    fp: dict[str, Any],
    overwrite: bool = False,
    num_cpus: float = 1,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run `task(shard, stage_dir, *args)` (which writes its output and marker) per shard.

    A shard's "input" here is the task's own working file (a synthetic shard it writes, a
    staged table), so it is not checked for being newer than the marker.
    """
    return _schedule(
        name,
        stage_dir,
        shards,
        task,
        args,
        fp=fp,
        overwrite=overwrite,
        num_cpus=num_cpus,
        max_in_flight=max_in_flight,
        progress=progress,
        check_inputs=False,
    )


def _schedule(
    name: str,
    stage_dir: str,
    shards: Sequence[Shard],
    task: Callable[..., dict[str, Any]],
    args: tuple,
    *,
    fp: dict[str, Any],
    overwrite: bool,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_in_flight: int | None = None,
    progress: bool = True,
    check_inputs: bool = True,
) -> dict[str, dict[str, Any]]:
    import ray

    done, todo = done_and_todo(stage_dir, shards, fp, overwrite, check_inputs)
    remote = ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_retries=TASK_RETRIES,
        retry_exceptions=[TransientIOError],
    )(task)
    cpus = int(ray.available_resources().get("CPU", 1)) or 1
    limit = max_in_flight or max(2, 2 * cpus)
    bar = Progress(name, len(shards), len(done), enabled=progress)
    pending: dict[Any, Shard] = {}
    queue = collections.deque(todo)
    refs_args = [ray.put(a) if _is_large(a) else a for a in args]
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                s = queue.popleft()
                pending[remote.remote(s, stage_dir, *refs_args)] = s
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                s = pending.pop(ref)
                stats = ray.get(ref)
                done[s.name] = stats
                bar.shard_done(stats)
    finally:
        bar.close()
    return {s.name: done[s.name] for s in shards}


def _leaf_task(fn: Callable[[Any], Any], items: Sequence[Any], combine: Callable) -> Any:
    """Ray task body: `fn` over a batch of items (I/O errors retried), combined locally."""
    acc = None
    for item in items:
        value = with_io_retries(lambda item=item: fn(item), str(item))
        acc = value if acc is None else combine(acc, value)
    return acc


def _combine_task(combine: Callable[[Any, Any], Any], *parts: Any) -> Any:
    acc = parts[0]
    for p in parts[1:]:
        acc = combine(acc, p)
    return acc


def _add(a: Any, b: Any) -> Any:
    return a + b


#: Items one leaf task reduces at most, and the fan-in of the combining tree.
REDUCE_BATCH = 256
REDUCE_FAN_IN = 16


def reduce_over_shards(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    combine: Callable[[Any, Any], Any] = _add,
    *,
    batch: int | None = None,
    fan_in: int = REDUCE_FAN_IN,
) -> Any:
    """`combine(fn(item) for item in items)` computed entirely by Ray tasks, as a tree.

    Leaf tasks each reduce a batch of consecutive items; combining tasks merge up to `fan_in`
    results at a time until one is left, and only that one reaches the driver. The driver
    holds object references (O(items / batch)), never the per-item results: a dense count
    vector per shard at 10^5 shards is summed on the cluster, not in the driver. `combine`
    must be associative; the tree's shape depends only on `len(items)`, so a floating-point
    reduction is deterministic too. Returns None for no items.
    """
    import ray

    items = list(items)
    if not items:
        return None
    if batch is None:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        batch = max(1, min(REDUCE_BATCH, -(-len(items) // (4 * cpus))))
    opts = {"num_cpus": 1, "max_retries": TASK_RETRIES, "retry_exceptions": [TransientIOError]}
    leaf = ray.remote(**opts)(_leaf_task)
    node = ray.remote(**opts)(_combine_task)
    fn_ref, combine_ref = ray.put(fn), ray.put(combine)
    refs = [
        leaf.remote(fn_ref, items[i : i + batch], combine_ref) for i in range(0, len(items), batch)
    ]
    while len(refs) > 1:
        refs = [
            node.remote(combine_ref, *refs[i : i + fan_in]) if len(refs[i : i + fan_in]) > 1
            else refs[i]
            for i in range(0, len(refs), fan_in)
        ]  # fmt: skip
    return ray.get(refs[0])


def sum_over_shards(
    fn: Callable[[str], np.ndarray], urls: Sequence[str], size: int, dtype: Any = np.uint64
) -> np.ndarray:
    """Σ fn(url) over `urls` (arrays of `size`), reduced by a tree of Ray tasks."""
    total = reduce_over_shards(fn, urls)
    if total is None:
        return np.zeros(size, dtype=dtype)
    return np.asarray(total, dtype=dtype)


def map_shards(
    fn: Callable[..., Any],
    shards: Sequence[Any],
    *args: Any,
    num_gpus: float = 0,
    progress: str | None = None,
) -> list[Any]:
    """[fn(shard, *args)] computed by Ray tasks (results in shard order), I/O errors retried;
    each task holds one CPU and `num_gpus` GPUs. `progress`: the name of a bar of tasks done."""
    import ray

    remote = ray.remote(
        num_cpus=1, num_gpus=num_gpus, max_retries=TASK_RETRIES, retry_exceptions=[TransientIOError]
    )(_map_task)
    fn_ref = ray.put(fn)
    arg_refs = [ray.put(a) for a in args]
    refs = [remote.remote(fn_ref, s, *arg_refs) for s in shards]
    if progress is None:
        return ray.get(refs)
    _wait_all(refs, Progress(progress, len(refs), 0, enabled=True))
    return ray.get(refs)


def _wait_all(refs: list[Any], bar: Progress) -> None:
    """Wait for every task of `refs`, ticking `bar`; a failed task raises as soon as it fails."""
    import ray

    try:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            bar.shard_done({})
    finally:
        bar.close()


def map_then_combine(
    fn: Callable[..., tuple[Any, Any]],
    shards: Sequence[Any],
    *args: Any,
    combine: Callable[..., Any],
    combine_args: tuple = (),
    combine_gpus: float = 0,
    check: Callable[[list[Any]], None] | None = None,
    progress: str | None = None,
) -> tuple[list[Any], Any]:
    """`fn(shard, *args)` → `(payload, info)` on a Ray task per shard (I/O errors retried),
    then `combine(*combine_args, *payloads)` (payloads in shard order) on one task holding
    `combine_gpus` GPUs; returns `(infos in shard order, combine's result)`.

    The payloads (e.g. a k-means training set) go from the map tasks to the combine task
    through the object store, never through the driver, which holds only the small infos;
    `check(infos)` runs on the driver before combine starts (to refuse what cannot work).
    """
    import ray

    remote = ray.remote(
        num_cpus=1, num_returns=2, max_retries=TASK_RETRIES, retry_exceptions=[TransientIOError]
    )(_map_task)
    fn_ref = ray.put(fn)
    arg_refs = [ray.put(a) for a in args]
    refs = [remote.remote(fn_ref, s, *arg_refs) for s in shards]
    bar = Progress(progress or "", len(refs), 0, enabled=progress is not None)
    _wait_all([info for _, info in refs], bar)
    infos = ray.get([info for _, info in refs])
    if check is not None:
        check(infos)
    task = ray.remote(num_cpus=1, num_gpus=combine_gpus, max_retries=0)(_combine_payloads)
    return infos, ray.get(task.remote(combine, combine_args, *[p for p, _ in refs]))


def _combine_payloads(combine: Callable[..., Any], head: tuple, *payloads: Any) -> Any:
    return combine(*head, *payloads)


def _map_task(fn: Callable[..., Any], shard: Any, *args: Any) -> Any:
    return with_io_retries(lambda: fn(shard, *args), str(shard))


def _group_task(fn: Callable[..., Any], head: tuple, *group: Any) -> Any:
    """Ray task body of `merge_tree`: `fn(list(group), *head)`, I/O errors retried."""
    name = getattr(getattr(fn, "func", fn), "__name__", "merge")  # a partial's function
    return with_io_retries(lambda: fn(list(group), *head), f"{name}{list(head)}")


def merge_tree(
    merge: Callable[[list[Any], str], Any],
    root: Callable[[list[Any]], Any],
    items: Sequence[Any],
    *,
    fan_in: int = REDUCE_FAN_IN,
) -> Any:
    """`root` over `items` merged `fan_in` at a time by a tree of Ray tasks; root's result.

    For results that live in files (sorted runs, ...): `items` are small values the driver
    holds (file URLs, counts). While more than `fan_in` are left, each run of up to `fan_in`
    consecutive values goes to one `merge(group, key)` task, whose result (e.g. the URL of the
    file it wrote) takes their place; a group of one is carried up as it is. `key`
    (`"<level>-<index>"`) is unique in the tree and the same when a task is retried, so a
    node can name its output after it. Then one `root(group)` task gets the last values (in
    item order; an empty list for no items) and its result is returned. Tasks are chained by
    object references: the driver submits the whole tree and waits only for the root, holding
    O(items) references, never the data. I/O errors are retried in the task, then by Ray.
    """
    import ray

    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[TransientIOError])(
        _group_task
    )
    merge_ref, root_ref = ray.put(merge), ray.put(root)
    level, values = 0, list(items)
    while len(values) > fan_in:
        level += 1
        values = [
            task.remote(merge_ref, (f"{level}-{i // fan_in}",), *values[i : i + fan_in])
            if len(values[i : i + fan_in]) > 1
            else values[i]
            for i in range(0, len(values), fan_in)
        ]
    return ray.get(task.remote(root_ref, (), *values))


def _start_actors(actors: list[Any], options: dict[str, Any], timeout: float) -> None:
    """Wait until every actor is placed and set up; raise a ValueError saying why not."""
    import ray

    refs = [a.setup.remote() for a in actors]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if waiting:
        raise ValueError(
            f"{len(waiting)} of {len(actors)} actor(s) with {options} could not start within "
            f"{timeout:.0f} s; the cluster has {ray.cluster_resources()} "
            f"({ray.available_resources()} free)"
        )
    for err in ray.get(ready):
        if isinstance(err, str):
            raise ValueError(err)


class _StageActor:
    """Ray actor body around a stage: `setup` reports a failure as its message, not a crash.

    `shipment` (see `ship_assets`) is materialized and handed to the stage before its setup,
    also in an actor restarted by Ray (whose first call may be `process`)."""

    def __init__(self, stage: Stage, shipment: dict[str, tuple[Any, Any]] | None = None) -> None:
        self.stage = stage
        self.shipment = shipment
        self._assets_ready = False

    def _ready(self) -> None:
        if not self._assets_ready:
            _use_assets(self.stage, self.shipment)
            self._assets_ready = True

    def setup(self) -> str | None:
        try:
            self._ready()
            self.stage.setup()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to the driver
            return f"{self.stage.name}: {type(exc).__name__}: {exc}"
        return None

    def process(self, chunk: Any) -> Any:
        self._ready()
        return self.stage.process(chunk)


def _is_large(obj: Any) -> bool:
    """Arguments shipped once through the object store instead of with every task."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes > 1 << 16
    return isinstance(obj, (dict, list, tuple)) and len(obj) > 16


class Progress:
    """A tqdm bar of finished shards with the rows written and rows/s (or nothing when off)."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool) -> None:
        self.rows, self.start, self.bar = 0, time.time(), None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=f"{name:>8}", unit="shard", dynamic_ncols=True
            )

    def shard_done(self, stats: dict[str, Any]) -> None:
        c = stats.get("counts", {})
        self.rows += int(c.get("rows_written", c.get("pairs", 0)))
        if self.bar is not None:
            self.bar.update(1)
            if self.rows:  # tasks that write no rows (evaluation) show the count alone
                rate = self.rows / max(time.time() - self.start, 1e-9)
                self.bar.set_postfix_str(f"rows={self.rows:,} rows/s={rate:,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_actor_stage(
    stage: Stage,
    shards: Sequence[Shard],
    stage_dir: str,
    *,
    split: Callable[..., Iterator[Any]],
    split_args: tuple,
    num_actors: int,
    finish: Callable[[Shard, str, list[Any]], dict[str, Any]],
    fp: dict[str, Any],
    overwrite: bool = False,
    shards_in_flight: int | None = None,
    actor_queue: int = 2,
    start_timeout: float = 600,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Map `stage` over shards with CPU producer tasks feeding a pool of (GPU) actors.

    For each shard not yet done, `split(shard, *split_args)` runs as a Ray streaming-generator
    task (CPU: read + decode) and yields chunks; each chunk goes to the least-loaded of
    `num_actors` actors holding the stage (placed with `stage.resources`) as
    `stage.process(chunk)`. Each actor has up to `actor_queue` chunks queued, so while it
    computes one the next is already decoded and on its way (prefetch); generators pause when
    the actors are full (bounded memory). When a shard's chunks are all processed,
    `finish(shard, stage_dir, results_in_chunk_order)` runs in the driver and writes the part
    and the marker. Output depends only on the chunks, never on which actor ran them.

    Before any chunk is sent, every actor must be placed and set up within `start_timeout`
    seconds; else a ValueError says why (e.g. a checkpoint that does not fit, or resources the
    cluster lacks).
    """
    import ray

    done, todo = done_and_todo(stage_dir, shards, fp, overwrite)
    if not todo:
        return {s.name: done[s.name] for s in shards}
    res = stage.resources
    options: dict[str, Any] = {"num_cpus": res.cpus}
    if res.gpus:
        options["num_gpus"] = res.gpus
    shipment = ship_assets(stage)
    actor = ray.remote(max_restarts=1, max_task_retries=3)(_StageActor)
    actors = [actor.options(**options).remote(stage, shipment) for _ in range(num_actors)]
    try:
        _start_actors(actors, options, start_timeout)
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    # I/O errors (a storage read failing) are retried: the shard is redone, never half-marked.
    producer = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[OSError])(split)
    limit = shards_in_flight or max(2, num_actors + 1)
    bar = Progress(stage.name, len(shards), len(done), enabled=progress)
    queue = collections.deque(todo)
    gens: dict[Any, Shard] = {}  # live generators
    next_index: dict[str, int] = {}
    split_done: set[str] = set()
    results: dict[str, dict[int, Any]] = {}
    pending: dict[Any, tuple[Shard, int, int]] = {}  # result ref -> (shard, chunk, actor)
    load = [0] * num_actors
    try:
        while queue or gens or pending:
            while queue and len(gens) + len(split_done) < limit:
                s = queue.popleft()
                g = producer.options(_generator_backpressure_num_objects=actor_queue + 1).remote(
                    s, *split_args
                )
                gens[g] = s
                next_index[s.name], results[s.name] = 0, {}
            can_feed = min(load) < actor_queue
            waitable = list(pending) + (list(gens) if can_feed else [])
            ready, _ = ray.wait(waitable, num_returns=1)
            for r in ready:
                if r in gens:
                    s = gens[r]
                    try:
                        chunk_ref = next(r)
                    except StopIteration:
                        del gens[r]
                        split_done.add(s.name)
                    else:
                        a = min(range(num_actors), key=load.__getitem__)
                        load[a] += 1
                        i = next_index[s.name]
                        next_index[s.name] = i + 1
                        pending[actors[a].process.remote(chunk_ref)] = (s, i, a)
                else:
                    s, i, a = pending.pop(r)
                    load[a] -= 1
                    results[s.name][i] = ray.get(r)
                if s.name in split_done and len(results[s.name]) == next_index[s.name]:
                    ordered = [results[s.name][i] for i in range(next_index[s.name])]
                    stats = finish(s, stage_dir, ordered)
                    done[s.name] = stats
                    split_done.discard(s.name)
                    del results[s.name]
                    bar.shard_done(stats)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return {s.name: done[s.name] for s in shards}
