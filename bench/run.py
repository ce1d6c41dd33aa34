"""`make bench`: throughput numbers measured in one run, printed as lines.

1. ingest: pairs/s and MB/s of gzip WAT input on one core (synthetic pool).
2. match: our engines vs a per-text pyahocorasick loop in MetaCLIP's style, 500k+ entries
   (bench_match.py), plus automaton build time and memory.
3. balance: rows/s on one core.
4. end to end: `curation run` on the demo pool with 2 CPUs (pairs/s).
5. DataComp filters: basic / clip_score rows/s, faiss k-means on 1M x 768 float16.
6. CLIP scoring (bench_score.py): decode vs model img/s and their time shares with the tiny
   model on CPU, end to end on the Ray actor pool; `python bench/bench_score.py --gpu` on a GPU
   machine for ViT-B-32 / ViT-L-14 end to end vs model alone.
7. Training (bench_train.py): `curation train` vs `open_clip_train.main` samples/s per worker
   on the same tars, batch and precision (tiny model on CPU; `--gpu` for ViT-B-32 bf16).
8. Cluster scale (bench_scale.py, reduced sizes): planning + resume of 20k shards, input
   identities by listing vs per object on an S3 server (moto), driver peak RSS of count and
   a top-fraction filter at 1M vs 3M rows (flat: the driver holds O(shards)).
9. Worldwide (bench_langid.py, bench_worldwide.py): language id rows/s on one core, and
   langid + per-language matching vs English-only matching on the same texts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def bench_ingest(tmp: Path) -> None:
    from curation.stages.ingest import Ingestor
    from curation.synth.wat import write_synthetic_pool

    t0 = time.perf_counter()
    s = write_synthetic_pool(str(tmp / "pool"), 2, 50_000, 1, malformed_rate=0.002)
    gen = time.perf_counter() - t0
    print(f"synth: {s.total_pairs:,} pairs in {gen:.2f} s ({s.total_pairs / gen:,.0f} pairs/s)")
    ing = Ingestor()
    pairs = nbytes = 0
    t0 = time.perf_counter()
    for f in s.files:
        r = ing.process_shard(f, Path(f).name)
        pairs += r.table.num_rows
        nbytes += r.extra["input_bytes"]
    dt = time.perf_counter() - t0
    print(
        f"ingest (1 core): {pairs:,} pairs, {nbytes / 1e6:.1f} MB gzip in {dt:.2f} s: "
        f"{pairs / dt:,.0f} pairs/s, {nbytes / 1e6 / dt:.1f} MB/s"
    )


def bench_balance() -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from curation.stages.balance import Balancer, count_entries, entry_probabilities

    rng = np.random.default_rng(0)
    n, n_entries = 1_000_000, 500_000
    lengths = rng.integers(0, 9, n)
    flat = (rng.zipf(1.3, int(lengths.sum())) % n_entries).astype(np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    uids = pa.array([f"{i:024x}" for i in rng.integers(0, 2**62, n)])
    # alt texts of 4-20 words (~60 bytes on average), drawn from a pool of 100k distinct ones
    vocab = ["a", "photo", "of", "the", "cat", "dog", "on", "red", "blue", "green", "house"]
    words = rng.integers(0, len(vocab), (100_000, 20))
    sizes = rng.integers(4, 25, 100_000)
    pool = [" ".join(vocab[w] for w in row[:k]) for row, k in zip(words, sizes, strict=True)]
    texts = pa.array(pool).take(pa.array(rng.integers(0, len(pool), n)))
    table = pa.table({"uid": uids, "text": texts, "entry_ids": ids})
    t0 = time.perf_counter()
    counts = count_entries(table.column("entry_ids"), n_entries)
    dc = time.perf_counter() - t0
    bal = Balancer(entry_probabilities(counts, 1000), seed=0)
    t0 = time.perf_counter()
    kept = bal.process(table).table
    db = time.perf_counter() - t0
    text_bytes = pc.sum(pc.binary_length(texts)).as_py() / n
    print(
        f"count (1 core): {n / dc:,.0f} rows/s; balance (1 core): {n:,} rows "
        f"({int(lengths.sum()):,} matches, texts {text_bytes:.0f} bytes on average) in {db:.2f} s: "
        f"{n / db:,.0f} rows/s, kept {kept.num_rows:,}"
    )


def bench_end_to_end(tmp: Path) -> None:
    out = tmp / "demo"
    cmd = [
        sys.executable,
        "-m",
        "curation.cli",
        "run",
        str(ROOT / "jobs/demo.yaml"),
        "-o",
        str(out),
        "--num-cpus",
        "2",
        "--quiet",
        "--overwrite",
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    dt = time.perf_counter() - t0
    import json

    m = json.loads((out / "manifest.json").read_text())
    pairs = m["stages"]["ingest"]["rows_written"]
    print(
        f"end to end (curation run jobs/demo.yaml, 2 CPUs, incl. Ray start and synth): "
        f"{pairs:,} pairs in {dt:.1f} s: {pairs / dt:,.0f} pairs/s"
    )


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="curation-bench-"))
    try:
        print("== ingest ==")
        bench_ingest(tmp)
        print("== balance ==")
        bench_balance()
        print("== end to end ==")
        bench_end_to_end(tmp)
        print("== DataComp filters ==")
        import bench_filters

        bench_filters.main()
        print("== CLIP scoring (CPU) ==")
        import bench_score

        bench_score.main([])
        print("== match (1 core) ==")
        import bench_match

        bench_match.main()
        print("== worldwide (MetaCLIP 2): language id and per-language matching (1 core) ==")
        import bench_langid
        import bench_worldwide

        print(bench_langid.bench_langid())
        for line in bench_worldwide.bench_worldwide():
            print(line)
        print("== training: curation train vs open_clip_train.main (tiny model, CPU) ==")
        import bench_train

        bench_train.main([])
        print("== planning and barriers at cluster scale (bench_scale.py; full size: 100k shards,")
        print("   1M vs 10M rows with `python bench/bench_scale.py [--before OLD_CHECKOUT]`) ==")
        import bench_scale

        bench_scale.main(["--shards", "20000", "--s3-shards", "1000", "--rows", "1000000,3000000"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
