"""The training data pipeline (`curation.train.data`) and `curation reshard`, on small synthetic
webdataset pools (`curation.synth.images`)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import datacomp
from curation.synth.images import write_synthetic_image_pool
from curation.train import data as D
from curation.train.data import (
    LoaderConfig,
    Subset,
    TrainBatches,
    count_samples,
    list_tar_shards,
)

SHARDS, PER_SHARD = 3, 25  # 75 samples


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pool")
    s = write_synthetic_image_pool(str(root), SHARDS, PER_SHARD, 0, image_size=64)
    uids = []
    for p in s.parquet_files:
        uids += pq.read_table(p).column("uid").to_pylist()
    return {"root": str(root), "shards": tuple(s.files), "uids": uids}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faulty")
    s = write_synthetic_image_pool(str(root), 3, 24, 1, image_size=64, fault_rate=0.25)
    t = pa.concat_tables([pq.read_table(p) for p in s.parquet_files])
    faults = [u for u, f in zip(t["uid"].to_pylist(), t["fault"].to_pylist(), strict=True) if f]
    return {"shards": tuple(s.files), "uids": t["uid"].to_pylist(), "faults": set(faults)}


def cfg_of(shards, **kw) -> LoaderConfig:
    base = dict(global_batch=12, image_size=32, seed=7, shuffle_buffer=16, num_workers=0)
    base.update(kw)
    return LoaderConfig(shards=tuple(shards), **base)


def run(cfg, rank=0, world=1, pass_index=0, start_step=0, keep=None):
    tb = TrainBatches(
        cfg, rank=rank, world_size=world, pass_index=pass_index, start_step=start_step, keep=keep
    )
    return list(tb), tb


def uids_of(batches) -> list[str]:
    return [u for b in batches for u in b["uids"]]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x["uids"] == y["uids"]
        and x["texts"] == y["texts"]
        and bool((x["images"] == y["images"]).all())
        for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------------------------


def test_batches_are_uint8_and_deterministic(pool):
    cfg = cfg_of(pool["shards"])
    a, tb = run(cfg)
    b, _ = run(cfg)
    assert len(a) == 75 // 12 == len(tb)
    for x in a:
        assert x["images"].dtype.is_floating_point is False
        assert str(x["images"].dtype) == "torch.uint8"
        assert tuple(x["images"].shape) == (12, 3, 32, 32)
        assert len(x["texts"]) == len(x["uids"]) == 12
    assert same(a, b)
    # another seed, another order
    c, _ = run(cfg_of(pool["shards"], seed=8))
    assert uids_of(a) != uids_of(c)


def test_pass_changes_order_not_the_multiset(pool):
    cfg = cfg_of(pool["shards"], global_batch=25)  # 75 = 3 x 25: nothing dropped
    p0, _ = run(cfg, pass_index=0)
    p1, _ = run(cfg, pass_index=1)
    assert uids_of(p0) != uids_of(p1)
    assert Counter(uids_of(p0)) == Counter(uids_of(p1)) == Counter(pool["uids"])


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_ranks_cover_every_sample_once_and_drop_the_same_tail(pool, streams):
    cfg = cfg_of(pool["shards"], streams=streams)
    dropped = None
    for world in (1, 2, 3):
        seen: list[str] = []
        steps = set()
        for rank in range(world):
            batches, tb = run(cfg, rank=rank, world=world)
            steps.add(len(batches))
            assert all(len(b["uids"]) == 12 // world for b in batches)
            seen += uids_of(batches)
        assert steps == {6}  # every rank the same number of steps
        assert len(seen) == len(set(seen)) == 72  # each once; 75 - 72 dropped
        rest = set(pool["uids"]) - set(seen)
        assert len(rest) == 3
        dropped = dropped or rest
        assert rest == dropped  # the same tail whatever world_size / streams
    _, tb = run(cfg, rank=0, world=1)
    assert tb.stats()["pass_dropped_remainder"] == 3


def test_world_size_must_divide_the_batch(pool):
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(cfg_of(pool["shards"]), rank=0, world_size=5, pass_index=0)


@pytest.mark.parametrize("start", [1, 3, 5])
def test_resume_is_the_tail_of_a_full_pass_and_skips_decoding(pool, monkeypatch, start):
    cfg = cfg_of(pool["shards"], global_batch=6, streams=3)
    full, _ = run(cfg, rank=1, world=2, pass_index=2)
    decoded = []
    real = D.decode_images

    def counting(images, *a, **k):
        decoded.append(len(images))
        return real(images, *a, **k)

    monkeypatch.setattr(D, "decode_images", counting)
    tail, tb = run(cfg, rank=1, world=2, pass_index=2, start_step=start)
    assert same(tail, full[start:])
    assert len(tb) == len(full) - start
    assert sum(decoded) == 3 * (len(full) - start)  # only the batches yielded
    assert tb.stats()["skipped_resume"] == 3 * start


def test_resume_past_the_end_yields_nothing(pool):
    batches, _ = run(cfg_of(pool["shards"]), start_step=6)
    assert batches == []


def test_fewer_shards_than_ranks_times_streams(pool):
    one = pool["shards"][:1]  # 25 samples, 2 ranks x 4 streams
    cfg = cfg_of(one, global_batch=4, streams=4, shuffle_buffer=3)
    seen: list[str] = []
    for rank in range(2):
        batches, _ = run(cfg, rank=rank, world=2)
        assert len(batches) == 6
        seen += uids_of(batches)
    assert len(seen) == len(set(seen)) == 24


def test_worker_processes_give_the_same_batches(pool):
    base = cfg_of(pool["shards"], streams=2)
    in_process, _ = run(base)
    for workers in (1, 2):
        cfg = cfg_of(pool["shards"], streams=2, num_workers=workers)
        out, tb = run(cfg)
        assert same(out, in_process)
        assert tb.stats()["kept"] == 72
    # resuming with worker processes: the tail of the in-process pass
    for start in (1, 2):
        out, _ = run(cfg_of(pool["shards"], streams=2, num_workers=2), start_step=start)
        assert same(out, in_process[start:])
    # fewer shards than workers, with worker processes
    cfg = cfg_of(pool["shards"][:1], global_batch=4, streams=4, num_workers=2)
    assert same(run(cfg, rank=1, world=2)[0], run(cfg_of(pool["shards"][:1], global_batch=4, streams=4), rank=1, world=2)[0])  # fmt: skip


def test_workers_choose_a_divisor_of_the_streams():
    assert D._workers(0, 4) == 0
    assert D._workers(2, 4) == 2
    assert D._workers(3, 4) == 2
    assert D._workers(8, 4) == 4


def test_subset_from_a_parquet_folder(pool, tmp_path):
    keep = pool["uids"][::2]  # 38 of 75 (24-hex uids: hashed)
    (tmp_path / "curated").mkdir()
    pq.write_table(pa.table({"uid": keep[:20]}), tmp_path / "curated" / "part-0.parquet")
    pq.write_table(pa.table({"uid": keep[20:]}), tmp_path / "curated" / "part-1.parquet")
    sub = Subset.load(str(tmp_path / "curated"))
    assert sub.mode == "hash" and len(sub) == 38
    assert sub.contains(pool["uids"]).sum() == 38
    cfg = cfg_of(pool["shards"], subset=str(tmp_path / "curated"), global_batch=19)
    assert count_samples(cfg) == 38
    batches, tb = run(cfg)
    assert sorted(uids_of(batches)) == sorted(keep)
    assert tb.stats()["pass_dropped_subset"] == 75 - 38


def _rekey(src: str, dst: Path) -> list[str]:
    """A copy of a synthetic tar whose uids are 32 hex digits (DataComp's form)."""
    out, uids = io.BytesIO(), []
    with tarfile.open(src) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["uid"] = hashlib.md5(meta["uid"].encode()).hexdigest().upper()
                uids.append(meta["uid"])
                data = json.dumps(meta).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    dst.write_bytes(out.getvalue())
    return uids


def test_subset_from_a_datacomp_uid_file(pool, tmp_path):
    uids: list[str] = []
    shards = []
    for i, s in enumerate(pool["shards"]):
        shards.append(str(tmp_path / f"{i:05d}.tar"))
        uids += _rekey(s, Path(shards[-1]))
    chosen = uids[1::3]  # 25
    npy = str(tmp_path / "subset.npy")
    datacomp.save_uids(npy, chosen)
    sub = Subset.load(npy)
    assert sub.mode == "pairs"
    mask = sub.contains([*uids, "not-hex", "ab" * 12])
    assert mask.sum() == 25 and not mask[-2:].any()
    cfg = cfg_of(shards, subset=npy, global_batch=5)
    assert count_samples(cfg) == 25
    batches, _ = run(cfg)
    assert sorted(uids_of(batches)) == sorted(chosen)


def test_broken_images_are_skipped_counted_and_padded(faulty):
    cfg = cfg_of(faulty["shards"], global_batch=12, streams=2)  # 72 samples, no remainder
    batches, tb = run(cfg)
    st = tb.stats()
    broken = sum(v for k, v in st.items() if k.startswith("dropped_") and not k.startswith("pass"))
    assert broken == len(faulty["faults"]) == 18
    assert st["padded"] == broken and st["kept"] == 72 - broken
    got = uids_of(batches)
    assert not set(got) & faulty["faults"]
    assert set(got) == set(faulty["uids"]) - faulty["faults"]
    assert all(len(b["uids"]) == 12 for b in batches)


def test_keep_runs_before_decoding(pool, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded an image")

    calls = []

    def drop_all(uids, texts, pass_index):
        calls.append(len(uids))
        return np.zeros(len(uids), dtype=bool), texts

    monkeypatch.setattr(D, "decode_images", boom)
    batches, tb = run(cfg_of(pool["shards"]), keep=drop_all)
    assert batches == [] and sum(calls) == 75 and len(tb) == 0
    assert tb.stats()["pass_dropped_keep"] == 75


def test_keep_selects_samples_and_texts(pool, monkeypatch):
    decoded = []
    real = D.decode_images

    def counting(images, *a, **k):
        decoded.append(len(images))
        return real(images, *a, **k)

    monkeypatch.setattr(D, "decode_images", counting)
    seen_pass = set()

    def keep(uids, texts, pass_index):
        seen_pass.add(pass_index)
        mask = np.array([int(u[-1], 16) % 2 == pass_index % 2 for u in uids])
        return mask, [f"{u} chosen" for u in uids]

    kept = {u for u in pool["uids"] if int(u[-1], 16) % 2 == 1}
    cfg = cfg_of(pool["shards"], global_batch=1)
    batches, _ = run(cfg, pass_index=3, keep=keep)
    assert set(uids_of(batches)) == kept and len(uids_of(batches)) == len(kept)
    assert all(
        t == f"{u} chosen" for b in batches for u, t in zip(b["uids"], b["texts"], strict=True)
    )
    assert sum(decoded) == len(kept) and seen_pass == {3}


def test_count_samples_reads_no_image(pool, monkeypatch):
    monkeypatch.setattr(D, "decode_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert count_samples(cfg_of(pool["shards"])) == 75
    with pytest.raises(ValueError, match="batch larger than the data"):
        count_samples(cfg_of(pool["shards"], global_batch=76))


def test_gzip_tars_and_fsspec_urls(pool, tmp_path):
    import gzip

    import fsspec

    want, _ = run(cfg_of(pool["shards"], global_batch=25))
    gz = []
    for i, s in enumerate(pool["shards"]):
        gz.append(str(tmp_path / f"{i}.tar.gz"))
        Path(gz[-1]).write_bytes(gzip.compress(Path(s).read_bytes(), mtime=0))
    assert list_tar_shards([str(tmp_path)]) == gz
    got, _ = run(cfg_of(gz, global_batch=25))
    assert Counter(uids_of(got)) == Counter(uids_of(want))
    fs = fsspec.filesystem("memory")
    mem = []
    for i, s in enumerate(pool["shards"]):
        mem.append(f"memory://train-data-test/{i}.tar")
        fs.pipe(mem[-1], Path(s).read_bytes())
    listed = list_tar_shards(["memory://train-data-test"])
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["0.tar", "1.tar", "2.tar"]
    got, _ = run(cfg_of(listed, global_batch=25))
    assert Counter(uids_of(got)) == Counter(uids_of(want))


def _image_last(src: str, dst: Path) -> int:
    """A copy of a tar with each sample's image after its .json/.txt; returns the byte offset
    of the middle of the 10th image's data."""
    out = io.BytesIO()
    with tarfile.open(src) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        ms = tin.getmembers()
        for i in range(0, len(ms), 3):
            for m in sorted(ms[i : i + 3], key=lambda m: m.name.endswith(".jpg")):
                tout.addfile(m, io.BytesIO(tin.extractfile(m).read()))
    dst.write_bytes(out.getvalue())
    with tarfile.open(dst) as t:
        jpg = [m for m in t.getmembers() if m.name.endswith(".jpg")][9]
        return jpg.offset_data + jpg.size // 2


def test_truncated_tar_is_counted_not_fatal(pool, tmp_path):
    mid_image = _image_last(pool["shards"][0], tmp_path / "reordered.tar")
    data = (tmp_path / "reordered.tar").read_bytes()
    for cut in (mid_image, len(data) // 2 + 7, len(data) // 3):  # mid-member
        bad = tmp_path / f"cut{cut}.tar"
        bad.write_bytes(data[:cut])
        cfg = cfg_of([str(bad), *pool["shards"][1:]], global_batch=1, streams=2)
        n = count_samples(cfg)
        assert 50 < n < 75
        batches, tb = run(cfg)
        assert len(uids_of(batches)) == n
        assert tb.stats()["pass_shards_corrupt"] == 1


def test_list_tar_shards(pool, tmp_path):
    assert list_tar_shards([pool["root"]]) == sorted(pool["shards"])
    with pytest.raises(FileNotFoundError):
        list_tar_shards([str(tmp_path)])


def test_pixels_match_open_clip_eval_transform(pool):
    import open_clip
    import torch
    from PIL import Image

    cfg = cfg_of(pool["shards"], image_size=48)
    batch = run(cfg)[0][0]
    raw = {}
    for s in pool["shards"]:
        for smp in D.iter_tar_samples(s):
            raw[smp.uid] = smp.image
    pre = open_clip.image_transform(48, is_train=False)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    for img, uid in zip(batch["images"], batch["uids"], strict=True):
        want = pre(Image.open(io.BytesIO(raw[uid])))
        got = (img.float() / 255 - mean) / std
        assert torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# reshard


def _subset_folder(tmp_path: Path, uids: list[str]) -> str:
    d = tmp_path / "curated"
    d.mkdir(exist_ok=True)
    pq.write_table(pa.table({"uid": uids}), d / "part-00000.parquet")
    return str(d)


def test_reshard_writes_fixed_size_deterministic_tars(pool, tmp_path):
    import webdataset as wds

    from curation.flows.reshard import run_reshard
    from curation.io.images import iter_image_shard

    chosen = pool["uids"][::3]  # 25
    sub = _subset_folder(tmp_path, chosen)
    m = run_reshard([pool["root"]], sub, str(tmp_path / "a"), samples_per_shard=7)
    assert [s["samples"] for s in m["shards"]] == [7, 7, 7, 4]
    assert m["samples_written"] == 25 and m["counts"]["dropped_subset"] == 50
    tars = sorted((tmp_path / "a").glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:08d}.tar" for i in range(4)]
    # readable by our reader and by webdataset; exactly the subset, in input order
    ours = []
    for t in tars:
        for chunk in iter_image_shard(str(t)):
            ours += chunk.table.column("uid").to_pylist()
    assert ours == [u for u in pool["uids"] if u in set(chosen)]
    theirs = [json.loads(s["json"])["uid"] for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]  # fmt: skip
    assert theirs == ours
    # byte-identical on rerun (another folder, and the same one with --overwrite)
    run_reshard([pool["root"]], sub, str(tmp_path / "b"), samples_per_shard=7)
    assert [t.read_bytes() for t in tars] == [
        t.read_bytes() for t in sorted((tmp_path / "b").glob("*.tar"))
    ]
    with pytest.raises(FileExistsError):
        run_reshard([pool["root"]], sub, str(tmp_path / "a"), samples_per_shard=7)
    before = [t.read_bytes() for t in tars]
    run_reshard([pool["root"]], sub, str(tmp_path / "a"), samples_per_shard=7, overwrite=True)
    assert [t.read_bytes() for t in tars] == before
    manifest = json.loads((tmp_path / "a" / "reshard_manifest.json").read_text())
    assert manifest["shards"][0]["sha256"] == hashlib.sha256(before[0]).hexdigest()


def test_reshard_cli(pool, tmp_path):
    from click.testing import CliRunner

    from curation.cli import main

    sub = _subset_folder(tmp_path, pool["uids"][:10])
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main, ["reshard", pool["root"], "--subset", sub, "-o", str(out), "--samples-per-shard", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "10 of 75 samples" in res.output
    assert len(list(out.glob("*.tar"))) == 3
