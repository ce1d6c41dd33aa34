"""The one module that knows Ray: maps per-shard stage functions over shards, resumably.

A stage run writes `STAGE_DIR/part-<shard>.parquet` (atomically) and then
`STAGE_DIR/_done/<shard>.json` (the completion marker, with the shard's counters). A rerun skips
shards whose marker exists. `STAGE_DIR/_stage.json` holds the stage's fingerprint (its parameters
and its inputs' fingerprints); a rerun with a different fingerprint refuses to reuse old parts
unless told to overwrite. Stage objects (automata, tables) are built once per worker process and
cached there, keyed by their parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from curation import fsio

MARKER_DIR = "_done"
STAGE_FILE = "_stage.json"
_WORKER_CACHE: dict[str, Any] = {}


class ResumeError(RuntimeError):
    """An output folder holds results of a different job; says how to proceed."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: a stable name (from the input file) and the input URL."""

    name: str
    input: str


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def cached(key: str, build: Callable[[], Any]) -> Any:
    """Per-worker-process cache: `build()` runs once per process for each key."""
    obj = _WORKER_CACHE.get(key)
    if obj is None:
        obj = build()
        _WORKER_CACHE[key] = obj
    return obj


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


def shard_names(inputs: Sequence[str]) -> list[Shard]:
    """Stable, unique shard names from input URLs (a short path hash breaks name collisions)."""
    names = [fsio.shard_name(u) for u in inputs]
    dup = {n for n in names if names.count(n) > 1}
    out = []
    for url, name in zip(inputs, names, strict=True):
        if name in dup:
            name = f"{name}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        out.append(Shard(name=name, input=url))
    return out


def part_url(stage_dir: str, shard: str) -> str:
    return fsio.join(stage_dir, f"part-{shard}.parquet")


def marker_url(stage_dir: str, shard: str) -> str:
    return fsio.join(stage_dir, MARKER_DIR, f"{shard}.json")


def write_marker(stage_dir: str, shard: str, stats: dict[str, Any]) -> None:
    """Write the completion marker last, after the part is in place."""
    fsio.atomic_write_json(marker_url(stage_dir, shard), stats)


