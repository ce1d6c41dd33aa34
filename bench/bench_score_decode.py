"""`curation score --decode device` vs the exact path: accuracy and throughput.

Accuracy (always; on the scorer's device, so with `--gpu` nvJPEG decodes): a real-looking set of
JPEGs (the generated world's pool images, `curation.synth.world`, re-encoded at their web sizes
from 32 px to 1600x2666 and banners; and `curation synth --images` scenes rescaled 0.5-3x with
aspect jitter), quality 50-95, chroma 4:4:4 / 4:2:2 / 4:2:0, some progressive, grayscale, CMYK
and PNG (the last two take the exact CPU path by design). Both paths run the score stage's own
code (`decode_chunks` / `probe_chunks` + `ScoreStage`), with `curation-tiny-vit` (random weights,
or `--checkpoint`, e.g. the scorer `bench/quality.py` trains: `runs/quality/scorer/
model.safetensors`). Reported: CLIP-score |Δ| mean / p99 / max, the overlap of the top-30%
selections (Jaccard and the fraction of the exact path's selection kept) and the pixel
differences of the preprocessed images (at the tiny model's 64 px and at 224 px).

Throughput on the CPU (one thread, 224 px): decode + resize/crop with Pillow (the exact path)
vs the header probe the CPU task does in device mode vs torchvision's decode_jpeg + tensor
resize on the CPU.

GPU (`--gpu`, when one is present): ViT-B-32 and ViT-L-14 at 224 px with random weights: model
alone on pre-decoded pixels, decode + resize alone on the GPU, and end to end from JPEG tars
through the actor pool with `--decode pil` and `--decode device` (steady state, as
`bench_score.py --gpu`; the goal is end to end >= 90% of model alone).

    python bench/bench_score_decode.py --gpu     # on a machine with a GPU (one command)
    python bench/bench_score_decode.py --gpu --no-ray   # the same where Ray is not installed:
                                                 # JPEG bytes -> scores in one process
    python bench/bench_score_decode.py --smoke [--no-ray]   # CPU: every part, tiny sizes
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_score import (  # noqa: E402  (the shared helpers of the score benchmark)
    decode_pixels,
    device_sync,
    jpeg_pool,
    model_throughput,
    steady_state,
)

TOP = 0.30


# -- the image set --------------------------------------------------------------------------
def real_looking_set(folder: Path, n: int, seed: int = 0) -> tuple[str, dict[str, int]]:
    """One webdataset tar of `n` JPEG (and a few PNG) samples with captions; its kinds."""
    import tarfile

    from PIL import Image

    from curation.io.images import read_tar
    from curation.synth.images import write_synthetic_image_pool
    from curation.synth.world import WorldConfig, write_world

    rng = np.random.default_rng(seed)
    n_world = n // 2
    cfg = WorldConfig(
        concepts=50,
        pool_size=n_world,
        clean_size=1,
        test_per_concept=1,
        retrieval_per_concept=0,
        samples_per_shard=max(1, n_world),
        seed=seed,
    )
    write_world(str(folder / "world"), cfg)
    world = read_tar(str(folder / "world" / "pool" / "shards" / "00000.tar")).table
    write_synthetic_image_pool(str(folder / "synth"), 1, n - n_world, seed, image_size=256)
    synth = read_tar(next(str(p) for p in (folder / "synth").glob("*.tar"))).table

    kinds: dict[str, int] = {}
    members: list[tuple[str, bytes]] = []
    for source, table in (("world", world), ("synth", synth)):
        widths = table.column("original_width").to_pylist()
        heights = table.column("original_height").to_pylist()
        for i, (data, text) in enumerate(
            zip(table.column("image").to_pylist(), table.column("text").to_pylist(), strict=True)
        ):
            im = Image.open(io.BytesIO(data)).convert("RGB")
            if source == "world":  # the web size the world gave this image
                w, h = int(widths[i]), int(heights[i])
            else:
                f = rng.uniform(0.5, 3.0)
                w = max(16, round(im.width * f * rng.uniform(0.8, 1.25)))
                h = max(16, round(im.height * f))
            im = im.resize((w, h), Image.BICUBIC)
            u = rng.random()
            kind, fmt, kw = "jpeg", "JPEG", {}
            if u < 0.05:
                kind, im = "gray", im.convert("L")
            elif u < 0.07:
                kind, im = "cmyk", im.convert("CMYK")
            elif u < 0.09:
                kind, fmt = "png", "PNG"
            elif u < 0.24:
                kind, kw = "progressive", {"progressive": True}
            if fmt == "JPEG":
                kw.update(
                    quality=int(rng.integers(50, 96)),
                    subsampling=int(rng.choice(3, p=[0.15, 0.15, 0.7])),
                )
            buf = io.BytesIO()
            im.save(buf, format=fmt, **kw)
            kinds[kind] = kinds.get(kind, 0) + 1
            key = f"{source}{i:06d}"
            members += [(f"{key}.jpg", buf.getvalue()), (f"{key}.txt", (text or "").encode())]
    path = folder / "set.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path), kinds


def _jpegs(tar: str) -> list[bytes]:
    from curation.io.images import probe_images, read_tar

    blobs = read_tar(tar).table.column("image").to_pylist()
    _, _, _, kinds = probe_images(blobs)
    return [b for b, k in zip(blobs, kinds, strict=True) if k[0] == "JPEG" and k[1] != "CMYK"]


# -- accuracy -------------------------------------------------------------------------------
def _scorer(model: str, checkpoint: str | None, device: str, batch_size: int = 256):
    from curation.stages.score import ClipScorer

    scorer = ClipScorer(model, checkpoint=checkpoint, batch_size=batch_size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer.setup()
    return scorer


def _preprocess(scorer):
    from curation.io.images import ImageLimits
    from curation.stages.device_decode import DevicePreprocess

    pp = scorer.expected_preprocess()
    return DevicePreprocess(pp["size"], pp["interpolation"], pp["resize_mode"], ImageLimits())


def score_both(tar: str, scorer) -> tuple:
    """The exact and the device path over `tar` with the score stage's code: two outputs."""
    from curation.core.stage import Shard
    from curation.io.images import ImageLimits
    from curation.stages.score import ScoreStage, assemble_shard, decode_chunks, probe_chunks

    shard, limits = Shard("set", tar), ImageLimits()
    out = []
    for split, stage in (
        (decode_chunks, ScoreStage(scorer)),
        (probe_chunks, ScoreStage(scorer, device_preprocess=_preprocess(scorer))),
    ):
        chunks = split(shard, limits, scorer.pixel_transform(), 512)
        out.append(assemble_shard(shard, [stage.process(c) for c in chunks]))
    return out[0], out[1]


