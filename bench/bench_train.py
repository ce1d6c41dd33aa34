"""Throughput of `curation train` against `open_clip_train.main` on the same tars, batch and precision.

    python bench/bench_train.py                    # CPU: curation-tiny-vit at 64 px, fp32
    python bench/bench_train.py --gpu              # GPU: ViT-B-32 at 224 px, bf16 (amp_bf16)

Both trainers read the same webdataset tars (a synthetic pool made here unless `--pool`), with the
same global batch, precision, decode processes and torch threads, for the same number of steps:

- ours: the `curation train` CLI (its own local Ray cluster, one Ray Train worker), steady-state
  samples/s per worker = the median of `train_log.jsonl`'s `samples_per_s_per_worker` after the
  first rows (warm-up), and the share of step time spent waiting for data (`data_s` vs `step_s`);
- open_clip: `python -m open_clip_train.main` (with the tiny config registered for the CPU case),
  `--dataset-type webdataset --dataset-resampled`, the median of its logged `/s/gpu` rate.

The ratio ours / open_clip is the goal metric (>= 1.0: the bundled stage is not slower than
training with open_clip directly). With `--gpu`, GPU utilization is sampled with `nvidia-smi`
during each run. Results go to stdout and, with `--json`, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CURATION = str(Path(PY).with_name("curation"))

# open_clip_train's own tar grouping (`group_by_keys_nothrow`) predates webdataset's end-of-shard
# marker (`tar_file_expander(eof_value={})`, a dict without "fname") and fails on it with
# KeyError 'fname'; the marker is turned off here, which is what older webdataset did.
_OPEN_CLIP_MAIN = """
import functools, sys, open_clip
import open_clip_train.data as ocd
ocd.tar_file_expander = functools.partial(ocd.tar_file_expander, eof_value=None)
from curation.stages.score import CONFIG_DIR
open_clip.add_model_config(str(CONFIG_DIR))
from open_clip_train.main import main
main(sys.argv[1:])
"""


class GpuSampler:
    """Mean GPU utilization (%) from `nvidia-smi` every 0.5 s while active (None without GPU)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        s = self.samples[4:] or self.samples  # skip start-up
        return round(statistics.mean(s), 1) if s else None


def make_pool(root: Path, shards: int, per_shard: int, image_size: int) -> Path:
    from curation.synth.images import write_synthetic_image_pool

    pool = root / f"pool-{image_size}"
    if not (pool / "synth_truth.json").exists():
        write_synthetic_image_pool(str(pool), shards, per_shard, 0, image_size=image_size)
    return pool


def run_ours(a: argparse.Namespace, pool: Path, work: Path) -> dict[str, Any]:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        CURATION, "train", str(pool), "-o", str(out), "--model", a.model,
        "--batch-size", str(a.batch_size), "--samples-seen", str(a.batch_size * a.steps),
        "--lr", "5e-4", "--warmup", "10", "--precision", a.precision_ours,
        "--device", "cuda" if a.gpu else "cpu", "--num-workers", "1",
        "--loader-workers", str(a.workers), "--cpus-per-worker", str(a.threads),
        "--log-every", str(a.log_every), "--checkpoint-every", str(10**9),
        "--num-cpus", str(max(a.threads, os.cpu_count() or 1)),
    ]  # fmt: skip
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"curation train failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x]
    steady = rows[2:] or rows
    data_s = sum(r["data_s"] for r in steady)
    step_s = sum(r["step_s"] for r in steady)
    return {
        "samples_per_s_per_worker": statistics.median(
            r["samples_per_s_per_worker"] for r in steady
        ),
        "data_wait_share": round(data_s / max(data_s + step_s, 1e-9), 3),
        "final_loss": rows[-1]["loss"],
        "wall_s": round(wall, 1),
        "gpu_util_pct": gpu.mean,
    }


def run_open_clip(a: argparse.Namespace, pool: Path, work: Path) -> dict[str, Any]:
    tars = sorted(pool.glob("*.tar"))
    pattern = str(pool / f"images-{{00000..{len(tars) - 1:05d}}}.tar")
    logs = work / "open_clip-logs"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [
        PY, "-c", _OPEN_CLIP_MAIN,
        "--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(a.batch_size * a.steps), "--epochs", "1",
        "--batch-size", str(a.batch_size), "--workers", str(a.workers),
        "--model", a.model, "--precision", a.precision_open_clip, "--lr", "5e-4",
        "--warmup", "10", "--wd", "0.2", "--local-loss", "--gather-with-grad",
        "--log-every-n-steps", str(a.log_every), "--logs", str(logs), "--name", "bench",
        "--save-frequency", "0", "--report-to", "", "--seed", "0",
    ]  # fmt: skip
    if not a.gpu:
        cmd += ["--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    if not a.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"open_clip_train.main failed:\n{text[-4000:]}")
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", text)]
    steady = rates[2:] or rates
    if not steady:
        raise SystemExit(f"no throughput in open_clip_train's log:\n{text[-3000:]}")
    return {
        "samples_per_s_per_worker": statistics.median(steady),
        "wall_s": round(wall, 1),
        "gpu_util_pct": gpu.mean,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="ViT-B-32 at 224 px, bf16, on a GPU")
    ap.add_argument("--pool", type=Path, default=None, help="tars to train on (default: synth)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="decode processes")
    ap.add_argument("--threads", type=int, default=None, help="CPUs / torch threads")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--skip-open-clip", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    ncpu = os.cpu_count() or 1
    if a.gpu:
        a.model, size = "ViT-B-32", 256
        a.precision_ours, a.precision_open_clip = "bf16", "amp_bf16"
        a.batch_size = a.batch_size or 256
        a.steps = a.steps or 100
        a.workers = a.workers or max(1, min(8, ncpu - 2))
        a.threads = a.threads or ncpu
    else:
        a.model, size = "curation-tiny-vit", 64
        a.precision_ours, a.precision_open_clip = "fp32", "fp32"
        a.batch_size = a.batch_size or 128
        a.steps = a.steps or 60
        a.workers = a.workers or 1
        a.threads = a.threads or min(2, ncpu)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        pool = a.pool or make_pool(work, a.shards, a.samples_per_shard, size)
        ours = run_ours(a, pool, work)
        theirs = None if a.skip_open_clip else run_open_clip(a, pool, work)
    finally:
        if a.pool is None or a.json is None:
            shutil.rmtree(work, ignore_errors=True)
    res = {
        "mode": "gpu" if a.gpu else "cpu",
        "model": a.model,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "precision": a.precision_ours,
        "decode_workers": a.workers,
        "threads": a.threads,
        "curation_train": ours,
        "open_clip_train": theirs,
        "ratio": round(
            ours["samples_per_s_per_worker"] / theirs["samples_per_s_per_worker"], 3
        ) if theirs else None,
    }  # fmt: skip
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
