"""Image shard readers and bounded decoding: tars, Parquet image tables, bombs, broken data."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.io.images import (
    ImageLimits,
    PixelTransform,
    decode_images,
    list_image_shards,
    read_image_shard,
    read_parquet_images,
    read_tar,
)


def jpeg(w: int = 40, h: int = 30, color=(200, 30, 30), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A valid grayscale PNG declaring w x h pixels, a few KB compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = zlib.compress(b"\x00" * (w + 1) * 64, 9)  # only the first rows: enough to parse
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_tar(path, samples, extra=None, gz: bool = False) -> str:
    """samples: list of (key, {ext: bytes}); extra(tf) may add odd members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                add(tf, f"{key}.{ext}", data)
        if extra:
            extra(tf)
    data = buf.getvalue()
    if gz:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return str(path)


def sample(key: str, uid: str | None = None, text: str = "a red square", img: bytes | None = None):
    meta = {"url": f"https://img.example.com/{key}.jpg", "caption": "json caption"}
    if uid:
        meta["uid"] = uid
    meta["original_width"], meta["original_height"] = 40, 30
    return key, {
        "jpg": img if img is not None else jpeg(),
        "txt": text.encode(),
        "json": json.dumps(meta).encode(),
    }


def test_read_tar_reads_samples_in_order_with_uid_text_and_metadata(tmp_path):
    url = write_tar(tmp_path / "a.tar", [sample("k0", uid="u0"), sample("k1")])
    shard = read_tar(url)
    t = shard.table
    assert t.column("key").to_pylist() == ["k0", "k1"]
    assert t.column("uid").to_pylist() == ["u0", "k1"]  # json uid, else the key
    assert t.column("text").to_pylist() == ["a red square"] * 2  # .txt wins over json caption
    assert t.column("url").to_pylist()[0] == "https://img.example.com/k0.jpg"
    assert t.column("original_width").to_pylist() == [40, 40]
    assert t.column("image").to_pylist()[0] == jpeg()
    assert shard.counts["rows_read"] == 2 and not shard.quarantine


def test_read_tar_caption_from_json_when_no_txt_and_gzip(tmp_path):
    key, parts = sample("k0")
    del parts["txt"]
    url = write_tar(tmp_path / "a.tar", [(key, parts)], gz=True)
    assert read_tar(url).table.column("text").to_pylist() == ["json caption"]


def test_read_tar_skips_non_regular_members_and_never_writes_to_disk(tmp_path, monkeypatch):
    def odd(tf):
        for kind, name in ((tarfile.DIRTYPE, "d"), (tarfile.SYMTYPE, "evil.jpg")):
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tf.addfile(ti)
        ti = tarfile.TarInfo("../../escape.jpg")
        data = jpeg()
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

    url = write_tar(tmp_path / "a.tar", [sample("k0")], extra=odd)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr(tarfile.TarFile, "extract", lambda *a, **k: pytest.fail("extract"))
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("extract"))
    shard = read_tar(url)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert shard.counts["members_skipped_not_regular"] == 2
    # The '../../escape' member is just a sample key, read in memory.
    assert shard.table.column("key").to_pylist() == ["k0", "../../escape"]


def test_read_tar_drops_bad_samples_with_reasons(tmp_path):
    big = ImageLimits(max_member_bytes=10_000)
    samples = [
        sample("ok"),
        ("noimg", {"txt": b"caption only"}),
        ("badjson", {"jpg": jpeg(), "json": b"{not json"}),
        ("badtxt", {"jpg": jpeg(), "txt": b"\xff\xfe bad"}),
        ("huge", {"jpg": b"\0" * 20_000, "txt": b"x"}),
    ]
    url = write_tar(tmp_path / "a.tar", samples)
    shard = read_tar(url, big)
    assert shard.table.column("key").to_pylist() == ["ok"]
    c = shard.counts
    assert c["rows_read"] == 5
    for reason in ("no_image", "bad_json", "bad_utf8", "member_too_large"):
        assert c[f"rows_dropped_{reason}"] == 1, reason
    assert sorted(q["key"] for q in shard.quarantine) == ["badjson", "badtxt", "huge", "noimg"]
    # One quarantine schema (core.accounting.quarantine_record): the shard's name, its URL.
    for q in shard.quarantine:
        assert (q["stage"], q["shard"], q["input"]) == ("score", "a", url), q
        assert set(q) == {"stage", "shard", "input", "reason", "detail", "key"}
    assert {q["shard"] for q in read_tar(url, big, shard="pool-a").quarantine} == {"pool-a"}


