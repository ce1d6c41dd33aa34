"""WAT ingest speed on one core: texts/s of `Ingestor` on synthetic WAT shards, and of
MetaCLIP's own parser on the same files in the same process when its source is given.

Writes `shards` synthetic shards of `pairs` pairs each (`write_synthetic_pool`, seed 1, 0.2 %
malformed records, as `bench/run.py`), ingests them in this process a few times and prints the
best texts/s by CPU time (the process's own, so a busy machine skews it less than wall time) and
by wall time, and the time split of one profiled pass.

With `--metaclip PATH` (a copy of facebookresearch/MetaCLIP's `metaclip/curation/parse_wat.py`,
which is not on PyPI and not shipped here), its `WATParser.parse_wat` reads the same files
alternately with ours, and the ratio is printed. Two changes are made to its module before it
runs: `gzip` is put in its namespace (the file uses it without importing it), and its per-text
fastText `lid` is replaced by a no-op (our ingest does no language id; `curation langid` is a
stage of its own, measured in `bench_langid.py`). Texts are counted as it emits them (each
image's non-empty alt / title / data-image-title).

Run: ``python bench/bench_ingest_speed.py [pairs_per_shard] [shards] [repeats]
[--metaclip parse_wat.py]``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import importlib.util
import io
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curation.stages.ingest import Ingestor
from curation.synth.wat import write_synthetic_pool


def _ingest_all(files: list[str]) -> int:
    ing = Ingestor()
    return sum(ing.process_shard(f, Path(f).name).table.num_rows for f in files)


def metaclip_parser(path: str) -> Callable[[list[str]], int]:
    """MetaCLIP's `WATParser` from its source file, as a function of files → texts."""
    spec = importlib.util.spec_from_file_location("metaclip_parse_wat", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--metaclip {path}: not a Python file")
    mod: Any = importlib.util.module_from_spec(spec)
    mod.gzip = gzip  # parse_wat.py uses gzip without importing it
    spec.loader.exec_module(mod)
    mod.lid = lambda text: None  # no language id in either measurement
    parser = mod.WATParser()

    def run(files: list[str]) -> int:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints each bad record
            return sum(
                len(r["texts"]) for f in files for r in parser.parse_wat(f, "bench", Path(f).stem)
            )

    return run


def _best(fn: Callable[[list[str]], int], files: list[str]) -> tuple[int, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn(files)
    return n, time.process_time() - c0, time.perf_counter() - w0


def main(pairs: int, shards: int, repeats: int, metaclip: str | None) -> None:
    """Prints texts/s (best of `repeats`) of ingesting `shards` shards of `pairs` pairs."""
    runners: dict[str, Callable[[list[str]], int]] = {"curation ingest": _ingest_all}
    if metaclip:
        runners["MetaCLIP parse_wat.py"] = metaclip_parser(metaclip)
    with tempfile.TemporaryDirectory() as tmp:
        pool = write_synthetic_pool(str(Path(tmp) / "pool"), shards, pairs, 1, malformed_rate=0.002)
        files = list(pool.files)
        nbytes = sum(Path(f).stat().st_size for f in files)
        for fn in runners.values():
            fn(files[:1])  # warm-up: imports, caches
        best = {name: (0, float("inf"), float("inf")) for name in runners}
        for _ in range(repeats):
            for name, fn in runners.items():  # alternately, so machine load hits both alike
                n, cpu, wall = _best(fn, files)
                b = best[name]
                best[name] = (n, min(b[1], cpu), min(b[2], wall))
        for name, (n, cpu, wall) in best.items():
            print(
                f"{name} (1 core): {n:,} texts, {nbytes / 1e6:.1f} MB gzip WAT: "
                f"{n / cpu:,.0f} texts/s by CPU time, {n / wall:,.0f} texts/s by wall time"
            )
        if metaclip:
            ours, theirs = best["curation ingest"], best["MetaCLIP parse_wat.py"]
            print(
                f"ratio (texts/s, CPU time): {(ours[0] / ours[1]) / (theirs[0] / theirs[1]):.2f}x "
                "MetaCLIP's parser"
            )
        prof = cProfile.Profile()
        prof.enable()
        _ingest_all(files)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(10)
        print("profile of curation ingest, top entries by own time:")
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print("\n".join(line for line in lines[start:] if line.strip()))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="?", type=int, default=50_000)
    ap.add_argument("shards", nargs="?", type=int, default=2)
    ap.add_argument("repeats", nargs="?", type=int, default=3)
    ap.add_argument("--metaclip", default=None, help="path to MetaCLIP's parse_wat.py")
    a = ap.parse_args()
    main(a.pairs, a.shards, a.repeats, a.metaclip)
