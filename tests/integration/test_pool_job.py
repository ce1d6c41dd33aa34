"""Jobs on a pool: DataComp filters composed with `and` / `or`, MetaCLIP balancing before or
after them, end to end on the session Ray cluster, each compared with the pieces applied one by
one (`run_filter` per baseline, and a local no-Ray reference for matching and balancing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from curation.config.job import parse_job
from curation.core.metadata import load_metadata
from curation.flows.filter import run_filter
from curation.flows.job import run_job
from curation.flows.status import status
from curation.io import datacomp
from curation.io.parts import ResumeError
from curation.stages.balance import Balancer, count_entries, entry_probabilities
from curation.stages.filters import (
    ImageBasedFilter,
    LanguageId,
    filter_from_params,
    global_threshold,
    make_filter,
    train_centroids,
)
from curation.stages.match import Matcher

from .conftest import read_parts, run_cli, tree_digest
from .test_filter_ray import DIM, make_pool

T, SEED = 4, 7
# Entries the pool's captions contain (test_filter_ray.EN / OTHER): heads ("a", "the") and tails.
ENTRIES = ["a", "the", "on", "red", "car", "street", "dogs", "park", "old", "stone", "bridge"]
ENTRIES += ["bread", "wooden", "table", "boat", "harbour", "sunset", "chat", "Hund", "Garten"]


@pytest.fixture(scope="module")
def pool_metadata(tmp_path_factory) -> str:
    from curation.core.metadata import write_metadata_json

    path = tmp_path_factory.mktemp("md") / "pool_metadata.json"
    write_metadata_json(ENTRIES, str(path))
    return str(path)


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    """A DataComp-layout pool (3 shards x 200 rows), its k-means centroids and a target file."""
    root = tmp_path_factory.mktemp("pooljob")
    (root / "pool").mkdir()
    urls = make_pool(root / "pool", seed=5)
    emb = np.concatenate(
        [
            datacomp.embedding_matrix(
                datacomp.read_shard(u, columns=["uid"], embeddings=["l14_img"]), "l14_img"
            )
            for u in urls
        ]
    )
    np.save(root / "centroids.npy", train_centroids(emb, 4, seed=0))
    np.save(root / "target.npy", np.eye(4, DIM, dtype=np.float16)[[1, 3]])
    return root, urls


def image_step(root: Path, **extra) -> dict:
    return {
        "baseline": "image_based",
        "centroids": str(root / "centroids.npy"),
        "target_embeddings": [str(root / "target.npy")],
        **extra,
    }


def job(name: str, steps: list[dict], combine: str, metadata: str | None, when: str | None, pool):
    spec = {
        "name": name,
        "seed": SEED,
        "input": {"pool": str(pool)},
        "filters": {"combine": combine, "steps": steps},
    }
    if metadata is not None:
        spec["metadata"] = metadata
        spec["balance"] = {"t": T, "when": when}
    return spec


def uids_of(folder: Path) -> list[str]:
    return read_parts(folder, ["uid"]).column("uid").to_pylist()


def filter_uids(filt, urls, out: Path) -> set[str]:
    """One piece: `curation filter` (run_filter) with one baseline; its kept uids."""
    run_filter(filt, urls, str(out), params={}, progress=False)
    return set(datacomp.pairs_to_uids(datacomp.load_uids(str(out / "uids.npy"))).tolist())


def reference_balance(tables: list[pa.Table], metadata: str) -> list[pa.Table]:
    """Matching, global counts and balancing without Ray, shard by shard."""
    md = load_metadata(metadata)
    m = Matcher(md.entries, engine="auto")
    m.setup()
    matched = [m.process(t) for t in tables]
    counts = sum(count_entries(t.column("entry_ids"), len(md)) for t in matched)
    probs = entry_probabilities(counts, T)
    return [Balancer(probs, SEED).process(t).table for t in matched]


def assert_reconciles(manifest: dict) -> None:
    flow = [s for s in manifest["flow"] if s != "count"]
    for stage in flow:
        s = manifest["stages"][stage]
        assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values()), stage
    for prev, nxt in zip(flow, flow[1:], strict=False):  # each stage reads what the last wrote
        assert manifest["stages"][nxt]["rows_read"] == manifest["stages"][prev]["rows_written"]
    assert manifest["stages"][flow[0]]["rows_read"] == 600


def test_and_filters_then_balance_equals_the_pieces(dc, tmp_path, pool_metadata):
    root, urls = dc
    steps = [
        image_step(root),
        {"baseline": "clip_score", "score_column": "clip_l14_similarity_score", "fraction": 0.3},
    ]
    spec = job("and_after", steps, "and", pool_metadata, "after", root / "pool")
    out = tmp_path / "job"
    m = run_job(parse_job(spec), str(out), progress=False)
    assert m["flow"] == ["filter", "match", "count", "balance"]
    assert_reconciles(m)

    # filter stage = image_based alone ∩ clip_score alone = DataComp's intersection baseline
    a = filter_uids(filter_from_params(**_p(steps[0])), urls, tmp_path / "a")
    b = filter_uids(filter_from_params(**_p(steps[1])), urls, tmp_path / "b")
    inter = make_filter(
        "image_based_intersect_clip_score",
        centroids=np.load(root / "centroids.npy"),
        target_embeddings=[str(root / "target.npy")],
        arch="l14",
        fraction=0.3,
    )
    i = filter_uids(inter, urls, tmp_path / "i")
    got = uids_of(out / "filter")
    assert set(got) == a & b == i and len(got) == len(set(got))
    assert 0 < len(got) < len(a) < 600 and len(got) < len(b)
    f = m["stages"]["filter"]
    assert f["combine"] == "and" and f["rows_dropped"]["clip_score_clip_score"] > 0
    assert f["steps"] == [
        {"name": "image_based", "rows_in": 600, "rows_kept": len(a), "rows_passed_alone": len(a)},
        {
            "name": "clip_score",
            "rows_in": len(a),
            "rows_kept": len(got),
            "rows_passed_alone": len(b),
        },
    ]
    scores = np.concatenate(
        [
            datacomp.read_shard(u, columns=["clip_l14_similarity_score"]).column(0).to_numpy()
            for u in urls
        ]
    )
    assert f["fit"]["clip_score"]["threshold"] == -np.sort(-scores)[int(600 * 0.3)]

    # balancing counts only the filtered rows
    pool = [datacomp.read_shard(u) for u in urls]
    filtered = [
        t.append_column("pool_row", pa.array(np.arange(t.num_rows, dtype=np.int64))).filter(
            pc.is_in(t.column("uid"), pa.array(sorted(a & b)))
        )
        for t in pool
    ]
    want = pa.concat_tables(reference_balance(filtered, pool_metadata))
    curated = read_parts(out / "balance")
    assert curated.column_names == [*pool[0].column_names, "pool_row", "entry_ids"]
    assert curated.equals(want)
    assert 0 < curated.num_rows < len(got)
    assert m["stages"]["count"]["matches"] == int(
        pc.sum(pc.list_value_length(read_parts(out / "match").column("entry_ids"))).as_py()
    )
    # the DataComp uid file of the curated rows, and the report of the balancing
    assert datacomp.pairs_to_uids(datacomp.load_uids(str(out / "uids.npy"))).tolist() == sorted(
        want.column("uid").to_pylist()
    )
    assert m["outputs"]["curated"] == str(out / "balance")
    assert m["outputs"]["uid_count"] == want.num_rows
    assert (out / "report" / "summary.json").exists()

    # a rerun redoes nothing and writes the same bytes
    digest = tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    assert run_job(parse_job(spec), str(out), progress=False) == m
    assert tree_digest(out) == digest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")} == mtimes
    st = status(str(out))
    assert st["complete"] and st["stages"]["filter"] == {"done": 3}
    assert st["stages"]["balance"]["done"] == 3
    # a changed step refuses to reuse the filter stage
    changed = json.loads(json.dumps(spec))
    changed["filters"]["steps"][1]["fraction"] = 0.2
    with pytest.raises(ResumeError, match="filter.*--overwrite"):
        run_job(parse_job(changed), str(out), progress=False)
    assert tree_digest(out) == digest


def _p(step: dict) -> dict:
    return {
        "baseline": step["baseline"],
        "params": {k: v for k, v in step.items() if k != "baseline"},
    }


def test_balance_then_or_filters_equals_the_pieces(dc, tmp_path, pool_metadata):
    root, urls = dc
    steps = [
        image_step(root, name="ib", assign_rule="l2"),
        {
            "baseline": "clip_score",
            "score_column": "clip_l14_similarity_score",
            "fraction": 0.2,
            "threshold_mode": "exact",
        },
    ]
    spec = job("or_before", steps, "or", pool_metadata, "before", root / "pool")
    out = tmp_path / "job"
    m = run_job(parse_job(spec), str(out), progress=False)
    assert m["flow"] == ["match", "count", "balance", "filter"]
    assert_reconciles(m)

    # balance the whole pool first; then the filters see (and fit on) the balanced rows only
    pool = [
        t.append_column("pool_row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        for t in (datacomp.read_shard(u, embeddings=["l14_img"]) for u in urls)
    ]
    balanced = reference_balance(pool, pool_metadata)
    assert read_parts(out / "balance").equals(
        pa.concat_tables([t.drop_columns(["l14_img"]) for t in balanced])
    )
    ib = ImageBasedFilter(
        np.load(root / "centroids.npy"),
        target_embeddings=[str(root / "target.npy")],
        rule="l2",
        language=LanguageId(),
    )
    ib.setup()
    threshold = global_threshold(
        [t.column("clip_l14_similarity_score") for t in balanced], 0.2, mode="exact"
    )
    want = []
    for t in balanced:
        keep = ib.keep(t) | (
            t.column("clip_l14_similarity_score").to_numpy(zero_copy_only=False) >= threshold
        )
        want.append(t.drop_columns(["l14_img"]).filter(pa.array(keep)))
    want_t = pa.concat_tables(want)
    got = read_parts(out / "filter")
    assert got.equals(want_t) and 0 < got.num_rows < m["stages"]["balance"]["rows_written"]
    # pool_row points at the row of the pool shard the embedding came from
    for t in want:
        shard = int(t.column("uid")[0].as_py()[:8], 16) if t.num_rows else 0
        rows = t.column("pool_row").to_numpy()
        assert t.column("uid").to_pylist() == pool[shard].column("uid").take(rows).to_pylist()

    f = m["stages"]["filter"]
    n_in = m["stages"]["balance"]["rows_written"]
    assert f["fit"]["clip_score"]["threshold"] == threshold
    assert f["combine"] == "or" and f["rows_dropped"] == {"any_step": n_in - got.num_rows}
    ib_kept = sum(int(ib.keep(t).sum()) for t in balanced)
    s_ib, s_clip = f["steps"]
    assert s_ib == {
        "name": "ib",
        "rows_in": n_in,
        "rows_kept": ib_kept,
        "rows_passed_alone": ib_kept,
    }
    assert s_clip["rows_in"] == n_in - ib_kept
    assert s_ib["rows_kept"] + s_clip["rows_kept"] == got.num_rows
    assert s_clip["rows_passed_alone"] == sum(
        int((t.column("clip_l14_similarity_score").to_numpy() >= threshold).sum()) for t in balanced
    )


def test_filter_only_job_from_the_cli(dc, tmp_path, ray_cluster):
    root, urls = dc
    steps = [{"baseline": "clip_score", "arch": "b32", "threshold": 0.3}]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job("clip_only", steps, "and", None, None, root / "pool")))
    out = tmp_path / "out"
    proc = run_cli(["run", path, "-o", out, "--address", ray_cluster, "--quiet"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["flow"] == ["filter"] and "balance" not in m["stages"]
    assert "run clip_only: pool 600 → filter (clip_score)" in proc.stdout
    assert f"uids:     {out}/uids.npy" in proc.stdout
    want = filter_uids(make_filter("clip_score", arch="b32", threshold=0.3), urls, tmp_path / "p")
    assert set(uids_of(out / "filter")) == want
    assert m["outputs"]["uid_count"] == len(want) == m["stages"]["filter"]["rows_written"]


def test_bad_filter_specs_fail_before_any_work(dc, tmp_path, pool_metadata):
    root, _ = dc
    out = tmp_path / "never"
    missing = job(
        "x",
        [image_step(root) | {"centroids": str(root / "nope.npy")}],
        "and",
        None,
        None,
        root / "pool",
    )
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        run_job(parse_job(missing), str(out), progress=False)
    wrong_column = job(
        "x",
        [{"baseline": "clip_score", "score_column": "clip_score", "fraction": 0.3}],
        "and",
        pool_metadata,
        "before",
        root / "pool",
    )
    with pytest.raises(ValueError, match="lacks \\['clip_score'\\].*clip_l14_similarity_score"):
        run_job(parse_job(wrong_column), str(out), progress=False)
    wrong_key = job(
        "x", [image_step(root, embedding_key="l14_txt")], "or", None, None, root / "pool"
    )
    with pytest.raises(ValueError, match="l14_txt"):
        run_job(parse_job(wrong_key), str(out), progress=False)
    assert not out.exists()


def test_scored_folder_job_keeps_uids_and_skips_the_uid_file(tmp_path, pool_metadata):
    from .test_filter_ray import make_scored

    folder = tmp_path / "scored"
    folder.mkdir()
    _, scores, _ = make_scored(folder)
    steps = [{"baseline": "clip_score", "score_column": "clip_score", "fraction": 0.5}]
    out = tmp_path / "job"
    m = run_job(
        parse_job(job("scored", steps, "and", pool_metadata, "after", folder)),
        str(out),
        progress=False,
    )
    assert m["flow"] == ["filter", "match", "count", "balance"]
    assert m["stages"]["filter"]["rows_read"] == 100
    assert m["stages"]["filter"]["rows_written"] == int((scores >= np.sort(scores)[::-1][50]).sum())
    curated = read_parts(out / "balance")
    assert curated.num_rows == m["stages"]["balance"]["rows_written"] > 0
    assert all(len(u) == 24 for u in curated.column("uid").to_pylist())  # kept as given
    assert curated.schema.field("image_embedding").type == pa.list_(pa.float16(), DIM)
    assert m["outputs"]["uids"] is None and "not 32 hex digits" in m["outputs"]["uid_file_skipped"]
    assert not (out / "uids.npy").exists()
    assert sorted(p.name for p in (out / "filter").glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
