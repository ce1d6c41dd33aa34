"""The real CLI on bad inputs and outputs that it meets once Ray runs: one `Error:` line naming
what is wrong, no traceback of ours; and what `score` does with `.tar.gz` shards and uids that
occur in two shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from .conftest import cli_env, run_cli, short_ray_tmp


@pytest.fixture(scope="module")
def wat(tmp_path_factory) -> Path:
    """One small synthetic WAT shard."""
    d = tmp_path_factory.mktemp("pool")
    run_cli(["synth", d, "--shards", "1", "--pairs-per-shard", "20", "--seed", "3"])
    return next(d.glob("*.warc.wat.gz"))


def _fails_with_one_line(args: list, **env: str) -> str:
    tmp = short_ray_tmp()
    try:
        proc = run_cli(args, env=cli_env(tmp, **env), check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), proc.stderr[-3000:]
    assert "curation/cli.py" not in proc.stderr, proc.stderr[-3000:]  # no driver traceback
    return last


def test_self_referencing_symlink_in_the_input_folder(wat, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(wat, d)
    os.symlink("loop.warc.wat.gz", d / "loop.warc.wat.gz")
    line = _fails_with_one_line(["ingest", d, "-o", tmp_path / "out", "--quiet"])
    assert "loop.warc.wat.gz" in line and "symbolic link" in line


def test_output_under_a_file(wat, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _fails_with_one_line(["ingest", wat, "-o", tmp_path / "afile" / "out", "--quiet"])
    assert "afile" in line and "not a folder" in line


@pytest.mark.parametrize("url", ["s3://no-such-bucket/x.warc.wat.gz", "http://127.0.0.1:9/x.wat"])
def test_remote_input_without_its_package_or_unreachable(url, tmp_path):
    line = _fails_with_one_line(["ingest", url, "-o", tmp_path / "out", "--quiet"])
    assert url in line
    assert "pip install" in line or "cannot list input" in line or "cannot reach input" in line


def test_error_inside_a_ray_task_is_one_line_naming_the_task(wat, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(wat, d)
    (d / "dir.warc.wat.gz").mkdir()  # the glob matches a folder: the task cannot read it
    line = _fails_with_one_line(
        ["ingest", f"{d}/*", "-o", tmp_path / "out", "--quiet"],
        CURATION_IO_BACKOFF_S="0",
    )
    assert "Ray task _shard_task" in line and "dir.warc.wat.gz" in line


def test_no_glob_and_escapes_address_names_with_brackets(wat, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(wat, d / "a[1].warc.wat.gz")
    shutil.copy(wat, d / "a1.warc.wat.gz")
    for args in (
        [f"{d}/a[1].warc.wat.gz", "--no-glob"],
        [f"{d}/a\\[1\\].warc.wat.gz"],
        [f"{d}/a[1].warc.wat.gz"],  # exists as written
    ):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        run_cli(["ingest", *args, "-o", out, "--quiet"])
        parts = sorted(p.name for p in out.glob("part-*.parquet"))
        assert parts == ["part-a_1_.parquet"], (args, parts)  # a1.warc.wat.gz is not read


# -- score -----------------------------------------------------------------------------------------
def _tar(samples: list[tuple[str, str]]) -> bytes:
    """A webdataset tar of tiny PNGs: (key, uid) per sample."""
    from PIL import Image

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, uid in samples:
            img = io.BytesIO()
            Image.new("RGB", (24, 24), (len(key) * 9 % 255, 40, 90)).save(img, format="PNG")
            meta = json.dumps({"uid": uid, "url": f"https://x/{uid}.png"}).encode()
            for ext, data in (("png", img.getvalue()), ("txt", b"a photo"), ("json", meta)):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_score_reports_uids_that_occur_in_more_than_one_shard(tmp_path):
    from curation.flows.score import score_shards
    from curation.stages.score import TINY_MODEL, ClipScorer

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "s0.tar").write_bytes(_tar([(f"k{i}", f"u{i}") for i in range(6)]))
    (pool / "s1.tar").write_bytes(_tar([(f"j{i}", f"u{i}") for i in range(3)]))  # u0..u2 again
    (pool / "s2.tar").write_bytes(_tar([("m0", "u4"), ("m1", "v1")]))  # u4 again
    out = tmp_path / "scores"
    with pytest.warns(UserWarning, match="4 uid"):
        s = score_shards(
            [str(pool)], str(out), ClipScorer(TINY_MODEL, batch_size=8), progress=False
        )
    assert s["shards"] == 3 and s["rows_written"] == 11  # reported, not dropped
    assert s["duplicate_uids"] == 4
    assert json.loads((out / "manifest.json").read_text())["summary"]["duplicate_uids"] == 4


def test_score_reads_gzip_tars_from_a_folder(tmp_path):
    import gzip

    from curation.flows.score import score_shards
    from curation.stages.score import TINY_MODEL, ClipScorer

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "s0.tar").write_bytes(_tar([(f"k{i}", f"u{i}") for i in range(4)]))
    (pool / "s1.tgz").write_bytes(gzip.compress(_tar([(f"j{i}", f"v{i}") for i in range(3)])))
    (pool / "s2.tar.gz").write_bytes(gzip.compress(_tar([("m0", "w0"), ("m1", "w1")])))
    out = tmp_path / "scores"
    s = score_shards([str(pool)], str(out), ClipScorer(TINY_MODEL, batch_size=8), progress=False)
    assert s["shards"] == 3 and s["rows_written"] == 9 and s["duplicate_uids"] == 0
