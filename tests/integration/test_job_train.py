"""`curation run` with `train:` and `eval:` sections, end to end on the session Ray cluster: a
DataComp-layout pool made from generated images (metadata/*.parquet beside shards/*.tar), a
CLIP-score filter then MetaCLIP balancing, the shipped tiny model trained on the curated subset
and evaluated zero-shot on a generated color task; a rerun trains nothing and writes the same
manifest bytes; a changed training config is refused without --overwrite."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.config.job import parse_job
from curation.flows.job import job_summary, run_job
from curation.io.parts import ResumeError
from curation.io.report import TRAIN_HEADING

SEED = 3
ROWS = 2 * 160


@pytest.fixture(scope="module")
def small_md(tmp_path_factory: pytest.TempPathFactory) -> str:
    from curation.core.metadata import write_metadata_json
    from curation.synth.images import COLORS

    path = tmp_path_factory.mktemp("md") / "colors.json"
    write_metadata_json(sorted(COLORS), str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from curation.core.metadata import write_metadata_json
    from curation.synth.eval_tasks import write_color_task
    from curation.synth.images import COLORS, SHAPES, write_synthetic_image_pool

    root = tmp_path_factory.mktemp("jobtrain")
    raw = root / "raw"
    write_synthetic_image_pool(str(raw), 2, ROWS // 2, 0, image_size=64, mismatch_rate=0.0)
    (root / "pool" / "metadata").mkdir(parents=True)
    (root / "pool" / "shards").mkdir()
    rng = np.random.default_rng(0)
    for p in sorted(raw.glob("*.parquet")):  # DataComp's layout: text + a CLIP score column
        t = pq.read_table(p, columns=["uid", "url", "caption", "width", "height"])
        t = t.rename_columns(["uid", "url", "text", "width", "height"])
        score = pa.array(rng.random(t.num_rows).astype("float32"))
        t = t.append_column("clip_b32_similarity_score", score)
        pq.write_table(t, root / "pool" / "metadata" / p.name)
        p.with_suffix(".tar").rename(root / "pool" / "shards" / p.with_suffix(".tar").name)
    write_metadata_json(sorted(set(COLORS) | set(SHAPES)), str(root / "md.json"))
    write_color_task(str(root / "color"), n=48, seed=7)
    return {"root": str(root), "md": str(root / "md.json"), "color": str(root / "color")}


def _spec(world: dict[str, str], **train) -> dict:
    root = Path(world["root"])
    return {
        "name": "tiny_train",
        "seed": SEED,
        "input": {"pool": str(root / "pool" / "metadata")},
        "filters": {
            "steps": [
                {
                    "baseline": "clip_score",
                    "score_column": "clip_b32_similarity_score",
                    "fraction": 0.8,
                },
            ]
        },  # fmt: skip
        "metadata": world["md"],
        "balance": {"t": 40, "when": "after"},
        "train": {
            "shards": str(root / "pool" / "shards"),
            "model": "curation-tiny-vit",
            "batch_size": 32,
            "samples_seen": 256,
            "lr": 1e-3,
            "warmup": 2,
            "device": "cpu",
            "loader_workers": 0,
            "shuffle_buffer": 64,
            "checkpoint_every": 4,
            "log_every": 1,
            **train,
        },
        "eval": {"tasks": [world["color"]], "batch_size": 48, "device": "cpu"},
    }


def test_job_trains_and_evaluates_and_a_rerun_resumes(world: dict[str, str], tmp_path: Path):
    out = tmp_path / "run"
    spec = parse_job(_spec(world))
    m = run_job(spec, str(out), progress=False)

    # curation as before, then train on the curated subset (the balanced rows) and evaluate
    assert m["flow"] == ["filter", "match", "count", "balance"]
    curated = m["stages"]["balance"]["rows_written"]
    assert 32 <= curated < m["stages"]["filter"]["rows_written"] < ROWS
    t = m["train"]
    assert t["result"]["steps"] == t["result"]["total_steps"] == 8
    assert t["result"]["samples_seen"] == 256 and t["result"]["device"] == "cpu"
    assert t["hyperparameters"]["model"] == "curation-tiny-vit"
    assert t["hyperparameters"]["seed"] == SEED  # the job's seed
    assert t["data"]["subset"]["url"] == str(out / "balance")  # uids not 32 hex: the folder
    assert t["data"]["subset"]["uids"] == curated == t["data"]["samples_per_pass"]
    assert t["result"]["model"] == str(out / "train" / "model.safetensors")
    assert (out / "train" / "model.safetensors").is_file()
    e = m["eval"]
    assert [x["task"] for x in e["tasks"]] == ["color"] and e["tasks"][0]["images"] == 48
    assert 0 <= e["tasks"][0]["metrics"]["acc1"] <= 1
    assert e["average"]["classification_acc1"] == e["tasks"][0]["metrics"]["acc1"]
    assert (
        json.loads((out / "eval" / "results.json").read_text())["tasks"][0]["metrics"]
        == (e["tasks"][0]["metrics"])
    )
    text = (out / "manifest.json").read_text()
    assert json.loads(text)["train"] == t and json.loads(text)["eval"] == e
    assert not re.search(r"seconds|wall", text), "no wall times in the job manifest"
    assert m["outputs"]["train"] == str(out / "train")

    # the report: the curation tables, then recipe, subset, loss curve and scores
    md = (out / "report" / "summary.md").read_text()
    assert md.count(TRAIN_HEADING) == 1 and md.index("head entries") < md.index(TRAIN_HEADING)
    section = md.split(TRAIN_HEADING, 1)[1]
    for want in ("tiny_train", "clip_score", "t = 40", f"the curated subset, {curated:,} rows",
                 "![training loss](loss_curve.png)", "| color | classification | 48 |"):  # fmt: skip
        assert want in section, (want, section)
    assert (out / "report" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    lines = job_summary(spec, m, str(out))
    assert "train:    curation-tiny-vit, 8/8 steps" in lines and "eval:     color: acc1" in lines

    # a rerun: nothing trained or evaluated again, the same manifest bytes
    ckpts = sorted(p.name for p in (out / "train" / "checkpoints").iterdir())
    stamps = {p: (out / p).stat().st_mtime_ns for p in ("train/model.safetensors",
              "train/manifest.json", "eval/results.json")}  # fmt: skip
    m2 = run_job(parse_job(_spec(world)), str(out), progress=False)
    assert (out / "manifest.json").read_text() == text and m2["train"] == t
    assert sorted(p.name for p in (out / "train" / "checkpoints").iterdir()) == ckpts
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "report" / "summary.md").read_text().count(TRAIN_HEADING) == 1

    # a changed training config is refused before any work, naming what changed
    with pytest.raises(ResumeError, match=r"training run of another config.*config\.lr"):
        run_job(parse_job(_spec(world, lr=2e-3)), str(out), progress=False)
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "manifest.json").read_text() == text
    # with --overwrite it trains and evaluates again, from scratch
    m3 = run_job(parse_job(_spec(world, lr=2e-3)), str(out), overwrite=True, progress=False)
    assert m3["train"]["hyperparameters"]["lr"] == 2e-3 and m3["train"]["result"]["steps"] == 8
    assert m3["train"]["data"] == t["data"] and m3["stages"] == m["stages"]
    assert all((out / p).stat().st_mtime_ns != stamps[p] for p in stamps)
    assert m3["eval"]["tasks"][0]["images"] == 48


def test_no_filter_job_trains_on_the_whole_pool(world: dict[str, str], tmp_path: Path, monkeypatch):
    """DataComp's no-filtering baseline: neither filters nor balance; no subset, no eval. OUT
    is relative (Ray Train's workers run elsewhere: the model must still land in OUT)."""
    spec = _spec(world, samples_seen=64)
    for key in ("filters", "metadata", "balance", "eval"):
        spec.pop(key)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "nofilter"
    m = run_job(parse_job(spec), "nofilter", progress=False)
    assert (out / "train" / "model.safetensors").is_file()
    assert (out / "train" / "train_log.jsonl").is_file()
    assert m["flow"] == [] and m["outputs"]["curated"] is None
    assert m["train"]["data"]["subset"] is None
    assert m["train"]["data"]["samples_per_pass"] == ROWS and m["train"]["result"]["steps"] == 2
    md = (out / "report" / "summary.md").read_text()
    assert md.startswith("# Curation report") and "the whole pool (no filtering)" in md
    assert "no filters or balancing" in job_summary(parse_job(spec), m, "nofilter")


@pytest.mark.slow  # ~35 s: online balancing's per-pass statistics start their own tasks
def test_online_balancing_trains_on_the_filtered_rows(world: dict[str, str], tmp_path: Path):
    """`train.balance: online`: the pre-balance rows (the filter output) with the job's own
    match output and counts, at the job's t."""
    out = tmp_path / "online"
    spec = _spec(world, balance="online", samples_seen=64)
    spec.pop("eval")
    m = run_job(parse_job(spec), str(out), progress=False)
    d = m["train"]["data"]
    assert d["online_balance"] and d["subset"]["url"] == str(out / "filter")
    assert d["subset"]["uids"] == m["stages"]["filter"]["rows_written"]
    assert d["balance"]["mode"] == "online" and d["balance"]["t"] == 40
    kept = pc.sum(pq.read_table(out / "counts" / "entry_counts.parquet").column("count"))
    assert kept.as_py() > 0


@pytest.mark.slow  # ~60 s on 2 cores: ingest, img2dataset and a training run
def test_raw_shard_job_fetches_its_curated_images_and_trains(tmp_path: Path, small_md: str):
    """A raw-shard job with `images:`: ingest → match → count → balance, the balanced rows'
    images downloaded into OUT/images (img2dataset, from a loopback server), trained on."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from curation.synth.images import COLORS

    from .http_fixture import ImageServer, jpeg_bytes

    colors = list(COLORS.items())
    routes = {f"/{i}.jpg": ("bytes", (jpeg_bytes(32, 32, colors[i % len(colors)][1]),
                                      "image/jpeg")) for i in range(48)}  # fmt: skip
    with ImageServer(routes) as server:
        rows = {
            "url": [server.url(f"/{i}.jpg") for i in range(48)],
            "text": [f"a photo of the color {colors[i % len(colors)][0]}" for i in range(48)],
        }
        pq.write_table(pa.table(rows), tmp_path / "pairs.parquet")
        spec = {
            "name": "raw_images",
            "seed": SEED,
            "input": {"paths": [str(tmp_path / "pairs.parquet")]},
            "metadata": small_md,
            "balance": {"t": 1000},
            "images": {"threads": 4, "timeout": 5, "samples_per_shard": 32},
            "train": {"batch_size": 16, "samples_seen": 32, "device": "cpu", "loader_workers": 0,
                      "log_every": 1, "shuffle_buffer": 16},
        }  # fmt: skip
        out = tmp_path / "out"
        m = run_job(parse_job(spec), str(out), progress=False)
    assert m["stages"]["balance"]["rows_written"] == 48  # t above every count: all kept
    assert m["images"]["rows_written"] == 48 and m["outputs"]["images"] == str(out / "images")
    assert len(list((out / "images").glob("*.tar"))) == 2
    t = m["train"]
    assert t["data"]["subset"] is None and t["data"]["samples_per_pass"] == 48
    assert t["result"]["steps"] == 2
    assert "images:   48 of 48 fetched" in job_summary(parse_job(spec), m, str(out))
