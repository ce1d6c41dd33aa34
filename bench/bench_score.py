"""CLIP scoring throughput: decode vs model, and end to end on the Ray actor pool.

CPU (always, part of `make bench`): the shipped tiny open_clip model on a generated webdataset
pool (`curation synth --images`, 256 px JPEGs):
- decode: JPEG → resize/crop uint8 (`decode_images`), one core;
- model: `ClipScorer.score` on pre-decoded pixels (both towers + tokenizer), one thread;
- the share of per-image time spent decoding vs in the model;
- end to end: `score_shards` on a local Ray cluster (CPU actors + decode tasks), Ray start
  excluded.

GPU (`python bench/bench_score.py --gpu`, when a GPU is present): ViT-B-32 and ViT-L-14 at
224 px with random weights (throughput does not depend on the weights): model alone on
pre-decoded pixels already in memory vs end to end from JPEG shards through the actor pool, and
their ratio (the goal: end to end >= 90% of model alone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def jpeg_pool(folder: Path, shards: int, per_shard: int, size: int) -> list[str]:
    """`curation synth --images` tars of `size`-px JPEGs under `folder`; their paths."""
    from curation.synth.images import write_synthetic_image_pool

    write_synthetic_image_pool(str(folder), shards, per_shard, 0, image_size=size)
    return sorted(str(p) for p in folder.glob("*.tar"))


def decode_pixels(files: list[str], transform) -> tuple:
    """The exact path over whole tars: (uint8 pixels, captions, seconds), one core."""
    import numpy as np

    from curation.io.images import decode_images, read_tar

    t0 = time.perf_counter()
    pix, texts = [], []
    for f in files:
        shard = read_tar(f)
        p, ok, _, _ = decode_images(shard.table.column("image"), transform)
        pix.append(p)
        texts += shard.table.filter(ok).column("text").to_pylist()
    return np.concatenate(pix), texts, time.perf_counter() - t0


def model_throughput(scorer, pixels, texts, repeats: int = 1) -> float:
    """img/s of `scorer.score` on pixels already in memory (model alone, after a warm-up)."""
    scorer.score(pixels[: scorer.batch_size], texts[: scorer.batch_size])  # warm up
    sync = device_sync(scorer)
    t0 = time.perf_counter()
    for _ in range(repeats):
        scorer.score(pixels, texts)
    sync()
    return repeats * len(pixels) / (time.perf_counter() - t0)


def device_sync(scorer):
    """A function that waits for the scorer's device (a no-op on the CPU)."""
    import torch

    if getattr(scorer, "device", "cpu").startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def end_to_end(files, out: Path, scorer, **kw) -> tuple[float, dict]:
    """`score_shards` over `files`: (img/s, summary); `kw` go to `score_shards`."""
    from curation.flows.score import score_shards

    t0 = time.perf_counter()
    s = score_shards(files, str(out), scorer, progress=False, overwrite=True, **kw)
    return s["rows_written"] / (time.perf_counter() - t0), s


def steady_state(files, tmp: Path, make_scorer, **kw) -> tuple[int, float, float, dict]:
    """End to end on a quarter of the shards and on all of them, after a warm-up run (Ray
    worker processes import torch once). Returns (images, seconds for all, steady-state img/s:
    the difference of the two runs, which cancels the fixed cost of starting the actors)."""
    end_to_end(files[:1], tmp / "warm", make_scorer(), **kw)
    runs = []
    for i, k in enumerate((max(1, len(files) // 4), len(files))):
        t0 = time.perf_counter()
        _, s = end_to_end(files[:k], tmp / f"run{i}", make_scorer(), **kw)
        runs.append((s["rows_written"], time.perf_counter() - t0))
    (n1, t1), (n2, t2) = runs
    return n2, t2, (n2 - n1) / (t2 - t1), s


def bench_cpu(tmp: Path, shards: int = 4, per_shard: int = 1000) -> None:
    import torch

    from curation.executor.runner import ensure_ray
    from curation.stages.score import TINY_MODEL, ClipScorer

    torch.set_num_threads(1)
    files = jpeg_pool(tmp / "pool", shards, per_shard, 256)
    scorer = ClipScorer(TINY_MODEL, batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer.setup()
    pixels, texts, dec_s = decode_pixels(files, scorer.pixel_transform())
    n = len(pixels)
    dec_rate = n / dec_s
    model_rate = model_throughput(scorer, pixels, texts)
    share = (1 / dec_rate) / (1 / dec_rate + 1 / model_rate)
    print(
        f"score CPU, {TINY_MODEL} ({scorer.image_size} px), {n:,} JPEGs of 256 px, one core: "
        f"decode+resize {dec_rate:,.0f} img/s, model {model_rate:,.0f} img/s; "
        f"per image {share:.0%} decoding / {1 - share:.0%} model"
    )
    ensure_ray(num_cpus=2)
    # Two pool sizes: the difference cancels the fixed cost (actor start: a fresh process
    # importing torch and building the model), leaving the steady-state rate.
    n2, t2, steady, s = steady_state(files, tmp, lambda: ClipScorer(TINY_MODEL, batch_size=256))
    print(
        f"score CPU end to end (Ray, 2 CPUs: {s['actors']} actor + 1 decode task, Ray start "
        f"excluded): {n2:,} images in {t2:.1f} s = {n2 / t2:,.0f} img/s including actor start; "
        f"steady state {steady:,.0f} img/s"
    )


def bench_gpu(tmp: Path, models: list[str], images: int, device: str = "cuda") -> None:
    """Model alone vs end to end per model; `device="cpu"` runs the same code on the CPU (a
    smoke test of this path on machines without a GPU)."""
    import torch

    from curation.executor.runner import ensure_ray
    from curation.stages.score import ClipScorer

    if device == "cuda" and not torch.cuda.is_available():
        print("score GPU: no CUDA device here; skipped")
        return
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    cpus = os.cpu_count() or 1
    shards = max(cpus - 1, 4)  # one per decode CPU, and enough for two pool sizes
    files = jpeg_pool(tmp / "gpool", shards, -(-images // shards), 256)
    ensure_ray(num_cpus=cpus)
    for model in models:
        for bs in (256,):
            scorer = ClipScorer(model, batch_size=bs, device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scorer.setup()
            pixels, texts, dec_s = decode_pixels(files[:1], scorer.pixel_transform())
            reps = max(1, 20_000 // len(pixels))
            alone = model_throughput(scorer, pixels, texts, repeats=reps)
            px = scorer.image_size
            del scorer
            torch.cuda.empty_cache()
            n2, t2, steady, s = steady_state(
                files,
                tmp / model,
                lambda m=model, b=bs: ClipScorer(m, batch_size=b),
                chunk_rows=1024,
                device=device,
            )
            print(
                f"score {name}, {model} {px} px, batch {bs}: model alone {alone:,.0f} img/s; "
                f"end to end from JPEG shards {n2 / t2:,.0f} img/s with actor start, steady "
                f"state {steady:,.0f} img/s = {steady / alone:.0%} of model alone ({n2:,} "
                f"images, {s['actors']} actor(s), {cpus - 1} decode CPUs, one-core decode "
                f"{len(pixels) / dec_s:,.0f} img/s)"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU numbers for --models")
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--images", type=int, default=30_000)
    ap.add_argument("--device", default="cuda", help="cpu: run the --gpu path on the CPU")
    args = ap.parse_args(argv or [])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="curation-bench-score-"))
    try:
        if args.gpu:
            bench_gpu(tmp, args.models.split(","), args.images, args.device)
        else:
            bench_cpu(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
