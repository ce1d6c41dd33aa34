"""Ray Train launcher: runs a training loop on `num_workers` workers with torch.distributed.

`run_training(loop, config, ...)` starts a `ray.train.torch.TorchTrainer` (DDP; the `gloo`
backend on CPU workers, `nccl` with one GPU per worker) on the Ray cluster this process is
connected to, the same cluster that runs curation. Each worker calls `loop(config, ctx)` with a
`TrainContext` (rank, world size, local rank, device, `report`); the value rank 0's loop
returns comes back to the caller (through a small zero-CPU actor, so it does not depend on Ray
Train's checkpoint storage). Ray Train's own storage is a throwaway local folder: the loop
writes its checkpoints, logs and model to the run's output URL itself.

A worker's error is raised here as itself when it is one the user can act on (ValueError,
FileNotFoundError, OSError: a one-line CLI error), else as a RuntimeError with its text.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainContext", "run_training"]


@dataclass
class TrainContext:
    """What a training loop knows of its place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    reporter: Any = None  # a callable(metrics) or None

    def report(self, metrics: dict[str, Any]) -> None:
        """Hand metrics to Ray Train (a no-op outside it)."""
        if self.reporter is not None:
            self.reporter(metrics)


class _ResultBox:
    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def _worker_fn(loop: Callable[[dict[str, Any], TrainContext], Any], box: Any, threads: int):
    def run(config: dict[str, Any]) -> None:
        import ray
        import ray.train
        import torch

        tc = ray.train.get_context()
        rank, world = tc.get_world_rank(), tc.get_world_size()
        torch.set_num_threads(max(1, threads))
        if config.get("_use_gpu"):
            from ray.train.torch import get_device

            dev = get_device()
            device = f"cuda:{dev.index}" if dev.index is not None else "cuda"
        else:
            device = "cpu"
        ctx = TrainContext(
            rank=rank,
            world_size=world,
            local_rank=tc.get_local_rank(),
            device=device,
            reporter=None,
        )
        result = loop(config, ctx)
        if rank == 0:
            ray.get(box.put.remote(result))

    return run


def _worker_errors(exc: BaseException) -> list[BaseException]:
    """The workers' own exceptions inside a Ray Train failure (best effort, by attribute)."""
    found: list[BaseException] = []
    for attr in ("worker_failures", "_worker_failures"):
        failures = getattr(exc, attr, None)
        if isinstance(failures, dict):
            found.extend(v for _, v in sorted(failures.items()) if isinstance(v, BaseException))
    cause = exc.__cause__ or exc.__context__
    if not found and cause is not None and cause is not exc:
        found = _worker_errors(cause) or [cause]
    unwrapped = []
    for e in found:
        inner = getattr(e, "cause", None)  # RayTaskError and friends
        unwrapped.append(inner if isinstance(inner, BaseException) else e)
    return unwrapped


def run_training(
    loop: Callable[[dict[str, Any], TrainContext], Any],
    config: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: int = 1,
    max_failures: int = 0,
    name: str = "curation-train",
) -> Any:
    """Run `loop(config, ctx)` on `num_workers` Ray Train workers; returns rank 0's result.

    Needs a connected Ray cluster (`runner.ensure_ray`). Each worker asks for
    `cpus_per_worker` CPUs (and one GPU with `use_gpu`) and sets torch's thread count to its
    CPUs. `max_failures`: how often Ray Train restarts the workers after a lost one (the loop
    then resumes from its last checkpoint).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1 or cpus_per_worker < 1:
        raise ValueError("num_workers and cpus_per_worker must be >= 1")
    box = ray.remote(num_cpus=0)(_ResultBox).remote()
    storage = tempfile.mkdtemp(prefix="curation-raytrain-")
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    cfg = dict(config, _use_gpu=bool(use_gpu))
    trainer = TorchTrainer(
        _worker_fn(loop, box, cpus_per_worker),
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    try:
        try:
            result = trainer.fit()
        except Exception as exc:
            _raise_worker_error(exc)
            raise
        err = getattr(result, "error", None)
        if err is not None:
            _raise_worker_error(err)
            raise err
        return ray.get(box.get.remote())
    finally:
        ray.kill(box)
        shutil.rmtree(storage, ignore_errors=True)


def _raise_worker_error(exc: BaseException) -> None:
    """Re-raise the first worker error the user can act on as itself."""
    for e in _worker_errors(exc):
        if isinstance(e, (ValueError, FileNotFoundError, OSError)):
            raise e
    errs = _worker_errors(exc)
    if errs:
        first = errs[0]
        raise RuntimeError(
            f"training failed on a Ray Train worker: {type(first).__name__}: {first}"
        ) from exc
