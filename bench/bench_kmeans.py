"""k-means for DataComp's image-based baseline: `train_centroids` with DataComp's settings.

DataComp's small-pool setting is 1M x 768 L/14 image embeddings → 100k centroids, 20
iterations, every point, exact L2 (faiss `Clustering` on `GpuIndexFlatL2` replicas).

- CPU (default): a smaller problem, `--rows` x 768 → `--k` (100k x 768 → 1,000), 20 iterations,
  faiss' CPU index on every core; prints seconds in all and per iteration.
- GPU (`--gpu`, needs faiss-gpu: `pip install 'curation[gpu]'` instead of `[filters]`): the
  DataComp setting, 1M x 768 → 100k on every GPU of the machine; prints the same.

Inputs are random unit vectors cast through float16 (as pool embeddings are stored); k-means
time depends on the sizes, not on the values. Run: ``python bench/bench_kmeans.py [--gpu]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def unit_rows(n: int, d: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def run(rows: int, dim: int, k: int, niter: int, gpus: bool) -> dict:
    """Times one `train_centroids` run; returns the sizes and seconds."""
    import faiss

    from curation.stages.filters.image_based import train_centroids

    x = unit_rows(rows, dim)
    t0 = time.perf_counter()
    c = train_centroids(x, k, seed=0, niter=niter, gpus=gpus)
    dt = time.perf_counter() - t0
    return {
        "rows": rows,
        "dim": dim,
        "k": k,
        "niter": niter,
        "seconds": dt,
        "per_iter": dt / niter,
        "gpus": faiss.get_num_gpus() if gpus and hasattr(faiss, "get_num_gpus") else 0,
        "shape": c.shape,
    }


def show(r: dict) -> None:
    where = f"{r['gpus']} GPU(s)" if r["gpus"] else f"CPU, {os.cpu_count()} cores"
    print(
        f"k-means {r['rows']:,} x {r['dim']} → {r['k']:,}, {r['niter']} iterations ({where}): "
        f"{r['seconds']:.1f} s, {r['per_iter']:.2f} s per iteration"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="DataComp's 1M x 768 → 100k on GPUs")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--niter", type=int, default=20)
    args = ap.parse_args(argv)
    if args.gpu:
        import faiss

        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            raise SystemExit("--gpu: faiss sees no GPU (install curation[gpu] on a GPU machine)")
        rows, k = args.rows or 1_000_000, args.k or 100_000
    else:
        rows, k = args.rows or 100_000, args.k or 1_000
    show(run(rows, args.dim, k, args.niter, gpus=args.gpu))


if __name__ == "__main__":
    main()
