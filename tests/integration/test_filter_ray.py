"""`curation filter` on Ray equals the local two-pass reference, and its manifest reconciles."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.flows.filter import run_filter
from curation.io import datacomp
from curation.stages.filters import filter_shards, make_filter, train_centroids

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


def captions_and_images(rng: np.random.Generator, rows: int) -> tuple:
    """70% English captions, and unit float16 image embeddings around 4 blobs (blob ids)."""
    texts = [
        (EN[i % len(EN)] if rng.random() < 0.7 else OTHER[i % len(OTHER)]) for i in range(rows)
    ]
    blobs = rng.integers(0, 4, rows)
    emb = np.eye(4, DIM)[blobs] + 0.05 * rng.standard_normal((rows, DIM))
    return texts, blobs, (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)


def make_pool(folder, shards: int = 3, rows: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    urls = []
    for s in range(shards):
        texts, _, emb = captions_and_images(rng, rows)
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
        assert manifest["fit"]["clip_score"]["threshold"] == pytest.approx(
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


# -- text_based on Ray -------------------------------------------------------------------------
# (caption, kept?) hand-checked: English (fastText) AND some `text.split()` word, lower-cased,
# has its first WordNet synset among the ImageNet-21k classes.
TEXT_BASED_ROWS = [
    ("A dog running on the beach at sunset", True),  # dog.n.01, beach.n.01
    ("Two cars parked outside the old station", True),  # cars -> car.n.01
    ("A beautiful red sunset over the sea", False),  # no such word
    ("Ein Hund läuft am Strand entlang", False),  # German
    ("Le chat dort sur le canapé du salon", False),  # French ("salon" would count)
    ("A flock of geese flying over the lake", True),  # geese -> goose.n.01 (noun.exc)
    ("Close up of an acoustic guitar on a wooden table", True),  # guitar.n.01
    ("hello world, have a nice day", True),  # have.n.01, "a person who possesses wealth"
    ("dog.", False),  # str.split() keeps the period: "dog." has no synset
    ("Portrait of a smiling woman in the city", True),  # woman.n.01, city.n.01
    ("Abstract background with colorful lines", False),
]


def test_text_based_on_ray_hand_checked(tmp_path):
    folder = tmp_path / "pool"
    urls = []
    for s, rows in enumerate((TEXT_BASED_ROWS[:6], TEXT_BASED_ROWS[6:])):
        n = len(rows)
        table = pa.table(
            {
                "uid": [f"{s:016x}{i:016x}" for i in range(n)],
                "url": [f"http://img.example/{s}/{i}.jpg" for i in range(n)],
                "text": [r[0] for r in rows],
            }
        )
        url = str(folder / f"{s:08d}.parquet")
        datacomp.write_shard(url, table, {})
        urls.append(url)
    out = tmp_path / "out"
    s = run_filter(make_filter("text_based"), [str(folder)], str(out), params={}, progress=False)
    want = sorted(
        f"{si:016x}{i:016x}"
        for si, rows in enumerate((TEXT_BASED_ROWS[:6], TEXT_BASED_ROWS[6:]))
        for i, (_, keep) in enumerate(rows)
        if keep
    )
    assert datacomp.pairs_to_uids(datacomp.load_uids(str(out / "uids.npy"))).tolist() == want
    assert s["rows_read"] == 11 and s["rows_written"] == 6
    assert s["rows_dropped"] == {"english": 2, "imagenet21k_word": 3}
    assert s["steps"] == [
        {"name": "text_based", "rows_in": 11, "rows_kept": 6, "rows_passed_alone": 6}
    ]


# -- our scored output as input ----------------------------------------------------------------
def make_scored(folder, shards: int = 2, rows: int = 50, seed: int = 3):
    """A `curation score` output folder: part-<shard>.parquet with 24-hex uids, clip_score and
    fixed_size_list<float16> embedding columns, no .npz (plus the run files beside them)."""
    from curation.core import fsio

    rng = np.random.default_rng(seed)
    blobs, scores, texts = [], [], []
    for s in range(shards):
        text, blob, img = captions_and_images(rng, rows)
        txt = rng.standard_normal((rows, DIM)).astype(np.float16)
        score = np.round(rng.uniform(0.1, 0.4, rows), 3).astype(np.float32)
        table = pa.table(
            {
                "uid": [f"{s:04x}{i:020x}" for i in range(rows)],
                "key": [f"{s:05d}{i:04d}" for i in range(rows)],
                "url": [f"http://img.example/{s}/{i}.jpg" for i in range(rows)],
                "text": text,
                "original_width": pa.array(rng.integers(100, 800, rows), pa.int32()),
                "original_height": pa.array(rng.integers(100, 800, rows), pa.int32()),
                "clip_score": pa.array(score, pa.float32()),
                "image_embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(img.reshape(-1)), DIM
                ),
                "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), DIM),
            }
        )
        fsio.atomic_write_parquet(str(folder / f"part-{s:05d}.parquet"), table)
        fsio.atomic_write_json(str(folder / "_done" / f"{s:05d}.json"), {"shard": s})
        blobs.append(blob)
        scores.append(score)
        texts += text
    fsio.atomic_write_json(str(folder / "manifest.json"), {"stage": "score"})
    return np.concatenate(blobs), np.concatenate(scores), texts


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scored")
    return (folder, *make_scored(folder))


def read_out(out):
    import pyarrow.parquet as pq

    parts = sorted(out.glob("part-*.parquet"))
    return [p.name for p in parts], pa.concat_tables([pq.read_table(p) for p in parts])


def test_scored_output_clip_score_cli(scored, tmp_path, ray_cluster):
    import pyarrow.parquet as pq

    folder, _, scores, _ = scored
    out = tmp_path / "clip30"
    proc = run_cli(
        [
            "filter",
            str(folder),
            "--baseline",
            "clip_score",
            "--score-column",
            "clip_score",
            "--fraction",
            "0.3",
            "-o",
            str(out),
            "--address",
            ray_cluster,
            "--quiet",
        ]
    )
    # DataComp's rule over all 100 rows: t = the 31st largest score, kept: score >= t
    t = -np.sort(-scores.astype(np.float64))[int(100 * 0.3)]
    want = [f"{i // 50:04x}{i % 50:020x}" for i in np.flatnonzero(scores >= t)]
    names, got = read_out(out)
    assert names == ["part-00000.parquet", "part-00001.parquet"]  # not part-part-...
    assert got.column("uid").to_pylist() == want and len(want) >= 30
    # the subset keeps the input's columns and types, embeddings included, uids as given
    assert got.schema == pq.read_schema(folder / "part-00000.parquet")
    m = json.loads((out / "manifest.json").read_text())
    assert m["fit"]["clip_score"]["threshold"] == pytest.approx(t)
    assert m["fit"]["clip_score"]["column"] == "clip_score"
    assert not (out / "uids.npy").exists()
    assert m["outputs"]["uids"] is None and m["outputs"]["uid_count"] is None
    assert m["outputs"]["uid_file_skipped"].startswith(
        f"{len(want)} of {len(want)} uids in {out} are not 32 hex digits"
    )
    assert "no uids.npy" in proc.stdout


def test_scored_output_image_based_on_parquet_embeddings(scored, tmp_path):
    folder, blobs, _, texts = scored
    np.save(tmp_path / "centroids.npy", np.eye(4, DIM, dtype=np.float32))
    np.save(tmp_path / "target.npy", np.eye(4, DIM, dtype=np.float16)[[1]])
    filt = make_filter_from_cli_names(
        "image_based",
        centroids=str(tmp_path / "centroids.npy"),
        target_embeddings=[str(tmp_path / "target.npy")],
        embedding_key="image_embedding",
    )
    out = tmp_path / "ib"
    s = run_filter(filt, [str(folder)], str(out), params={}, progress=False)
    # caption filter: the EN captions pass (English, > 1 token, > 5 chars), OTHER ones do not;
    # the image embedding sits near axis `blob`, the target's cluster is 1
    want = [f"{i // 50:04x}{i % 50:020x}" for i in range(100) if texts[i] in EN and blobs[i] == 1]
    _, got = read_out(out)
    assert got.column("uid").to_pylist() == want and 0 < len(want) < 100
    assert "image_embedding" in got.column_names and "pool_row" not in got.column_names
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values()) == 100


def make_filter_from_cli_names(baseline, **params):
    from curation.stages.filters import filter_from_params

    return filter_from_params(baseline, params)


@pytest.mark.parametrize(
    "params,threshold",
    [
        ({"arch": "l14", "fraction": 1.0, "threshold_mode": "exact"}, "-inf"),  # keep all scored
        ({"arch": "l14", "fraction": 0.9}, "nan"),  # DataComp: index n on a NaN keeps nothing
    ],
)
def test_null_scores_fit_and_the_same_job_resumes(tmp_path, params, threshold):
    folder = tmp_path / "pool"
    folder.mkdir()
    urls = make_pool(folder, shards=2, rows=20, seed=3)
    scored = 0
    for u in urls:  # a null score in every 4th row
        t = pq.read_table(u)
        col = t.column("clip_l14_similarity_score").to_numpy()
        nulls = np.arange(t.num_rows) % 4 == 0
        scores = pa.array(col, mask=nulls)
        pq.write_table(
            t.set_column(
                t.column_names.index("clip_l14_similarity_score"),
                "clip_l14_similarity_score",
                scores,
            ),
            u,
        )
        scored += int((~nulls).sum())
    out = tmp_path / "out"
    runs = [
        run_filter(
            make_filter("clip_score", **params), urls, str(out), params=params, progress=False
        )
        for _ in range(2)  # the second run finds every shard done: no "changed: fit"
    ]
    want = scored if threshold == "-inf" else 0
    assert [s["rows_written"] for s in runs] == [want, want]
    assert runs[0]["fit"] == runs[1]["fit"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["clip_score"]["threshold"] == threshold
    assert "NaN" not in (out / "_stage.json").read_text()
