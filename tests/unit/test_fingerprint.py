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


def test_input_identities_come_from_one_listing_per_folder(monkeypatch):
    """Planning 10^5 shards on an object store must not ask once per file: a folder of inputs
    is listed once, and the identities equal what `fs.info` gives file by file (absent ones are
    None). (memory:// stands in for a remote store; local files are stat'ed, which is cheaper.)"""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    fs = fsspec.filesystem("memory")
    urls = []
    for i in range(12):
        fs.pipe(f"/plan/in-{i:02d}.bin", b"x" * i)
        urls.append(f"memory:///plan/in-{i:02d}.bin")
    urls.append("memory:///plan/absent.bin")
    one_by_one = [fpmod.file_identity(u) for u in urls]
    infos, lists = [], []
    real_info, real_ls = MemoryFileSystem.info, MemoryFileSystem.ls

    def counting_info(self, path, **kw):  # noqa: ANN001, ANN003, ANN202
        infos.append(path)
        return real_info(self, path, **kw)

    def counting_ls(self, path, detail=True, **kw):  # noqa: ANN001, ANN003, ANN202
        lists.append(path)
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(MemoryFileSystem, "info", counting_info)
    monkeypatch.setattr(MemoryFileSystem, "ls", counting_ls)
    try:
        assert fpmod.file_identities(urls) == one_by_one
        assert one_by_one[-1] is None and one_by_one[3] == {"size": 3}
        assert len(lists) == 1  # one listing of the folder
        assert [p for p in infos if "in-" in p] == []  # no input asked for by itself
        assert fpmod.inputs_fingerprint(urls) == [
            [u, i] for u, i in zip(urls, one_by_one, strict=True)
        ]
    finally:
        fs.rm("/plan", recursive=True)
