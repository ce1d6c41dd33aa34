"""`curation train`: CLIP training on (curated subsets of) webdataset tars, on Ray Train.

Plan on the driver (one-line errors before any worker starts): list the tars, check the model
name with open_clip, refuse an OUT that already holds checkpoints unless `--resume` (and a
checkpoint of another architecture or run shape with it), count the samples a pass keeps (the
subset's; "batch larger than the data" when not one full batch). Then
`curation.executor.train.run_training` runs `curation.train.loop.train_loop` on the workers
(DDP over Ray Train), which writes checkpoints, `train_log.jsonl` and `model.safetensors` to
OUT. Last, on the driver: the zero-shot check on `--eval` shards, `loss_curve.png` and
`manifest.json` (inputs and their fingerprints, the subset, the resolved hyperparameters,
versions, samples seen, per-pass data and online-balancing statistics; the wall time in its own
`timing` key).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from curation.config.train import TrainConfig
from curation.core import fsio
from curation.core.fingerprint import asset_digest, inputs_fingerprint, versions
from curation.core.redact import redact
from curation.executor.runner import check_output_location, cluster_resources, reduce_over_shards
from curation.executor.train import run_training
from curation.io.parts import OutputLease, check_output_not_in_inputs
from curation.train.loop import (
    check_checkpoint_fits,
    latest_checkpoint,
    loader_config,
    read_checkpoint_meta,
    train_loop,
)

__all__ = ["check_model", "plan_training", "train_command", "write_loss_curve"]

MODEL_HELP = "`python -c 'import open_clip; print(open_clip.list_models())'` lists them"


def check_model(name: str) -> dict[str, Any]:
    """open_clip's config of model `name` (the shipped `curation-tiny-vit` included)."""
    import open_clip

    from curation.stages.score import register_model_configs

    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {name!r}; e.g. ViT-B-32, ViT-B-16, ViT-L-14 or "
            f"curation-tiny-vit ({MODEL_HELP})"
        )
    return open_clip.get_model_config(name) or {}


def _image_size(model_cfg: dict[str, Any]) -> int:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def plan_training(cfg: TrainConfig) -> dict[str, Any]:
    """Driver-side checks and the plan: shard URLs, image size, samples and steps per pass."""
    from curation.train.data import count_samples, list_tar_shards

    if cfg.pretrained and not os.path.isfile(cfg.pretrained):
        raise FileNotFoundError(f"--pretrained {cfg.pretrained!r} is not a local file")
    model_cfg = check_model(cfg.model)
    urls = list_tar_shards(list(cfg.shards))
    check_output_not_in_inputs(cfg.out, urls)
    image_size = _image_size(model_cfg)
    loader = loader_config(dataclasses.replace(cfg, shards=tuple(urls)), image_size)
    subset_size = None
    if cfg.subset:
        from curation.train.data import Subset

        subset_size = len(Subset.load(cfg.subset))
    try:
        samples = count_samples(loader)
    except ValueError as exc:
        if cfg.subset and "larger" not in str(exc):
            raise
        samples = None
        err = exc
    if cfg.subset and not samples:
        raise ValueError(
            f"--subset {cfg.subset}: none of its {subset_size} uids has an image in the "
            f"{len(urls)} shards given (check that the subset was made from this pool)"
        )
    if samples is None:
        raise err
    steps_per_pass = samples // cfg.batch_size
    if steps_per_pass < 1 and cfg.balance is None:
        raise ValueError(
            f"batch larger than the data: --batch-size {cfg.batch_size} but a pass has only "
            f"{samples} samples"
        )
    return {
        "urls": urls,
        "image_size": image_size,
        "samples_per_pass": samples,
        "steps_per_pass": steps_per_pass,
        "subset_size": subset_size,
    }


def _check_resume(cfg: TrainConfig) -> int | None:
    last = latest_checkpoint(cfg.out)
    if last is None:
        return None
    where = fsio.join(cfg.out, "checkpoints", f"step-{last}")
    if not cfg.resume:
        raise ValueError(
            f"{cfg.out} already holds training checkpoints (the latest is {where}): pass "
            "--resume to continue that run, or choose another -o"
        )
    check_checkpoint_fits(read_checkpoint_meta(cfg.out, last), cfg, where)
    return last


