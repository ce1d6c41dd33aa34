"""The CLIP training loop each Ray Train worker runs (`train_loop(config, ctx)`).

open_clip is used as a library, the way open_clip_train's `main.py`/`train.py` and DataComp use
it: `create_model_and_transforms` + `get_tokenizer`; `ClipLoss(local_loss=True,
gather_with_grad=True, cache_labels=True, rank, world_size)` (DataComp's `--local-loss
--gather-with-grad`) or `SigLipLoss`; AdamW with no weight decay on gains, biases and the logit
scale (open_clip_train's `exclude` rule), β/ε from the config; `open_clip_train.scheduler.cosine_lr`
called with the global step before each step; the logit scale clamped to [0, ln 100] after each
step. bf16 autocast on CUDA (no GradScaler: that is only for fp16), fp32 on CPU. Images arrive as
uint8 `[B, 3, H, W]` (decoded, resized and cropped by the loader's CPU workers) and are scaled and
normalized with the model's mean/std on the device. DDP when world_size > 1 (torch.distributed
is set up by Ray Train).

Checkpoints (`OUT/checkpoints/step-<k>/state.pt` + `meta.json`), every `checkpoint_every` steps
and at the end, written by rank 0 atomically (bytes, then one atomic write; `meta.json` last, so
a checkpoint counts only once complete): model, optimizer, scaler, the global step (the
scheduler is a pure function of it), torch/numpy/python RNG states and the data position
(pass_index, step_in_pass). Loaded with `torch.load(weights_only=True)`. On start the loop
continues from the latest complete checkpoint in OUT (the flow refuses OUT with checkpoints
unless `--resume`), so a resumed run reads the same batches in the same order, and on CPU ends
with weights equal to an uninterrupted run's.

Outputs by rank 0: `OUT/train_log.jsonl` (rewritten atomically at each checkpoint and at the
end), `OUT/model.safetensors` (the plain state dict: `open_clip.create_model(arch)` +
`load_state_dict(strict=True)` takes it).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.config.train import TrainConfig
from curation.core import fsio

if TYPE_CHECKING:
    from curation.train.data import LoaderConfig

__all__ = [
    "CHECKPOINT_VERSION",
    "build_model",
    "checkpoint_url",
    "latest_checkpoint",
    "list_checkpoints",
    "read_checkpoint_meta",
    "train_loop",
]

CHECKPOINT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"


# -- checkpoints on any fsspec URL ---------------------------------------------------------------
def checkpoint_url(out: str, step: int) -> str:
    return fsio.join(out, "checkpoints", f"step-{step}")


def list_checkpoints(out: str) -> list[int]:
    """Steps of the complete checkpoints under OUT/checkpoints (those with their meta.json)."""
    fs, root = fsio.url_to_fs(fsio.join(out, "checkpoints"))
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    steps = []
    for n in names:
        base = n.rstrip("/").rsplit("/", 1)[-1]
        complete = base.startswith("step-") and base[5:].isdigit()
        if complete and fs.exists(f"{root.rstrip('/')}/{base}/{META_FILE}"):
            steps.append(int(base[5:]))
    return sorted(steps)


def latest_checkpoint(out: str) -> int | None:
    steps = list_checkpoints(out)
    return steps[-1] if steps else None


def read_checkpoint_meta(out: str, step: int) -> dict[str, Any]:
    return fsio.read_json(fsio.join(checkpoint_url(out, step), META_FILE))


def loader_config(cfg: TrainConfig, image_size: int) -> LoaderConfig:
    """The data loader of a training config: the same for planning (samples per pass) and for
    the loop. `streams` is pinned (not left to follow `loader_workers`), so the data order of a
    run, and of its resume, does not depend on the number of decode processes."""
    from curation.train.data import LoaderConfig

    return LoaderConfig(
        shards=tuple(cfg.shards),
        global_batch=cfg.batch_size,
        image_size=image_size,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.loader_workers,
        subset=cfg.subset,
        streams=cfg.streams or max(1, cfg.loader_workers),
    )


def check_checkpoint_fits(meta: dict[str, Any], cfg: TrainConfig, where: str) -> None:
    """One-line errors for resuming a checkpoint made by another architecture or run shape."""
    if meta.get("model") != cfg.model:
        raise ValueError(
            f"checkpoint {where} is of architecture {meta.get('model')!r}, not {cfg.model!r}: "
            "resume with the same --model, or write to another -o"
        )
    # the data order of a pass depends on these (and on the streams, which the flow takes from
    # the checkpoint): a resumed run must match them to read the same batches
    for key, attr in (("batch_size", "batch_size"), ("seed", "seed"),
                      ("samples_seen_target", "samples_seen"),
                      ("world_size", "num_workers")):  # fmt: skip
        if key in meta and meta[key] != getattr(cfg, attr):
            raise ValueError(
                f"checkpoint {where} was made with {_flag(attr)} {meta[key]}, this run has "
                f"{getattr(cfg, attr)}: resume with the same settings, or write to another -o"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _save_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _read_bytes(url: str) -> bytes:
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


# -- model ------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """(model on CPU, tokenizer, preprocess cfg) for `cfg.model`, seeded, optional weights."""
    import open_clip
    import torch

    from curation.stages.score import load_state_dict, register_model_configs

    register_model_configs()
    torch.manual_seed(cfg.seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns about random init: that is the point here
    try:
        kwargs: dict[str, Any] = {}
        if cfg.loss == "siglip":  # as open_clip_train: SigLIP's initial scale and bias
            kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
        model, _, _ = open_clip.create_model_and_transforms(
            cfg.model, device="cpu", output_dict=True, **kwargs
        )
    finally:
        root.setLevel(level)
    if cfg.pretrained:
        sd = load_state_dict(cfg.pretrained)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"--pretrained {cfg.pretrained!r} does not fit {cfg.model}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return model, tokenizer, dict(model.visual.preprocess_cfg)


def image_size_of(pp: dict[str, Any]) -> int:
    size = pp["size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square model input size {size} is not supported")
        return int(size[0])
    return int(size)


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip_train's split: no decay for gains, biases, norms and the logit scale."""

    def exclude(n: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def _rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(list(py_state[1]), dtype=torch.int64),
        "python_version": int(py_state[0]),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"]))
    random.setstate((s["python_version"], tuple(int(x) for x in s["python"].tolist()), None))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class _Log:
    """train_log.jsonl lines kept by rank 0 and rewritten atomically to OUT."""

    def __init__(self, out: str, upto: int | None) -> None:
        self.url = fsio.join(out, "train_log.jsonl")
        self.rows: list[dict[str, Any]] = []
        if upto is not None and fsio.exists(self.url):
            for line in _read_bytes(self.url).decode().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row["step"] <= upto:
                        self.rows.append(row)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        fsio.atomic_write_bytes(self.url, data.encode())


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_min(value: int, device: str) -> int:
    dist = _dist()
    if dist is None:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _gather_objects(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


# -- the loop ---------------------------------------------------------------------------------------
def train_loop(config: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Train `config` (a `TrainConfig.to_dict()` plus `_steps_per_pass`) on this rank.

    Returns (on every rank; the executor keeps rank 0's) a summary: steps done, samples seen,
    passes and their data statistics (summed over ranks), final loss, the checkpoint resumed.
    """
    import open_clip
    import torch
    from open_clip_train.scheduler import cosine_lr

    from curation.train.data import TrainBatches

    extra = {k: config[k] for k in list(config) if k.startswith("_")}
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    rank, world = int(ctx.rank), int(ctx.world_size)
    device = str(ctx.device)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    total_steps = cfg.total_steps
    last_step = total_steps if cfg.stop_after is None else min(total_steps, cfg.stop_after)

    model, tokenizer, pp = build_model(cfg)
    image_size = image_size_of(pp)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup, total_steps)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if on_cuda else "fp32"
    if precision == "bf16" and not on_cuda:
        raise ValueError("--precision bf16 needs a CUDA device; on CPU training runs in fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    scaler = None  # bf16 needs no loss scaling (GradScaler is for fp16 only)

    if cfg.loss == "siglip":
        loss_fn = open_clip.loss.SigLipLoss(rank=rank, world_size=world)
    else:
        loss_fn = open_clip.loss.ClipLoss(
            local_loss=True,
            gather_with_grad=True,
            cache_labels=True,
            rank=rank,
            world_size=world,
        )

    # -- resume ----------------------------------------------------------------------------------
    step, pass_index, step_in_pass, samples_seen = 0, 0, 0, 0
    pass_stats: list[dict[str, Any]] = []
    resumed_from = latest_checkpoint(cfg.out)
    if resumed_from is not None:
        where = checkpoint_url(cfg.out, resumed_from)
        check_checkpoint_fits(read_checkpoint_meta(cfg.out, resumed_from), cfg, where)
        state = _load_bytes(_read_bytes(fsio.join(where, STATE_FILE)))
        try:
            model.load_state_dict(state["model"], strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint {where} does not fit {cfg.model}: {str(exc).splitlines()[0]}"
            ) from exc
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        pass_index, step_in_pass = int(state["pass_index"]), int(state["step_in_pass"])
        samples_seen = int(state["samples_seen"])
        pass_stats = json.loads(state["pass_stats_json"])
        _set_rng_state(state["rng"])
        del state

    train_model: Any = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[torch.device(device).index] if on_cuda else None,
            static_graph=True,
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    balancer = None
    if cfg.balance == "online":
        from curation.train.online import OnlineBalancer

        balancer = OnlineBalancer.load(
            cfg.matched, cfg.counts, t=cfg.t, tail_proportion=cfg.tail_proportion, seed=cfg.seed
        )
    loader_cfg = loader_config(cfg, image_size)
    log = _Log(cfg.out, step if resumed_from is not None else None) if rank == 0 else None
    uid_log: list[str] = []
    uid_url = fsio.join(cfg.out, "_uids", f"rank-{rank}.jsonl")
    if cfg.record_uids and resumed_from is not None and fsio.exists(uid_url):
        uid_log = [
            ln for ln in _read_bytes(uid_url).decode().splitlines()
            if ln and json.loads(ln)["step"] <= step
        ]  # fmt: skip

    def save_checkpoint() -> None:
        if cfg.record_uids:
            fsio.atomic_write_bytes(uid_url, "".join(x + "\n" for x in uid_log).encode())
        if rank == 0:
            where = checkpoint_url(cfg.out, step)
            state = {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
                "pass_index": pass_index,
                "step_in_pass": step_in_pass,
                "samples_seen": samples_seen,
                "pass_stats_json": json.dumps(pass_stats),
                "rng": _rng_state(),
            }
            fsio.atomic_write_bytes(fsio.join(where, STATE_FILE), _save_bytes(state))
            assert log is not None
            log.flush()
            meta = {
                "version": CHECKPOINT_VERSION,
                "model": cfg.model,
                "step": step,
                "pass_index": pass_index,
                "step_in_pass": step_in_pass,
                "samples_seen": samples_seen,
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
                "samples_seen_target": cfg.samples_seen,
                "streams": loader_cfg.n_streams,
                "world_size": world,
            }
            fsio.atomic_write_json(fsio.join(where, META_FILE), meta)
        _barrier()

    def autocast() -> Any:
        import contextlib

        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=amp_dtype)

    model.train()
    t_start = time.perf_counter()
    last_loss = float("nan")
    data_s = step_s = 0.0
    window_samples, window_t = 0, time.perf_counter()
    if rank == 0 and resumed_from is not None:
        print(f"resuming from checkpoint step-{resumed_from} (pass {pass_index}, step "
              f"{step_in_pass} of it)", flush=True)  # fmt: skip
    while step < last_step:
        batches = TrainBatches(
            loader_cfg,
            rank=rank,
            world_size=world,
            pass_index=pass_index,
            start_step=step_in_pass,
            keep=balancer.keep if balancer is not None else None,
        )
        it = iter(batches)
        t0 = time.perf_counter()
        while step < last_step:
            batch = next(it, None)
            if _all_min(0 if batch is None else 1, device) == 0:
                break
            assert batch is not None
            t1 = time.perf_counter()
            data_s += t1 - t0
            lr = scheduler(step)
            images = batch["images"].to(device, non_blocking=True)
            images = (images.float().div_(255.0) - mean) / std
            texts = tokenizer(list(batch["texts"])).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                out = train_model(images, texts)
                losses = loss_fn(**out, output_dict=True)
                total = sum(losses.values())
            total.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            step_in_pass += 1
            samples_seen += cfg.batch_size
            window_samples += cfg.batch_size
            if cfg.record_uids:
                uid_log.append(json.dumps({"step": step, "pass": pass_index,
                                           "uids": list(batch["uids"])}))  # fmt: skip
            t0 = time.perf_counter()
            step_s += t0 - t1
            if step % cfg.log_every == 0 or step == last_step:
                last_loss = float(total.detach().float().item())
                now = time.perf_counter()
                sps = window_samples / max(now - window_t, 1e-9)
                window_samples, window_t = 0, now
                if rank == 0:
                    assert log is not None
                    row = {
                        "step": step,
                        "pass": pass_index,
                        "loss": last_loss,
                        "lr": float(lr),
                        "logit_scale": float(model.logit_scale.detach().exp().item()),
                        "samples_seen": samples_seen,
                        "samples_per_s": sps,
                        "samples_per_s_per_worker": sps / world,
                        "data_s": data_s,
                        "step_s": step_s,
                    }
                    log.add(row)
                    ctx.report({**row, "total_steps": total_steps})
                if rank == 0 and not config.get("_progress_bar"):  # else the driver's bar
                    print(
                        f"step {step}/{total_steps} pass {pass_index} loss {last_loss:.4f} "
                        f"lr {lr:.3g} {sps:,.1f} samples/s ({sps / world:,.1f}/worker)",
                        flush=True,
                    )
                data_s = step_s = 0.0
            if step % cfg.checkpoint_every == 0 and step < last_step:
                save_checkpoint()
        if step >= last_step:
            break  # stopped inside (or at the very end of) a pass: the position stays
        # the pass is over: its statistics, summed over ranks
        stats = Counter()
        for s in _gather_objects(dict(batches.stats())):
            stats.update(s)
        row: dict[str, Any] = {"pass": pass_index, "steps": step_in_pass, **dict(stats)}
        if step_in_pass == 0:
            raise ValueError(
                f"pass {pass_index} has no full batch of {cfg.batch_size} samples: the batch is "
                "larger than the data (use a smaller --batch-size)"
            )
        pass_stats.append(row)
        pass_index += 1
        step_in_pass = 0
    save_checkpoint()
    wall = time.perf_counter() - t_start
    if rank == 0:
        _write_safetensors(model, fsio.join(cfg.out, "model.safetensors"))
    _barrier()
    if cfg.record_uids:
        fsio.atomic_write_bytes(uid_url, "".join(x + "\n" for x in uid_log).encode())
    return {
        "steps": step,
        "total_steps": total_steps,
        "samples_seen": samples_seen,
        "passes": pass_stats,
        "position": {"pass_index": pass_index, "step_in_pass": step_in_pass},
        "final_loss": last_loss,
        "resumed_from": resumed_from,
        "world_size": world,
        "device": device,
        "precision": precision,
        "image_size": image_size,
        "train_seconds": wall,
        "steps_per_pass_planned": extra.get("_steps_per_pass"),
    }


def _write_safetensors(model: Any, url: str) -> None:
    from safetensors.torch import save

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    fsio.atomic_write_bytes(url, save(sd, metadata={"format": "pt"}))
