"""`curation eval` on the session Ray cluster: a tiny model trained by `curation train` over
generated CLIP_benchmark-layout tasks (color classification, caption retrieval) gives sane
metrics, random weights give chance, and the CLI equals the in-process function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.flows.evaluate import evaluate_in_process, resolve_model
from curation.stages.score import TINY_MODEL

from .conftest import cli_env, run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from curation.config.train import resolve
    from curation.flows.train import train_command
    from curation.stages.score import register_model_configs
    from curation.synth.eval_tasks import write_caption_task, write_color_task
    from curation.synth.images import write_synthetic_image_pool

    root = tmp_path_factory.mktemp("eval")
    write_synthetic_image_pool(str(root / "pool"), 3, 500, 0, image_size=64, mismatch_rate=0.0)
    cfg = resolve(
        None,
        {
            "shards": (str(root / "pool"),),
            "out": str(root / "run"),
            "batch_size": 64,
            "samples_seen": 64 * 250,
            "lr": 3e-3,
            "warmup": 20,
            "seed": 0,
            "log_every": 50,
            "checkpoint_every": 1000,
            "loader_workers": 0,
            "shuffle_buffer": 256,
            "device": "cpu",
        },
    )
    train_command(cfg)
    write_color_task(str(root / "color"), n=120, seed=7)
    write_caption_task(str(root / "caps"), n=40, seed=8)
    register_model_configs()
    torch.manual_seed(123)
    rand = open_clip.create_model(TINY_MODEL)
    weights = {k: v.contiguous() for k, v in rand.state_dict().items()}
    save_file(weights, str(root / "rand.safetensors"))
    return {k: str(root / k) for k in ("run", "color", "caps", "rand.safetensors")} | {
        "root": str(root)
    }


def test_cli_eval_trained_and_random(world: dict[str, str], ray_cluster: str) -> None:
    out = Path(world["root"]) / "results.json"
    proc = run_cli(
        ["eval", world["run"], "--task", world["color"], "--task", world["caps"], "-o", out,
         "--device", "cpu", "--batch-size", "32", "--address", ray_cluster],
        env=cli_env(), timeout=240,
    )  # fmt: skip
    assert "color: acc1" in proc.stdout, proc.stdout
    doc = json.loads(out.read_text())
    color, caps = doc["tasks"]
    assert color["kind"] == "classification" and color["images"] == 120 and color["classes"] == 12
    assert caps["kind"] == "retrieval" and caps["images"] == 40 and caps["texts"] > 40
    m = color["metrics"]
    assert m["acc1"] >= 2 / 12, m  # trained: well above chance (1/12)
    assert m["acc1"] <= m["acc5"] <= 1.0 and 0.0 <= m["mean_per_class_recall"] <= 1.0
    r = caps["metrics"]
    assert r["image_retrieval_recall@1"] <= r["image_retrieval_recall@5"]
    assert r["image_retrieval_recall@5"] <= r["image_retrieval_recall@10"]
    assert doc["average"]["classification_acc1"] == m["acc1"]
    assert doc["average"]["retrieval_mean_recall"] == r["mean_recall"]
    assert doc["model"]["model"] == TINY_MODEL

    # the same numbers in-process (no Ray)
    local = evaluate_in_process(
        resolve_model(world["run"]), [world["color"], world["caps"]], "cpu", 32
    )
    for a, b in zip(doc["tasks"], local["tasks"], strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
        assert a["images"] == b["images"]

    # random weights: near chance on the same task, below the trained model
    rand = evaluate_in_process(
        resolve_model(world["rand.safetensors"], TINY_MODEL), [world["color"], world["caps"]]
    )
    rm = rand["tasks"][0]["metrics"]
    assert rm["acc1"] <= 0.25 and rm["acc1"] < m["acc1"], (rm, m)
    assert rand["tasks"][1]["metrics"]["mean_recall"] < r["mean_recall"]


def test_cli_eval_errors(world: dict[str, str], tmp_path: Path) -> None:
    """One-line errors before any Ray work (in-process CLI: nothing here starts Ray)."""
    from click.testing import CliRunner

    from curation.cli import main

    out = str(tmp_path / "r.json")
    cases = [
        (["eval", world["run"], "--task", str(tmp_path), "-o", out], "no test/*.tar"),
        (["eval", world["rand.safetensors"], "--model", "ViT-Nope", "--task", world["color"],
          "-o", out], "unknown open_clip model"),
        (["eval", world["rand.safetensors"], "--task", world["color"], "-o", out],
         "needs --model"),
        (["eval", str(tmp_path / "none.safetensors"), "--model", TINY_MODEL, "--task",
          world["color"], "-o", out], "no such local file"),
    ]  # fmt: skip
    for args, msg in cases:
        res = CliRunner().invoke(main, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code != 0 and lines == [lines[0]], res.output
        assert lines[0].startswith("Error:") and msg in lines[0], lines
    assert not (tmp_path / "r.json").exists()
