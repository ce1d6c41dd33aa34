"""`curation eval`: zero-shot classification and retrieval of a model on CLIP_benchmark tasks.

A model is
- a `curation train` output folder (its `manifest.json` names the architecture and
  `model.safetensors`),
- a local `.safetensors` / torch state-dict file with `--model ARCH`, or
- `--model ARCH --pretrained TAG` whose weights are already in open_clip's local cache
  (never downloaded).

Each task folder (`curation.train.eval_tasks`) is evaluated by one Ray task (holding a GPU when
the cluster has one and the device allows it); the results JSON holds every task's metrics and
the averages (acc1 over classification tasks, mean recall over retrieval tasks). It is written
atomically. A progress bar counts the tasks done; on a multi-node cluster the driver-local
checkpoint is shipped to the workers (`executor.runner.ship_files`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curation.core import fsio

__all__ = ["resolve_model", "run_task", "evaluate_in_process", "summarize", "evaluate_command"]


def resolve_model(
    model_or_run: str | None, arch: str | None = None, pretrained: str | None = None
) -> dict[str, Any]:
    """{"model": arch, "checkpoint": local file or None, "pretrained": tag or None}; checks
    that the files exist and that open_clip knows the architecture (one-line errors)."""
    from curation.stages.score import ClipScorer

    checkpoint = None
    if model_or_run and pretrained:
        raise ValueError("give a model file / train run or --pretrained TAG, not both")
    if model_or_run:
        p = Path(model_or_run)
        if p.is_dir():
            manifest_path = p / "manifest.json"
            if not manifest_path.is_file():
                raise FileNotFoundError(
                    f"{model_or_run}: a folder without manifest.json (not a `curation train` run)"
                )
            manifest = fsio.read_json(str(manifest_path))
            run_arch = (manifest.get("hyperparameters") or {}).get("model")
            weights = (manifest.get("result") or {}).get("model") or "model.safetensors"
            if not run_arch:
                raise ValueError(f"{manifest_path}: names no model architecture")
            if arch and arch != run_arch:
                raise ValueError(f"{model_or_run} trained {run_arch}, but --model {arch} was given")
            arch = run_arch
            checkpoint = str(p / weights)
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"{model_or_run}: no {weights} (training not finished?)")
        elif p.is_file():
            if not arch:
                raise ValueError(f"{model_or_run}: a weights file needs --model ARCH")
            checkpoint = str(p)
        else:
            raise FileNotFoundError(f"model {model_or_run!r}: no such local file or train run")
    elif not (arch and pretrained):
        raise ValueError(
            "name a model: a train run, a weights file + --model, or --model + --pretrained"
        )
    if not arch:
        raise ValueError("--model ARCH is required")
    try:  # unknown arch, unknown tag, weights not in the cache
        ClipScorer(arch, checkpoint=checkpoint, pretrained=pretrained)
    except FileNotFoundError as exc:
        msg = str(exc).replace("pass --checkpoint PATH", "give a local weights file + --model")
        raise FileNotFoundError(msg) from exc
    return {"model": arch, "checkpoint": checkpoint, "pretrained": pretrained}


def run_task(
    task_url: str,
    model: dict[str, Any],
    device: str,
    batch_size: int,
    shipment: dict[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """One task folder with the model (loaded here): its result dict. `shipment`: the
    checkpoint as `executor.runner.ship_files` shipped it (a copy is opened on this node)."""
    from curation.stages.score import ClipScorer
    from curation.train.eval_tasks import evaluate_task, load_task

    t0 = time.time()
    if shipment:
        from curation.executor.runner import local_files

        model = {**model, "checkpoint": local_files(shipment)["checkpoint"]}
    task = load_task(task_url)
    scorer = ClipScorer(
        model["model"],
        checkpoint=model["checkpoint"],
        pretrained=model["pretrained"],
        device=device,
        batch_size=batch_size,
    )
    out = evaluate_task(scorer, task, batch_size)
    out["seconds"] = round(time.time() - t0, 3)
    return out


def summarize(model: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document: the model, each task, the averages."""
    cls = [r["metrics"]["acc1"] for r in results if r["kind"] == "classification"]
    ret = [r["metrics"]["mean_recall"] for r in results if r["kind"] == "retrieval"]
    return {
        "model": model,
        "tasks": results,
        "average": {
            "classification_acc1": sum(cls) / len(cls) if cls else None,
            "retrieval_mean_recall": sum(ret) / len(ret) if ret else None,
            "classification_tasks": len(cls),
            "retrieval_tasks": len(ret),
        },
    }


def evaluate_in_process(
    model: dict[str, Any], tasks: Sequence[str], device: str = "cpu", batch_size: int = 256
) -> dict[str, Any]:
    """The same results as `evaluate_command`, computed in this process (no Ray)."""
    return summarize(model, [run_task(t, model, device, batch_size) for t in tasks])


def evaluate_command(
    model: dict[str, Any],
    tasks: Sequence[str],
    out: str,
    *,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every task folder as a Ray task; writes `out` (JSON) and returns it.

    The checkpoint is a file on the driver's disk: on a cluster of several nodes it is read
    once and shipped through the object store like a stage's assets (`ship_files`), and each
    node's tasks open their local copy; a one-node run copies nothing.
    """
    from curation.executor.runner import cluster_resources, map_shards, ship_files
    from curation.train.eval_tasks import load_task

    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not tasks:
        raise ValueError("give at least one --task folder")
    for t in tasks:  # one-line errors before any work
        load_task(t)
    gpus = cluster_resources().get("GPU", 0) if device != "cpu" else 0
    if device.startswith("cuda") and not gpus:
        raise ValueError(f"device {device!r} asked for, but the Ray cluster has no GPU")
    task_device = ("cuda" if device == "auto" else device) if gpus else "cpu"
    t0 = time.time()
    shipment = ship_files({"checkpoint": model["checkpoint"]}) if model["checkpoint"] else {}
    results = map_shards(
        run_task,
        list(tasks),
        model,
        task_device,
        batch_size,
        shipment or None,
        num_gpus=1 if gpus else 0,
        progress="eval" if progress else None,
    )
    doc = summarize(model, results)
    doc["device"] = task_device
    doc["wall_seconds"] = round(time.time() - t0, 3)
    fsio.atomic_write_json(out, doc)
    return doc
