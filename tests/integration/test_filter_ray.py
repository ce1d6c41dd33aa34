"""`curation filter` on Ray equals the local two-pass reference, and its manifest reconciles."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from curation import datacomp
from curation.filter_run import run_filter
from curation.filters import filter_shards, make_filter, train_centroids

from .conftest import run_cli

DIM = 16
EN = [
    "a red car parked on the street",
    "two dogs playing in the park",
    "the old stone bridge",
    "fresh bread on a wooden table",
    "a small boat near the harbour at sunset",
]
OTHER = ["le chat dort sur le canapé", "der Hund spielt im Garten", "hi", "ok!!"]


def make_pool(folder, shards: int = 3, rows: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    urls = []
    for s in range(shards):
        texts = [
            (EN[i % len(EN)] if rng.random() < 0.7 else OTHER[i % len(OTHER)]) for i in range(rows)
        ]
        blobs = rng.integers(0, 4, rows)
        emb = np.eye(4, DIM)[blobs] + 0.05 * rng.standard_normal((rows, DIM))
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
        table = pa.table(
            {
                "uid": [f"{s:08x}{i:024x}" for i in range(rows)],
                "url": [f"http://img.example/{s}/{i}.jpg" for i in range(rows)],
                "text": texts,
                "original_width": pa.array(rng.integers(100, 800, rows), pa.int64()),
                "original_height": pa.array(rng.integers(100, 800, rows), pa.int64()),
                "clip_b32_similarity_score": pa.array(rng.uniform(0.1, 0.4, rows)),
                "clip_l14_similarity_score": pa.array(np.round(rng.uniform(0.1, 0.4, rows), 2)),
            }
        )
        url = str(folder / f"{s:08d}.parquet")
        datacomp.write_shard(url, table, {"l14_img": emb})
        urls.append(url)
    return urls


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dcpool")
    return folder, make_pool(folder)


@pytest.mark.parametrize(
    "name,params",
    [
        ("basic_filter", {}),
        ("clip_score", {"arch": "l14", "fraction": 0.3}),
        ("laion2b", {}),
    ],
)
def test_ray_filter_equals_local_reference(pool, tmp_path, name, params):
    folder, urls = pool
    want = filter_shards(make_filter(name, **params), urls)
    out = tmp_path / "out"
    s = run_filter(
        make_filter(name, **params), [str(folder)], str(out), params=params, progress=False
    )
    got = datacomp.load_uids(str(out / "uids.npy"))
    assert np.array_equal(got, want)
    assert 0 < len(got) < 600
    assert s["rows_read"] == 600
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["uid_count"] == len(want)
    if "fraction" in params:
        assert manifest["fit"]["threshold"] == pytest.approx(
            -np.sort(
                -np.concatenate(
                    [
                        datacomp.read_shard(u, columns=["clip_l14_similarity_score"])
                        .column(0)
                        .to_numpy()
                        for u in urls
                    ]
                )
            )[int(600 * 0.3)]
        )


def test_image_based_intersect_clip_score_on_ray(pool, tmp_path):
    folder, urls = pool
    emb = np.concatenate(
        [
            datacomp.embedding_matrix(
                datacomp.read_shard(u, columns=["uid"], embeddings=["l14_img"]), "l14_img"
            )
            for u in urls
        ]
    ).astype(np.float32)
    centroids = train_centroids(emb, 4, seed=0)
    target = np.eye(4, DIM)[[1]].astype(np.float32)  # one target blob
    params = {"centroids": centroids, "target_embeddings": [target], "arch": "l14", "fraction": 0.5}
    want = filter_shards(make_filter("image_based_intersect_clip_score", **params), urls)
    out = tmp_path / "ib"
    run_filter(
        make_filter("image_based_intersect_clip_score", **params),
        urls,
        str(out),
        params={"fraction": 0.5},
        progress=False,
    )
    got = datacomp.load_uids(str(out / "uids.npy"))
    assert np.array_equal(got, want) and len(got) > 0


def test_filter_cli(pool, tmp_path, ray_cluster):
    folder, _ = pool
    out = tmp_path / "cli"
    proc = run_cli(
        [
            "filter",
            str(folder),
            "--baseline",
            "clip_score",
            "--threshold",
            "0.3",
            "-o",
            str(out),
            "--address",
            ray_cluster,
            "--quiet",
        ]
    )
    assert "filter clip_score" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    s = m["summary"]
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values())
    assert set(s["rows_dropped"]) == {"clip_score"}
