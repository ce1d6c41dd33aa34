"""Tests of the synthetic webdataset image pool (`curation synth --images`)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curation.cli import main
from curation.core.text import uid_of_url
from curation.synth.images import (
    COLORS,
    FAULT_KINDS,
    SHAPES,
    generate_image_shard,
    write_synthetic_image_pool,
)

COLUMNS = [
    "key", "uid", "url", "caption", "status", "error_message", "width", "height",
    "original_width", "original_height", "mismatched", "concepts", "true_caption", "fault",
]  # fmt: skip
TOL = 40  # per-channel distance to a palette color that still counts as that color


def _members(tar_bytes: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def _samples(tar_bytes: bytes) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for m, data in _members(tar_bytes):
        key, ext = m.name.split(".", 1)
        out.setdefault(key, {})[ext] = data
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _near(pixels: np.ndarray, color: str) -> np.ndarray:
    return np.abs(pixels - np.array(COLORS[color])).max(axis=-1) <= TOL


def _parse(caption: str) -> set[str]:
    """Independent reading of a caption into the `kind:value` concepts it states."""
    text = caption.lower()
    out: set[str] = set()
    m = re.search(r'"([^"]+)"', text)
    if m:
        out.add(f"word:{m.group(1)}")
        text = text[: m.start()] + text[m.end() :]
    m = re.search(r"on an? (\w+) background", text)
    if m:
        out.add(f"background:{m.group(1)}")
        text = text[: m.start()] + text[m.end() :]
    for tok in re.findall(r"[a-z]+", text):
        if tok in COLORS:
            out.add(f"color:{tok}")
        elif tok in ("striped", "dotted", "checkered"):
            out.add(f"texture:{tok}")
        elif tok in ("two", "three"):
            out.add(f"count:{2 if tok == 'two' else 3}")
        else:
            for shape in (tok, tok[:-1], tok[:-2]):
                if shape in SHAPES:
                    out.add(f"shape:{shape}")
                    break
    return out


def _stated(concepts: list[str], caption: str) -> set[str]:
    """The concepts a true caption must state: all but a plain texture and an unsaid bg."""
    return {
        c
        for c in concepts
        if c != "texture:plain" and ("background" in caption or not c.startswith("background:"))
    }


@pytest.fixture(scope="module")
def shard():
    return generate_image_shard(11, 3, 300, mismatch_rate=0.25, fault_rate=0.2)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(mismatch_rate=0.3, fault_rate=0.15)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa = write_synthetic_image_pool(str(a), 2, 30, 5, **kw)
    write_synthetic_image_pool(str(b), 2, 30, 5, **kw)
    write_synthetic_image_pool(str(c), 2, 30, 6, **kw)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert sorted(fa) == [
        "images-00000.parquet", "images-00000.tar", "images-00001.parquet", "images-00001.tar",
        "synth_truth.json",
    ]  # fmt: skip
    for name in fa:
        if name == "synth_truth.json":  # holds the folder's own path
            assert fa[name].replace(str(a).encode(), b"") == fb[name].replace(str(b).encode(), b"")
        else:
            assert fa[name] == fb[name], name
            assert fa[name] != fc[name], name
    # rewriting the same folder reproduces every file, truth included
    write_synthetic_image_pool(str(a), 2, 30, 5, **kw)
    assert _files(a) == fa
    assert sa.files == [str(a / "images-00000.tar"), str(a / "images-00001.tar")]
    # shard i depends on (seed, i) only
    one = generate_image_shard(5, 1, 30, **kw)
    assert one.tar == fa["images-00001.tar"]


def test_tar_members_are_plain_sorted_and_keyed(shard):
    members = _members(shard.tar)
    assert len(members) == 3 * 300
    rows = shard.table.to_pydict()
    for j, key in enumerate(rows["key"]):
        group = members[3 * j : 3 * j + 3]
        names = [m.name for m, _ in group]
        assert names == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
        for m, data in group:
            assert m.isreg() and m.size == len(data)
            assert not m.name.startswith("/") and "/" not in m.name and ".." not in m.name
            assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o444, 0, 0, "", "")
    assert rows["uid"] == rows["key"]
    assert rows["key"] == [uid_of_url(u) for u in rows["url"]]
    assert len(set(rows["key"])) == 300
    assert all(
        re.fullmatch(r"https://img\.example\.com/synth/11/3/\d+\.jpg", u) for u in rows["url"]
    )


def test_parquet_json_txt_agree(tmp_path):
    write_synthetic_image_pool(str(tmp_path), 1, 80, 2, fault_rate=0.1)
    table = pq.read_table(tmp_path / "images-00000.parquet")
    assert table.column_names == COLUMNS
    assert table.schema.field("concepts").type.value_type == pa.string()
    samples = _samples((tmp_path / "images-00000.tar").read_bytes())
    rows = table.to_pylist()
    assert list(samples) == [r["key"] for r in rows]
    for r in rows:
        s = samples[r["key"]]
        meta = json.loads(s["json"])
        assert s["txt"].decode("utf-8") == r["caption"]
        for col in COLUMNS:
            if col != "fault":
                assert meta[col] == r[col], col
        assert r["status"] == "success" and r["error_message"] is None
        if r["fault"] is None:
            assert (r["width"], r["height"]) == (r["original_width"], r["original_height"])
            with Image.open(io.BytesIO(s["jpg"])) as im:
                assert im.format == "JPEG" and im.size == (r["width"], r["height"])
            assert {o["color"] for o in meta["objects"]} == {
                c[6:] for c in r["concepts"] if c.startswith("color:")
            }
        else:
            assert r["width"] is None and r["height"] is None


def test_mismatches_exact_and_really_mismatched(shard, tmp_path):
    rows = shard.table.to_pydict()
    mism = np.array(rows["mismatched"])
    good = np.array([f is None for f in rows["fault"]])
    assert not (mism & ~good).any()  # faults are never mismatched
    assert int(mism.sum()) == shard.truth.mismatched == round(0.25 * int(good.sum()))
    for cap, true, concepts, m in zip(
        rows["caption"], rows["true_caption"], rows["concepts"], mism, strict=True
    ):
        assert _parse(true) == _stated(concepts, true)  # the true caption says what was drawn
        if m:
            assert cap != true
            assert not _parse(cap) <= set(concepts)  # it states something not in the image
        else:
            assert cap == true
    big = generate_image_shard(0, 0, 1000, mismatch_rate=0.2).table.column("mismatched")
    assert abs(sum(big.to_pylist()) / 1000 - 0.2) < 0.01


def test_faults_counted_and_undecodable(shard, tmp_path):
    rows = shard.table.to_pydict()
    counts = {k: rows["fault"].count(k) for k in FAULT_KINDS}
    assert counts == shard.truth.faults
    assert sum(counts.values()) == round(0.2 * 300)
    assert all(counts[k] > 0 for k in FAULT_KINDS)
    samples = _samples(shard.tar)
    for key, fault in zip(rows["key"], rows["fault"], strict=True):
        data = samples[key]["jpg"]
        if fault is None:
            _decode(data)
        elif fault == "bomb":
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(data))
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
        else:
            with pytest.raises((OSError, SyntaxError)), Image.open(io.BytesIO(data)) as im:
                im.load()

    write_synthetic_image_pool(str(tmp_path), 3, 40, 9, fault_rate=0.25)
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    total = {k: 0 for k in FAULT_KINDS}
    for url in truth["files"]:
        table = pq.read_table(url.replace(".tar", ".parquet"))
        faults = table.column("fault").to_pylist()
        assert truth["faults_per_file"][url] == {k: faults.count(k) for k in FAULT_KINDS}
        assert truth["mismatched_per_file"][url] == sum(table.column("mismatched").to_pylist())
        assert truth["samples_per_file"][url] == table.num_rows == 40
        for k in FAULT_KINDS:
            total[k] += faults.count(k)
    assert truth["total_faults"] == total and sum(total.values()) == 30
    assert truth["params"]["fault_rate"] == 0.25 and truth["seed"] == 9


def test_images_show_the_captioned_colors(shard):
    """Each drawn color fills its boxes; colors the scene lacks are (almost) absent."""
    rows = shard.table.to_pydict()
    samples = _samples(shard.tar)
    checked = 0
    for key, fault, mism, caption in zip(
        rows["key"], rows["fault"], rows["mismatched"], rows["caption"], strict=True
    ):
        if fault is not None:
            continue
        px = _decode(samples[key]["jpg"])
        meta = json.loads(samples[key]["json"])
        if meta["word"] is not None:  # ink is black or white, not a concept
            x0, y0, x1, y1 = meta["word"]["box"]
            px[y0:y1, x0:x1] = COLORS[meta["concepts"][-1].split(":")[1]]
        for obj in meta["objects"]:
            for x0, y0, x1, y1 in obj["boxes"]:
                assert _near(px[y0:y1, x0:x1], obj["color"]).mean() > 0.04, (key, obj)
        said = {c[6:] for c in _parse(caption) if c.startswith("color:")}
        bg = meta["concepts"][-1].split(":")[1]
        drawn = {o["color"] for o in meta["objects"]} | {bg}
        if not mism:  # colors read from the caption text are in the pixels
            assert said <= drawn
            for color in said:
                assert _near(px, color).sum() > 100, (key, color)
        for color in ("red", "green", "blue", "yellow", "cyan", "pink", "white", "black"):
            if color not in drawn:
                assert _near(px, color).mean() < 0.005, (key, color)
        checked += 1
    assert checked == 240


def test_odd_sizes_png_and_empty_shard():
    s = generate_image_shard(1, 0, 120, image_size=64, image_format="png", mismatch_rate=0)
    rows = s.table.to_pydict()
    sizes = set(zip(rows["width"], rows["height"], strict=True))
    assert (64, 64) in sizes and (80, 50) in sizes and len(sizes) >= 4
    assert not any(rows["mismatched"]) and rows["caption"] == rows["true_caption"]
    samples = _samples(s.tar)
    key = rows["key"][0]
    assert sorted(samples[key]) == ["json", "png", "txt"]
    with Image.open(io.BytesIO(samples[key]["png"])) as im:
        assert im.format == "PNG" and im.size == (rows["width"][0], rows["height"][0])
    empty = generate_image_shard(1, 0, 0)
    assert empty.table.num_rows == 0 and _members(empty.tar) == []
    with pytest.raises(ValueError, match="image_format"):
        write_synthetic_image_pool("/nonexistent", 1, 1, 0, image_format="gif")
    with pytest.raises(ValueError, match="mismatch_rate"):
        write_synthetic_image_pool("/nonexistent", 1, 1, 0, mismatch_rate=1.5)


def test_cli_synth_images(tmp_path):
    out = tmp_path / "pool"
    args = ["synth", str(out), "--images", "--shards", "2", "--pairs-per-shard", "12",
            "--seed", "4", "--image-size", "48", "--mismatch-rate", "0.5",
            "--image-faults", "0.25", "--image-format", "png"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "24 samples" in res.output and "synth_truth.json" in res.output
    truth = json.loads((out / "synth_truth.json").read_text())
    assert truth["total_samples"] == 24
    assert truth["params"]["image_format"] == "png" and truth["params"]["image_size"] == 48
    assert sum(truth["total_faults"].values()) == 6
    assert truth["total_mismatched"] == 2 * round(0.5 * 9)
    assert (out / "images-00001.tar").exists() and (out / "images-00001.parquet").exists()
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--image-faults", "0.1"])
    assert res.exit_code == 2 and "--images" in res.output
    res = CliRunner().invoke(
        main, ["synth", str(tmp_path / "y"), "--images", "--malformed-rate", "0.1"]
    )
    assert res.exit_code == 2 and "--image-faults" in res.output
