"""`curation filter centroids` on Ray: the centroids equal the in-process run's (which
tests/unit/test_centroids.py checks against a direct faiss run of DataComp's `train_kmeans` on
the rows its `caption_filter` keeps), and `filter apply` takes them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.flows.centroids import build_centroids
from curation.io import datacomp
from curation.stages.filters.image_based import load_training_embeddings, train_pool_centroids

from .conftest import run_cli
from .test_filter_ray import make_pool

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("centroid_pool")
    return folder, make_pool(folder, shards=3, rows=300, seed=4)


@pytest.mark.parametrize("ratio", [None, 0.5])
def test_centroids_equal_reference(pool, tmp_path, ray_cluster, ratio):
    folder, urls = pool
    out = str(tmp_path / "c.npy")
    rec = build_centroids([str(folder)], out, k=6, sample_ratio=ratio, seed=3)
    # in this process, shard after shard: bit-equal to a direct faiss run (tests/unit)
    x = load_training_embeddings(urls, sample_ratio=ratio, seed=3)
    np.testing.assert_array_equal(
        np.load(out), train_pool_centroids(urls, 6, sample_ratio=ratio, seed=3)
    )
    assert rec["training_rows"] == len(x) and rec["rows_read"] == 900
    assert 0 < rec["rows_caption_passed"] < 900  # the OTHER captions are filtered out
    on_disk = json.loads((tmp_path / "c.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert [r["rows"] for r in on_disk["inputs"]] == [300, 300, 300]


def test_scored_output_uses_image_embedding_column(pool, tmp_path, ray_cluster):
    """`curation score` output: Parquet with an `image_embedding` column, no `.npz`."""
    _, urls = pool
    for i, url in enumerate(urls):
        t = datacomp.read_shard(url, columns=["uid", "text"], embeddings=["l14_img"])
        emb = datacomp.embedding_matrix(t, "l14_img", dtype=np.float16)
        t = t.drop_columns(["l14_img"]).append_column(
            "image_embedding", datacomp.embedding_column(emb, "image_embedding")
        )
        pq.write_table(t, str(tmp_path / f"part-{i}.parquet"))
    out = str(tmp_path / "c.npy")
    rec = build_centroids([str(tmp_path / "part-*.parquet")], out, k=4, seed=0)
    assert rec["key"] == "image_embedding"
    np.testing.assert_array_equal(np.load(out), train_pool_centroids(urls, 4, seed=0))


def test_cli_centroids_then_image_based_filter(pool, tmp_path, ray_cluster):
    folder, urls = pool
    c = tmp_path / "assets" / "centroids.npy"
    proc = run_cli(
        ["filter", "centroids", folder, "-o", c, "--k", 8, "--address", ray_cluster, "--quiet"]
    )
    assert "centroids:" in proc.stdout and "(8, 16) float32" in proc.stdout
    centroids = np.load(c)
    target = tmp_path / "target.npy"
    np.save(target, centroids[:2] + 0.01)  # targets near two of the clusters
    out = tmp_path / "image_based"
    run_cli(
        [
            "filter", folder, "--baseline", "image_based", "--centroids", c,
            "--target-embeddings", target, "-o", out, "--address", ray_cluster, "--quiet",
        ]
    )  # fmt: skip
    s = json.loads((out / "manifest.json").read_text())["summary"]
    assert s["rows_read"] == 900 and 0 < s["rows_written"] < 900
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())


def test_cli_bad_arguments_fail_before_work(pool, tmp_path):
    folder, _ = pool
    bad = run_cli(["filter", "centroids", folder, "-o", tmp_path / "c.pt", "--k", 2], check=False)
    assert bad.returncode == 2 and "name a .npy file" in bad.stderr
    bad = run_cli(
        ["filter", "centroids", folder, "-o", tmp_path / "c.npy", "--k", 2, "--lid-model", "nope"],
        check=False,
    )
    assert bad.returncode == 2 and "--lid-model nope: no such file" in bad.stderr
    assert not (tmp_path / "c.npy").exists()


def test_too_few_rows_is_a_clear_error(pool, tmp_path, ray_cluster):
    folder, _ = pool
    with pytest.raises(ValueError, match="at least k=5000 training embeddings"):
        build_centroids([str(folder)], str(tmp_path / "c.npy"), k=5000)
    assert not (tmp_path / "c.npy").exists()
    with pytest.raises(FileNotFoundError, match="matched no files"):
        build_centroids([str(tmp_path)], str(tmp_path / "c.npy"), k=2)