def _use_gpu(cfg: TrainConfig) -> bool:
    gpus = float(cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and gpus < cfg.num_workers:
        raise ValueError(
            f"--device cuda with {cfg.num_workers} workers needs {cfg.num_workers} GPUs; the Ray "
            f"cluster has {gpus:g}"
        )
    return cfg.device == "cuda" or (cfg.device == "auto" and gpus >= cfg.num_workers)


def _read_log(out: str) -> list[dict[str, Any]]:
    url = fsio.join(out, "train_log.jsonl")
    if not fsio.exists(url):
        return []
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return [json.loads(ln) for ln in f.read().decode().splitlines() if ln.strip()]


def write_loss_curve(rows: list[dict[str, Any]], url: str, title: str = "") -> None:
    """Loss (and learning rate) against samples seen, as a PNG at `url`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    x = [r["samples_seen"] for r in rows]
    ax.plot(x, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("contrastive loss")
    ax2 = ax.twinx()
    ax2.plot(x, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(title or "curation train")
    from curation.io.report import save_png

    save_png(fig, url)


def _local_copy(url: str, tmp: str) -> str:
    fs, path = fsio.url_to_fs(url)
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or os.path.isfile(url):
        return path
    dest = os.path.join(tmp, os.path.basename(path))
    fs.get(path, dest)
    return dest


def _shard_pass_stats(
    url: str, *, balancer: Any, subset: Any, passes: Sequence[int]
) -> list[dict[str, Any]]:
    """One tar's online-balancing statistics for each pass (uids only; no image decoded)."""
    import numpy as np

    from curation.train.data import iter_tar_samples

    got = [s.uid for s in iter_tar_samples(url, want_images=False) if s.reason is None]
    uids = np.asarray(got, dtype=object)
    if subset is not None:
        uids = uids[subset.contains(uids)]
    return [balancer.pass_stats(balancer.keep(uids, None, p)[0], uids, p) for p in passes]


def _sum_pass_stats(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from curation.train.online import combine_pass_stats

    return [combine_pass_stats([x, y]) for x, y in zip(a, b, strict=True)]


def _online_pass_stats(
    cfg: TrainConfig, urls: list[str], passes: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per pass: what online balancing reads and keeps over the whole pool (every rank's share
    together), and the head/tail entry coverage of the kept samples' chosen texts. A tree of
    Ray tasks (one per tar) computes it; the driver gets one list of counters per pass."""
    from functools import partial

    from curation.train.data import Subset
    from curation.train.online import OnlineBalancer, combine_pass_stats

    bal = OnlineBalancer.load(
        cfg.matched, cfg.counts, t=cfg.t, tail_proportion=cfg.tail_proportion, seed=cfg.seed
    )
    subset = Subset.load(cfg.subset) if cfg.subset else None
    fn = partial(_shard_pass_stats, balancer=bal, subset=subset, passes=list(passes))
    per_pass = reduce_over_shards(fn, urls, _sum_pass_stats) or [{} for _ in passes]
    out = [{"pass": p, **combine_pass_stats([st])} for p, st in zip(passes, per_pass, strict=True)]
    return out, bal.describe()


def train_command(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; writes OUT and returns the manifest's body."""
    t0 = time.time()
    # Ray Train workers do not run in the driver's working directory: relative local paths
    # (-o out/train, --subset, --pretrained, ...) are made absolute here
    cfg = dataclasses.replace(
        cfg, **{k: _absolute(getattr(cfg, k)) for k in ("out", "subset", "matched", "counts",
                                                       "pretrained")}
    )  # fmt: skip
    check_output_location(cfg.out)
    with OutputLease(cfg.out):
        plan = plan_training(cfg)
        resumed_from = _check_resume(cfg)
        if resumed_from is not None:  # the data order follows the checkpoint's streams
            streams = read_checkpoint_meta(cfg.out, resumed_from).get("streams")
            if streams:
                cfg = dataclasses.replace(cfg, streams=int(streams))
        use_gpu = _use_gpu(cfg)
        config = dict(cfg.to_dict(), shards=plan["urls"], _steps_per_pass=plan["steps_per_pass"])
        result = run_training(
            train_loop,
            config,
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=cfg.cpus_per_worker,
            max_failures=cfg.max_failures,
            progress=progress,
        )
        rows = _read_log(cfg.out)
        if rows:
            write_loss_curve(rows, fsio.join(cfg.out, "loss_curve.png"), f"{cfg.model}")
        evaluation = None
        if cfg.eval_shards:
            from curation.train.data import list_tar_shards
            from curation.train.evaluate import evaluate_checkpoint

            with tempfile.TemporaryDirectory(prefix="curation-eval-") as tmp:
                weights = _local_copy(fsio.join(cfg.out, "model.safetensors"), tmp)
                evaluation = evaluate_checkpoint(
                    cfg.model, weights, list_tar_shards(list(cfg.eval_shards)), seed=cfg.seed
                )
        balance = None
        if cfg.balance == "online":
            passes = sorted(
                {r["pass"] for r in result["passes"]} | {result["position"]["pass_index"]}
            )
            stats, desc = _online_pass_stats(cfg, plan["urls"], passes)
            loader_by_pass = {r["pass"]: r for r in result["passes"]}
            for s in stats:
                s["trained_steps"] = loader_by_pass.get(s["pass"], {}).get("steps")
            balance = {"mode": "online", **desc, "passes": stats}
        last_ckpt = latest_checkpoint(cfg.out)
        manifest = {
            "stage": "train",
            "versions": _versions(),
            "inputs": {
                "shards": inputs_fingerprint(plan["urls"], None),
                "subset": _subset_info(cfg.subset, plan["subset_size"]),
                "eval_shards": list(cfg.eval_shards),
                "pretrained": _file_info(cfg.pretrained),
            },
            "hyperparameters": cfg.hyperparameters(),
            "data": {
                "image_size": plan["image_size"],
                "samples_per_pass": plan["samples_per_pass"],
                "steps_per_pass": plan["steps_per_pass"],
                "shuffle_buffer": cfg.shuffle_buffer,
                "passes": result["passes"],
                "position": result["position"],
            },
            "result": {
                "steps": result["steps"],
                "total_steps": result["total_steps"],
                "samples_seen": result["samples_seen"],
                "final_loss": result["final_loss"],
                "device": result["device"],
                "precision": result["precision"],
                "world_size": result["world_size"],
                "resumed_from_step": resumed_from,
                "latest_checkpoint": f"checkpoints/step-{last_ckpt}" if last_ckpt else None,
                "model": "model.safetensors",
            },
            "balance": balance,
            "eval": evaluation,
            "timing": {
                "wall_seconds": round(time.time() - t0, 3),
                "train_seconds": round(result["train_seconds"], 3),
            },
        }
        fsio.atomic_write_json(fsio.join(cfg.out, "manifest.json"), redact(manifest))
        return manifest


def _absolute(url: str | None) -> str | None:
    """A local path made absolute (a URL of a store as it is)."""
    return None if not url else fsio.full_url(*fsio.url_to_fs(url))


def _versions() -> dict[str, str]:
    import importlib.metadata as im

    out = dict(versions())
    for pkg in ("torch", "open_clip_torch", "safetensors"):
        try:
            out[pkg] = im.version(pkg)
        except im.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _file_info(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    digest = asset_digest(path)  # the same cached digest the fingerprints use
    return {"path": path, "sha256": digest.removeprefix("sha256:") if digest else None}


def _subset_info(subset: str | None, size: int | None) -> dict[str, Any] | None:
    if not subset:
        return None
    from curation.train.data import Subset

    return {"url": subset, "uids": size, "fingerprint": Subset.load(subset).fingerprint()}
