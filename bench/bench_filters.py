"""DataComp filter throughput (one core): basic, text_based and clip_score rows/s, k-means on
1M x 768."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

N_ROWS = 200_000
KMEANS_ROWS, KMEANS_DIM, KMEANS_K, KMEANS_ITERS = 1_000_000, 768, 1024, 2


def _pool(n: int, seed: int = 0) -> pa.Table:
    from wordfreq import top_n_list

    rng = np.random.default_rng(seed)
    words = np.array(top_n_list("en", 5000))
    lengths = rng.integers(1, 12, n)
    flat = words[rng.integers(0, len(words), int(lengths.sum()))]
    splits = np.split(flat, np.cumsum(lengths)[:-1])
    texts = [" ".join(s) for s in splits]
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "text": texts,
            "original_width": pa.array(rng.integers(64, 1024, n), pa.int64()),
            "original_height": pa.array(rng.integers(64, 1024, n), pa.int64()),
            "clip_b32_similarity_score": pa.array(rng.uniform(0.1, 0.4, n)),
            "clip_l14_similarity_score": pa.array(rng.uniform(0.1, 0.4, n)),
        }
    )


def main() -> None:
    from curation.stages.filters import make_filter, train_centroids

    table = _pool(N_ROWS)
    for name, params in (
        ("basic_filter", {}),
        ("text_based", {}),
        ("clip_score", {"arch": "b32", "threshold": 0.25}),
    ):
        f = make_filter(name, **params)
        f.setup()
        t0 = time.perf_counter()
        kept = int(f.keep(table).sum())
        dt = time.perf_counter() - t0
        print(f"{name} (1 core): {N_ROWS / dt:,.0f} rows/s ({kept:,} of {N_ROWS:,} kept)")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((KMEANS_ROWS, KMEANS_DIM), dtype=np.float32).astype(np.float16)
    t0 = time.perf_counter()
    train_centroids(emb, KMEANS_K, seed=0, niter=KMEANS_ITERS)
    dt = time.perf_counter() - t0
    print(
        f"k-means (faiss CPU, {os.cpu_count()} cores): {KMEANS_ROWS:,} x {KMEANS_DIM} float16, "
        f"k={KMEANS_K}: {dt / KMEANS_ITERS:.1f} s per iteration ({KMEANS_ITERS} run; "
        f"DataComp runs 20 iterations with k=100,000 on GPU)"
    )


if __name__ == "__main__":
    main()