def top_agreement(a: np.ndarray, b: np.ndarray, frac: float = TOP) -> tuple[float, float]:
    """(Jaccard, fraction of `a`'s selection also in `b`'s) of the top `frac` by score."""
    k = math.ceil(frac * len(a))
    sa = set(np.argsort(-a, kind="stable")[:k].tolist())
    sb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(sa & sb) / max(1, len(sa | sb)), len(sa & sb) / max(1, k)


def pixel_diffs(blobs: list[bytes], size: int, device: str) -> dict[str, float]:
    """Pillow + open_clip's PIL transform vs the device path, same JPEGs, `size` px."""

    from curation.io.images import PixelTransform, decode_images, probe_images
    from curation.stages.device_decode import DevicePreprocess

    exact, ok, _, _ = decode_images(blobs, PixelTransform(size, "bicubic", "shortest"))
    _, _, sizes, _ = probe_images(blobs)
    pre = DevicePreprocess(size, "bicubic", "shortest")
    got, ok2, _, _ = pre.decode(blobs, sizes, device)
    assert ok.all() and ok2.all()
    d = np.abs(got.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16) - exact.astype(np.int16))
    per_image = d.reshape(len(d), -1).max(1)
    return {
        "max": float(d.max()),
        "mean": float(d.mean()),
        "differing": float((d > 0).mean()),
        "p99_image_max": float(np.percentile(per_image, 99)),
    }


