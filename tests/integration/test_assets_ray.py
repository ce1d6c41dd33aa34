"""Assets on a multi-node cluster: a local file named on the driver reaches workers of another
node through the object store, and a one-node run ships nothing.

The two-node cluster (`ray.cluster_utils.Cluster`: a head and a worker node, 1 CPU each) runs in
a subprocess (this file run as a script), since this process is connected to the session
cluster. The worker node is started from another working directory, so its workers resolve the
driver's relative metadata path (`meta/my_metadata.json`, as in `-m ./my_metadata.json`) against
a folder that lacks it, and the head's CPU is held by an actor, so every shard runs on the
worker node: without shipping the run fails there (checked), with it the output equals a normal
run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from integration.two_node import attempt, run_scenario, two_node_cluster

TEXTS = ["a red car", "the blue car is red", "nothing", "car car", "a red, red rose", ""]
ENTRIES = ["red", "car", "blue car", "rose", "is red"]
SHARDS = 4


def _inputs(root: Path) -> list[tuple[str, str]]:
    """(name, url) of the input shards, and the metadata at `root/a/meta/my_metadata.json`."""
    from curation.core.metadata import write_metadata_json

    (root / "a" / "meta").mkdir(parents=True, exist_ok=True)
    (root / "b").mkdir(exist_ok=True)
    write_metadata_json(ENTRIES, str(root / "a" / "meta" / "my_metadata.json"))
    shards = []
    for i in range(SHARDS):
        p = root / "in" / f"part-s{i}.parquet"
        p.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": TEXTS[i:] + TEXTS[:i], "row": list(range(len(TEXTS)))}), p)
        shards.append((f"s{i}", str(p)))
    return shards


WW = {"en": ["red", "car", "rose"], "de": ["rot", "Auto", "Rose"]}
WW_ROWS = [("a red car", "en"), ("ein rotes Auto", "de"), ("die Rose ist rot", "de"),
           ("a rose", "en"), ("rouge", "fr"), ("", "en")]  # fmt: skip


def _world_inputs(root: Path) -> list[tuple[str, str]]:
    """A per-language metadata folder at `root/a/meta_ww/` (`<lang>.json`, as MetaCLIP 2's
    `data/metadata/`) and langid-like parts (`text`, `lang`)."""
    (root / "a" / "meta_ww").mkdir(parents=True, exist_ok=True)
    for lang, entries in WW.items():
        (root / "a" / "meta_ww" / f"{lang}.json").write_text(json.dumps(entries))
    shards = []
    for i in range(2):
        rows = WW_ROWS[i:] + WW_ROWS[:i]
        p = root / "in_ww" / f"part-w{i}.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [t for t, _ in rows], "lang": [g for _, g in rows]}), p)
        shards.append((f"w{i}", str(p)))
    return shards


def _world_match_stage(folder: str):
    from curation.core.metadata import load_metadata_set
    from curation.flows.worldwide import LanguageMatchStage

    return LanguageMatchStage(folder, load_metadata_set(folder).checksum, "auto", True)


def _match_stage(metadata: str):
    from curation.core.metadata import load_metadata
    from curation.stages.match import MatchStage

    return MatchStage(metadata, load_metadata(metadata).checksum)


def _split(shard):
    """Producer of the actor-stage run: the shard's table in two chunks."""
    from curation.io.parts import read_part

    table = read_part(shard.input)
    yield table.slice(0, 3)
    yield table.slice(3)


def _finish(shard, stage_dir: str, outputs: list) -> dict:
    """The actor-stage run's part: the chunks' outputs, as `run_stage` would write them."""
    from collections import Counter

    from curation.io.parts import finish_part

    counts: Counter = Counter()
    for o in outputs:
        counts.update(o.counts)
    return finish_part(stage_dir, shard, pa.concat_tables([o.table for o in outputs]), counts)


