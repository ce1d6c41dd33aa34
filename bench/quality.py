"""`make quality`: does curation make a better model? Measured on a world with known truth.

One generated world (`curation.synth.world`: Zipf-distributed concepts, images that show their
concept, a known share of mismatched and boilerplate captions, a balanced zero-shot test set
and a retrieval set). Every arm trains the same model with the same hyperparameters and the
same number of samples seen (DataComp's protocol: only the data differs); each arm's subset
is made by the pipeline itself (`curation run` pool jobs, `curation train --balance online`):

- `raw`: the whole pool;
- `basic`: DataComp's basic filter (English, > 2 words, > 5 characters, min side >= 200 px,
  aspect <= 3);
- `balanced`: MetaCLIP balancing (offline) at t;
- `online`: MetaCLIP balancing online (`curation train --balance online`, a fresh draw per pass);
- `clip30`: DataComp's CLIP-score filter, top 30%; the scores come from a CLIP model trained by
  `curation train` on the world's small clean split (its captions follow the same Zipf law), not
  from the ground truth;
- `clip30+balanced`: the CLIP-score filter, then MetaCLIP balancing of the kept rows.

Per arm and seed: zero-shot top-1 on the balanced test set (overall, head concepts = those whose
pool count is >= t, tail = the others) and retrieval mean recall. The seed sets the training
(initialization, data order) and the balancing draw; the world and the scorer are fixed.

    python bench/quality.py [--out runs/quality] [--seeds 0 1 2] [--scale 1]

`--scale N` multiplies the pool, the clean split, t and the samples seen by N (and uses the GPU
when the Ray cluster has one); the default runs in about 15 minutes on 2 CPU cores.
Writes OUT/quality.json, OUT/quality.md (the table) and OUT/quality.png (the plot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("raw", "basic", "balanced", "online", "clip30", "clip30+balanced")


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _pool_job(name: str, pool: str, seed: int, **sections: Any) -> Any:
    from curation.config.job import parse_job

    return parse_job({"name": name, "seed": seed, "input": {"pool": [pool]}, **sections})


def _curate(arm: str, world: str, scored: str, t: float, seed: int, out: str) -> str | None:
    """Run the arm's pool job into `out`; the subset (uids.npy) or None for the whole pool."""
    from curation.flows.job import run_job

    meta = os.path.join(world, "metadata.json")
    clip = {"baseline": "clip_score", "score_column": "clip_score", "fraction": 0.3}
    if arm == "raw":
        return None
    if arm == "basic":
        spec = _pool_job(arm, scored, seed, filters={"steps": [{"baseline": "basic_filter"}]})
    elif arm in ("balanced", "online"):
        spec = _pool_job("balanced", scored, seed, metadata=meta, balance={"t": t})
    elif arm == "clip30":
        spec = _pool_job(arm, scored, seed, filters={"steps": [clip]})
    elif arm == "clip30+balanced":
        spec = _pool_job(
            arm, scored, seed, filters={"steps": [clip]}, metadata=meta,
            balance={"t": t, "when": "after"},
        )  # fmt: skip
    else:
        raise ValueError(arm)
    if not os.path.exists(os.path.join(out, "manifest.json")):
        run_job(spec, out, overwrite=True, progress=False)
    return os.path.join(out, "uids.npy")


def _train(
    shards: str, out: str, seed: int, args: argparse.Namespace, **extra: Any
) -> dict[str, Any]:
    from curation.config.train import resolve
    from curation.flows.train import train_command

    if os.path.exists(os.path.join(out, "manifest.json")):
        return _read_json(os.path.join(out, "manifest.json"))
    shutil.rmtree(out, ignore_errors=True)
    cfg = resolve(
        None,
        {
            "shards": (shards,),
            "out": out,
            "model": args.model,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "samples_seen": args.samples_seen * args.scale,
            "seed": seed,
            "cpus_per_worker": args.cpus_per_worker,
            "loader_workers": 1,
            "checkpoint_every": 1_000_000,
            **extra,
        },
    )
    return train_command(cfg, progress=False)


