"""`curation score` on the local Ray cluster: actor pool results equal the local scorer,
do not depend on the number of actors, reconcile, quarantine bad images, and resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.flows.score import OUTPUT_COLUMNS, score_shards
from curation.io.images import decode_images, read_tar
from curation.io.parts import ResumeError
from curation.stages.score import TINY_MODEL, ClipScorer

from .conftest import assert_same_tree, read_parts

ROWS = 60
BAD = {7: b"<html>404</html>", 11: None}  # row -> payload (None: truncated JPEG)


def _jpeg(rng: np.random.Generator, i: int) -> bytes:
    a = (rng.random((30 + i % 40, 50, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_pool(folder: Path, shards: int = 3) -> list[str]:
    """Tars of ROWS samples; shard 0 has the BAD rows, the last shard is cut in half."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(shards):
        rng = np.random.default_rng(s)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(ROWS):
                key = f"{s:03d}{i:06d}"
                img = _jpeg(rng, i)
                if s == 0 and i in BAD:
                    img = BAD[i] if BAD[i] is not None else img[: len(img) // 3]
                meta = {"uid": f"uid-{s}-{i}", "url": f"https://img.example.com/{s}/{i}.jpg"}
                for ext, data in (
                    ("jpg", img),
                    ("txt", f"caption {i} of shard {s}".encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        data = buf.getvalue()
        if s == shards - 1:
            data = data[: len(data) // 2]
        path = folder / f"shard-{s:02d}.tar"
        path.write_bytes(data)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[str]:
    return make_pool(tmp_path_factory.mktemp("img") / "pool")


def run(pool, out, **kw):
    kw.setdefault("chunk_rows", 16)
    return score_shards(pool, str(out), ClipScorer(TINY_MODEL, batch_size=8), progress=False, **kw)


@pytest.fixture(scope="module")
def scored(pool, tmp_path_factory) -> tuple[Path, dict]:
    """One run with the default pool (1 CPU actor on this 2-CPU cluster), shared read-only."""
    out = tmp_path_factory.mktemp("scored") / "out"
    return out, run(pool, out)


def test_scores_reconcile_quarantine_and_equal_the_local_scorer(pool, scored):
    out, s = scored
    assert s["actors"] == 1 and s["device"] == "cpu"
    truncated = read_tar(pool[-1])
    assert s["rows_read"] == 2 * ROWS + truncated.counts["rows_read"]
    assert s["rows_dropped"] == {"decode_error": 1, "not_an_image": 1}
    assert s["rows_written"] == s["rows_read"] - 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["rows_written"] == s["rows_written"]
    assert manifest["model"]["random_weights"] is True and manifest["model"]["embed_dim"] == 64
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(x["reason"] for x in q) == ["corrupt_shard", "decode_error", "not_an_image"]
    assert {x["key"] for x in q if "key" in x} == {"000000007", "000000011"}

    t = read_parts(out)
    assert t.column_names == list(OUTPUT_COLUMNS)
    assert str(t.schema.field("image_embedding").type) == "fixed_size_list<element: halffloat>[64]"
    # Reference: the same scorer in this process, shard by shard.
    ref = ClipScorer(TINY_MODEL, batch_size=8)
    with pytest.warns(UserWarning):
        ref.setup()
    tr = ref.pixel_transform()
    want_uid, want_score, want_img = [], [], []
    for url in pool:
        shard = read_tar(url)
        px, ok, _, _ = decode_images(shard.table.column("image"), tr)
        kept = shard.table.filter(ok)
        r = ref.score(px, kept.column("text").to_pylist())
        want_uid += kept.column("uid").to_pylist()
        want_score.append(r.clip_score)
        want_img.append(r.image_embedding)
    assert t.column("uid").to_pylist() == want_uid
    np.testing.assert_allclose(
        t.column("clip_score").to_numpy(), np.concatenate(want_score), atol=1e-5
    )
    img = np.stack(t.column("image_embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(img.astype(np.float32), np.concatenate(want_img), atol=1e-3)
    # Stored halves still give the score to fp16 precision.
    txt = np.stack(t.column("text_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    cos = (img.astype(np.float32) * txt).sum(1)
    np.testing.assert_allclose(cos, t.column("clip_score").to_numpy(), atol=5e-3)
    # Sizes come from the decoded image when the shard's metadata has none.
    assert set(t.column("original_width").to_pylist()) == {50}


def test_output_does_not_depend_on_the_number_of_actors(pool, scored, tmp_path):
    """Rerun at the same path (outputs name it) with 2 actors: every byte is the same,
    manifest included, whatever actor scored which chunk."""
    import shutil

    out = scored[0]
    shutil.copytree(out, tmp_path / "one")
    shutil.rmtree(out)
    s = run(pool, out, num_actors=2)
    assert s["actors"] == 2
    digest = assert_same_tree(tmp_path / "one", out)
    assert "manifest.json" in digest and any(k.startswith("part-") for k in digest)


def test_chunking_does_not_change_results(pool, scored, tmp_path):
    run(pool, tmp_path / "b", chunk_rows=500)
    ta, tb = read_parts(scored[0]), read_parts(tmp_path / "b")
    assert ta.column("uid").equals(tb.column("uid"))
    np.testing.assert_allclose(
        ta.column("clip_score").to_numpy(), tb.column("clip_score").to_numpy(), atol=1e-5
    )


def test_rerun_resumes_and_a_changed_model_is_refused(pool, scored, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(scored[0], out)
    part = out / "part-shard-01.parquet"
    marker = out / "_done" / "shard-01.json"
    other = out / "part-shard-00.parquet"
    before, other_before = part.read_bytes(), other.stat().st_mtime_ns
    marker.unlink()
    part.write_bytes(b"garbage from a crashed run")
    run(pool, out)  # shard-01 is redone, the others are skipped
    assert marker.exists() and part.read_bytes() == before
    assert other.stat().st_mtime_ns == other_before
    with pytest.raises(ResumeError, match="different job"):
        score_shards(pool, str(out), ClipScorer(TINY_MODEL, seed=5), chunk_rows=16, progress=False)


def test_cli_scores_synth_images_pool_and_parquet_image_tables(pool, tmp_path):
    """`curation synth --images` → `curation score` with the tiny model and no checkpoint, plus
    a Parquet image table read like a tar."""
    import pyarrow as pa
    from click.testing import CliRunner

    from curation.cli import main

    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "synth",
            str(tmp_path / "syn"),
            "--images",
            "--shards",
            "2",
            "--pairs-per-shard",
            "40",
            "--image-size",
            "64",
            "--image-faults",
            "0.1",
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    shard = read_tar(pool[1])
    table = shard.table.rename_columns(["key", "uid", "url", "text", "w", "h", "jpg"])
    pq.write_table(table, tmp_path / "syn" / "zz-images.parquet")
    res = runner.invoke(
        main, ["score", str(tmp_path / "syn"), "-o", str(tmp_path / "out"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    truth = json.loads((tmp_path / "syn" / "synth_truth.json").read_text())["total_faults"]
    summary = json.loads((tmp_path / "out" / "manifest.json").read_text())["summary"]
    assert summary["rows_read"] == 80 + ROWS
    # Every broken image of the synthetic pool is caught under its reason.
    assert summary["rows_dropped"] == {
        k: v
        for k, v in {
            "decode_error": truth["truncated"],
            "not_an_image": truth["not_an_image"],
            "image_too_large": truth["bomb"],
        }.items()
        if v
    }
    assert summary["rows_written"] == 80 + ROWS - sum(truth.values())
    t = pq.read_table(tmp_path / "out" / "part-zz-images.parquet")
    assert t.column("uid").to_pylist() == shard.table.column("uid").to_pylist()
    assert pa.compute.all(pa.compute.is_finite(t.column("clip_score"))).as_py()
    # The ground truth joins the scores by uid.
    meta = pq.read_table(tmp_path / "syn" / "images-00000.parquet", columns=["uid", "fault"])
    part = pq.read_table(tmp_path / "out" / "part-images-00000.parquet")
    ok = meta.filter(pa.compute.is_null(meta.column("fault"))).column("uid").to_pylist()
    assert part.column("uid").to_pylist() == ok


def test_model_errors_are_one_clear_message_and_weights_are_fingerprinted(pool, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    import torch

    save_file({"visual.proj": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ValueError, match="do not fit") as info:
        score_shards(pool[:1], str(tmp_path / "x"), ClipScorer(TINY_MODEL, checkpoint=str(bad)))
    assert "Traceback" not in str(info.value)

    ref = ClipScorer(TINY_MODEL)
    with pytest.warns(UserWarning):
        ref.setup()
    good = tmp_path / "w.safetensors"
    save_file(dict(ref._model.state_dict()), str(good))
    out = tmp_path / "out"
    score_shards(pool[:1], str(out), ClipScorer(TINY_MODEL, checkpoint=str(good)), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["checkpoint_sha256"].startswith("sha256:")
    # Other weights at the same path: resuming would mix two models in one folder.
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in ref._model.state_dict().items()}
    save_file(sd, str(good))
    with pytest.raises(ResumeError, match="checkpoint_sha256"):
        score_shards(pool[:1], str(out), ClipScorer(TINY_MODEL, checkpoint=str(good)))
