"""DataComp's `image_based_clustering.py` in this process (`stages.filters.image_based`), on CPU
faiss, against a direct faiss run of its `train_kmeans`; the Ray flow is tested in
`tests/integration/test_centroids_ray.py`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.io import datacomp
from curation.stages.filters.image_based import (
    load_training_embeddings,
    sample_rows,
    shard_training_embeddings,
    train_centroids,
    train_pool_centroids,
)

faiss = pytest.importorskip("faiss")

DIM = 8
# (caption, kept by DataComp's caption_filter: English, > 1 fastText token, > 5 chars)
CAPTIONS = [
    ("a photo of a dog", True),
    ("deux chiens noirs", False),  # not English
    ("photograph", False),  # 1 token
    ("a b c", False),  # 3 tokens but 5 characters
    ("hello\nworld", True),  # a newline is one more token, 11 characters
    ("red car", True),  # 2 tokens, 7 characters
    ("", False),
    ("two  cats  asleep", True),
]
FRENCH = {"deux chiens noirs"}


def stub_language(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Language id by lookup, independent of the fastText model."""
    return np.array(["fr" if t in FRENCH else "en" for t in texts.to_pylist()], dtype=object)


def reference_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """`train_kmeans` of DataComp's script, with a CPU flat index in place of the GPU one."""
    d = x.shape[1]
    cluster = faiss.Clustering(d, k)
    cluster.niter = 20
    cluster.seed = seed
    cluster.max_points_per_centroid = 10000000
    cluster.train(np.ascontiguousarray(x, dtype=np.float32), faiss.IndexFlatL2(d))
    return faiss.vector_float_to_array(cluster.centroids).reshape(k, d)


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_pool(root, shards: int = 3, repeat: int = 6) -> tuple[list[str], np.ndarray]:
    """DataComp-layout shards (Parquet + `.npz` `l14_img` float16); returns the urls and the
    float32 embeddings of the caption-passing rows, in shard order."""
    texts = [c for c, _ in CAPTIONS] * repeat
    keep = np.array([k for _, k in CAPTIONS] * repeat)
    urls, kept = [], []
    for s in range(shards):
        emb = unit_rows(len(texts), seed=s).astype(np.float16)
        url = str(root / f"{s:08d}.parquet")
        uids = [f"{s:016x}{i:016x}" for i in range(len(texts))]
        datacomp.write_shard(url, pa.table({"uid": uids, "text": texts}), {"l14_img": emb})
        urls.append(url)
        kept.append(emb.astype(np.float32)[keep])
    return urls, np.concatenate(kept)


def test_kmeans_equals_direct_faiss_run():
    x = unit_rows(2000, seed=1)
    got = train_centroids(x, 16, seed=3)
    assert got.dtype == np.float32 and got.shape == (16, DIM)
    np.testing.assert_array_equal(got, reference_kmeans(x, 16, seed=3))
    assert not np.array_equal(got, train_centroids(x, 16, seed=4))


def test_caption_prefilter_drops_non_english_short_captions(tmp_path):
    urls, kept = write_pool(tmp_path)
    x = load_training_embeddings(urls, "l14_img", language=stub_language)
    np.testing.assert_array_equal(x, kept)
    assert len(x) == 3 * 6 * sum(k for _, k in CAPTIONS)
    everything = load_training_embeddings(urls, "l14_img", caption_filtering=False)
    assert len(everything) == 3 * 6 * len(CAPTIONS)


def test_pool_centroids_equal_reference_and_count_per_shard(tmp_path):
    urls, kept = write_pool(tmp_path)
    got = train_pool_centroids(urls, 4, seed=0, language=stub_language)
    np.testing.assert_array_equal(got, reference_kmeans(kept, 4, seed=0))
    x, counts = shard_training_embeddings(urls[1], 1, language=stub_language, sample_ratio=0.5)
    passed = 6 * sum(k for _, k in CAPTIONS)
    assert counts == {"rows": 6 * len(CAPTIONS), "caption_passed": passed, "sampled": passed // 2}
    assert x.dtype == np.float32 and x.shape == (passed // 2, DIM)


def test_sampling_is_seeded_per_shard(tmp_path):
    urls, _ = write_pool(tmp_path)
    a = load_training_embeddings(urls, language=stub_language, sample_ratio=0.5, seed=7)
    b = load_training_embeddings(urls, language=stub_language, sample_ratio=0.5, seed=7)
    np.testing.assert_array_equal(a, b)
    per_shard = 6 * sum(k for _, k in CAPTIONS)
    assert len(a) == 3 * int(per_shard * 0.5)
    full = load_training_embeddings(urls, language=stub_language)
    first = full[:per_shard][sample_rows(per_shard, 0.5, 7, 0)]
    np.testing.assert_array_equal(a[: len(first)], first)


def test_too_few_rows_raise(tmp_path):
    urls, _ = write_pool(tmp_path, shards=1, repeat=1)
    with pytest.raises(ValueError, match="at least num_clusters=99"):
        train_pool_centroids(urls, 99, language=stub_language)
    with pytest.raises(ValueError, match="no shards"):
        load_training_embeddings([], language=stub_language)


def test_both_faiss_wheels_are_refused():
    from curation.stages.filters.image_based import check_one_faiss

    check_one_faiss(["numpy", "faiss-cpu"])
    check_one_faiss(["faiss_gpu_cu12"])
    with pytest.raises(RuntimeError, match="both faiss-cpu and faiss-gpu-cu12"):
        check_one_faiss(["faiss-cpu", "faiss_gpu_cu12"])
    check_one_faiss()  # this environment: one of them