def _evaluate(run: str, world: str) -> dict[str, Any]:
    from curation.flows.evaluate import evaluate_command, resolve_model

    out = os.path.join(run, "eval.json")
    if os.path.exists(out):
        return _read_json(out)
    tasks = [
        os.path.join(world, "tasks", "classification"),
        os.path.join(world, "tasks", "retrieval"),
    ]
    return evaluate_command(resolve_model(run), tasks, out, batch_size=500)


def _composition(world: str, uids_npy: str | None) -> dict[str, Any]:
    """Truth about a subset: rows, kinds, and the share of tail captions."""
    import pyarrow.dataset as ds

    table = ds.dataset(os.path.join(world, "pool", "metadata"), format="parquet").to_table(
        columns=["uid", "kind"]
    )
    kinds = np.asarray(table.column("kind").to_pylist())
    if uids_npy is not None:
        from curation.train.data import Subset

        keep = Subset.load(uids_npy).contains(np.asarray(table.column("uid").to_pylist(), object))
        kinds = kinds[keep]
    n = len(kinds)
    return {
        "rows": int(n),
        "mismatch_share": float((kinds == "mismatch").mean()) if n else 0.0,
        "boilerplate_share": float((kinds == "boilerplate").mean()) if n else 0.0,
    }


def _metrics(ev: dict[str, Any], head: np.ndarray) -> dict[str, float]:
    cls = next(t for t in ev["tasks"] if t["kind"] == "classification")
    ret = next(t for t in ev["tasks"] if t["kind"] == "retrieval")
    rec = np.asarray([np.nan if r is None else r for r in cls["per_class_recall"]], float)
    return {
        "overall": float(cls["metrics"]["acc1"]),
        "head": float(np.nanmean(rec[head])),
        "tail": float(np.nanmean(rec[~head])),
        "retrieval": float(ret["metrics"]["mean_recall"]),
    }


