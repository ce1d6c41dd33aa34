"""Streaming image shards: bounded reads, chunking, per-chunk accounting, decode_chunks."""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter

import fsspec.implementations.local as local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_images import jpeg, png_bomb, sample, write_tar

from curation.core.stage import Shard
from curation.io.images import (
    ImageLimits,
    PixelTransform,
    decode_images,
    iter_image_shard,
    read_image_shard,
)
from curation.stages.score import _with_sizes, decode_chunks


def noise_jpeg(seed: int, size: int = 96) -> bytes:
    """A JPEG of random pixels: about 20 KB that does not compress."""
    a = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class Counting:
    """Wraps an opened input file and counts the bytes read from it."""

    total = 0

    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        data = self.f.read(n)
        Counting.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.fixture
def count_reads(monkeypatch):
    real_open = local.LocalFileSystem._open
    Counting.total = 0
    monkeypatch.setattr(
        local.LocalFileSystem, "_open", lambda *a, **k: Counting(real_open(*a, **k))
    )
    return Counting


@pytest.fixture(scope="module")
def big_tar(tmp_path_factory):
    """60 samples of ~20 KB each (about 1.3 MB), plain and gzip."""
    d = tmp_path_factory.mktemp("big")
    samples = [sample(f"k{i:03d}", img=noise_jpeg(i)) for i in range(60)]
    return write_tar(d / "big.tar", samples), write_tar(d / "bigz.tar", samples, gz=True)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_first_chunk_comes_after_reading_about_one_chunk_not_the_whole_tar(
    big_tar, count_reads, gz
):
    url = big_tar[gz]
    size = local.LocalFileSystem().size(url)
    sample_bytes = size / 60
    chunks = iter_image_shard(url, chunk_rows=4)
    first = next(chunks)
    assert first.table.num_rows == 4
    # Four samples, the fifth (a full chunk is handed out when the next row arrives), and
    # the read-ahead of tarfile / gzip: far from the whole file.
    assert count_reads.total < 6 * sample_bytes + 64 * 1024 < size / 4, count_reads.total
    rest = list(chunks)
    assert count_reads.total >= size
    assert [c.table.num_rows for c in [first, *rest]] == [4] * 15


def test_decode_chunks_streams_the_shard(big_tar, count_reads):
    url = big_tar[0]
    size = local.LocalFileSystem().size(url)
    chunks = decode_chunks(
        Shard("big", url), ImageLimits(), PixelTransform(16, "bicubic", "shortest"), 4
    )
    first = next(chunks)
    assert first["pixels"].shape == (4, 16, 16, 3)
    assert count_reads.total < size / 4, count_reads.total
    assert sum(len(c["meta"]) for c in chunks) == 56


def _mixed_samples():
    """Kept, reader-dropped and decode-failing samples, interleaved."""
    out = []
    for i in range(23):
        key, parts = sample(f"s{i:02d}", uid=f"u{i}", img=jpeg(20 + i, 10 + i))
        if i % 7 == 3:
            parts = {"txt": b"caption only"}  # no_image
        elif i % 7 == 5:
            parts["json"] = b"{broken"  # bad_json
        elif i == 8:
            parts["jpg"] = b"<html>not an image</html>"  # decoded: not_an_image
        elif i == 13:
            parts["jpg"] = jpeg()[:60]  # decoded: decode_error
        elif i == 16:
            parts["jpg"] = b"\0" * 5000  # member_too_large under the limits below
        elif i == 20:
            parts["jpg"] = png_bomb(3000, 3000)  # decoded: image_too_large
        out.append((key, parts))
    return out


LIMITS = ImageLimits(max_member_bytes=4000, max_pixels=1_000_000)


def _reconciles(counts: Counter, kept: int) -> bool:
    dropped = sum(v for k, v in counts.items() if k.startswith("rows_dropped_"))
    return counts["rows_read"] == kept + dropped