def bench_accuracy(tar: str, kinds: dict, models: list[tuple[str, str | None]], device: str):
    """Scores and pixels of both paths on the set, per (model, checkpoint or None)."""
    n = sum(kinds.values())
    print(f"image set: {n:,} samples {kinds}")
    for model, ckpt in models:
        scorer = _scorer(model, ckpt, device)
        ref, got = score_both(tar, scorer)
        assert ref.table.column("key").equals(got.table.column("key"))
        a = ref.table.column("clip_score").to_numpy()
        b = got.table.column("clip_score").to_numpy()
        d = np.abs(a - b)
        jac, kept = top_agreement(a, b)
        weights = "trained weights" if ckpt else "random weights"
        print(
            f"accuracy {model} ({scorer.image_size} px, {weights}, {device}): clip_score "
            f"|Δ| mean {d.mean():.2e} p99 {np.percentile(d, 99):.2e} max {d.max():.2e} "
            f"(scores: std {a.std():.3f}, range {a.min():.3f}..{a.max():.3f}); top {TOP:.0%}: "
            f"Jaccard {jac:.4f}, {kept:.2%} of the exact selection kept; routed "
            f"{got.counts['images_decoded_device']:,} to the device, "
            f"{got.counts['images_decoded_cpu']:,} exact on CPU, "
            f"{got.counts['images_device_fallback']:,} fell back"
        )
    blobs = _jpegs(tar)
    for size in (64, 224):
        p = pixel_diffs(blobs, size, device)
        print(
            f"pixels at {size} px ({len(blobs):,} JPEGs, {device}): |Δ| max {p['max']:.0f}, "
            f"mean {p['mean']:.4f}, {p['differing']:.2%} of values differ, per-image max p99 "
            f"{p['p99_image_max']:.0f}"
        )


# -- throughput -----------------------------------------------------------------------------
def _rate(fn, n: int, sync=lambda: None) -> float:
    fn()  # warm-up (imports, open_clip's transform, CUDA context)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return n / (time.perf_counter() - t0)


def bench_cpu_throughput(tar: str, label: str, size: int = 224) -> None:
    """One thread: exact path vs header probe vs torchvision on the CPU, `tar`'s JPEGs."""
    import torch

    from curation.io.images import PixelTransform, decode_images, probe_images
    from curation.stages.device_decode import DevicePreprocess

    torch.set_num_threads(1)
    blobs = _jpegs(tar)
    _, _, sizes, _ = probe_images(blobs)
    pre = DevicePreprocess(size, "bicubic", "shortest")
    tr = PixelTransform(size, "bicubic", "shortest")
    pil = _rate(lambda: decode_images(blobs, tr), len(blobs))
    probe = _rate(lambda: probe_images(blobs), len(blobs))
    tv = _rate(lambda: pre.decode(blobs, sizes, "cpu"), len(blobs))
    mp = float((sizes[:, 0].astype(np.int64) * sizes[:, 1]).mean()) / 1e6
    print(
        f"CPU one thread, {len(blobs):,} {label} JPEGs (mean {mp:.2f} MP) → {size} px: Pillow "
        f"decode + PIL transform (exact) {pil:,.0f} img/s; header probe (the CPU task with "
        f"--decode device) {probe:,.0f} img/s; torchvision decode_jpeg + tensor resize on CPU "
        f"{tv:,.0f} img/s ({tv / pil:.1f}x)"
    )


def in_process_rate(files: list[str], scorer, mode: str) -> tuple[int, float]:
    """(images, img/s) of the score stage's own code run in this process, shard after shard:
    the CPU half (`decode_chunks`, or `probe_chunks` with `mode="device"`) then the scorer
    (`ScoreStage.process`), one after the other. With `device` the CPU half is a header check,
    so this is the scorer's own rate from JPEG bytes, no Ray needed."""
    from curation.core.stage import Shard
    from curation.io.images import ImageLimits
    from curation.stages.score import ScoreStage, decode_chunks, probe_chunks

    limits, transform = ImageLimits(), scorer.pixel_transform()
    split = probe_chunks if mode == "device" else decode_chunks
    stage = ScoreStage(scorer, device_preprocess=_preprocess(scorer) if mode == "device" else None)
    for c in split(Shard("warm", files[0]), limits, transform, 1024):  # warm-up
        stage.process(c)
    sync = device_sync(scorer)
    sync()
    t0, n = time.perf_counter(), 0
    for f in files:
        for c in split(Shard(Path(f).stem, f), limits, transform, 1024):
            n += len(stage.process(c)["clip_score"])
    sync()
    return n, n / (time.perf_counter() - t0)