def test_truncated_tar_is_quarantined_and_keeps_what_was_read(tmp_path):
    url = write_tar(tmp_path / "a.tar", [sample(f"k{i}") for i in range(6)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    shard = read_tar(url)
    assert 0 < shard.table.num_rows < 6
    [q] = shard.quarantine
    assert q["reason"] == "corrupt_shard"
    assert (q["stage"], q["shard"], q["input"]) == ("score", "a", url)
    assert shard.counts["rows_read"] == shard.table.num_rows == q["samples_before_error"]


def test_io_errors_propagate_so_the_shard_is_retried_not_truncated(tmp_path, monkeypatch):
    """Only damage is quarantined: a read failing mid-stream (network) must raise, or the shard
    would be marked done with half its rows."""
    import fsspec.implementations.local as local

    with pytest.raises(FileNotFoundError):
        read_tar(str(tmp_path / "nope.tar"))
    url = write_tar(tmp_path / "a.tar", [sample(f"k{i}") for i in range(10)])
    real_open = local.LocalFileSystem._open

    class Flaky:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, n=-1):
            if self.n > 5000:
                raise ConnectionResetError("Connection reset by peer")
            data = self.f.read(n)
            self.n += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(local.LocalFileSystem, "_open", lambda *a, **k: Flaky(real_open(*a, **k)))
    with pytest.raises(ConnectionResetError):
        read_tar(url)


def test_gzip_tar_inflating_past_the_shard_limit_is_quarantined(tmp_path):
    zeros = b"\0" * 3_000_000
    url = write_tar(tmp_path / "z.tar", [(f"k{i}", {"jpg": zeros}) for i in range(8)], gz=True)
    assert (tmp_path / "z.tar").stat().st_size < 200_000
    shard = read_tar(url, ImageLimits(max_shard_bytes=10_000_000))
    [q] = shard.quarantine
    assert q["reason"] == "shard_too_large" and shard.counts["shards_shard_too_large"] == 1
    assert shard.table.num_rows <= 3


def test_corrupt_parquet_is_quarantined_and_a_missing_image_column_fails_up_front(tmp_path):
    from curation.io.images import check_image_shards

    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    shard = read_image_shard(str(tmp_path / "bad.parquet"), shard="bad-0")
    assert [q["reason"] for q in shard.quarantine] == ["corrupt_shard"]
    [q] = shard.quarantine
    assert (q["stage"], q["shard"], q["input"]) == ("score", "bad-0", str(tmp_path / "bad.parquet"))
    pq.write_table(pa.table({"uid": ["a"], "pixels": [b"x"]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"uid": ["a"], "jpg": ["text, not bytes"]}), tmp_path / "s.parquet")
    urls = [str(tmp_path / n) for n in ("bad.parquet", "p.parquet")]
    with pytest.raises(ValueError, match="--image-column"):
        check_image_shards(urls)
    check_image_shards(urls, image_column="pixels")
    with pytest.raises(ValueError, match="not binary"):
        check_image_shards([str(tmp_path / "s.parquet")])


def test_parquet_image_table_binary_and_struct_columns(tmp_path):
    imgs = [jpeg(), None, b"", b"\0" * 5000]
    t = pa.table(
        {
            "uid": ["a", "b", "c", "d"],
            "caption": ["one", "two", "three", "four"],
            "width": [40, 1, 2, 3],
            "jpg": pa.array(imgs, pa.binary()),
        }
    )
    pq.write_table(t, tmp_path / "p.parquet")
    shard = read_parquet_images(str(tmp_path / "p.parquet"), ImageLimits(max_member_bytes=4000))
    assert shard.table.column("uid").to_pylist() == ["a"]
    assert shard.table.column("text").to_pylist() == ["one"]
    assert shard.table.column("original_width").to_pylist() == [40]
    assert shard.counts["rows_read"] == 4
    assert shard.counts["rows_dropped_no_image"] == 2
    assert shard.counts["rows_dropped_member_too_large"] == 1
    assert [(q["shard"], q["key"], q["reason"]) for q in shard.quarantine] == [
        ("p", "000000001", "no_image"),  # no `key` column: the row number
        ("p", "000000002", "no_image"),
        ("p", "000000003", "member_too_large"),
    ]

    hf = pa.table(
        {
            "text": ["x"],
            "image": pa.array([{"bytes": jpeg(), "path": "x.jpg"}]),
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    s2 = read_image_shard(str(tmp_path / "hf.parquet"))
    assert s2.table.column("image").to_pylist() == [jpeg()]
    assert s2.table.column("uid").to_pylist() == ["000000000"]


def test_parquet_without_image_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"uid": ["a"], "text": ["t"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no image-bytes column"):
        read_parquet_images(str(tmp_path / "p.parquet"))


def test_list_image_shards_skips_metadata_parquet_beside_a_tar(tmp_path):
    write_tar(tmp_path / "00000.tar", [sample("k")])
    pq.write_table(pa.table({"key": ["k"]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"jpg": [jpeg()]}), tmp_path / "images.parquet")
    got = [u.rsplit("/", 1)[-1] for u in list_image_shards([str(tmp_path)])]
    assert got == ["00000.tar", "images.parquet"]
    with pytest.raises(FileNotFoundError):
        list_image_shards([str(tmp_path / "empty*.tar")])


def test_decode_refuses_bombs_before_decoding_and_reports_each_failure():
    tr = PixelTransform(32, "bicubic", "shortest")
    limits = ImageLimits(max_pixels=1_000_000)
    blobs = [
        jpeg(),
        png_bomb(),
        png_bomb(2000, 2000),  # 4M pixels: under Pillow's own limit, over ours
        b"<html>not an image</html>",
        jpeg()[:60],
        b"%!PS-Adobe-3.0 EPSF-3.0\n",  # EPS: Pillow knows it, we do not allow it
        jpeg(fmt="PNG"),
    ]
    pixels, ok, failures, sizes = decode_images(blobs, tr, limits)
    assert ok.tolist() == [True, False, False, False, False, False, True]
    assert [r for r, _ in failures] == [
        "image_too_large",
        "image_too_large",
        "not_an_image",
        "decode_error",
        "not_an_image",
    ]
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.uint8
    assert sizes.tolist() == [[40, 30], [40, 30]]
    assert all(" at 0x" not in d for _, d in failures)  # reproducible quarantine text
    # The red square stays red after resize + crop.
    assert pixels[0, 16, 16].tolist()[0] > 150 and pixels[0, 16, 16].tolist()[1] < 80


def test_pixel_transform_matches_open_clip_preprocess_exactly():
    import open_clip
    import torch

    tr = PixelTransform(48, "bicubic", "shortest")
    pre = open_clip.image_transform(48, is_train=False)
    rng = np.random.default_rng(0)
    for w, h, mode in [(100, 80, "RGB"), (33, 200, "L"), (64, 64, "RGBA"), (301, 300, "P")]:
        im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
        x = torch.from_numpy(tr(im)).permute(2, 0, 1).float() / 255
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
        assert torch.equal((x - mean) / std, pre(im)), (w, h, mode)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_pixels=0)


@pytest.mark.parametrize("cut", ["member_boundary", "end_marker", "garbage", "gzip"])
def test_tar_cut_where_tarfile_stops_quietly_is_still_corrupt(tmp_path, cut):
    samples = [sample(f"k{i}") for i in range(4)]
    url = write_tar(tmp_path / "a.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    # Offset just after the last member's data block (where the end marker begins).
    with tarfile.open(url) as tf:
        members = tf.getmembers()
    last = members[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    if cut == "member_boundary":
        data = data[: members[6].offset]
    elif cut == "end_marker":
        data = data[:end]
    elif cut == "garbage":
        data = data[:end] + b"\x07" * 1024
    else:
        data = gzip.compress(data, mtime=0)[:-300]
    (tmp_path / "a.tar").write_bytes(data)
    shard = read_tar(url)
    assert [q["reason"] for q in shard.quarantine] == ["corrupt_shard"], cut
    assert shard.table.num_rows < 4


def test_complete_tar_padded_to_a_record_is_not_corrupt(tmp_path):
    url = write_tar(tmp_path / "a.tar", [sample("k0"), sample("k1")], gz=True)
    shard = read_tar(url)
    assert shard.table.num_rows == 2 and not shard.quarantine


def test_max_pixels_above_pillows_warning_level_is_honoured():
    """Pillow warns at ~89M pixels; a higher --max-pixels must not be capped by that warning."""
    from PIL import Image as PILImage

    tr = PixelTransform(16, "bicubic", "shortest")
    w = h = 10_000  # 100M pixels: over Pillow's warning level, under its hard limit
    assert PILImage.MAX_IMAGE_PIXELS < w * h < 2 * PILImage.MAX_IMAGE_PIXELS
    blob = png_bomb(w, h)
    _, ok, failures, _ = decode_images([blob], tr, ImageLimits(max_pixels=50_000_000))
    assert not ok[0] and failures[0][0] == "image_too_large" and "max_pixels" in failures[0][1]
    # Allowed: it goes to the decoder (no image_too_large).
    _, ok, failures, _ = decode_images([blob], tr, ImageLimits(max_pixels=200_000_000))
    assert ok[0] or failures[0][0] == "decode_error", failures
