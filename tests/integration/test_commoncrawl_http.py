"""`curation ingest --paths`: CommonCrawl read where it lives, over HTTP, with cut transfers.

A loopback HTTP server (`http_fixture.FileServer`: HEAD, Range, Content-Length) serves a
CommonCrawl-like layout `crawl-data/CC-MAIN-TEST/segments/<seg>/wat/<name>.warc.wat.gz` of
synthetic WAT shards (`curation.synth.wat.generate_shard`, whose truth says how many pairs each
holds) and its `wat.paths.gz` listing. The first transfer of some shards is cut mid-body (the
server closes after half the bytes): a transient storage error, retried, never quarantined, no
row lost. A shard that is itself cut on the server (served whole) is `truncated_shard`.

The CLI runs as a subprocess connected to the session Ray cluster (`--address`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from curation.synth.wat import generate_shard

from .conftest import cli_env, run_cli
from .http_fixture import FileServer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SEED, PAIRS = 7, 1500
CRAWL = "crawl-data/CC-MAIN-TEST"
SEGMENTS = ("1700000000000.10", "1700000000001.11")
#: (segment, shard index) of the good shards, in listing order (not sorted on purpose).
LAYOUT = ((1, 2), (0, 0), (1, 3), (0, 1))
CUT = {0, 2}  # shard indices whose first transfer is cut mid-body
TRUNCATED_INDEX = 4  # a shard cut on the server itself


def _name(index: int) -> str:
    return f"CC-MAIN-20240101000000-20240101010000-{index:05d}.warc.wat.gz"


def _rel(seg: int, index: int) -> str:
    return f"{CRAWL}/segments/{SEGMENTS[seg]}/wat/{_name(index)}"


def _listing(path: Path, lines: list[str]) -> None:
    path.write_bytes(gzip.compress("".join(f"{x}\n" for x in lines).encode()))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(server, local copies folder, truth {file name: pairs}, listing paths in order)."""
    root = tmp_path_factory.mktemp("cc")
    www, local = root / "www", root / "local"
    local.mkdir()
    truth: dict[str, int] = {}
    rels = []
    for seg, index in LAYOUT:
        data, t = generate_shard(SEED, index, PAIRS)
        rel = _rel(seg, index)
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(data)
        (local / _name(index)).write_bytes(data)
        truth[_name(index)] = t.pairs
        rels.append(rel)
    data, _ = generate_shard(SEED, TRUNCATED_INDEX, PAIRS)
    cut = data[: int(len(data) * 0.55)]  # the file itself ends inside a record
    trel = _rel(0, TRUNCATED_INDEX)
    (www / trel).write_bytes(cut)
    (local / "truncated").mkdir()
    (local / "truncated" / _name(TRUNCATED_INDEX)).write_bytes(cut)
    _listing(www / CRAWL / "wat.paths.gz", ["", *rels[:2], "", *rels[2:]])
    _listing(www / CRAWL / "wat-truncated.paths.gz", [trel, rels[1]])
    _listing(www / CRAWL / "bad.paths.gz", [rels[0], rels[1], f"{CRAWL}/../../../etc/passwd"])
    with FileServer(str(www)) as server:
        yield server, local, truth, rels


def _ingest(server: FileServer, listing: str, out: Path, address: str, *extra: str, **kw):
    return run_cli(
        [
            "ingest", "--paths", f"{server.base}/{CRAWL}/{listing}", "--base-url",
            server.base + "/", "-o", out, "--quiet", "--address", address, *extra,
        ],
        env=cli_env(),
        **kw,
    )  # fmt: skip


def _markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))}


def _rows_by_file(out: Path) -> dict[str, int]:
    return {
        os.path.basename(m["input"]): m["counts"]["rows_written"] for m in _markers(out).values()
    }


def test_http_listing_with_cut_transfers_yields_every_pair(site, tmp_path, ray_cluster):
    server, local, truth, rels = site
    server.cut_first = {f"/{_rel(seg, i)}" for seg, i in LAYOUT if i in CUT}
    server.cuts.clear()
    out = tmp_path / "http"
    proc = _ingest(server, "wat.paths.gz", out, ray_cluster)
    assert "0 quarantined" in proc.stdout, proc.stdout
    # the cut transfers happened, and the shards were read again (whole)
    assert set(server.cuts) == server.cut_first and len(server.cut_first) == len(CUT)
    for path in server.cut_first:
        assert server.gets[path] >= 2, server.gets
    # every pair: the generator's truth, shard by shard; nothing quarantined
    assert _rows_by_file(out) == truth
    manifest = json.loads((out / "manifest.json").read_text())["summary"]
    assert manifest["rows_written"] == sum(truth.values())
    assert manifest["paths_listing"]["inputs"] == len(LAYOUT)
    assert manifest["paths_listing"]["base_url"] == server.base + "/"
    assert (out / "quarantine.jsonl").read_text() == ""
    assert all("quarantine" not in m for m in _markers(out).values())
    for m in _markers(out).values():
        assert m["input"].startswith(server.base + "/" + CRAWL + "/segments/")
        assert "//" not in m["input"].split("://", 1)[1]
    # the same shards ingested from local files: identical part bytes
    lout = tmp_path / "local"
    run_cli(
        ["ingest", *sorted(str(p) for p in local.glob("*.warc.wat.gz")), "-o", lout, "--quiet",
         "--address", ray_cluster],
        env=cli_env(),
    )  # fmt: skip
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == sorted(p.name for p in lout.glob("part-*.parquet")) and len(parts) == 4
    for name in parts:
        assert (out / name).read_bytes() == (lout / name).read_bytes(), name
    for m, lm in zip(_markers(out).values(), _markers(lout).values(), strict=True):
        assert m["input_sha256"] == lm["input_sha256"] and m["input_bytes"] == lm["input_bytes"]
    # a rerun resumes: nothing to do, nothing fetched again
    gets = dict(server.gets)
    _ingest(server, "wat.paths.gz", out, ray_cluster)
    assert {k: v for k, v in server.gets.items() if k.endswith(".wat.gz")} == {
        k: v for k, v in gets.items() if k.endswith(".wat.gz")
    }


