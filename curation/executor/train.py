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
    """Rank 0's result, and its latest progress metrics (for the driver's progress bar)."""

    def __init__(self) -> None:
        self.value: Any = None
        self.metrics: dict[str, Any] | None = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def progress(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics

    def latest(self) -> dict[str, Any] | None:
        return self.metrics


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
            # fire and forget: the driver's progress bar polls the latest
            reporter=(lambda m: box.progress.remote(m)) if rank == 0 else None,
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
    progress: bool = False,
) -> Any:
    """Run `loop(config, ctx)` on `num_workers` Ray Train workers; returns rank 0's result.

    Needs a connected Ray cluster (`runner.ensure_ray`). Each worker asks for
    `cpus_per_worker` CPUs (and one GPU with `use_gpu`) and sets torch's thread count to its
    CPUs. `max_failures`: how often Ray Train restarts the workers after a lost one (the loop
    then resumes from its last checkpoint). `progress`: a tqdm bar of steps with samples/s
    and the loss, from what rank 0 reports (`ctx.report`) at each log step.
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
    cfg = dict(config, _use_gpu=bool(use_gpu), _progress_bar=bool(progress))
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
            result = _fit_with_progress(trainer, box) if progress else trainer.fit()
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


def _fit_with_progress(trainer: Any, box: Any, poll_s: float = 1.0) -> Any:
    """`trainer.fit()` in a thread while this one draws a progress bar from rank 0's reports."""
    import threading

    import ray
    from tqdm import tqdm

    out: dict[str, Any] = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    bar = None
    try:
        while thread.is_alive():
            thread.join(poll_s)
            m = ray.get(box.latest.remote())
            if not m:
                continue
            if bar is None:
                bar = tqdm(total=int(m["total_steps"]), desc="   train", unit="step")
            bar.n = int(m["step"])
            bar.set_postfix_str(
                f"loss={m['loss']:.3f} samples/s={m['samples_per_s']:,.0f} "
                f"({m['samples_per_s_per_worker']:,.0f}/worker)"
            )
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    if "error" in out:
        raise out["error"]
    return out["result"]


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
