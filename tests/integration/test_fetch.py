"""`curation images fetch`: img2dataset downloads from a loopback server into uid-keyed shards.

One module-scoped run (Ray distributor, the session's cluster, the real CLI in-process) serves
every image case: good JPEG / PNG, 404, 500, a timeout, HTML, two decompression bombs, a corrupt
PNG, a refused connection, a null URL and a duplicate uid. The resume test deletes one finished
shard and reruns with the multiprocessing distributor: only that shard is downloaded again and
every file comes out byte-identical.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

# img2dataset imports albumentations, which asks PyPI for updates unless this is set; set at
# collection, before the session's Ray cluster (and so its workers) starts.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .conftest import tree_digest  # noqa: E402
from .http_fixture import (  # noqa: E402
    ImageServer,
    corrupt_png,
    jpeg_bytes,
    png_bomb,
    png_bytes,
)

TIMEOUT_S = 1
JPG_A = jpeg_bytes(64, 48, (200, 10, 10))
JPG_C = jpeg_bytes(30, 30, (0, 0, 250))
PNG_B = png_bytes(40, 30, (0, 200, 0, 128))
ROUTES = {
    "/a.jpg": ("bytes", (JPG_A, "image/jpeg")),
    "/b.png": ("bytes", (PNG_B, "image/png")),
    "/c.jpg": ("bytes", (JPG_C, "image/jpeg")),
    "/500": ("status", 500),
    "/slow.jpg": ("slow", TIMEOUT_S + 2),
    "/page.html": ("bytes", (b"<html><body>not an image</body></html>", "text/html")),
    "/bomb-big.png": ("bytes", (png_bomb(20_000, 20_000), "image/png")),
    "/bomb-mid.png": ("bytes", (png_bomb(8_000, 8_000), "image/png")),
    "/corrupt.png": ("bytes", (corrupt_png(), "image/png")),
}
# uid → (path on the server or a full URL, expected reason; None = downloaded). Part s0 then s1.
PART_S0 = {
    "good_a": ("/a.jpg", None),
    "good_b": ("/b.png", None),
    "missing": ("/missing.jpg", "http_404"),
    "err500": ("/500", "http_error"),
    "slow": ("/slow.jpg", "timeout"),
    "html": ("/page.html", "not_an_image"),
}
PART_S1 = {
    "bomb_big": ("/bomb-big.png", "image_too_large"),
    "bomb_mid": ("/bomb-mid.png", "image_too_large"),
    "corrupt": ("/corrupt.png", "decode_error"),
    "good_c": ("/c.jpg", None),
    "good_a": ("/a.jpg", "duplicate_uid"),  # same uid again: dropped before download
    "no_url": (None, "invalid_url"),
    "refused": ("REFUSED", "connection_error"),
}
PER_SHARD = 4
GOOD = {"good_a": (JPG_A, (64, 48)), "good_b": (None, (40, 30)), "good_c": (JPG_C, (30, 30))}


def _closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_part(path: Path, rows: dict, server: ImageServer, refused: str) -> None:
    urls = [
        None if p is None else refused if p == "REFUSED" else server.url(p)
        for p, _ in rows.values()
    ]
    pq.write_table(
        pa.table({"uid": list(rows), "url": urls, "text": [f"a photo of {u}" for u in rows]}),
        path,
    )


def _fetch_cli(curated: Path, out: Path, *extra: str) -> tuple[int, str]:
    from curation.cli import main

    args = ["images", "fetch", str(curated), "-o", str(out), "--timeout", str(TIMEOUT_S)]
    args += ["--threads", "4", "--samples-per-shard", str(PER_SHARD), "--quiet", *extra]
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@dataclass
class Fetched:
    server: ImageServer
    curated: Path
    out: Path
    root: Path


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fetched]:
    root = tmp_path_factory.mktemp("fetch")
    curated = root / "curated"
    curated.mkdir()
    with ImageServer(dict(ROUTES)) as server:
        refused = f"http://127.0.0.1:{_closed_port()}/x.jpg"
        _write_part(curated / "part-s0.parquet", PART_S0, server, refused)
        _write_part(curated / "part-s1.parquet", PART_S1, server, refused)
        out = root / "shards"
        code, output = _fetch_cli(curated, out)
        assert code == 0, output
        yield Fetched(server, curated, out, root)


def _all_rows(out: Path) -> pa.Table:
    files = sorted(out.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_layout_and_uid_keys(fetched: Fetched) -> None:
    out = fetched.out
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "_done",
        "_stage.json",
        "manifest.json",
        "s0-00000.parquet",
        "s0-00000.tar",
        "s0-00001.parquet",
        "s0-00001.tar",
        "s1-00000.parquet",
        "s1-00000.tar",
        "s1-00001.parquet",
        "s1-00001.tar",
    ], names
    members: dict[str, bytes] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for info in tf.getmembers():
                assert info.isreg() and info.mtime == 0 and info.uid == info.gid == 0
                assert info.uname == info.gname == ""
                members[info.name] = tf.extractfile(info).read()
    assert sorted(members) == sorted(f"{u}.{e}" for u in GOOD for e in ("jpg", "json", "txt"))
    from PIL import Image

    for uid, (served, size) in GOOD.items():
        img = Image.open(io.BytesIO(members[f"{uid}.jpg"]))
        assert img.format == "JPEG" and img.size == size
        if served is not None:  # resize_mode=no keeps JPEG bytes as downloaded
            assert members[f"{uid}.jpg"] == served
        assert members[f"{uid}.txt"].decode() == f"a photo of {uid}"
        meta = json.loads(members[f"{uid}.json"])
        assert meta["uid"] == meta["key"] == uid
        assert meta["caption"] == f"a photo of {uid}"
        assert meta["url"].startswith(fetched.server.base) and meta["status"] == "success"
    # the png was re-encoded (one extension per run); its pixels survive
    png_as_jpg = Image.open(io.BytesIO(members["good_b.jpg"])).convert("RGB")
    assert png_as_jpg.size == (40, 30)


def test_one_row_per_sample_with_its_reason(fetched: Fetched) -> None:
    rows = _all_rows(fetched.out).to_pylist()
    by_uid = {r["uid"]: r for r in rows}
    assert len(rows) == len(by_uid) == len(PART_S0) + len(PART_S1) - 1  # one per unique uid
    expected = {
        **{u: r for u, (_, r) in PART_S1.items()},
        **{u: r for u, (_, r) in PART_S0.items()},
    }
    for uid, reason in expected.items():
        row = by_uid[uid]
        assert row["key"] == uid
        assert row["caption"] == f"a photo of {uid}"
        if reason is None:
            assert row["status"] == "success" and row["reason"] is None, row
            assert (row["width"], row["height"]) == GOOD[uid][1]
        else:
            assert row["status"].startswith("failed"), row
            assert row["reason"] == reason, row
            assert row["error_message"], row
    # both bombs were refused from their header, never decoded by OpenCV
    assert "decompression bomb" in by_uid["bomb_big"]["error_message"]
    assert by_uid["bomb_mid"]["error_message"].startswith("image area too large: header declares")
    assert fetched.server.hits["/a.jpg"] == 1  # the duplicate uid was not downloaded twice


def test_manifest_reconciles(fetched: Fetched) -> None:
    manifest = json.loads((fetched.out / "manifest.json").read_text())
    assert manifest["stage"] == "fetch"
    s = manifest["summary"]
    assert s["rows_read"] == len(PART_S0) + len(PART_S1)
    assert s["rows_written"] == len(GOOD)
    want: dict[str, int] = {}
    for _, reason in [*PART_S0.values(), *PART_S1.values()]:
        if reason is not None:
            want[reason] = want.get(reason, 0) + 1
    assert s["rows_dropped"] == dict(sorted(want.items()))
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())
    assert s["shards"] == 4
    assert manifest["options"]["distributor"] == "ray"
    assert manifest["img2dataset"]


def test_rerun_is_a_no_op_and_a_changed_job_is_refused(fetched: Fetched) -> None:
    before, hits = tree_digest(fetched.out), dict(fetched.server.hits)
    code, output = _fetch_cli(fetched.curated, fetched.out)
    assert code == 0, output
    assert tree_digest(fetched.out) == before
    assert fetched.server.hits == hits
    code, output = _fetch_cli(fetched.curated / "part-*.parquet", fetched.out)  # same parts
    assert code == 0, output
    assert tree_digest(fetched.out) == before
    code, output = _fetch_cli(fetched.curated, fetched.out, "--max-image-area", "1000")
    assert code != 0 and "--overwrite" in output, output
    assert tree_digest(fetched.out) == before


def test_resume_with_multiprocessing_gives_the_same_bytes(fetched: Fetched) -> None:
    """Delete one finished shard; the rerun (other distributor) downloads only that shard."""
    out = fetched.root / "resumed"
    shutil.copytree(fetched.out, out)
    for p in ("s1-00000.tar", "s1-00000.parquet", "_done/s1-00000.json", "manifest.json"):
        (out / p).unlink()
    hits = dict(fetched.server.hits)
    code, output = _fetch_cli(
        fetched.curated, out, "--distributor", "multiprocessing", "--processes", "1"
    )
    assert code == 0, output
    again = {p: n - hits.get(p, 0) for p, n in fetched.server.hits.items() if n != hits.get(p, 0)}
    assert again == {"/bomb-big.png": 1, "/bomb-mid.png": 1, "/corrupt.png": 1, "/c.jpg": 1}
    a, b = tree_digest(fetched.out), tree_digest(out)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == ["manifest.json"]  # options.distributor differs
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (fetched.out, out))
    assert ma["summary"]["rows_dropped"] == mb["summary"]["rows_dropped"]
    assert mb["options"]["distributor"] == "multiprocessing"


def test_bad_inputs_fail_before_any_download(fetched: Fetched, tmp_path: Path) -> None:
    from curation.flows.fetch import fetch

    hits = dict(fetched.server.hits)
    pq.write_table(
        pa.table({"uid": ["x"], "url": ["http://127.0.0.1:9/x"]}), tmp_path / "a.parquet"
    )
    with pytest.raises(ValueError, match="no column.*text"):
        fetch(str(tmp_path / "a.parquet"), str(tmp_path / "o1"), progress=False)
    pq.write_table(
        pa.table({"uid": ["x.jpg"], "url": ["http://127.0.0.1:9/x"], "text": ["t"]}),
        tmp_path / "b.parquet",
    )
    with pytest.raises(ValueError, match="cannot be a webdataset key"):
        fetch(str(tmp_path / "b.parquet"), str(tmp_path / "o2"), progress=False)
    assert fetched.server.hits == hits
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# -- pieces, without Ray or a server -------------------------------------------------------------
def test_classify_errors() -> None:
    from curation.flows.fetch import classify_errors

    cases = {
        "HTTP Error 404: Not Found": "http_404",
        "HTTP Error 403: Forbidden": "http_error",
        "timed out": "timeout",
        "<urlopen error timed out>": "timeout",
        "The read operation timed out": "timeout",
        "<urlopen error [Errno 111] Connection refused>": "connection_error",
        "<urlopen error [Errno -2] Name or service not known>": "connection_error",
        "Remote end closed connection without response": "connection_error",
        "unknown url type: ''": "invalid_url",
        "Use of image disallowed by X-Robots-Tag directive": "disallowed",
        "image area too large": "image_too_large",
        "not an image: no known image header": "not_an_image",
        "Image decoding error": "decode_error",
        "image too small": "image_filtered",
        "hash mismatch": "other",
    }
    status = pa.array(["failed_to_download"] * len(cases) + ["success"])
    errors = pa.array([*cases, None])
    assert classify_errors(status, errors).to_pylist() == [*cases.values(), None]


def test_rekey_tar_streams_and_skips_non_regular_members(tmp_path: Path) -> None:
    from curation.flows.fetch import rekey_tar

    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in [("000.jpg", b"J0"), ("000.txt", b"t0"), ("001.jpg", b"J1")]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 12345
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("000.link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
        info = tarfile.TarInfo("002.d")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    dst = tmp_path / "dst.tar"
    written = rekey_tar(str(src), str(dst), {"000": "u0", "001": "u1", "002": "u2"}, ["u1", "u0"])
    assert written == {"u1": 1, "u0": 2}
    with tarfile.open(dst) as tf:
        got = [(m.name, m.mtime, tf.extractfile(m).read()) for m in tf.getmembers()]
    assert got == [("u1.jpg", 0, b"J1"), ("u0.jpg", 0, b"J0"), ("u0.txt", 0, b"t0")]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
