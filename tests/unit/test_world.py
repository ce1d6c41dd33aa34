"""The quality benchmark's generated world: determinism, truth, and what matching sees."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from curation.stages.match import Matcher, naive_match
from curation.synth.world import (
    BOILERPLATE,
    FILLERS,
    TEMPLATES,
    WorldConfig,
    concept_names,
    write_world,
)
from curation.train.eval_tasks import load_task

SMALL = WorldConfig(
    concepts=12,
    pool_size=600,
    clean_size=60,
    test_per_concept=3,
    retrieval_per_concept=1,
    samples_per_shard=250,
    image_size=32,
    seed=3,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    return root, write_world(str(root), SMALL)


def test_same_config_same_bytes(world, tmp_path: Path) -> None:
    root, _ = world
    write_world(str(tmp_path), SMALL)
    assert _digest(tmp_path) == _digest(root)
    other = tmp_path / "other"
    write_world(str(other), WorldConfig(**{**SMALL.__dict__, "seed": 4}))
    assert _digest(other)["metadata.json"] != _digest(root)["metadata.json"]


def test_pool_layout_and_truth(world) -> None:
    root, doc = world
    table = ds.dataset(root / "pool" / "metadata", format="parquet").to_table()
    assert table.num_rows == SMALL.pool_size
    assert sorted(p.name for p in (root / "pool" / "shards").iterdir()) == [
        "00000.tar", "00001.tar", "00002.tar",
    ]  # fmt: skip
    kind = np.asarray(table.column("kind").to_pylist())
    img = table.column("image_concept").to_numpy()
    cap = table.column("caption_concept").to_numpy()
    assert (cap[kind == "clean"] == img[kind == "clean"]).all()
    assert (cap[kind == "mismatch"] != img[kind == "mismatch"]).all()
    assert (cap[kind == "boilerplate"] == -1).all()
    assert doc["pool"]["kinds"] == {k: int((kind == k).sum()) for k in doc["pool"]["kinds"]}
    # the rates are what was asked, within sampling noise
    assert abs((kind == "mismatch").mean() - SMALL.mismatch_rate) < 0.06
    assert abs((kind == "boilerplate").mean() - SMALL.boilerplate_rate) < 0.05
    # Zipf: the rank-1 concept is the most frequent image concept
    counts = np.bincount(img, minlength=SMALL.concepts)
    assert counts.argmax() == 0 and counts[0] > 3 * counts[-1]
    assert doc["pool"]["image_counts"] == counts.tolist()
    # the tar holds the same uids and captions as the Parquet, in order
    with tarfile.open(root / "pool" / "shards" / "00000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(names[1]).read())
        jpg = tf.extractfile(names[0]).read()
    assert names[0] == f"{table.column('uid')[0]}.jpg"
    assert meta["caption"] == table.column("text")[0].as_py()
    assert Image.open(io.BytesIO(jpg)).size == (32, 32)


def test_matching_finds_exactly_the_named_concept(world) -> None:
    """No name is inside another name or a fixed caption text: MetaCLIP's substring matching
    (our matcher and the reference loop) finds the caption's concept and nothing else."""
    root, _ = world
    names = json.loads((root / "metadata.json").read_text())
    assert names == concept_names(SMALL.seed, SMALL.concepts)
    table = ds.dataset(root / "pool" / "metadata", format="parquet").to_table()
    m = Matcher(names)
    m.setup()
    got = m.match(table.column("text")).to_pylist()
    cap = table.column("caption_concept").to_pylist()
    assert got == [[] if c < 0 else [c] for c in cap]
    texts = table.column("text").to_pylist()
    assert [naive_match(t, names) for t in texts[:200]] == got[:200]
    for fixed in (*TEMPLATES, *FILLERS, *BOILERPLATE):
        assert naive_match(fixed.replace("{}", " "), concept_names(0, None)) == []


def test_tasks_are_balanced_clip_benchmark_tasks(world) -> None:
    root, doc = world
    cls = load_task(str(root / "tasks" / "classification"))
    assert cls.kind == "classification"
    assert list(cls.classnames) == [c["name"] for c in doc["concepts"]]
    ret = load_task(str(root / "tasks" / "retrieval"))
    assert ret.kind == "retrieval"
    with tarfile.open(root / "tasks" / "classification" / "test" / "0.tar") as tf:
        labels = [int(tf.extractfile(n).read()) for n in tf.getnames() if n.endswith(".cls")]
    assert np.bincount(labels).tolist() == [SMALL.test_per_concept] * SMALL.concepts


def test_concepts_have_distinct_signatures(world) -> None:
    _, doc = world
    pairs = {(c["background"], c["foreground"]) for c in doc["concepts"]}
    assert len(pairs) == SMALL.concepts
    assert all(c["background"] != c["foreground"] for c in doc["concepts"])


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="mismatch_rate"):
        WorldConfig(mismatch_rate=0.8, boilerplate_rate=0.3)
    with pytest.raises(ValueError, match="concepts"):
        WorldConfig(concepts=1)