def finish_part(
    stage_dir: str,
    shard: Shard,
    table: Any,
    counts: dict[str, int],
    *,
    parquet: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write a shard's part atomically, then its marker (counts + `extra`); returns the marker.

    `parquet` holds extra `pyarrow.parquet.write_table` options for the part.
    """
    fsio.atomic_write_parquet(part_url(stage_dir, shard.name), table, **(parquet or {}))
    counts["rows_written"] = table.num_rows
    stats = {"shard": shard.name, "input": shard.input, "counts": dict(sorted(counts.items()))}
    stats.update(extra)
    write_marker(stage_dir, shard.name, stats)
    return stats


def prepare_stage_dir(stage_dir: str, fp: dict[str, Any], overwrite: bool) -> None:
    """Create the stage folder, or check that its fingerprint matches (else refuse / wipe)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(stage_dir)
    stage_file = fsio.join(stage_dir, STAGE_FILE)
    if fs.exists(path):
        if fs.exists(url_to_fs(stage_file)[1]):
            old = fsio.read_json(stage_file)
            if old != fp:
                if not overwrite:
                    changed = _changed_keys(old, fp)
                    raise ResumeError(
                        f"{stage_dir} holds results of a different job (changed: "
                        f"{', '.join(changed)}). Rerun with --overwrite to replace them, or "
                        "write to another output folder."
                    )
                fs.rm(path, recursive=True)
        elif overwrite:
            fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    fs.makedirs(url_to_fs(fsio.join(stage_dir, MARKER_DIR))[1], exist_ok=True)
    if not fs.exists(url_to_fs(stage_file)[1]):
        fsio.atomic_write_json(stage_file, fp)
    _remove_stale_temps(fs, path)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ, one level into nested mappings (`params.t`)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += _changed_keys(a, b, f"{k}.")
        else:
            out.append(prefix + k)
    return out


def _remove_stale_temps(fs: Any, path: str) -> None:
    for p in fs.find(path):
        if ".tmp-" in p.rsplit("/", 1)[-1]:
            fs.rm(p)


def _done_and_todo(
    stage_dir: str, shards: Sequence[Shard], fp: dict[str, Any], overwrite: bool
) -> tuple[dict[str, dict[str, Any]], list[Shard]]:
    """Prepare the stage folder; split shards into done (their markers) and still to do."""
    prepare_stage_dir(stage_dir, fp, overwrite)
    done: dict[str, dict[str, Any]] = {}
    todo: list[Shard] = []
    for s in shards:
        m = read_marker(stage_dir, s.name)
        if m is None:
            todo.append(s)
        else:
            done[s.name] = m
    return done, todo


def read_marker(stage_dir: str, shard: str) -> dict[str, Any] | None:
    url = marker_url(stage_dir, shard)
    return fsio.read_json(url) if fsio.exists(url) else None


def run_stage(
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
    """Run `task(shard, stage_dir, *args)` as one Ray task per shard not yet done.

    Returns each shard's marker contents (counters), in shard order, including shards finished
    by an earlier run. Tasks retry on worker death (their outputs are deterministic, so a retry
    writes identical bytes). At most `max_in_flight` tasks are queued at once (bounded memory).
    """
    import ray

    done, todo = _done_and_todo(stage_dir, shards, fp, overwrite)
    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(task)
    cpus = int(ray.available_resources().get("CPU", 1)) or 1
    limit = max_in_flight or max(2, 2 * cpus)
    bar = _Progress(name, len(shards), len(done), enabled=progress)
    pending: dict[Any, Shard] = {}
    queue = list(todo)
    refs_args = [ray.put(a) if _is_large(a) else a for a in args]
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                s = queue.pop(0)
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


def _start_actors(actors: list[Any], options: dict[str, Any], timeout: float) -> None:
    """Wait until every actor is placed and set up; raise a ValueError saying why not."""
    import ray

    refs = [a.setup.remote() if hasattr(a, "setup") else a.__ray_ready__.remote() for a in actors]
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


def _is_large(obj: Any) -> bool:
    try:
        import numpy as np

        return isinstance(obj, np.ndarray) and obj.nbytes > 1 << 16
    except ImportError:  # pragma: no cover
        return False


class _Progress:
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
            rate = self.rows / max(time.time() - self.start, 1e-9)
            self.bar.set_postfix_str(f"rows={self.rows:,} rows/s={rate:,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_actor_stage(
    name: str,
    stage_dir: str,
    shards: Sequence[Shard],
    *,
    split: Callable[..., Iterator[Any]],
    split_args: tuple,
    actor_cls: type,
    actor_args: tuple,
    num_actors: int,
    actor_options: dict[str, Any],
    finish: Callable[[Shard, str, list[Any]], dict[str, Any]],
    fp: dict[str, Any],
    overwrite: bool = False,
    split_cpus: float = 1,
    shards_in_flight: int | None = None,
    actor_queue: int = 2,
    start_timeout: float = 600,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Map a stage over shards with CPU producer tasks feeding a pool of (GPU) actors.

    For each shard not yet done, `split(shard, *split_args)` runs as a Ray streaming-generator
    task (CPU: read + decode) and yields chunks; each chunk goes to the least-loaded of
    `num_actors` actors (`actor_cls(*actor_args)`, created with `actor_options`, e.g.
    `{"num_gpus": 1}`) as `actor.process(chunk)`. Each actor has up to `actor_queue` chunks
    queued, so while it computes one the next is already decoded and on its way (prefetch);
    generators pause when the actors are full (bounded memory). When a shard's chunks are all
    processed, `finish(shard, stage_dir, results_in_chunk_order)` runs in the driver and writes
    the part and the marker. Output depends only on the chunks, never on which actor ran them.

    Before any chunk is sent, every actor must be placed and its `setup()` (if it has one:
    it returns None, or an error message) must succeed within `start_timeout` seconds; else a
    ValueError says why (e.g. a checkpoint that does not fit, or resources the cluster lacks).
    """
    import ray

    done, todo = _done_and_todo(stage_dir, shards, fp, overwrite)
    if not todo:
        return {s.name: done[s.name] for s in shards}
    actor = ray.remote(max_restarts=1, max_task_retries=3)(actor_cls)
    actors = [actor.options(**actor_options).remote(*actor_args) for _ in range(num_actors)]
    try:
        _start_actors(actors, actor_options, start_timeout)
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    # I/O errors (a storage read failing) are retried: the shard is redone, never half-marked.
    producer = ray.remote(num_cpus=split_cpus, max_retries=3, retry_exceptions=[OSError])(split)
    limit = shards_in_flight or max(2, num_actors + 1)
    bar = _Progress(name, len(shards), len(done), enabled=progress)
    queue = list(todo)
    gens: dict[Any, Shard] = {}  # live generators
    next_index: dict[str, int] = {}
    split_done: set[str] = set()
    results: dict[str, dict[int, Any]] = {}
    pending: dict[Any, tuple[Shard, int, int]] = {}  # result ref -> (shard, chunk, actor)
    load = [0] * num_actors
    try:
        while queue or gens or pending:
            while queue and len(gens) + len(split_done) < limit:
                s = queue.pop(0)
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
