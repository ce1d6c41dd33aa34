"""`curation embed` on the local Ray cluster: embeddings of loose image files and of image
shards equal the local model's, every file is accounted for, and a rerun resumes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.flows.embed import embed_images
from curation.io import datacomp
from curation.io.images import PixelTransform, decode_images, read_tar
from curation.io.parts import ResumeError
from curation.stages.score import TINY_MODEL, ClipScorer

from .conftest import run_cli
from .test_score_ray import make_pool


def _image(rng: np.random.Generator, h: int, w: int, fmt: str, mode: str = "RGB") -> bytes:
    a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """ImageNet-like folders: class/NAME.JPEG, some PNG/WebP/grayscale, a corrupt file, a
    non-image file; returns the folder and the good files' keys in sorted order."""
    root = tmp_path_factory.mktemp("imgs") / "train"
    rng = np.random.default_rng(0)
    good = []
    for c in ("n01440764", "n01443537", "n02102040"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            fmt, ext, mode = [
                ("JPEG", "JPEG", "RGB"),
                ("PNG", "png", "RGBA"),
                ("WEBP", "webp", "RGB"),
                ("JPEG", "jpg", "L"),
            ][i % 4]
            name = f"{c}/{c}_{i}.{ext}"
            (root / name).write_bytes(_image(rng, 30 + 9 * i, 70 - 5 * i, fmt, mode))
            good.append(name)
    (root / "n01440764" / "n01440764_bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "n01440764" / "LICENSE.txt").write_text("not an image")
    return root, sorted(good)


def local_embeddings(files: list[bytes]) -> np.ndarray:
    scorer = ClipScorer(TINY_MODEL, batch_size=8, device="cpu")
    scorer.setup()
    pp = scorer.expected_preprocess()
    pixels, ok, _, _ = decode_images(
        files, PixelTransform(pp["size"], pp["interpolation"], pp["resize_mode"])
    )
    assert ok.all()
    return scorer.embed_images(pixels)


def run(inputs, out, **kw):
    kw.setdefault("chunk_rows", 4)
    scorer = ClipScorer(TINY_MODEL, batch_size=8)
    return embed_images([str(i) for i in inputs], str(out), scorer, progress=False, **kw)


def test_loose_files_equal_local_model_and_resume(image_dir, tmp_path, ray_cluster):
    root, good = image_dir
    out = tmp_path / "out"
    s = run([root], out, files_per_shard=5)
    assert s["rows_read"] == 19 and s["rows_written"] == 18
    assert s["rows_dropped"] == {"decode_error": 1}
    got = np.load(out / "embeddings.npy")
    want = local_embeddings([(root / k).read_bytes() for k in good])
    assert got.dtype == np.float32 and got.shape == want.shape == (18, 64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 4  # 19 files, 5 per shard
    keys = [k for p in parts for k in pq.read_table(p).column("key").to_pylist()]
    assert keys == good
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [r["key"] for r in q] == ["n01440764/n01440764_bad.JPEG"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"] == {"files": 19, "files_ignored": 1, "shards": 0}
    assert m["outputs"]["rows"] == 18
    # what image_based's --target-embeddings reads
    assert datacomp.load_embedding_file(str(out / "embeddings.npy")).shape == (18, 64)

    before = (out / "embeddings.npy").read_bytes()
    marker = next((out / "_done").iterdir())
    mtime = marker.stat().st_mtime_ns
    again = run([root], out, files_per_shard=5)
    assert again["rows_written"] == 18 and marker.stat().st_mtime_ns == mtime  # nothing redone
    assert (out / "embeddings.npy").read_bytes() == before
    with pytest.raises(ResumeError):
        run([root], out, files_per_shard=7)


def test_image_shards_and_float16(tmp_path, ray_cluster):
    pool = make_pool(tmp_path / "pool", shards=2)
    out = tmp_path / "out"
    s = run(pool, out, dtype="float16")
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())
    got = np.load(out / "embeddings.npy")
    assert got.dtype == np.float16 and len(got) == s["rows_written"]
    shard = read_tar(pool[1])
    want = local_embeddings(shard.table.column("image").to_pylist())
    np.testing.assert_allclose(got[-len(want) :].astype(np.float32), want, atol=2e-3)
    keys = pq.read_table(out / f"part-{Path(pool[1]).stem}.parquet").column("key").to_pylist()
    assert keys == shard.table.column("key").to_pylist()


def test_cli(image_dir, tmp_path, ray_cluster):
    root, good = image_dir
    out = tmp_path / "cli"
    proc = run_cli(["embed", root / "n02102040", "-o", out, "--address", ray_cluster, "--quiet"])
    assert "embedded 6" in proc.stdout and "embeddings.npy (6 rows)" in proc.stdout
    assert np.load(out / "embeddings.npy").shape == (6, 64)
    bad = run_cli(["embed", tmp_path / "nothing*", "-o", tmp_path / "x"], check=False)
    assert bad.returncode != 0 and "matched no files" in bad.stderr


def test_device_decode_is_close_to_the_exact_path(image_dir, tmp_path, ray_cluster):
    """`--decode device` (torchvision on this CPU-only machine): the same rows and quarantine,
    embeddings within a small distance of the exact path's."""
    root, good = image_dir
    exact = run([root], tmp_path / "pil", files_per_shard=8)
    fast = run([root], tmp_path / "device", files_per_shard=8, decode="device")
    assert fast["rows_written"] == exact["rows_written"] == 18
    assert fast["rows_dropped"] == exact["rows_dropped"] == {"decode_error": 1}
    a, b = (np.load(tmp_path / d / "embeddings.npy") for d in ("pil", "device"))
    assert not np.array_equal(a, b)  # another resampler: not bit-identical, by design
    np.testing.assert_allclose(a, b, atol=2e-2)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.999
