"""WAT ingest speed on one core: texts/s of `Ingestor` on synthetic WAT shards.

Writes `shards` synthetic shards of `pairs` pairs each (`write_synthetic_pool`, seed 1, 0.2 %
malformed records, as `bench/run.py`), ingests each in this process a few times and prints the
best texts/s by CPU time (the process's own, so a busy machine skews it less than wall time) and
by wall time, and the time split of one profiled pass. MetaCLIP's parser is not importable
offline, so only ours is printed; compare with the numbers of bench/RESULTS.md.

Run: ``python bench/bench_ingest_speed.py [pairs_per_shard] [shards] [repeats]``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

from curation.stages.ingest import Ingestor
from curation.synth.wat import write_synthetic_pool


def _ingest_all(files: list[str]) -> int:
    ing = Ingestor()
    return sum(ing.process_shard(f, Path(f).name).table.num_rows for f in files)


def main(pairs: int = 50_000, shards: int = 2, repeats: int = 3) -> None:
    """Prints texts/s (best of `repeats`) of ingesting `shards` shards of `pairs` pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        pool = write_synthetic_pool(str(Path(tmp) / "pool"), shards, pairs, 1, malformed_rate=0.002)
        files = list(pool.files)
        nbytes = sum(Path(f).stat().st_size for f in files)
        _ingest_all(files[:1])  # warm-up: imports, caches
        best_cpu = best_wall = float("inf")
        n = 0
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            n = _ingest_all(files)
            best_cpu = min(best_cpu, time.process_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - w0)
        print(
            f"ingest (1 core): {n:,} texts, {nbytes / 1e6:.1f} MB gzip WAT: "
            f"{n / best_cpu:,.0f} texts/s by CPU time, {n / best_wall:,.0f} texts/s by wall time"
        )
        prof = cProfile.Profile()
        prof.enable()
        _ingest_all(files)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(10)
        print("profile, top entries by own time:")
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print("\n".join(line for line in lines[start:] if line.strip()))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]]
    main(*args)
