"""`curation eval` on a multi-node cluster: the driver-local checkpoint reaches the workers of
another node through the object store (like a stage's assets), and a one-node run ships nothing.

The two-node cluster (`ray.cluster_utils.Cluster`, 1 CPU each) runs in a subprocess (this file
run as a script, `two_node.run_scenario`): the worker node starts in another working
directory, so the driver's relative checkpoint path (`w/rand.safetensors`) does not resolve
there, and the head's CPU is held by an actor, so the task runs on the worker node. Without
shipping it fails there; with it the metrics equal an in-process evaluation's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from integration.two_node import attempt, run_scenario, two_node_cluster


def _world(root: Path) -> tuple[str, str]:
    """Random tiny-model weights at `root/a/w/rand.safetensors` and a color task folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from curation.stages.score import TINY_MODEL, register_model_configs
    from curation.synth.eval_tasks import write_color_task

    (root / "a" / "w").mkdir(parents=True, exist_ok=True)
    (root / "b").mkdir(exist_ok=True)
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL)
    weights = root / "a" / "w" / "rand.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    write_color_task(str(root / "task"), n=24, seed=1)
    return str(weights), str(root / "task")


def two_node_scenario(root: Path) -> dict:
    from curation.flows.evaluate import evaluate_command
    from curation.stages.score import TINY_MODEL

    _, task = _world(root)
    with two_node_cluster(root) as info:
        out: dict = {"nodes": info["nodes"]}
        model = {"model": TINY_MODEL, "checkpoint": "w/rand.safetensors", "pretrained": None}
        args = {"device": "cpu", "batch_size": 24, "progress": False}
        os.environ["CURATION_SHIP_ASSETS"] = "never"
        out["never"] = attempt(
            lambda: evaluate_command(model, [task], str(root / "never.json"), **args)
        )
        os.environ["CURATION_SHIP_ASSETS"] = "auto"
        doc = evaluate_command(model, [task], str(root / "shipped.json"), **args)
        out["metrics"] = doc["tasks"][0]["metrics"]
        return out


def test_the_checkpoint_reaches_workers_of_another_node(tmp_path):
    from curation.flows.evaluate import evaluate_in_process
    from curation.stages.score import TINY_MODEL

    root, cache = tmp_path / "scenario", tmp_path / "cache"
    got = run_scenario(
        __file__, root, timeout=300, CURATION_ASSET_CACHE=str(cache), CURATION_IO_BACKOFF_S="0.01"
    )
    assert got["nodes"] == 2
    assert got["never"] != "ok" and "rand.safetensors" in got["never"], got["never"]

    weights = root / "a" / "w" / "rand.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (cache / sha / "rand.safetensors").read_bytes() == weights.read_bytes()
    model = {"model": TINY_MODEL, "checkpoint": str(weights), "pretrained": None}
    local = evaluate_in_process(model, [str(root / "task")], "cpu", 24)
    assert got["metrics"] == local["tasks"][0]["metrics"]


def test_a_one_node_eval_ships_nothing(tmp_path, monkeypatch):
    from curation.core import assets
    from curation.flows.evaluate import evaluate_command
    from curation.stages.score import TINY_MODEL

    weights, task = _world(tmp_path)

    def no_copy(*args, **kwargs):
        raise AssertionError("a one-node run must not copy the checkpoint into the object store")

    monkeypatch.delenv("CURATION_SHIP_ASSETS", raising=False)
    monkeypatch.setattr(assets, "read_asset", no_copy)
    model = {"model": TINY_MODEL, "checkpoint": weights, "pretrained": None}
    doc = evaluate_command(model, [task], str(tmp_path / "r.json"), device="cpu", batch_size=24)
    assert doc["tasks"][0]["images"] == 24


if __name__ == "__main__":
    print(json.dumps(two_node_scenario(Path(sys.argv[1]))))