@pytest.mark.parametrize("chunk_rows", [1, 3, 5, 100])
@pytest.mark.parametrize("cut", [False, True], ids=["whole", "truncated"])
def test_chunks_add_up_to_the_whole_shard_and_reconcile_one_by_one(tmp_path, chunk_rows, cut):
    url = write_tar(tmp_path / "m-01.tar", _mixed_samples())
    if cut:
        data = (tmp_path / "m-01.tar").read_bytes()
        (tmp_path / "m-01.tar").write_bytes(data[: len(data) * 2 // 3])
    whole = read_image_shard(url, LIMITS)
    chunks = list(iter_image_shard(url, LIMITS, chunk_rows=chunk_rows))
    kept = whole.table.num_rows
    assert [c.table.num_rows for c in chunks[:-1]] == [chunk_rows] * (len(chunks) - 1)
    assert len(chunks) == max(1, math.ceil(kept / chunk_rows))
    assert pa.concat_tables([c.table for c in chunks]).equals(whole.table)
    assert sum((c.counts for c in chunks), Counter()) == whole.counts
    assert [q for c in chunks for q in c.quarantine] == whole.quarantine
    for c in chunks:
        assert _reconciles(c.counts, c.table.num_rows)
    shard_level = [q for c in chunks for q in c.quarantine if "key" not in q]
    if cut:
        # The shard-level record rides on the last chunk and counts every sample read.
        assert shard_level == chunks[-1].quarantine[-1:]
        [q] = shard_level
        assert q["reason"] == "corrupt_shard"
        assert q["samples_before_error"] == whole.counts["rows_read"] > 0
        assert chunks[-1].counts["shards_corrupt_shard"] == 1
    else:
        assert not shard_level and whole.counts["rows_read"] == 23
        assert whole.counts["rows_dropped_no_image"] == 3
        assert whole.counts["rows_dropped_bad_json"] == 3
        assert whole.counts["rows_dropped_member_too_large"] == 1


def test_quarantine_entries_name_the_stage_shard_and_input(tmp_path):
    url = write_tar(tmp_path / "m-01.tar", _mixed_samples())
    q = read_image_shard(url, LIMITS).quarantine
    assert {(x["stage"], x["shard"], x["input"]) for x in q} == {("score", "m-01", url)}
    assert {x["reason"] for x in q} == {"no_image", "bad_json", "member_too_large"}
    assert all(set(x) == {"stage", "shard", "input", "reason", "detail", "key"} for x in q)
    named = read_image_shard(url, LIMITS, shard="pool-7").quarantine
    assert {x["shard"] for x in named} == {"pool-7"}


def _old_decode_chunks(shard, limits, transform, chunk_rows):
    """decode_chunks as it was: the whole shard read first, then sliced (the reference)."""
    img = read_image_shard(shard.input, limits, shard=shard.name)
    table = img.table
    for lo in range(0, max(table.num_rows, 1), chunk_rows):
        part = table.slice(lo, chunk_rows)
        pixels, ok, failures, sizes = decode_images(part.column("image"), transform, limits)
        counts = Counter(img.counts) if lo == 0 else Counter()
        quarantine = list(img.quarantine) if lo == 0 else []
        keys = np.asarray(part.column("key").to_pylist(), dtype=object)[~ok]
        for key, (reason, _) in zip(keys, failures, strict=True):
            counts[f"rows_dropped_{reason}"] += 1
            quarantine.append((reason, key))
        meta = _with_sizes(part.drop_columns(["image"]).filter(pa.array(ok)), sizes)
        yield meta, pixels, counts, quarantine


@pytest.mark.parametrize("chunk_rows", [2, 4, 64])
@pytest.mark.parametrize("cut", [False, True], ids=["whole", "truncated"])
def test_decode_chunks_gives_the_same_chunks_as_reading_the_whole_shard(tmp_path, chunk_rows, cut):
    url = write_tar(tmp_path / "m-01.tar", _mixed_samples())
    if cut:
        data = (tmp_path / "m-01.tar").read_bytes()
        (tmp_path / "m-01.tar").write_bytes(data[: len(data) * 2 // 3])
    shard = Shard("m-01", url)
    tr = PixelTransform(16, "bicubic", "shortest")
    got = list(decode_chunks(shard, LIMITS, tr, chunk_rows))
    want = list(_old_decode_chunks(shard, LIMITS, tr, chunk_rows))
    assert len(got) == len(want)
    for g, (meta, pixels, _, _) in zip(got, want, strict=True):
        assert g["meta"].equals(meta)
        np.testing.assert_array_equal(g["pixels"], pixels)
    assert sum((g["counts"] for g in got), Counter()) == sum((w[2] for w in want), Counter())
    got_q = sorted((q["reason"], q.get("key") or "") for g in got for q in g["quarantine"])
    want_q = sorted(
        (q[0], q[1]) if isinstance(q, tuple) else (q["reason"], q.get("key") or "")
        for w in want
        for q in w[3]
    )
    assert got_q == want_q
    for g in got:
        assert all(q["stage"] == "score" and q["shard"] == "m-01" for q in g["quarantine"])
        assert all(q["input"] == url for q in g["quarantine"])
        dropped = sum(v for k, v in g["counts"].items() if k.startswith("rows_dropped_"))
        assert g["counts"]["rows_read"] == len(g["meta"]) + dropped


def test_parquet_image_table_is_read_in_batches(tmp_path):
    n = 50
    imgs = [jpeg() if i % 9 else None for i in range(n)]  # rows 0, 9, 18, ... have no image
    t = pa.table({"caption": [f"c{i}" for i in range(n)], "jpg": pa.array(imgs, pa.binary())})
    pq.write_table(t, tmp_path / "p.parquet", row_group_size=8)
    url = str(tmp_path / "p.parquet")
    chunks = list(iter_image_shard(url, chunk_rows=6))
    kept = n - 6
    assert [c.table.num_rows for c in chunks] == [6] * 7 + [kept - 42]
    table = pa.concat_tables([c.table for c in chunks])
    # Generated keys are the row numbers across row groups and batches.
    assert table.column("key").to_pylist() == [f"{i:09d}" for i in range(n) if i % 9]
    assert table.column("text").to_pylist() == [f"c{i}" for i in range(n) if i % 9]
    for c in chunks:
        assert _reconciles(c.counts, c.table.num_rows)
    q = [q for c in chunks for q in c.quarantine]
    assert [x["key"] for x in q] == [f"{i:09d}" for i in range(0, n, 9)]
    assert {(x["stage"], x["shard"], x["reason"]) for x in q} == {("score", "p", "no_image")}
    assert read_image_shard(url).table.equals(table)


def test_io_error_after_the_first_chunk_propagates(tmp_path, monkeypatch):
    """A read failing mid-shard raises from the iterator; it is never turned into a quarantine
    entry (the consumer must start the shard over)."""
    url = write_tar(tmp_path / "a.tar", [sample(f"k{i}", img=noise_jpeg(i)) for i in range(20)])
    real_open = local.LocalFileSystem._open

    class Flaky(Counting):
        def read(self, n=-1):
            if Counting.total > 100_000:
                raise ConnectionResetError("Connection reset by peer")
            return super().read(n)

    Counting.total = 0
    monkeypatch.setattr(local.LocalFileSystem, "_open", lambda *a, **k: Flaky(real_open(*a, **k)))
    chunks = iter_image_shard(url, chunk_rows=2)
    assert not next(chunks).quarantine
    with pytest.raises(ConnectionResetError):
        list(chunks)


def test_gzip_bomb_is_cut_at_the_shard_limit_on_the_last_chunk(tmp_path):
    zeros = b"\0" * 3_000_000
    url = write_tar(tmp_path / "z.tar", [(f"k{i}", {"jpg": zeros}) for i in range(8)], gz=True)
    chunks = list(iter_image_shard(url, ImageLimits(max_shard_bytes=10_000_000), chunk_rows=1))
    assert 1 <= len(chunks) <= 3
    [q] = chunks[-1].quarantine
    assert q["reason"] == "shard_too_large" and chunks[-1].counts["shards_shard_too_large"] == 1
    assert q["samples_before_error"] == sum(c.table.num_rows for c in chunks)
    assert not any(c.quarantine for c in chunks[:-1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_rows"):
        iter_image_shard("x.tar", chunk_rows=0)
    with pytest.raises(ValueError, match=r"\.tgz \(webdataset\) or a \.parquet"):
        iter_image_shard("x.zip")


def test_non_regular_members_are_counted_while_streaming(tmp_path):
    def odd(tf):
        ti = tarfile.TarInfo("somedir")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)

    url = write_tar(tmp_path / "a.tar", [sample("k0"), sample("k1")], extra=odd)
    chunks = list(iter_image_shard(url, chunk_rows=1))
    assert sum(c.counts["members_skipped_not_regular"] for c in chunks) == 1
    assert [c.table.num_rows for c in chunks] == [1, 1]
