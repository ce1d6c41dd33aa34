"""DataComp's uid file written on Ray by sorted runs and a merge tree (`write_uid_file`)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.core.stage import Shard
from curation.flows.filter import UID_SCRATCH, run_filter, write_uid_file
from curation.io import datacomp
from curation.io.parts import part_url, read_part
from curation.stages.filters import make_filter


def old_uid_file(stage_dir: str, shards: list[Shard]) -> bytes | str:
    """What the in-driver computation gave: the bytes `save_uids` writes, or the skip reason."""
    cols = [read_part(part_url(stage_dir, s.name), columns=["uid"]).column("uid") for s in shards]
    uids = pa.chunked_array([c for col in cols for c in col.chunks], type=pa.string())
    problem = datacomp.uid_file_problem(uids, where=stage_dir)
    if problem is not None:
        return problem
    buf = io.BytesIO()
    pairs = datacomp.uids_to_pairs(uids)
    pairs.sort()
    np.save(buf, pairs, allow_pickle=False)
    return buf.getvalue()


def uid_hex(rng: np.random.Generator, n: int) -> list[str]:
    hi = rng.integers(0, 6, n)  # equal upper halves, different lower halves
    return [
        f"{int(a):016x}{int(b):016x}" for a, b in zip(hi, rng.integers(0, 2**63, n), strict=True)
    ]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A stage folder of 11 parts: 32-hex uids, duplicates within and across parts, an empty
    part, upper-case digits."""
    folder = tmp_path_factory.mktemp("uidstage")
    rng = np.random.default_rng(7)
    parts = [uid_hex(rng, int(n)) for n in rng.integers(0, 60, 11)]
    parts[2] = []
    parts[4] += parts[1][:7] + parts[4][:3]
    parts[6] = [u.upper() for u in parts[6]]
    shards = [Shard(name=f"{i:05d}", input=f"in-{i}") for i in range(len(parts))]
    for s, uids in zip(shards, parts, strict=True):
        pq.write_table(
            pa.table({"uid": pa.array(uids, pa.string())}), part_url(str(folder), s.name)
        )
    return folder, shards


@pytest.mark.parametrize("block_rows,fan_in", [(None, None), (1, 2), (3, 2), (5, 3), (7, 16)])
def test_uid_file_equals_the_in_driver_computation(stage, tmp_path, block_rows, fan_in):
    folder, shards = stage
    want = old_uid_file(str(folder), shards)
    assert isinstance(want, bytes) and len(want) > 128 + 16 * 300
    out = tmp_path / "out"
    (out / UID_SCRATCH).mkdir(parents=True)
    (out / UID_SCRATCH / "part-000000000.run").write_bytes(b"stale")  # an interrupted run's
    kw = {k: v for k, v in {"block_rows": block_rows, "fan_in": fan_in}.items() if v}
    info = write_uid_file(str(out), str(folder), shards, **kw)
    assert info == {"uids": str(out / "uids.npy"), "uid_count": (len(want) - 128) // 16}
    assert (out / "uids.npy").read_bytes() == want
    assert sorted(p.name for p in out.iterdir()) == ["uids.npy"]  # scratch removed


def test_no_shards_writes_an_empty_uid_file(tmp_path):
    info = write_uid_file(str(tmp_path), str(tmp_path), [])
    assert info["uid_count"] == 0
    assert (tmp_path / "uids.npy").read_bytes() == old_uid_file(str(tmp_path), [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uids.npy"]


def test_a_bad_uid_skips_the_file_with_the_first_named(stage, tmp_path):
    folder, shards = stage
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for i, s in enumerate(shards):
        t = read_part(part_url(str(folder), s.name))
        if i in (3, 8):  # the first bad uid is in shard 3
            uids = t.column("uid").to_pylist()
            uids[len(uids) // 2] = f"bad{i}" if i == 3 else None
            t = pa.table({"uid": pa.array(uids, pa.string())})
        pq.write_table(t, part_url(str(bad_dir), s.name))
    want = old_uid_file(str(bad_dir), shards)
    assert isinstance(want, str) and "(the first: 'bad3')" in want and want.startswith("2 of ")
    out = tmp_path / "out"
    out.mkdir()
    (out / "uids.npy").write_bytes(b"an earlier run's")
    info = write_uid_file(str(out), str(bad_dir), shards, block_rows=2, fan_in=2)
    assert info == {"uids": None, "uid_count": None, "uid_file_skipped": want}
    assert list(out.iterdir()) == []  # old file and scratch removed


def test_filter_run_writes_the_same_uid_file(tmp_path):
    """A filter run over several shards: `uids.npy` is what the in-driver code wrote from the
    kept parts, and no scratch is left."""
    rng = np.random.default_rng(3)
    pool = tmp_path / "pool"
    pool.mkdir()
    for s in range(5):
        n = 80
        uids = uid_hex(rng, n)
        if s == 3:
            uids[:10] = uids[10:20]  # duplicates are kept
        table = pa.table(
            {
                "uid": uids,
                "url": [f"http://img.example/{s}/{i}.jpg" for i in range(n)],
                "text": ["a red car parked on the street"] * n,
                "original_width": pa.array(rng.integers(100, 800, n), pa.int64()),
                "original_height": pa.array(rng.integers(100, 800, n), pa.int64()),
                "clip_b32_similarity_score": pa.array(rng.uniform(0.1, 0.4, n)),
                "clip_l14_similarity_score": pa.array(rng.uniform(0.1, 0.4, n)),
            }
        )
        datacomp.write_shard(str(pool / f"{s:08d}.parquet"), table, {})
    out = tmp_path / "out"
    params = {"arch": "l14", "fraction": 0.5}
    s = run_filter(
        make_filter("clip_score", **params), [str(pool)], str(out), params=params, progress=False
    )
    shards = [Shard(name=f"{i:08d}", input="") for i in range(5)]
    want = old_uid_file(str(out), shards)
    assert isinstance(want, bytes)
    assert s["uid_count"] == (len(want) - 128) // 16 > 100
    assert (out / "uids.npy").read_bytes() == want
    assert not (out / UID_SCRATCH).exists()


@pytest.mark.parametrize("block_rows,fan_in", [(None, None), (1, 2), (4, 3)])
def test_duplicate_uids_on_ray_equals_the_in_driver_count(tmp_path, block_rows, fan_in):
    from curation.flows.score import duplicate_uids

    rng = np.random.default_rng(5)
    words = [f"u{i}" for i in range(120)] + ["é", "x" * 40]
    parts = []
    for i in range(9):
        uids = list(rng.choice(words, int(rng.integers(0, 30))))
        if i == 4:
            uids += [None, None]
        p = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"uid": pa.array(uids, pa.string())}), p)
        parts.append(str(p))
    want = duplicate_uids(parts)  # in this process
    assert want > 5
    scratch = tmp_path / "_dup"
    kw = {k: v for k, v in {"block_rows": block_rows, "fan_in": fan_in}.items() if v}
    assert duplicate_uids(parts, str(scratch), **kw) == want
    assert duplicate_uids(parts[:1], str(scratch), **kw) == 0
    assert duplicate_uids([], str(scratch), **kw) == 0
    assert not scratch.exists()
