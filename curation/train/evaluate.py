"""A small zero-shot classification check on held-out synthetic images (`curation synth --images`).

The synthetic pool's truth (`images-NNNNN.parquet` beside each tar: `uid`, `concepts` such as
`color:red`, `shape:circle`, `background:white`) says what each image shows. Images with exactly
one group of shapes give two tasks: its `shape` (8 classes) and its `color` (12 classes). Each
class becomes a text prompt ("a photo of a red shape", "a photo of a circle"), embedded with the
model's text tower; an image is classified as the prompt closest to its embedding (cosine), as in
CLIP's zero-shot evaluation. The result is top-1 accuracy against chance (1 / classes).

This is the minimal evaluation `curation train` reports (`--eval HELD_OUT_SHARDS`); the full
evaluation suite is a separate issue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from curation.core import fsio

__all__ = ["TASKS", "load_eval_set", "zero_shot_accuracy", "evaluate_model", "evaluate_checkpoint"]


def _prompts(task: str, name: str, others: Sequence[str]) -> list[str]:
    """Prompt ensemble of a class, in the captions' own words: a color is averaged over every
    shape of the eval set ("a red circle", "a red star", ...), a shape over every color."""
    if task == "color":
        return [f"a photo of a {name} {s}" for s in others]
    return [f"a photo of a {c} {name}" for c in others]


#: the tasks: the color or the shape of the one group of shapes an image shows
TASKS = ("color", "shape")


def _truth_url(tar_url: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if tar_url.endswith(suffix):
            return tar_url[: -len(suffix)] + ".parquet"
    raise ValueError(f"{tar_url}: not a tar shard")


def load_eval_set(
    shards: Sequence[str], image_size: int, *, limit: int = 2000, interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> dict[str, Any]:  # fmt: skip
    """Decoded single-group images of synthetic shards with their labels.

    Returns {"pixels": uint8 [n, H, W, 3], "color": [n] str, "shape": [n] str, "uids": [n]}.
    Shards without a truth Parquet beside them are refused (a ValueError naming the shard).
    """
    from curation.io.images import ImageLimits, PixelTransform, decode_images, iter_image_shard

    truth: dict[str, tuple[str, str]] = {}
    for url in shards:
        t_url = _truth_url(url)
        if not fsio.exists(t_url):
            raise ValueError(
                f"--eval shard {url}: no {t_url.rsplit('/', 1)[-1]} with the truth beside it "
                "(eval shards come from `curation synth --images`)"
            )
        fs, path = fsio.url_to_fs(t_url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["uid", "concepts", "fault", "mismatched"])
        for uid, concepts, fault in zip(
            table.column("uid").to_pylist(),
            table.column("concepts").to_pylist(),
            table.column("fault").to_pylist(),
            strict=True,
        ):
            if fault is not None or not concepts:
                continue
            colors = [c[6:] for c in concepts if c.startswith("color:")]
            shapes = [c[6:] for c in concepts if c.startswith("shape:")]
            if len(colors) == 1 and len(shapes) == 1:
                truth[uid] = (colors[0], shapes[0])
    transform = PixelTransform(image_size, interpolation, resize_mode)
    limits = ImageLimits()
    pixels, colors, shapes, uids = [], [], [], []
    n = 0
    for url in shards:
        for chunk in iter_image_shard(url, limits, chunk_rows=256):
            tbl = chunk.table
            sel = [i for i, u in enumerate(tbl.column("uid").to_pylist()) if u in truth]
            if not sel:
                continue
            sel = sel[: max(0, limit - n)]
            part = tbl.take(sel)
            px, ok, _, _ = decode_images(part.column("image"), transform, limits)
            for u in np.asarray(part.column("uid").to_pylist(), dtype=object)[ok]:
                colors.append(truth[u][0])
                shapes.append(truth[u][1])
                uids.append(u)
            pixels.append(px)
            n += int(ok.sum())
            if n >= limit:
                break
        if n >= limit:
            break
    if not n:
        raise ValueError(f"no single-object images with a truth found in {list(shards)}")
    return {
        "pixels": np.concatenate(pixels),
        "color": np.asarray(colors),
        "shape": np.asarray(shapes),
        "uids": uids,
    }


def zero_shot_accuracy(
    model: Any,
    tokenizer: Any,
    pixels: np.ndarray,
    labels: np.ndarray,
    prompts: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1 zero-shot accuracy of `model` on uint8 `(n, H, W, 3)` images and string labels.

    `prompts(name) -> list[str]`: the texts whose mean unit embedding stands for a class."""
    import torch
    import torch.nn.functional as F

    classes = sorted(set(labels.tolist()))
    model.eval()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    with torch.inference_mode():
        weights = []
        for c in classes:
            tok = tokenizer(list(prompts(c))).to(device)
            e = F.normalize(model.encode_text(tok).float(), dim=-1).mean(0)
            weights.append(F.normalize(e, dim=-1))
        w = torch.stack(weights, dim=1)  # [d, classes]
        preds = []
        for lo in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(pixels[lo : lo + batch_size]))
            x = x.to(device).permute(0, 3, 1, 2).float().div_(255)
            f = F.normalize(model.encode_image((x - m) / s).float(), dim=-1)
            preds.append((f @ w).argmax(dim=1).cpu().numpy())
    pred = np.concatenate(preds)
    truth = np.searchsorted(np.asarray(classes), labels)
    acc = float((pred == truth).mean())
    return {
        "accuracy": acc,
        "chance": 1.0 / len(classes),
        "classes": len(classes),
        "images": int(len(labels)),
    }


def evaluate_model(
    model: Any, tokenizer: Any, preprocess_cfg: dict[str, Any], eval_set: dict[str, Any],
    device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Both tasks (`color`, `shape`) on a loaded eval set."""
    return {
        task: zero_shot_accuracy(
            model,
            tokenizer,
            eval_set["pixels"],
            eval_set[task],
            lambda name, task=task: _prompts(
                task, name, sorted(set(eval_set["shape" if task == "color" else "color"]))
            ),
            mean=preprocess_cfg["mean"],
            std=preprocess_cfg["std"],
            device=device,
        )
        for task in TASKS
    }


def evaluate_checkpoint(
    model_name: str, weights: str | None, shards: Sequence[str], *, limit: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Zero-shot accuracy of `model_name` with `weights` (a local .safetensors / state dict;
    None: random weights, seeded) on held-out synthetic shards."""
    import open_clip
    import torch

    from curation.stages.score import load_state_dict, register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, device="cpu")
    if weights:
        model.load_state_dict(load_state_dict(weights), strict=True)
    tokenizer = open_clip.get_tokenizer(model_name)
    pp = dict(model.visual.preprocess_cfg)
    size = pp["size"][0] if isinstance(pp["size"], (list, tuple)) else pp["size"]
    es = load_eval_set(
        shards, int(size), limit=limit, interpolation=pp["interpolation"],
        resize_mode=pp["resize_mode"],
    )  # fmt: skip
    return evaluate_model(model, tokenizer, pp, es)
