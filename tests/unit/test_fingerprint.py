"""Resume fingerprints: a rerun must never reuse parts made from other code, inputs or assets."""

from __future__ import annotations

import os

import pytest

from curation.core import fingerprint as fpmod
from curation.core.stage import Shard
from curation.io import parts


def test_package_version_is_in_every_stage_fingerprint(tmp_path, monkeypatch):
    stage = str(tmp_path / "stage")
    parts.prepare_stage_dir(stage, {"stage": "x", "params": {"t": 1}}, overwrite=False)
    parts.prepare_stage_dir(stage, {"stage": "x", "params": {"t": 1}}, overwrite=False)  # same
    monkeypatch.setattr(parts, "__version__", "9.9.9")
    with pytest.raises(parts.ResumeError, match="curation"):
        parts.prepare_stage_dir(stage, {"stage": "x", "params": {"t": 1}}, overwrite=False)


def test_asset_digest_sees_a_same_size_rewrite(tmp_path):
    """Retrained centroids of the same size are a different asset."""
    f = tmp_path / "centroids.npy"
    f.write_bytes(b"A" * 1000)
    before = fpmod.assets_fingerprint([str(f)])
    f.write_bytes(b"B" * 1000)
    os.utime(f, (1, 1))  # even with an older mtime
    after = fpmod.assets_fingerprint([str(f)])
    assert before != after
    assert after[0][1].startswith("sha256:")


def test_input_identity_is_deterministic_for_the_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):
        (d / "s.parquet").write_bytes(b"x" * 10)
    os.utime(a / "s.parquet", (1, 1))
    ia = fpmod.inputs_fingerprint([str(a / "s.parquet")], str(a))
    ib = fpmod.inputs_fingerprint([str(b / "s.parquet")], str(b))
    assert ia == ib == [["./s.parquet", {"size": 10}]]


def test_input_rewritten_after_its_marker_is_redone(tmp_path):
    """A shard whose input changed after its result was written is not reused (like make)."""
    stage = str(tmp_path / "stage")
    src = tmp_path / "in.parquet"
    src.write_bytes(b"old")
    shard = Shard("in", str(src))
    fp = {"stage": "x"}
    parts.prepare_stage_dir(stage, fp, overwrite=False)
    parts.write_marker(stage, "in", {"shard": "in", "counts": {}})
    marker = tmp_path / "stage" / "_done" / "in.json"
    os.utime(src, (1_000, 1_000))
    os.utime(marker, (2_000, 2_000))
    done, todo = parts.done_and_todo(stage, [shard], fp, overwrite=False)
    assert list(done) == ["in"] and todo == []
    src.write_bytes(b"new")  # same path, same size class: rewritten after the marker
    os.utime(src, (3_000, 3_000))
    done, todo = parts.done_and_todo(stage, [shard], fp, overwrite=False)
    assert done == {} and todo == [shard]


def test_done_markers_come_from_one_listing(tmp_path, monkeypatch):
    stage = str(tmp_path / "stage")
    parts.prepare_stage_dir(stage, {"stage": "x"}, overwrite=False)
    for i in range(5):
        parts.write_marker(stage, f"s{i}", {"shard": f"s{i}"})
    calls = []
    from fsspec.implementations.local import LocalFileSystem

    real_exists = LocalFileSystem.exists

    def counting_exists(self, path, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(path)
        return real_exists(self, path, **kw)

    monkeypatch.setattr(LocalFileSystem, "exists", counting_exists)
    shards = [Shard(f"s{i}", str(tmp_path / f"s{i}")) for i in range(5)]
    done = {name for name in parts.done_markers(stage)}
    assert done == {s.name for s in shards}
    assert not [c for c in calls if "_done" in c]  # no per-shard exists() calls
