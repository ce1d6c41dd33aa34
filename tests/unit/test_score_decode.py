"""`--decode device`: JPEGs decoded and resized by the scorer (torchvision, here on the CPU).

Checked against the exact path (`decode_chunks` + Pillow): pixels within a few levels, CLIP
scores within ~1e-4 on the tiny model, the same rows in the same order, the same quarantine
reasons and counters, and the same result twice.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.core.stage import Shard
from curation.io.images import ImageLimits, PixelTransform, decode_images, probe_images
from curation.stages import device_decode
from curation.stages.device_decode import DevicePreprocess, device_decodable
from curation.stages.score import (
    TINY_MODEL,
    ClipScorer,
    ScoreStage,
    assemble_shard,
    decode_chunks,
    probe_chunks,
)

LIMITS = ImageLimits(max_pixels=4_000_000)


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth gradients, shapes and noise: closer to a photo than uniform noise."""
    small = (rng.random((max(2, h // 16), max(2, w // 16), 3)) * 255).astype(np.uint8)
    im = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    im = im + rng.normal(0, 6, im.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (xx - w * rng.uniform(0.3, 0.7)) ** 2 + (yy - h * rng.uniform(0.3, 0.7)) ** 2
    im[disk < (min(w, h) * 0.25) ** 2] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(im, 0, 255).astype(np.uint8))


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample_jpegs(n: int = 24, seed: int = 0) -> list[bytes]:
    """JPEGs of varied sizes, aspect ratios, qualities, subsampling; progressive and gray."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = int(rng.integers(40, 700))
        h = max(8, int(w / rng.uniform(0.4, 2.5)))
        im = _photo(rng, w, h)
        if i % 7 == 3:
            im = im.convert("L")
        out.append(
            _encode(
                im,
                quality=int(rng.integers(40, 97)),
                subsampling=int(rng.integers(0, 3)),
                progressive=i % 5 == 1,
            )
        )
    return out


def _run_device(pre: DevicePreprocess, blobs: list[bytes]) -> np.ndarray:

    ok, _, sizes, _ = probe_images(blobs, LIMITS)
    assert ok.all()
    px, ok, failures, _ = pre.decode(blobs, sizes, "cpu")
    assert ok.all() and not failures
    return px.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "size,mode,interp",
    [(64, "shortest", "bicubic"), (224, "shortest", "bicubic"), (64, "squash", "bilinear"),
     (64, "longest", "bicubic")],
)  # fmt: skip
def test_device_pixels_are_within_a_few_levels_of_pixel_transform(size, mode, interp):
    blobs = sample_jpegs()
    exact, ok, _, _ = decode_images(blobs, PixelTransform(size, interp, mode), LIMITS)
    assert ok.all()
    got = _run_device(DevicePreprocess(size, interp, mode, LIMITS), blobs)
    assert got.shape == exact.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - exact.astype(np.int16))
    # Measured (torchvision 0.29 vs Pillow 13, CPU; the same libjpeg-turbo decodes): max 1-2
    # levels, mean ~0.01; the decode itself is identical on the CPU, the resamplers round apart.
    assert diff.max() <= 3, diff.max()
    assert diff.mean() < 0.05, diff.mean()


def test_unsupported_preprocessing_is_refused_up_front():
    with pytest.raises(ValueError, match="resize_mode 'crop'.*--decode pil"):
        DevicePreprocess(224, "bicubic", "crop")
    with pytest.raises(ValueError, match="interpolation 'nearest'"):
        DevicePreprocess(224, "nearest", "shortest")


def test_routing_sends_only_plain_jpegs_to_the_device():
    rng = np.random.default_rng(1)
    im = _photo(rng, 50, 40)
    jpg = _encode(im)
    cases = {
        "rgb": (jpg, True),
        "gray": (_encode(im.convert("L")), True),
        "progressive": (_encode(im, progressive=True), True),
        "cmyk": (_encode(im.convert("CMYK")), False),
        "no_eoi": (jpg[:-2], False),
        "png": (_encode(im, "PNG"), False),
        "webp": (_encode(im, "WEBP"), False),
    }
    ok, _, _, kinds = probe_images([b for b, _ in cases.values()], LIMITS)
    assert ok.all()
    got = {
        k: device_decodable(b, kind) for (k, (b, _)), kind in zip(cases.items(), kinds, strict=True)
    }
    assert got == {k: want for k, (_, want) in cases.items()}


def test_batches_stay_within_the_pixel_budget():
    sizes = np.array([[100, 100], [100, 100], [300, 300], [10, 10], [10, 10]], np.int32)
    assert device_decode._batches(sizes, 25_000, 10) == [(0, 2), (2, 3), (3, 5)]
    assert device_decode._batches(sizes, 10**9, 2) == [(0, 2), (2, 4), (4, 5)]
    assert device_decode._batches(sizes[:0], 10, 2) == []


# -- the stage: probe_chunks + ScoreStage vs decode_chunks + ScoreStage ----------------------


@pytest.fixture(scope="module")
def scorer():
    s = ClipScorer(TINY_MODEL, batch_size=8, device="cpu")
    with pytest.warns(UserWarning, match="random weights"):
        s.setup()
    return s


def _stages(scorer):
    pp = scorer.expected_preprocess()
    pre = DevicePreprocess(pp["size"], pp["interpolation"], pp["resize_mode"], LIMITS)
    return ScoreStage(scorer), ScoreStage(scorer, device_preprocess=pre)


def _corrupt_with_eoi(jpg: bytes) -> bytes:
    """Header intact, entropy-coded data zeroed, still ending with EOI: only decoding tells."""
    return jpg[:600] + bytes(200) + jpg[800:]


def hostile_tar(path: Path) -> tuple[str, dict[str, str]]:
    """A tar mixing device-decodable JPEGs with everything that must take another way."""
    rng = np.random.default_rng(2)
    jpegs = sample_jpegs(12, seed=3)
    im = _photo(rng, 120, 90)
    big = _encode(Image.new("RGB", (2100, 2000)))  # 4.2M pixels > LIMITS.max_pixels
    samples = {
        "a00": jpegs[0],
        "a01": _encode(im, "PNG"),
        "a02": jpegs[1],
        "a03": _encode(im, "WEBP"),
        "a04": _encode(im.convert("L")),
        "a05": _encode(im.convert("CMYK")),
        "a06": jpegs[2][: len(jpegs[2]) // 2],  # truncated: no EOI, exact path: decode_error
        "a07": b"<html>404</html>",
        "a08": big,
        "a09": _corrupt_with_eoi(sample_jpegs(1, seed=9)[0]),  # fails on the scorer
        "a10": b"",
        "a11": jpegs[3],
        "a12": _encode(im.convert("P"), "PNG"),
        **{f"b{i:02d}": jpegs[i] for i in range(4, 12)},
    }
    expected = {
        "a06": "decode_error",
        "a07": "not_an_image",
        "a08": "image_too_large",
        "a09": "decode_error",
        "a10": "not_an_image",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, data in samples.items():
            meta = {"uid": f"uid-{key}"}
            if key == "a00":
                meta.update(original_width=1000, original_height=800)
            for ext, payload in (
                ("jpg", data),
                ("txt", f"a photo {key}".encode()),
                ("json", json.dumps(meta).encode()),
            ):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return str(path), expected


def _score(stage, split, shard, scorer, chunk_rows):
    transform = scorer.pixel_transform()
    chunks = split(shard, LIMITS, transform, chunk_rows)
    return assemble_shard(shard, [stage.process(c) for c in chunks])


@pytest.mark.parametrize("chunk_rows", [4, 64])
def test_device_path_keeps_rows_order_accounting_and_quarantine_of_the_pil_path(
    scorer, tmp_path, chunk_rows
):
    url, expected = hostile_tar(tmp_path / "hostile.tar")
    shard = Shard("hostile", url)
    pil_stage, dev_stage = _stages(scorer)
    ref = _score(pil_stage, decode_chunks, shard, scorer, chunk_rows)
    got = _score(dev_stage, probe_chunks, shard, scorer, chunk_rows)

    assert got.table.schema == ref.table.schema
    same = ["uid", "key", "url", "text", "original_width", "original_height"]
    assert got.table.select(same).equals(ref.table.select(same))
    assert got.table.column("original_width").to_pylist()[0] == 1000  # metadata wins
    rows = {k: v for k, v in ref.counts.items() if k.startswith("rows_")}
    assert {k: v for k, v in got.counts.items() if k.startswith("rows_")} == rows
    assert got.counts["rows_read"] == got.table.num_rows + sum(
        v for k, v in got.counts.items() if k.startswith("rows_dropped_")
    )
    reasons = {q["key"]: q["reason"] for q in got.quarantine}
    assert reasons == expected == {q["key"]: q["reason"] for q in ref.quarantine}
    # The same records (details included); only the one found on the scorer comes last.
    key = lambda q: q["key"]  # noqa: E731
    assert sorted(got.quarantine, key=key) == sorted(ref.quarantine, key=key)
    # 3 PNG/WebP + CMYK on the CPU task; JPEGs (gray too) on the scorer, one failing there.
    assert got.counts["images_decoded_cpu"] == 4
    assert got.counts["images_device_fallback"] == 1
    assert got.counts["images_decoded_device"] == got.table.num_rows - 4

    s_ref = ref.table.column("clip_score").to_numpy()
    s_got = got.table.column("clip_score").to_numpy()
    # Measured on this set with random tiny weights: max |Δ| ~3e-5.
    assert np.abs(s_got - s_ref).max() < 5e-4
    # Rows decoded by the exact path on both sides score the same.
    exact = np.isin(
        got.table.column("key").to_numpy(zero_copy_only=False), ["a01", "a03", "a05", "a12"]
    )
    np.testing.assert_allclose(s_got[exact], s_ref[exact], atol=1e-5)


def test_device_path_is_deterministic(scorer, tmp_path):
    url, _ = hostile_tar(tmp_path / "hostile.tar")
    shard = Shard("hostile", url)
    _, dev_stage = _stages(scorer)
    a = _score(dev_stage, probe_chunks, shard, scorer, 8)
    b = _score(dev_stage, probe_chunks, shard, scorer, 8)
    assert a.table.equals(b.table)
    assert a.counts == b.counts and a.quarantine == b.quarantine
    # Chunking changes no pixel (the model's batches change, as on the exact path).
    c = _score(dev_stage, probe_chunks, shard, scorer, 3)
    assert c.table.select(["key"]).equals(a.table.select(["key"]))
    np.testing.assert_allclose(
        c.table.column("clip_score").to_numpy(), a.table.column("clip_score").to_numpy(), atol=1e-5
    )
    assert np.array_equal(
        _pixels(dev_stage, shard, scorer, 3), _pixels(dev_stage, shard, scorer, 8)
    )


def _pixels(stage, shard, scorer, chunk_rows):
    chunks = probe_chunks(shard, LIMITS, scorer.pixel_transform(), chunk_rows)
    return np.concatenate(
        [stage.device_preprocess.finish(c, "cpu")["pixels"].numpy() for c in chunks]
    )


def test_decode_batches_do_not_change_pixels(monkeypatch):
    blobs = sample_jpegs(10, seed=5)
    pre = DevicePreprocess(64, "bicubic", "shortest", LIMITS)
    whole = _run_device(pre, blobs)
    monkeypatch.setattr(device_decode, "DECODE_PIXELS", 50_000)
    monkeypatch.setattr(device_decode, "DECODE_IMAGES", 3)
    np.testing.assert_array_equal(_run_device(pre, blobs), whole)
    _, _, sizes, _ = probe_images(blobs, LIMITS)
    assert len(device_decode._batches(sizes, 50_000, 3)) > 3


def test_a_jpeg_the_device_refuses_is_decoded_by_the_exact_path(monkeypatch):

    blobs = sample_jpegs(8, seed=6)
    refused = {blobs[2], blobs[5]}
    real = device_decode._decode_jpegs

    def picky(tensors, device):
        if any(bytes(t.numpy()) in refused for t in tensors):
            return None
        return real(tensors, device)

    monkeypatch.setattr(device_decode, "_decode_jpegs", picky)
    pre = DevicePreprocess(64, "bicubic", "shortest", LIMITS)
    _, _, sizes, _ = probe_images(blobs, LIMITS)
    px, ok, failures, counts = pre.decode(blobs, sizes, "cpu")
    assert ok.all() and not failures
    assert counts == {"images_decoded_device": 6, "images_device_fallback": 2}
    exact, _, _, _ = decode_images(blobs, PixelTransform(64, "bicubic", "shortest"), LIMITS)
    got = px.permute(0, 2, 3, 1).numpy()
    for i in (2, 5):  # the exact path's pixels, bit for bit
        np.testing.assert_array_equal(got[i], exact[i])
    assert np.abs(got.astype(int) - exact.astype(int)).max() <= 3


def test_empty_and_fully_dropped_chunks(scorer, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, data in (("k1", b"junk"), ("k2", b"")):
            ti = tarfile.TarInfo(f"{key}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path = tmp_path / "bad.tar"
    path.write_bytes(buf.getvalue())
    shard = Shard("bad", str(path))
    pil_stage, dev_stage = _stages(scorer)
    ref = _score(pil_stage, decode_chunks, shard, scorer, 4)
    got = _score(dev_stage, probe_chunks, shard, scorer, 4)
    assert got.table.num_rows == 0 and got.table.schema == ref.table.schema
    assert got.quarantine == ref.quarantine


def test_cli_has_the_decode_option_with_the_exact_path_as_default():
    from click.testing import CliRunner

    from curation.cli import main

    res = CliRunner().invoke(main, ["score", "--help"])
    assert res.exit_code == 0, res.output
    assert "--decode [pil|device]" in res.output and "default: pil" in res.output
    res = CliRunner().invoke(main, ["score", "x.tar", "-o", "out", "--decode", "gpu"])
    assert res.exit_code == 2 and "'gpu' is not one of 'pil', 'device'" in res.output


def test_parquet_image_tables_take_the_same_way(scorer, tmp_path):
    import pyarrow.parquet as pq

    from curation.io.images import read_tar

    url, expected = hostile_tar(tmp_path / "hostile.tar")
    t = read_tar(url, LIMITS).table
    path = tmp_path / "images.parquet"
    pq.write_table(t.select(["key", "uid", "text"]).append_column("jpg", t.column("image")), path)
    shard = Shard("images", str(path))
    pil_stage, dev_stage = _stages(scorer)
    ref = _score(pil_stage, decode_chunks, shard, scorer, 5)
    got = _score(dev_stage, probe_chunks, shard, scorer, 5)
    assert got.table.select(["key", "original_width"]).equals(
        ref.table.select(["key", "original_width"])
    )
    assert sorted(q["key"] for q in got.quarantine) == sorted(q["key"] for q in ref.quarantine)
    s_ref, s_got = (x.table.column("clip_score").to_numpy() for x in (ref, got))
    assert np.abs(s_got - s_ref).max() < 5e-4