def test_file_truncated_on_the_server_is_quarantined(site, tmp_path, ray_cluster):
    server, local, truth, _ = site
    server.cut_first, _ = set(), server.cuts.clear()
    out = tmp_path / "trunc"
    _ingest(server, "wat-truncated.paths.gz", out, ray_cluster)
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    name = _name(TRUNCATED_INDEX)
    assert [x["reason"] for x in q] == ["truncated_shard"]
    assert os.path.basename(q[0]["input"]) == name
    rows = _rows_by_file(out)
    good = _name(LAYOUT[1][1])
    assert rows[good] == truth[good]
    assert 0 < rows[name] < PAIRS  # what was read before the cut is kept
    # the same as ingesting the truncated file from a local disk
    lout = tmp_path / "trunc-local"
    run_cli(
        ["ingest", str(local / "truncated" / name), "-o", lout, "--quiet", "--address",
         ray_cluster],
        env=cli_env(),
    )  # fmt: skip
    part = f"part-{name.removesuffix('.warc.wat.gz')}.parquet"
    assert (out / part).read_bytes() == (lout / part).read_bytes()
    lq = [json.loads(x) for x in (lout / "quarantine.jsonl").read_text().splitlines()]
    assert [x["reason"] for x in lq] == ["truncated_shard"]
    assert lq[0]["record"] == q[0]["record"]


def test_limit_ingests_the_first_n_in_listing_order(site, tmp_path, ray_cluster):
    server, _, truth, rels = site
    server.cut_first, _ = set(), server.cuts.clear()
    out = tmp_path / "limit"
    _ingest(server, "wat.paths.gz", out, ray_cluster, "--limit", "2")
    want = [os.path.basename(r) for r in rels[:2]]
    assert sorted(_rows_by_file(out)) == sorted(want)
    assert _rows_by_file(out) == {n: truth[n] for n in want}
    assert len(list(out.glob("part-*.parquet"))) == 2
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["paths_listing"]["limit"] == 2
    assert summary["paths_listing"]["paths_in_listing"] == len(LAYOUT)


def test_bad_listing_line_fails_before_any_work(site, tmp_path, ray_cluster):
    server, _, _, _ = site
    server.cut_first, _ = set(), server.cuts.clear()
    before = {k: v for k, v in server.gets.items() if k.endswith(".wat.gz")}
    out = tmp_path / "bad"
    proc = _ingest(server, "bad.paths.gz", out, ray_cluster, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("Error: ") and "line 3" in err[-1] and "'..' segment" in err[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert {k: v for k, v in server.gets.items() if k.endswith(".wat.gz")} == before


def test_positional_http_urls_and_missing_url(site, tmp_path, ray_cluster):
    """http(s) INPUTS are read as they are (no glob: `?` is a query), a missing one is an error
    naming it when it is the only input."""
    server, _, truth, rels = site
    server.cut_first, _ = set(), server.cuts.clear()
    out = tmp_path / "pos"
    url = f"{server.base}/{rels[0]}"
    run_cli(["ingest", url + "?sig=x", "-o", out, "--quiet", "--address", ray_cluster])
    assert list(_rows_by_file(out).values()) == [truth[os.path.basename(rels[0])]]
    missing = f"{server.base}/{CRAWL}/nope.warc.wat.gz"
    proc = run_cli(
        ["ingest", missing, "-o", tmp_path / "none", "--quiet", "--address", ray_cluster],
        check=False,
    )
    assert proc.returncode == 1 and "nope.warc.wat.gz" in proc.stderr.splitlines()[-1]
    shutil.rmtree(tmp_path / "none", ignore_errors=True)


def test_reader_maps_network_failures_to_oserror(site):
    """In-process: a cut transfer and an HTTP 503 are `RemoteReadError` (an `OSError`, the
    original message kept); the next read is whole; a 404 is a missing file."""
    from curation.core.stage import Shard
    from curation.stages.ingest import Ingestor, RemoteReadError

    server, local, truth, rels = site
    a, b = f"/{rels[0]}", f"/{rels[1]}"
    server.cut_first, _ = {a}, server.cuts.clear()
    server.fail_first = {b: 503}
    ing = Ingestor()
    try:
        with pytest.raises(RemoteReadError, match="Not enough data to satisfy content length"):
            ing.read(Shard("a", server.base + a))
        with pytest.raises(RemoteReadError, match="503"):
            ing.read(Shard("b", server.base + b))
        assert issubclass(RemoteReadError, OSError)
        for path in (a, b):
            got = ing.read(Shard("s", server.base + path))
            want = ing.read(Shard("s", str(local / os.path.basename(path))))
            assert (
                got.table.equals(want.table) and got.table.num_rows == truth[os.path.basename(path)]
            )
            assert got.extra == want.extra and not got.quarantine
        gone = ing.read(Shard("g", f"{server.base}/{CRAWL}/gone.warc.wat.gz"))
        assert [q["reason"] for q in gone.quarantine] == ["missing_file"]
    finally:
        server.fail_first = {}
