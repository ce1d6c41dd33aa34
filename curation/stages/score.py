"""CLIP scoring with open_clip: image and text embeddings and their cosine similarity.

`ClipScorer` is a stage in the project's sense: construct it with plain parameters (cheap,
picklable), call `setup()` once per worker to load the model, then `score(pixels, texts)` per
batch. It knows nothing of Ray; `curation.flows.score` maps it over image shards on an actor pool.

- **Model**: an open_clip architecture by name (`ViT-B-32`, `ViT-L-14`, ... or the shipped
  `curation-tiny-vit` test config in `curation/model_configs/`). Weights come from a local
  `checkpoint` (`.safetensors`, or a torch file loaded with `weights_only=True`; a `state_dict`
  key and DistributedDataParallel's `module.` prefix are accepted), or from open_clip's
  `pretrained` tag when the file is already in its cache (never downloaded: the hub is put in
  offline mode). With neither, weights are random, seeded by `seed` so every worker holds the
  same model, and a warning says the scores mean nothing.
- **Inputs**: `pixels` are uint8 `(n, H, W, 3)` from `curation.io.images.PixelTransform` (the PIL
  half of open_clip's preprocessing, done by CPU decode workers); here they become floats,
  `/ 255`, normalized with the model's mean/std — together exactly open_clip's `preprocess`.
- **Outputs**: L2-normalized float32 embeddings and `clip_score = Σ img · txt` (cosine
  similarity, as DataComp's `clip_*_similarity_score`; no logit scale). On CUDA the model runs
  under bf16 (or fp16) autocast; on CPU in float32. Batches are processed in fixed slices of
  `batch_size`, so results do not depend on how rows were grouped upstream.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.core.accounting import drop_rows
from curation.core.stage import Resources, Shard, Stage, StageOutput
from curation.io.datacomp import embedding_column
from curation.io.images import (
    ImageLimits,
    ImageShard,
    PixelTransform,
    decode_images,
    iter_image_shard,
    probe_images,
)
from curation.stages.device_decode import DevicePreprocess, device_decodable

__all__ = [
    "CONFIG_DIR",
    "TINY_MODEL",
    "ClipScorer",
    "cached_pretrained_file",
    "ScoreResult",
    "load_state_dict",
    "probe_chunks",
    "register_model_configs",
    "resolve_device",
]

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_MODEL = "curation-tiny-vit"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_PP_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


def register_model_configs() -> None:
    """Register the configs shipped in `curation/model_configs` with open_clip (idempotent)."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(str(CONFIG_DIR))


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when torch sees a GPU, else `cpu`; `cuda` without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def load_state_dict(path: str) -> dict[str, Any]:
    """A model state dict from a local checkpoint, without unpickling arbitrary objects.

    `.safetensors` files are read with safetensors; anything else with
    `torch.load(weights_only=True)`, which refuses pickled code. open_clip training checkpoints
    (`{"state_dict": ..., "epoch": ...}`) and `module.`-prefixed keys are unwrapped.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if p.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"checkpoint {path!r}: expected one of {CHECKPOINT_SUFFIXES} (safetensors or a "
            "torch state dict)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError or RuntimeError variants
            raise ValueError(
                f"checkpoint {path!r} cannot be loaded with weights_only=True ({exc}); only "
                "plain tensors/state dicts are accepted — convert it to safetensors"
            ) from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"checkpoint {path!r} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


@dataclass
class ScoreResult:
    """Per-row outputs of one batch: float32 score, float32 unit-norm embeddings."""

    clip_score: np.ndarray
    image_embedding: np.ndarray
    text_embedding: np.ndarray


class ClipScorer:
    """open_clip model → embeddings + cosine score; build cheaply, `setup()` per worker."""

    def __init__(
        self,
        model: str,
        *,
        checkpoint: str | None = None,
        pretrained: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 256,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        if checkpoint and pretrained:
            raise ValueError("give a local --checkpoint or a --pretrained tag, not both")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint!r} is not a local file")
        register_model_configs()
        import open_clip

        if model not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model!r}; e.g. ViT-B-32, ViT-L-14 or {TINY_MODEL} "
                "(`python -c 'import open_clip; print(open_clip.list_models())'` lists them)"
            )
        self.model_name = model
        self.weights_path = checkpoint
        self.pretrained_cfg: dict[str, Any] = {}
        if pretrained:
            self.pretrained_cfg = dict(open_clip.get_pretrained_cfg(model, pretrained) or {})
            if not self.pretrained_cfg:
                raise ValueError(
                    f"{model} has no pretrained tag {pretrained!r}; it has "
                    f"{open_clip.list_pretrained_tags_by_model(model)}"
                )
            self.weights_path = cached_pretrained_file(self.pretrained_cfg, model, pretrained)
        self.embed_dim = int((open_clip.get_model_config(model) or {}).get("embed_dim", 0))
        self.checkpoint = checkpoint
        self.pretrained = pretrained
        self.device_request = device
        self.precision = precision
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_threads = num_threads
        self.random_weights = checkpoint is None and pretrained is None
        self._model: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def assets(self) -> dict[str, str]:
        """The file `setup()` opens: the weights (`--checkpoint`, or the cached file of a
        `--pretrained` tag found on the driver); none for random weights. Model configs are
        open_clip's or the package's own (`curation/model_configs`), found in each worker's
        installed copy."""
        return {"weights": self.weights_path} if self.weights_path else {}

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Load the weights from `paths["weights"]` (a local copy of the same bytes)."""
        if "weights" in paths:
            if self._model is not None:
                raise RuntimeError(f"{self.model_name}: weights switched after setup()")
            self.weights_path = paths["weights"]

    def setup(self) -> None:
        """Load the model (once per worker); resolves the device and precision."""
        if self._model is not None:
            return
        import open_clip
        import torch

        register_model_configs()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        self.device = resolve_device(self.device_request)
        torch.manual_seed(self.seed)  # random-weight models are identical on every worker
        pc = self.pretrained_cfg
        kwargs: dict[str, Any] = {
            "device": "cpu",
            "force_quick_gelu": bool(pc.get("quick_gelu", False)),
            "image_mean": pc.get("mean"),
            "image_std": pc.get("std"),
            "image_interpolation": pc.get("interpolation"),
            "image_resize_mode": pc.get("resize_mode"),
        }
        with warnings.catch_warnings(), _quiet_open_clip():
            model, _, _ = open_clip.create_model_and_transforms(self.model_name, **kwargs)
        if self.weights_path:
            sd = load_state_dict(self.weights_path)
            try:
                missing, unexpected = model.load_state_dict(sd, strict=False)
            except RuntimeError as exc:  # shape mismatches
                raise ValueError(
                    f"weights {self.weights_path!r} do not fit {self.model_name}: {exc}"
                ) from exc
            missing = [k for k in missing if not k.endswith("attn_mask")]
            if missing or unexpected:
                raise ValueError(
                    f"weights {self.weights_path!r} do not fit {self.model_name}: "
                    f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
                )
        else:
            warnings.warn(
                f"{self.model_name}: no --checkpoint or --pretrained; random weights "
                f"(seed {self.seed}) — scores test the plumbing only",
                stacklevel=2,
            )
        model.eval().to(self.device)
        self._model = model
        self._tokenizer = open_clip.get_tokenizer(self.model_name)
        pp = dict(model.visual.preprocess_cfg)
        got = {k: _square(pp[k]) if k == "size" else pp[k] for k in _PP_KEYS}
        want = self.expected_preprocess()
        if {k: _plain(v) for k, v in got.items()} != {k: _plain(v) for k, v in want.items()}:
            raise RuntimeError(
                f"{self.model_name}: the model's preprocessing {got} differs from the one "
                f"derived from its config {want}; decode workers would prepare images wrongly"
            )
        self.preprocess_cfg = pp
        self._mean = torch.tensor(pp["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pp["std"], device=self.device).view(1, 3, 1, 1)
        self.image_size = _square(pp["size"])
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if self.device.startswith("cuda") else "fp32"
        if precision != "fp32" and not self.device.startswith("cuda"):
            raise ValueError(f"precision {precision} needs a CUDA device (got {self.device})")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def expected_preprocess(self) -> dict[str, Any]:
        """open_clip's eval preprocessing for this model, from its configs, without building it.

        Mirrors `open_clip.create_model`: defaults, then the model config's `preprocess_cfg`,
        then the pretrained tag's; the size is the vision tower's. `setup()` checks the built
        model agrees, so decode workers can start before any model is loaded.
        """
        from dataclasses import asdict

        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        cfg = open_clip.get_model_config(self.model_name) or {}
        pp = merge_preprocess_dict(asdict(PreprocessCfg()), cfg.get("preprocess_cfg", {}))
        if self.pretrained:
            pp = merge_preprocess_dict(
                pp, open_clip.get_pretrained_cfg(self.model_name, self.pretrained)
            )
        size = cfg.get("vision_cfg", {}).get("image_size", pp["size"])
        pp["size"] = _square(size)
        return {k: pp[k] for k in _PP_KEYS}

    def pixel_transform(self) -> Any:
        """The CPU half of this model's preprocessing, for decode workers (picklable)."""
        from curation.io.images import PixelTransform

        pp = self.expected_preprocess()
        return PixelTransform(pp["size"], pp["interpolation"], pp["resize_mode"])

    def checkpoint_digest(self) -> str | None:
        """sha256 of the weights file (for resume fingerprints), None for random weights."""
        if not self.weights_path:
            return None
        if getattr(self, "_digest", None) is None:
            import hashlib

            h = hashlib.sha256()
            with open(self.weights_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self._digest = "sha256:" + h.hexdigest()
        return self._digest

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the model."""
        return {
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "pretrained": self.pretrained,
            "weights": self.weights_path,
            "random_weights": self.random_weights,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "precision": self.precision,
        }

    # -- compute ---------------------------------------------------------------------------
    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 `(n, H, W, 3)` → float32 unit-norm image embeddings `(n, d)`."""
        import torch

        self.setup()
        out = []
        with torch.inference_mode():
            for lo in range(0, len(pixels), self.batch_size):
                batch = np.require(pixels[lo : lo + self.batch_size], requirements=["C", "W"])
                x = torch.from_numpy(batch)
                x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                out.append(self._encode_uint8(x))
        return _concat(out, self.embed_dim)

    def embed_pixels(self, pixels: Any) -> np.ndarray:
        """`embed_images` of uint8 numpy `(n, H, W, 3)`, `embed_image_tensor` of a uint8 torch
        tensor `(n, 3, H, W)` (the `--decode device` path)."""
        if isinstance(pixels, np.ndarray):
            return self.embed_images(pixels)
        return self.embed_image_tensor(pixels)

    def embed_image_tensor(self, x: Any) -> np.ndarray:
        """uint8 torch `(n, 3, H, W)` (already on the device, e.g. decoded there) → float32
        unit-norm image embeddings `(n, d)`; the same fixed `batch_size` slices as
        `embed_images`."""
        import torch

        self.setup()
        with torch.inference_mode():
            out = [
                self._encode_uint8(x[lo : lo + self.batch_size].to(self.device))
                for lo in range(0, len(x), self.batch_size)
            ]
        return _concat(out, self.embed_dim)

    def _encode_uint8(self, x: Any) -> np.ndarray:
        """uint8 NCHW on the device → `/ 255`, normalize, encode, L2-normalize (one batch)."""
        x = x.float().div_(255)
        x = (x - self._mean) / self._std
        with self._autocast():
            f = self._model.encode_image(x)
        return _normalize(f.float()).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Captions → float32 unit-norm text embeddings `(n, d)` (null captions count as "")."""
        import torch

        self.setup()
        texts = [t if t is not None else "" for t in texts]
        out = []
        with torch.inference_mode():
            for lo in range(0, len(texts), self.batch_size):
                tok = self._tokenizer(texts[lo : lo + self.batch_size]).to(self.device)
                with self._autocast():
                    f = self._model.encode_text(tok)
                out.append(_normalize(f.float()).cpu().numpy())
        return _concat(out, self.embed_dim)

    def score(self, pixels: Any, texts: list[str]) -> ScoreResult:
        """Embeddings of both sides and their cosine similarity, row by row.

        `pixels`: uint8 numpy `(n, H, W, 3)` (`embed_images`) or a uint8 torch tensor
        `(n, 3, H, W)` (`embed_image_tensor`, the `--decode device` path).
        """
        if len(pixels) != len(texts):
            raise ValueError(f"{len(pixels)} images but {len(texts)} texts")
        img = self.embed_pixels(pixels)
        txt = self.embed_texts(texts)
        s = np.einsum("nd,nd->n", img, txt, dtype=np.float32) if len(img) else np.zeros(0)
        return ScoreResult(s.astype(np.float32), img, txt)


def cached_pretrained_file(cfg: dict[str, Any], model: str, tag: str) -> str:
    """The local file of open_clip's pretrained weights `model`/`tag`, already in the cache.

    Looks where open_clip's downloader puts them (the Hugging Face hub cache for `hf_hub`
    entries, preferring `.safetensors`; `~/.cache/clip` for URL entries) and never downloads.
    """
    tried = []
    if cfg.get("file"):
        tried.append(cfg["file"])
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        model_id, filename = os.path.split(cfg["hf_hub"])  # as open_clip's download_pretrained
        filename = filename or HF_WEIGHTS_NAME
        for candidate in [*_get_safe_alternatives(filename), filename]:
            found = try_to_load_from_cache(model_id, candidate)
            if isinstance(found, str):
                return found
            tried.append(f"hf://{model_id}/{candidate}")
    if cfg.get("url"):
        tried.append(
            os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        )
    for path in tried:
        if not path.startswith("hf://") and os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"open_clip weights {model}/{tag} are not in the local cache (looked for {tried}) and "
        "nothing is downloaded here; pass --checkpoint PATH"
    )


def _normalize(x: Any) -> Any:
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def _concat(parts: list[np.ndarray], dim: int | None) -> np.ndarray:
    if parts:
        return np.concatenate(parts).astype(np.float32, copy=False)
    return np.zeros((0, dim or 0), dtype=np.float32)


def _plain(v: Any) -> Any:
    return [round(float(x), 8) for x in v] if isinstance(v, (tuple, list)) else v


def _square(size: Any) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square model input size {size} is not supported")
        return int(size[0])
    return int(size)


class _quiet_open_clip:
    """open_clip logs a WARNING for random init; we warn once ourselves with the reason."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self._level)


# -- the stage: decode tasks feed scorer actors ------------------------------------------
OUTPUT_COLUMNS = (
    "uid",
    "key",
    "url",
    "text",
    "original_width",
    "original_height",
    "clip_score",
    "image_embedding",
    "text_embedding",
)


def decode_chunks(
    shard: Shard,
    limits: ImageLimits,
    transform: PixelTransform,
    chunk_rows: int,
    image_column: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream one image shard and yield decoded chunks (the CPU half of the score stage).

    The shard is read one chunk ahead (`iter_image_shard`), so memory is bounded by a chunk,
    not by the shard. Each chunk: `meta` (up to `chunk_rows` kept rows' metadata, image bytes
    dropped), `pixels` (uint8), and `counts` and `quarantine` for the samples read with it; the
    shard-level ones (a corrupt or too-large shard) ride on the last chunk.
    """
    for img in iter_image_shard(
        shard.input, limits, image_column, shard=shard.name, chunk_rows=chunk_rows
    ):
        yield decode_chunk(img, shard, limits, transform)


def decode_chunk(
    img: ImageShard,
    shard: Shard,
    limits: ImageLimits,
    transform: PixelTransform,
    stage: str = "score",
) -> dict[str, Any]:
    """One `decode_chunks` chunk from the samples `img` (META_COLUMNS + `image` bytes) of
    `shard`; undecodable images are counted and quarantined (as `stage`)."""
    part = img.table
    pixels, ok, failures, sizes = decode_images(part.column("image"), transform, limits)
    counts: Counter = Counter(img.counts)
    quarantine = list(img.quarantine)
    if failures:
        keys = np.asarray(part.column("key").to_pylist(), dtype=object)[~ok]
        drop_rows(
            counts, quarantine, stage, shard.name, shard.input, zip(keys, failures, strict=True)
        )
    meta = _with_sizes(part.drop_columns(["image"]).filter(pa.array(ok)), sizes)
    return {"meta": meta, "pixels": pixels, "counts": counts, "quarantine": quarantine}


def probe_chunks(
    shard: Shard,
    limits: ImageLimits,
    transform: PixelTransform,
    chunk_rows: int,
    image_column: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The CPU half of `--decode device` (`curation.stages.device_decode`): like
    `decode_chunks`, but plain JPEGs are only checked by their header and shipped as bytes.

    Each chunk: `meta` (kept rows, in shard order; sizes from the headers), `on_device` (bool
    per `meta` row), `jpeg` (list of bytes: the images of the `on_device` rows) with `jpeg_sizes`
    (their header width, height), `pixels` (uint8, the other rows decoded here by the exact
    path), `counts`, `quarantine`, and `shard` / `input` for the scorer's quarantine records.
    """
    for img in iter_image_shard(
        shard.input, limits, image_column, shard=shard.name, chunk_rows=chunk_rows
    ):
        yield probe_chunk(img, shard, limits, transform)


def probe_chunk(
    img: ImageShard,
    shard: Shard,
    limits: ImageLimits,
    transform: PixelTransform,
    stage: str = "score",
) -> dict[str, Any]:
    """One `probe_chunks` chunk from the samples `img` of `shard` (quarantined as `stage`)."""
    part = img.table
    blobs = part.column("image").to_pylist()
    ok, failures, sizes, kinds = probe_images(blobs, limits)
    rows = np.flatnonzero(ok)
    reasons = dict(zip(np.flatnonzero(~ok).tolist(), failures, strict=True))
    to_dev = np.array(
        [device_decodable(blobs[i], k) for i, k in zip(rows, kinds, strict=True)], dtype=bool
    )
    cpu = rows[~to_dev]
    pixels, ok_cpu, cpu_failures, _ = decode_images([blobs[i] for i in cpu], transform, limits)
    ok[cpu[~ok_cpu]] = False
    reasons.update(zip(cpu[~ok_cpu].tolist(), cpu_failures, strict=True))
    counts: Counter = Counter(img.counts)
    counts["images_decoded_cpu"] += int(ok_cpu.sum())
    quarantine = list(img.quarantine)
    keys = part.column("key").to_pylist()
    # in row order, as decode_chunks
    dropped = ((keys[i], reasons[i]) for i in sorted(reasons))
    drop_rows(counts, quarantine, stage, shard.name, shard.input, dropped)
    kept = ok[rows]  # of the header-checked rows, those still kept
    meta = _with_sizes(part.drop_columns(["image"]).filter(pa.array(ok)), sizes[kept])
    dev_rows = rows[to_dev]
    return {
        "meta": meta,
        "on_device": to_dev[kept],
        "jpeg": [blobs[i] for i in dev_rows],
        "jpeg_sizes": sizes[to_dev],
        "pixels": pixels,
        "counts": counts,
        "quarantine": quarantine,
        "shard": shard.name,
        "input": shard.input,
        "stage": stage,
    }


class ScoreStage(Stage):
    """The GPU half of the score stage: a `ClipScorer` on an actor, scoring decoded chunks.

    `resources` is set by the flow from the cluster's shape (one GPU each, or CPU shares).
    """

    name = "score"

    def __init__(
        self,
        scorer: ClipScorer,
        resources: Resources | None = None,
        device_preprocess: DevicePreprocess | None = None,
    ) -> None:
        self.scorer = scorer
        self.resources = resources or Resources(cpus=1, actor=True)
        #: decodes the JPEGs of `probe_chunks` chunks (`--decode device`); None: `pil` only
        self.device_preprocess = device_preprocess

    def assets(self) -> dict[str, str]:
        """The scorer's weights file (see `ClipScorer.assets`)."""
        return self.scorer.assets()

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Load the weights from a local copy (see `ClipScorer.use_assets`)."""
        self.scorer.use_assets(paths)

    def setup(self) -> None:
        """Load the model (once per actor)."""
        self.scorer.setup()

    def decoded(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The chunk with `pixels` for every row: a `probe_chunks` chunk (`--decode device`)
        has its JPEGs decoded on the scorer's device; a `decode_chunks` one is already."""
        if "jpeg" not in chunk:
            return chunk
        if self.device_preprocess is None:
            raise RuntimeError("a --decode device chunk, but this stage has no preprocess")
        self.setup()
        return self.device_preprocess.finish(chunk, self.scorer.device)

    def process(self, chunk: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        """Scores and float16 embeddings of one decoded chunk (its counters pass through).

        A `probe_chunks` chunk (`--decode device`) has its JPEGs decoded here first."""
        chunk = self.decoded(chunk)
        meta: pa.Table = chunk["meta"]
        res = self.scorer.score(chunk["pixels"], meta.column("text").to_pylist())
        d = self.scorer.embed_dim
        return {
            "meta": meta,
            "clip_score": res.clip_score,
            "image_embedding": res.image_embedding.astype(np.float16).reshape(-1, d),
            "text_embedding": res.text_embedding.astype(np.float16).reshape(-1, d),
            "counts": chunk["counts"],
            "quarantine": chunk["quarantine"],
        }


def _with_sizes(meta: pa.Table, sizes: np.ndarray) -> pa.Table:
    """Missing original_width/height come from the decoded image."""
    import pyarrow.compute as pc

    for j, name in enumerate(("original_width", "original_height")):
        col = pc.coalesce(meta.column(name), pa.array(sizes[:, j], pa.int32()))
        meta = meta.set_column(meta.schema.get_field_index(name), name, col)
    return meta


def assemble_shard(shard: Shard, results: list[dict[str, Any]]) -> StageOutput:
    """A shard's scored chunks, in order (a shard yields at least one), as one output."""
    counts: Counter = Counter()
    for r in results:
        counts.update(r["counts"])
    meta = pa.concat_tables([r["meta"] for r in results])
    table = pa.table(
        {
            **{c: meta.column(c) for c in OUTPUT_COLUMNS[:6]},
            "clip_score": pa.array(np.concatenate([r["clip_score"] for r in results])),
            **{
                c: embedding_column(np.concatenate([r[c] for r in results]), c, shard.input)
                for c in OUTPUT_COLUMNS[7:]
            },
        }
    )
    return StageOutput(table, counts, [q for r in results for q in r["quarantine"]])