def bench_device(
    tmp: Path,
    models: list[str],
    images: int,
    device: str,
    image_size: int,
    repeats: int,
    smoke: bool = False,
    use_ray: bool = True,
) -> None:
    """Model alone vs decode alone vs end to end (pil / device) per model on `device`: through
    the Ray actor pool, or (`use_ray=False`, for a machine without Ray) in this process."""
    import torch

    from curation.io.images import probe_images, read_tar
    from curation.stages.score import ClipScorer

    if device == "cuda" and not torch.cuda.is_available():
        print("score decode GPU: no CUDA device here; skipped")
        return
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    cpus = os.cpu_count() or 1
    shards = max(cpus - 1, 4)
    files = jpeg_pool(tmp / "gpool", shards, -(-images // shards), image_size)
    if use_ray:
        from curation.executor.runner import ensure_ray

        ensure_ray(num_cpus=cpus)
    blobs = read_tar(files[0]).table.column("image").to_pylist()
    _, _, sizes, _ = probe_images(blobs)
    for model in models:
        scorer = _scorer(model, None, device)
        pixels, texts, _ = decode_pixels(files[:1], scorer.pixel_transform())
        alone = model_throughput(scorer, pixels, texts, repeats=repeats)
        pre = _preprocess(scorer)
        dec = _rate(lambda p=pre: p.decode(blobs, sizes, device), len(blobs), device_sync(scorer))
        px = scorer.image_size
        if not use_ray:
            got = {mode: in_process_rate(files, scorer, mode) for mode in ("pil", "device")}
            print(
                f"score {name}{' (smoke: sizes too small to mean anything)' if smoke else ''}, "
                f"{model} {px} px, in one process (no Ray): model alone {alone:,.0f} img/s; "
                f"decode+resize alone on {device} {dec:,.0f} img/s ({image_size} px JPEGs); "
                f"JPEG bytes → scores, --decode device {got['device'][1]:,.0f} img/s = "
                f"{got['device'][1] / alone:.0%} of model alone; --decode pil on one decode "
                f"core {got['pil'][1]:,.0f} img/s ({got['device'][0]:,} images)"
            )
            continue
        del scorer
        if device == "cuda":
            torch.cuda.empty_cache()
        rates = {}
        for mode in ("pil", "device"):
            n2, _, steady, s = steady_state(
                files,
                tmp / model / mode,
                lambda m=model: ClipScorer(m, batch_size=256),
                chunk_rows=1024,
                device=device,
                decode=mode,
            )
            rates[mode] = steady
        print(
            f"score {name}{' (smoke: sizes too small to mean anything)' if smoke else ''}, "
            f"{model} {px} px: model alone {alone:,.0f} img/s; decode+resize "
            f"alone on {device} {dec:,.0f} img/s ({image_size} px JPEGs); end to end steady "
            f"state --decode pil {rates['pil']:,.0f} img/s = {rates['pil'] / alone:.0%}, "
            f"--decode device {rates['device']:,.0f} img/s = {rates['device'] / alone:.0%} of "
            f"model alone ({n2:,} images, {s['actors']} actor(s), {cpus} CPUs)"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="accuracy with nvJPEG + GPU throughput")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU, tiny sizes")
    ap.add_argument("--images", type=int, default=1000, help="accuracy set size")
    ap.add_argument("--checkpoint", default=None, help="curation-tiny-vit weights (trained)")
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14", help="GPU throughput models")
    ap.add_argument("--gpu-images", type=int, default=30_000)
    ap.add_argument("--image-size", type=int, default=256, help="GPU pool's JPEG size")
    ap.add_argument(
        "--no-ray",
        action="store_true",
        help="GPU part in this process (a machine without Ray): the scorer's rate from JPEGs",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from curation.stages.score import TINY_MODEL

    tmp = Path(tempfile.mkdtemp(prefix="curation-bench-decode-"))
    try:
        n = 48 if args.smoke else args.images
        tar, kinds = real_looking_set(tmp / "set", n)
        device = "cuda" if args.gpu else "cpu"
        models = [(TINY_MODEL, None)]
        if args.checkpoint:
            models.append((TINY_MODEL, args.checkpoint))
        if args.gpu:
            models.append(("ViT-B-32", None))
        bench_accuracy(tar, kinds, models, device)
        bench_cpu_throughput(tar, "real-looking")
        pool = jpeg_pool(tmp / "cpool", 1, 48 if args.smoke else 500, 256)
        bench_cpu_throughput(pool[0], "`synth --images` 256 px")
        use_ray = not args.no_ray
        if args.smoke:  # the GPU part's code, on the CPU with the tiny model
            bench_device(tmp, [TINY_MODEL], 64, "cpu", 64, 1, smoke=True, use_ray=use_ray)
        elif args.gpu:
            bench_device(
                tmp, args.models.split(","), args.gpu_images, "cuda", args.image_size, 20,
                use_ray=use_ray,
            )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