def _table(results: dict[str, Any]) -> str:
    cols = ("overall", "head", "tail", "retrieval")
    lines = [
        "| arm | rows | mismatched | boilerplate | zero-shot top-1 | head | tail | retrieval |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in results["arms"].items():
        c = r["composition"]
        cells = []
        for k in cols:
            v = np.asarray([s[k] for s in r["seeds"].values()]) * 100
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}")
        rows = f"{c['rows']:,}" if c else "(per pass)"
        mis = f"{100 * c['mismatch_share']:.1f}%" if c else ""
        boil = f"{100 * c['boilerplate_share']:.1f}%" if c else ""
        lines.append(f"| {arm} | {rows} | {mis} | {boil} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("overall", "head", "tail", "retrieval")
    arms = list(results["arms"])
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        seeds = results["arms"][arm]["seeds"].values()
        v = np.asarray([[s[k] for k in cols] for s in seeds]) * 100
        x = np.arange(len(cols)) + (i - (len(arms) - 1) / 2) * width
        ax.bar(x, v.mean(0), width, yerr=v.std(0, ddof=1) if len(v) > 1 else None,
               capsize=2, label=arm)  # fmt: skip
    ax.set_xticks(np.arange(len(cols)))
    ax.set_xticklabels(["zero-shot top-1", "head concepts", "tail concepts", "retrieval recall"])
    ax.set_ylabel("%")
    ax.set_title(f"Same model and samples seen per arm, mean ± std over seeds {results['seeds']}")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--model", default="curation-tiny-vit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--samples-seen", type=int, default=25_600, help="At --scale 1.")
    ap.add_argument("--t", type=float, default=200, help="MetaCLIP t at --scale 1.")
    ap.add_argument("--cpus-per-worker", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args(argv)
    if len(args.seeds) < 1 or args.scale < 1:
        ap.error("need at least one seed and --scale >= 1")

    from curation.executor.runner import ensure_ray
    from curation.synth.world import WorldConfig, write_world

    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(None, args.num_cpus)
    timings: dict[str, float] = {}

    wcfg = WorldConfig(
        pool_size=30_000 * args.scale, clean_size=3_000 * args.scale,
        samples_per_shard=5_000,
    )  # fmt: skip
    world = os.path.join(out, "world")
    t0 = time.time()
    wpath = os.path.join(world, "world.json")
    wdoc = _read_json(wpath) if os.path.exists(wpath) else None
    if wdoc is None or wdoc["config"] != wcfg.__dict__:
        shutil.rmtree(world, ignore_errors=True)
        wdoc = write_world(world, wcfg)
    timings["world"] = time.time() - t0
    t = args.t * args.scale
    counts = np.asarray(wdoc["pool"]["caption_counts"])
    head = counts >= t
    _log(
        f"world: {wcfg.pool_size:,} pairs, {wcfg.concepts} concepts (Zipf {wcfg.zipf}), "
        f"kinds {wdoc['pool']['kinds']}; t = {t:g}: {int(head.sum())} head concepts "
        f"({timings['world']:.0f} s)"
    )

    # The CLIP scorer: trained by `curation train` on the clean split, then `curation score`.
    t0 = time.time()
    scorer_run = os.path.join(out, "scorer")
    _train(os.path.join(world, "clean", "shards"), scorer_run, 0, args)
    scored = os.path.join(out, "scored")
    if not os.path.exists(os.path.join(scored, "manifest.json")):
        from curation.flows.score import score_shards
        from curation.stages.score import ClipScorer

        scorer = ClipScorer(
            args.model, checkpoint=os.path.join(scorer_run, "model.safetensors"), batch_size=256
        )
        score_shards([os.path.join(world, "pool", "shards")], scored, scorer, progress=False,
                     overwrite=True)  # fmt: skip
    timings["scorer"] = time.time() - t0
    _log(f"scorer trained on the clean split and the pool scored ({timings['scorer']:.0f} s)")

    results: dict[str, Any] = {"seeds": args.seeds, "t": t, "world": wdoc["config"], "arms": {}}
    shards = os.path.join(world, "pool", "shards")
    for arm in args.arms:
        results["arms"][arm] = {"composition": None, "seeds": {}}
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.time()
            cur = os.path.join(out, "curated", f"{arm}-s{seed}")
            subset = _curate(arm, world, scored, t, seed, cur)
            extra: dict[str, Any] = {}
            if arm == "online":
                extra = {
                    "balance": "online",
                    "matched": os.path.join(cur, "match"),
                    "counts": os.path.join(cur, "counts", "entry_counts.parquet"),
                    "t": t,
                }
            elif subset is not None:
                extra = {"subset": subset}
            run = os.path.join(out, "train", f"{arm}-s{seed}")
            man = _train(shards, run, seed, args, **extra)
            ev = _evaluate(run, world)
            m = _metrics(ev, head)
            r = results["arms"][arm]
            r["seeds"][str(seed)] = {**m, "final_loss": man["result"]["final_loss"]}
            if arm != "online" and r["composition"] is None:
                r["composition"] = _composition(world, subset)
            if arm == "online":
                r["online_passes"] = man["balance"]["passes"]
            dt = time.time() - t0
            timings[f"{arm}-s{seed}"] = dt
            _log(
                f"seed {seed} {arm:>16}: top-1 {100 * m['overall']:.1f}  head "
                f"{100 * m['head']:.1f}  tail {100 * m['tail']:.1f}  retrieval "
                f"{100 * m['retrieval']:.1f}  ({dt:.0f} s)"
            )
    results["wall_seconds"] = round(time.time() - t_start, 1)
    results["timings"] = {k: round(v, 1) for k, v in timings.items()}
    table = _table(results)
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(table + "\n")
    _plot(results, os.path.join(out, "quality.png"))
    _log("\n" + table)
    _log(f"\nwall time {results['wall_seconds']:.0f} s -> {out}/quality.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
