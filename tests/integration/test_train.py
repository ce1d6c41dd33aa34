"""`curation train` on the session Ray cluster (2 CPUs), with the shipped tiny model at 64 px.

- a short run on captions that describe their images: the loss goes down, the zero-shot check
  on held-out images beats chance clearly, every output is there, and `model.safetensors` loads
  into plain open_clip (`create_model(arch)` + `load_state_dict(strict=True)`) and into
  `curation score`'s scorer;
- resume: 6 steps with a checkpoint every 3, stopped after 3 and resumed, ends with weights equal
  (bit for bit, CPU) to an uninterrupted run's;
- 1 vs 2 Ray Train workers: the same number of samples per step globally and the same set of
  samples per pass;
- online balancing: per-pass read / kept / head-tail statistics in the manifest;
- one-line errors: unknown model, batch larger than the data, a subset with no images, a
  checkpoint of another architecture, an OUT with checkpoints but no --resume.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config.train import resolve
from curation.flows.train import train_command

from .conftest import cli_env, run_cli

SEED = 0


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from curation.synth.images import write_synthetic_image_pool

    root = tmp_path_factory.mktemp("train-pools")
    # captions describe their images (no mismatched pairs): what CLIP can learn from
    write_synthetic_image_pool(str(root / "pool"), 4, 500, 0, image_size=64, mismatch_rate=0.0)
    write_synthetic_image_pool(str(root / "held"), 1, 400, 99, image_size=64, mismatch_rate=0.0)
    return {"pool": str(root / "pool"), "held": str(root / "held"), "root": str(root)}


def _cfg(pools: dict[str, str], out: Path, **kw: Any):
    base: dict[str, Any] = {
        "shards": (pools["pool"],),
        "out": str(out),
        "batch_size": 32,
        "samples_seen": 32 * 6,
        "lr": 1e-3,
        "warmup": 2,
        "seed": SEED,
        "log_every": 1,
        "checkpoint_every": 3,
        "loader_workers": 0,
        "shuffle_buffer": 256,
    }
    base.update(kw)
    return resolve(None, base)


def _log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x]


def _safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- learning ------------------------------------------------------------------------------------
def test_train_learns_and_writes_its_outputs(pools: dict[str, str], tmp_path: Path) -> None:
    import open_clip

    out = tmp_path / "run"
    cfg = _cfg(
        pools, out, batch_size=64, samples_seen=64 * 150, lr=3e-3, warmup=10, log_every=5,
        checkpoint_every=100, eval_shards=(pools["held"],),
    )  # fmt: skip
    m = train_command(cfg)

    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(5, 151, 5))
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.4, (first, last)
    for r in rows:
        assert r["samples_per_s"] > 0 and r["samples_per_s_per_worker"] > 0 and r["lr"] >= 0

    ev = m["eval"]["color"]
    assert ev["images"] >= 150
    assert ev["accuracy"] >= 2 * ev["chance"], m["eval"]  # chance 1/12

    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "loss_curve.png", "manifest.json", "model.safetensors", "train_log.jsonl",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-100", "step-150"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    man = json.loads((out / "manifest.json").read_text())
    assert man["result"]["steps"] == 150 and man["result"]["samples_seen"] == 64 * 150
    assert man["hyperparameters"]["beta2"] == 0.98 and man["hyperparameters"]["eps"] == 1e-6
    assert man["hyperparameters"]["weight_decay"] == 0.2
    assert man["data"]["samples_per_pass"] == 2000 and man["data"]["steps_per_pass"] == 31
    assert len(man["inputs"]["shards"]) == 4 and man["timing"]["wall_seconds"] > 0
    assert {"torch", "open_clip_torch", "ray"} <= set(man["versions"])

    # plain open_clip takes the state dict unchanged
    from curation.stages.score import CONFIG_DIR, ClipScorer

    open_clip.add_model_config(str(CONFIG_DIR))
    model = open_clip.create_model("curation-tiny-vit")
    model.load_state_dict(_safetensors(out / "model.safetensors"), strict=True)
    # and so does `curation score --checkpoint`
    scorer = ClipScorer("curation-tiny-vit", checkpoint=str(out / "model.safetensors"))
    scorer.setup()
    assert scorer.embed_texts(["a red circle"]).shape == (1, 64)


# -- resume and workers ----------------------------------------------------------------------------
def _uids(out: Path, world: int) -> dict[int, list[str]]:
    """{step: the uids of that step over all ranks}."""
    per_step: dict[int, list[str]] = defaultdict(list)
    for r in range(world):
        for line in (out / "_uids" / f"rank-{r}.jsonl").read_text().splitlines():
            row = json.loads(line)
            per_step[row["step"]] += row["uids"]
    return dict(per_step)


@pytest.fixture(scope="module")
def uninterrupted(pools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_command(_cfg(pools, out, record_uids=True, samples_seen=32 * 70, stop_after=6))
    return out


def test_resume_equals_uninterrupted(
    pools: dict[str, str], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = train_command(_cfg(pools, out, samples_seen=32 * 70, stop_after=3))
    assert first["result"]["steps"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    with pytest.raises(ValueError, match="already holds training checkpoints.*--resume"):
        train_command(_cfg(pools, out, samples_seen=32 * 70, stop_after=6))
    with pytest.raises(ValueError, match="architecture 'curation-tiny-vit', not 'ViT-B-32'"):
        train_command(_cfg(pools, out, samples_seen=32 * 70, model="ViT-B-32", resume=True))
    with pytest.raises(ValueError, match="made with --num-workers 1, this run has 2"):
        train_command(_cfg(pools, out, samples_seen=32 * 70, num_workers=2, resume=True))
    second = train_command(_cfg(pools, out, samples_seen=32 * 70, stop_after=6, resume=True))
    assert second["result"]["resumed_from_step"] == 3 and second["result"]["steps"] == 6

    a = _safetensors(uninterrupted / "model.safetensors")
    b = _safetensors(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()))]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    la, lb = _log(uninterrupted), _log(out)
    assert [(r["step"], r["loss"], r["lr"]) for r in la] == [
        (r["step"], r["loss"], r["lr"]) for r in lb
    ]


def test_two_workers_see_the_same_samples(
    pools: dict[str, str], uninterrupted: Path, tmp_path: Path
) -> None:
    """Steps 1..6 of pass 0 and then all of pass 0 (62 steps of 32) with 1 and 2 workers."""
    out = tmp_path / "run"
    m = train_command(
        _cfg(pools, out, num_workers=2, record_uids=True, samples_seen=32 * 70, stop_after=6)
    )
    assert m["result"]["world_size"] == 2
    one, two = _uids(uninterrupted, 1), _uids(out, 2)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert len(one[s]) == len(two[s]) == 32  # the global batch, every step
        assert len(set(two[s])) == 32
    # each pass: every kept sample exactly once, whatever the number of workers
    from curation.train.data import LoaderConfig, TrainBatches, list_tar_shards

    cfg = LoaderConfig(tuple(list_tar_shards([pools["pool"]])), 32, 64, SEED, 256, 0)
    per_world = []
    for world in (1, 2):
        seen: list[str] = []
        for rank in range(world):
            for batch in TrainBatches(cfg, rank=rank, world_size=world, pass_index=0):
                seen += batch["uids"]
        per_world.append(seen)
    assert len(per_world[0]) == len(per_world[1]) == 62 * 32
    assert sorted(per_world[0]) == sorted(per_world[1])
    assert len(set(per_world[0])) == len(per_world[0])


# -- online balancing -------------------------------------------------------------------------------
def _matched_for_shapes(pool: str, root: Path) -> tuple[str, str, float]:
    """A match-stage folder for the pool with the 8 shape words as entries, counts as if from a
    larger pool where the first four shapes are 20x as frequent, and t between the two groups:
    those four are head entries (kept with p = t / count), the others tail (always kept)."""
    shapes = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon"]
    uids, texts, ids = [], [], []
    for f in sorted(Path(pool).glob("images-*.parquet")):
        tbl = pq.read_table(f, columns=["uid", "caption"])
        for uid, cap in zip(
            tbl.column("uid").to_pylist(), tbl.column("caption").to_pylist(), strict=True
        ):
            low = f" {cap.lower()}"
            uids.append(uid)
            texts.append(cap)
            ids.append(sorted({i for i, w in enumerate(shapes) if f" {w}" in low}))
    matched = root / "matched"
    matched.mkdir()
    pq.write_table(
        pa.table({"uid": uids, "text": texts, "entry_ids": pa.array(ids, pa.list_(pa.uint32()))}),
        matched / "part-00000.parquet",
    )
    counts = np.zeros(len(shapes), dtype=np.int64)
    for e in ids:
        for i in e:
            counts[i] += 1
    counts[:4] *= 20
    pq.write_table(
        pa.table(
            {"entry_id": np.arange(len(shapes), dtype=np.uint32), "entry": shapes, "count": counts}
        ),
        root / "counts.parquet",
    )
    t = float(counts[4:].max() * 2)
    assert counts[:4].min() > t
    return str(matched), str(root / "counts.parquet"), t


def test_online_balancing_reports_each_pass(pools: dict[str, str], tmp_path: Path) -> None:
    matched, counts, t = _matched_for_shapes(pools["pool"], tmp_path)
    out = tmp_path / "run"
    m = train_command(
        _cfg(
            pools,
            out,
            balance="online",
            matched=matched,
            counts=counts,
            t=t,
            samples_seen=32 * 200,
            stop_after=70,
        )  # fmt: skip
    )
    bal = m["balance"]
    assert bal["mode"] == "online" and bal["t"] == t
    passes = bal["passes"]
    assert len(passes) >= 2  # a pass keeps ~2/3 of 2000 samples: < 70 steps of 32
    for p in passes:
        assert p["read"] == 2000 and 0.3 * p["read"] < p["kept"] < 0.9 * p["read"]
        assert p["kept_head_matches"] + p["kept_tail_matches"] > 0
        assert 0 < p["head_share"] < 1 and abs(p["head_share"] + p["tail_share"] - 1) < 1e-9
    assert passes[0]["kept"] != passes[1]["kept"] or passes[0] != passes[1]  # fresh draws
    trained = {r["pass"]: r for r in m["data"]["passes"]}
    assert trained[0]["pass_candidates"] == passes[0]["kept"]


# -- one-line errors ------------------------------------------------------------------------------
def test_train_errors(pools: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch larger than the data"):
        train_command(_cfg(pools, tmp_path / "a", batch_size=4096, samples_seen=4096))
    subset = tmp_path / "subset"
    subset.mkdir()
    pq.write_table(pa.table({"uid": ["0" * 24, "f" * 24]}), subset / "part-00000.parquet")
    with pytest.raises(ValueError, match="none of its 2 uids has an image"):
        train_command(_cfg(pools, tmp_path / "b", subset=str(subset)))
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        train_command(_cfg(pools, tmp_path / "c", model="ViT-Nope"))


def test_cli_unknown_model_is_one_line(pools: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(
        ["train", pools["pool"], "-o", tmp_path / "o", "--model", "ViT-Nope", "--device", "cpu"],
        env=cli_env(),
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("Error: unknown open_clip model")
    assert "list_models" in lines[0]
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_cli_trains_on_the_session_cluster_with_a_progress_bar(
    pools: dict[str, str], tmp_path: Path, ray_cluster: str
) -> None:
    """`curation train --address` uses the cluster curation runs on, and the driver draws a
    progress bar of steps with samples/s from rank 0's reports (not the workers' log lines)."""
    out = tmp_path / "cli"
    proc = run_cli(
        ["train", pools["pool"], "-o", out, "--batch-size", "32", "--samples-seen", "320",
         "--loader-workers", "0", "--log-every", "2", "--device", "cpu",
         "--address", ray_cluster],
        timeout=240,
    )  # fmt: skip
    assert "train:" in proc.stderr and "samples/s=" in proc.stderr, proc.stderr[-2000:]
    assert "step 10/10" not in proc.stdout + proc.stderr  # no per-step worker prints
    assert "10/10 steps" in proc.stdout
    assert (out / "model.safetensors").exists()