def _read(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


# -- the two-node scenario (run as a script) --------------------------------------------------
def two_node_scenario(root: Path) -> dict:
    """In `root/a`, on a fresh two-node cluster: the match stage with a relative metadata path,
    first with shipping off (must fail), then as by default (ships); then the same on an actor
    placed on the worker node (the only one with a GPU, a bare resource here) by
    `run_actor_stage`. Returns what happened."""
    import ray

    from curation.core.stage import Resources, Shard
    from curation.executor.runner import run_actor_stage, run_stage, ship_assets

    shards = [Shard(n, u) for n, u in _inputs(root)]
    ww_shards = [Shard(n, u) for n, u in _world_inputs(root)]
    with two_node_cluster(root, worker_gpus=1) as info:
        hold = info["hold"]
        out: dict = {"nodes": info["nodes"], "head": info["head"]}

        stage = _match_stage("meta/my_metadata.json")
        os.environ["CURATION_SHIP_ASSETS"] = "never"
        out["never"] = attempt(
            lambda: run_stage(stage, shards, str(root / "out-never"), fp={"t": 1}, progress=False)
        )
        os.environ["CURATION_SHIP_ASSETS"] = "auto"
        shipment = ship_assets(stage)
        out["shipped"] = {k: [b.basename, b.sha256, b.size] for k, (b, _) in shipment.items()}
        del shipment
        markers = run_stage(stage, shards, str(root / "out-shipped"), fp={"t": 1}, progress=False)
        out["counts"] = {k: m["counts"] for k, m in sorted(markers.items())}

        # a worldwide metadata folder: one asset per <lang>.json
        ww = _world_match_stage("meta_ww")
        os.environ["CURATION_SHIP_ASSETS"] = "never"
        out["ww_never"] = attempt(
            lambda: run_stage(ww, ww_shards, str(root / "ww-never"), fp={"t": 1}, progress=False)
        )
        os.environ["CURATION_SHIP_ASSETS"] = "auto"
        shipment = ship_assets(ww)
        out["ww_shipped"] = sorted(shipment)
        del shipment
        markers = run_stage(ww, ww_shards, str(root / "ww-shipped"), fp={"t": 1}, progress=False)
        out["ww_counts"] = {k: m["counts"] for k, m in sorted(markers.items())}

        ray.kill(hold)  # producers may now run on either node; the actor needs the GPU
        stage = _match_stage("meta/my_metadata.json")
        stage.resources = Resources(cpus=0, gpus=1, actor=True)
        actor_run = {
            "split": _split, "split_args": (), "num_actors": 1, "finish": _finish,
            "fp": {"t": 1}, "start_timeout": 120, "progress": False,
        }  # fmt: skip
        os.environ["CURATION_SHIP_ASSETS"] = "never"
        out["actor_never"] = attempt(
            lambda: run_actor_stage(stage, shards, str(root / "actor-never"), **actor_run)
        )
        os.environ["CURATION_SHIP_ASSETS"] = "auto"
        markers = run_actor_stage(stage, shards, str(root / "actor-shipped"), **actor_run)
        out["actor_counts"] = {k: m["counts"] for k, m in sorted(markers.items())}
        return out


# -- tests ------------------------------------------------------------------------------------
def test_a_local_asset_reaches_workers_of_another_node(tmp_path):
    from curation.core.stage import Shard
    from curation.executor.runner import run_stage

    root = tmp_path / "scenario"
    cache = tmp_path / "cache"
    got = run_scenario(__file__, root, CURATION_ASSET_CACHE=str(cache))
    assert got["nodes"] == 2

    # without shipping the worker node cannot read the driver's relative path
    assert got["never"] != "ok"
    assert "FileNotFoundError" in got["never"] and "meta/my_metadata.json" in got["never"]

    # shipped: materialized once in the worker node's cache, under its content hash
    md = root / "a" / "meta" / "my_metadata.json"
    sha = hashlib.sha256(md.read_bytes()).hexdigest()
    assert got["shipped"] == {"metadata": ["my_metadata.json", sha, md.stat().st_size]}
    assert (cache / sha / "my_metadata.json").read_bytes() == md.read_bytes()
    assert sorted(p.name for p in (cache / sha).iterdir()) == ["my_metadata.json"]

    # the output equals a normal run's (the session cluster, one node, the absolute path)
    shards = [Shard(f"s{i}", str(root / "in" / f"part-s{i}.parquet")) for i in range(SHARDS)]
    normal = tmp_path / "normal"
    markers = run_stage(_match_stage(str(md)), shards, str(normal), fp={"t": 1}, progress=False)
    shipped = root / "out-shipped"
    assert _read(shipped).equals(_read(normal))
    assert got["counts"] == {k: m["counts"] for k, m in sorted(markers.items())}
    for i in range(SHARDS):
        name = f"part-s{i}.parquet"
        assert (shipped / name).read_bytes() == (normal / name).read_bytes()

    # a per-language metadata folder is shipped file by file and matches as a normal run
    assert "FileNotFoundError" in got["ww_never"] and "meta_ww" in got["ww_never"], got["ww_never"]
    assert got["ww_shipped"] == ["metadata:de", "metadata:en"]
    ww_shards = [Shard(f"w{i}", str(root / "in_ww" / f"part-w{i}.parquet")) for i in range(2)]
    ww_normal = tmp_path / "ww_normal"
    ww = _world_match_stage(str(root / "a" / "meta_ww"))
    ww_markers = run_stage(ww, ww_shards, str(ww_normal), fp={"t": 1}, progress=False)
    assert got["ww_counts"] == {k: m["counts"] for k, m in sorted(ww_markers.items())}
    assert _read(root / "ww-shipped").equals(_read(ww_normal))
    assert got["ww_counts"]["w0"]["matches"] == 6  # red, car | rot, Auto | Rose, rot | rose

    # the same through run_actor_stage, its actor on the worker node
    assert got["actor_never"].startswith("ValueError: match: FileNotFoundError")
    assert got["actor_counts"] == got["counts"]
    assert _read(root / "actor-shipped").equals(_read(normal))


def test_a_one_node_run_ships_nothing(tmp_path, monkeypatch):
    import ray

    from curation.core import assets
    from curation.core.stage import Shard
    from curation.executor.runner import run_stage, ship_assets

    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    shards = [Shard(n, u) for n, u in _inputs(tmp_path)]
    stage = _match_stage(str(tmp_path / "a" / "meta" / "my_metadata.json"))
    monkeypatch.delenv("CURATION_SHIP_ASSETS", raising=False)
    assert ship_assets(stage) == {}

    def no_copy(*args, **kwargs):
        raise AssertionError("a one-node run must not copy assets into the object store")

    monkeypatch.setattr(assets, "read_asset", no_copy)
    markers = run_stage(stage, shards, str(tmp_path / "out"), fp={"t": 1}, progress=False)
    assert sum(m["counts"]["rows_written"] for m in markers.values()) == SHARDS * len(TEXTS)

    # shared URLs and bundled resources are never shipped, whatever the setting
    monkeypatch.setenv("CURATION_SHIP_ASSETS", "always")
    from curation.core.metadata import load_metadata

    bundled = type(stage)("bundled:metadata_en", load_metadata("bundled:metadata_en").checksum)
    assert ship_assets(bundled) == {}


def test_shipping_refuses_an_asset_over_the_limit(tmp_path, monkeypatch):
    from curation.core.assets import AssetTooLarge
    from curation.executor.runner import ship_assets

    _inputs(tmp_path)
    stage = _match_stage(str(tmp_path / "a" / "meta" / "my_metadata.json"))
    monkeypatch.setenv("CURATION_SHIP_ASSETS", "always")
    monkeypatch.setenv("CURATION_MAX_ASSET_BYTES", "10")
    with pytest.raises(AssetTooLarge, match="my_metadata.json.*CURATION_MAX_ASSET_BYTES"):
        ship_assets(stage)
    monkeypatch.setenv("CURATION_MAX_ASSET_BYTES", str(1 << 20))
    shipment = ship_assets(stage)
    assert list(shipment) == ["metadata"]
    blob, ref = shipment["metadata"]
    import ray

    assert bytes(ray.get(ref)) == (tmp_path / "a" / "meta" / "my_metadata.json").read_bytes()
    assert blob.basename == "my_metadata.json"


if __name__ == "__main__":
    result = two_node_scenario(Path(sys.argv[1]))
    print(json.dumps(result, sort_keys=True))
