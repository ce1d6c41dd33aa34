"""DataComp's image-based baseline: k-means clusters of image embeddings near a target set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from curation.io import datacomp
from curation.stages.filters.base import (
    Filter,
    LanguageFn,
    Scores,
    caption_char_count,
    fasttext_token_count,
)
from curation.stages.filters.language import LanguageId

# --------------------------------------------------------------------------------------------
# Image-based clustering


def assign_centroids(
    embeddings: np.ndarray, centroids: np.ndarray, rule: str = "ip", batch_size: int = 4096
) -> np.ndarray:
    """Index of each embedding's centroid, in batches (float32).

    `rule="ip"` is DataComp's rule (`get_centroid_ids_gpu` in `apply_filter.py`,
    `get_cluster_labels` in `utils.py`): `argmax_j <x, c_j>` with neither side normalized,
    although the centroids come from L2 k-means. `rule="l2"` is the nearest centroid in L2
    (`argmax_j <x, c_j> - |c_j|^2 / 2`), k-means' own rule. Ties go to the lowest index.
    """
    if rule not in ("ip", "l2"):
        raise ValueError(f"rule must be 'ip' or 'l2', got {rule!r}")
    x = np.asarray(embeddings, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"embeddings {x.shape} and centroids {c.shape} must be (n, d) and (k, d)")
    bias = -0.5 * np.einsum("ij,ij->i", c, c) if rule == "l2" else None
    out = np.empty(len(x), dtype=np.int64)
    ct = np.ascontiguousarray(c.T)
    for i in range(0, len(x), batch_size):
        sim = x[i : i + batch_size] @ ct
        if bias is not None:
            sim += bias
        out[i : i + batch_size] = np.argmax(sim, axis=1)
    return out


def target_centroid_ids(
    target_embeddings: np.ndarray | Sequence[np.ndarray], centroids: np.ndarray, rule: str = "ip"
) -> np.ndarray:
    """Sorted unique centroid ids of the target set (DataComp: ImageNet-1k L/14 image features).

    Mirrors `torch.unique(get_centroid_ids_gpu(target_embedding, pool_centroids, ...))` in
    `load_uids_with_image_filter`; several arrays (e.g. one per embedding file) are stacked.
    """
    if not isinstance(target_embeddings, np.ndarray):
        target_embeddings = np.concatenate([np.asarray(t) for t in target_embeddings])
    return np.unique(assign_centroids(target_embeddings, centroids, rule))


def sample_rows(n: int, ratio: float | None, seed: int, shard_index: int = 0) -> np.ndarray:
    """Row indices of one shard drawn for k-means training; all rows when `ratio` is None.

    DataComp (`load_embedding_helper` in `image_based_clustering.py`) draws
    `int(n * ratio)` rows with replacement via `np.random.choice`; so does this, but from a
    generator seeded by `(seed, shard_index)`, so the sample does not depend on worker order.
    """
    if ratio is None or ratio <= 0:
        return np.arange(n)
    rng = np.random.default_rng([seed, shard_index])
    return rng.choice(n, size=int(n * ratio), replace=True) if n else np.arange(0)


#: DataComp's setting: larger than any sample, so faiss trains on every point given.
MAX_POINTS_PER_CENTROID = 10_000_000


def check_one_faiss(installed: Sequence[str] | None = None) -> None:
    """Refuse an environment with both faiss-cpu and a faiss-gpu wheel: they install the same
    `faiss` module over each other, and which one imports is an accident of install order."""
    if installed is None:
        from importlib import metadata

        installed = [d.metadata["Name"] or "" for d in metadata.distributions()]
    names = {n.lower().replace("_", "-") for n in installed}
    gpu = sorted(n for n in names if n.startswith("faiss-gpu"))
    if "faiss-cpu" in names and gpu:
        raise RuntimeError(
            f"both faiss-cpu and {', '.join(gpu)} are installed (the same `faiss` module); "
            f"pip uninstall -y faiss-cpu {' '.join(gpu)}, then install one: curation[filters] "
            "on CPU nodes, curation[gpu] on GPU nodes"
        )


def _flat_l2_index(faiss: Any, d: int, gpus: bool) -> Any:
    """An exact L2 index: replicated over all the GPUs faiss sees (float32, as DataComp's
    `IndexReplicas` of `GpuIndexFlatL2`) when `gpus`, else on the CPU."""
    index = faiss.IndexFlatL2(d)
    if gpus and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # pragma: no cover
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = False
        co.shard = False
        index = faiss.index_cpu_to_all_gpus(index, co)
    return index


def train_centroids(
    embeddings: np.ndarray,
    num_clusters: int,
    seed: int = 0,
    niter: int = 20,
    gpus: bool = True,
) -> np.ndarray:
    """k-means centroids `(num_clusters, d)` float32 with faiss, as DataComp trains them.

    Mirrors `train_kmeans` in `baselines/image_based_clustering.py`: `faiss.Clustering` with
    `niter=20`, `seed`, `max_points_per_centroid=10_000_000` (faiss sub-samples nothing) and an
    exact L2 flat index, on every GPU faiss sees (faiss-gpu) unless `gpus=False`, else on the
    CPU. The embeddings are used as given (not normalized, not spherical), cast to float32.
    """
    check_one_faiss()
    try:
        import faiss
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "k-means needs faiss: pip install 'curation[filters]' (CPU) or 'curation[gpu]'"
        ) from e
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < num_clusters:
        raise ValueError(
            f"need at least num_clusters={num_clusters} training embeddings, got shape "
            f"{x.shape}; lower the number of clusters, use more shards or a larger sample ratio"
        )
    d = x.shape[1]
    cluster = faiss.Clustering(d, num_clusters)
    cluster.verbose = False
    cluster.niter = niter
    cluster.seed = seed
    cluster.max_points_per_centroid = MAX_POINTS_PER_CENTROID
    cluster.train(x, _flat_l2_index(faiss, d, gpus))
    return faiss.vector_float_to_array(cluster.centroids).reshape(num_clusters, d).copy()


def caption_filter(texts: pa.Array | pa.ChunkedArray, language: LanguageFn) -> np.ndarray:
    """DataComp's `caption_filter` (`apply_filter.py`): English, > 1 fastText token, > 5 chars."""
    return (
        (language(texts) == "en")
        & (fasttext_token_count(texts) > 1)
        & (caption_char_count(texts) > 5)
    )


def shard_training_embeddings(
    url: str,
    shard_index: int,
    key: str = "l14_img",
    caption_filtering: bool = True,
    language: LanguageFn | None = None,
    sample_ratio: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, int]]:
    """One shard's share of the k-means training set, as DataComp's `load_embedding_helper`
    selects it: the float32 embeddings `key` of the rows passing `caption_filter` (unless
    `caption_filtering=False`), then `sample_rows(…, seed, shard_index)`; with the counts
    `rows`, `caption_passed` and `sampled`. `language` must be set up already."""
    table = datacomp.read_shard(
        url, columns=["text"] if caption_filtering else [], embeddings=[key]
    )
    emb = datacomp.embedding_matrix(table, key)
    rows = len(emb)
    if caption_filtering:
        lang = language if language is not None else LanguageId()
        emb = emb[caption_filter(table.column("text"), lang)]
    sample = emb[sample_rows(len(emb), sample_ratio, seed, shard_index)]
    counts = {"rows": rows, "caption_passed": len(emb), "sampled": len(sample)}
    return np.ascontiguousarray(sample, dtype=np.float32), counts


def load_training_embeddings(
    shard_urls: Sequence[str],
    key: str = "l14_img",
    caption_filtering: bool = True,
    language: LanguageFn | None = None,
    sample_ratio: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The float32 `(rows, d)` k-means training set of `shard_urls`, in this process:
    `shard_training_embeddings` of each shard, stacked in shard order."""
    if caption_filtering:
        language = language if language is not None else LanguageId()
        getattr(language, "setup", lambda: None)()
    parts = [
        shard_training_embeddings(u, i, key, caption_filtering, language, sample_ratio, seed)[0]
        for i, u in enumerate(shard_urls)
    ]
    if not parts:
        raise ValueError("no shards to read: give a pool folder or .parquet files")
    return np.concatenate(parts)


def train_pool_centroids(
    shard_urls: Sequence[str],
    num_clusters: int,
    key: str = "l14_img",
    sample_ratio: float | None = None,
    seed: int = 0,
    caption_filtering: bool = True,
    language: LanguageFn | None = None,
    niter: int = 20,
) -> np.ndarray:
    """k-means centroids of a pool's image embeddings, as DataComp's clustering script makes
    them, in this process: `load_training_embeddings`, then `train_centroids`. All sampled rows
    are held in memory (rows x dim x 4 bytes); `curation filter centroids`
    (`curation.flows.centroids`) reads the shards on Ray tasks instead."""
    x = load_training_embeddings(shard_urls, key, caption_filtering, language, sample_ratio, seed)
    return train_centroids(x, num_clusters, seed=seed, niter=niter)


class ImageBasedFilter(Filter):
    """DataComp `image_based`: caption filter, then keep rows in a target-set cluster.

    Mirrors `image_filter_helper` and `caption_filter` in `apply_filter.py`: fastText English,
    more than 1 fastText token (`len(fasttext.tokenize(text)) > 1`; note: not the basic
    filter's `> 2` words, and each newline counts as a `</s>` token), more than 5 characters;
    no image-size test. Each pool embedding (`key`, DataComp: `l14_img`) is assigned to a
    centroid by `assign_centroids` (`rule`), and the row is kept when its centroid is the
    centroid of at least one target embedding. `centroids` are the pool's k-means centroids
    (`train_centroids`, `train_pool_centroids`); give the targets as `target_embeddings` (arrays
    or `.npy`/`.npz` URLs, any number of files; DataComp: ImageNet-1k train L/14 image
    features) or as precomputed `target_ids`.
    """

    name = "image_based"

    def __init__(
        self,
        centroids: np.ndarray,
        target_embeddings: np.ndarray | str | Sequence[np.ndarray | str] | None = None,
        target_ids: np.ndarray | None = None,
        key: str = "l14_img",
        language: LanguageFn | None = None,
        rule: str = "ip",
        batch_size: int = 4096,
    ) -> None:
        if (target_embeddings is None) == (target_ids is None):
            raise ValueError("give exactly one of target_embeddings= or target_ids=")
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self._target_embeddings = target_embeddings
        self.target_ids = None if target_ids is None else np.unique(np.asarray(target_ids))
        self.key = key
        self.columns = ("text", key)
        self.language = language if language is not None else LanguageId()
        self.rule = rule
        self.batch_size = batch_size

    @property
    def embedding_columns(self) -> tuple[str, ...]:
        """The pool image embeddings (`key`)."""
        return (self.key,)

    def _target_list(self) -> list[np.ndarray | str]:
        targets = self._target_embeddings
        if targets is None:
            return []
        return [targets] if isinstance(targets, (str, np.ndarray)) else list(targets)

    def assets(self) -> dict[str, str]:
        """The language model's file, and the target embedding files while `prepare` has not
        mapped them to centroid ids (the centroids are arrays: they travel with the filter)."""
        out = super().assets()
        if self.target_ids is None:
            for i, t in enumerate(self._target_list()):
                if isinstance(t, str):
                    out[f"target_embeddings/{i}"] = t
        return out

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Open the language model and the target embedding files at local copies."""
        super().use_assets(paths)
        targets = self._target_list()
        if any(f"target_embeddings/{i}" in paths for i in range(len(targets))):
            self._target_embeddings = [
                paths.get(f"target_embeddings/{i}", t) if isinstance(t, str) else t
                for i, t in enumerate(targets)
            ]

    def setup(self) -> None:
        """Load the language model and map the target embeddings to centroid ids (once)."""
        getattr(self.language, "setup", lambda: None)()
        self.prepare()

    def prepare(self) -> None:
        """Map the target embeddings to centroid ids (once, on the driver; drops the targets)."""
        if self.target_ids is None:
            arrays = [
                datacomp.load_embedding_file(t) if isinstance(t, str) else np.asarray(t)
                for t in self._target_list()
            ]
            self.target_ids = target_centroid_ids(arrays, self.centroids, self.rule)
            self._target_embeddings = None

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Language, fastText token and character counts, and the centroid of each row."""
        self._check_columns(table)
        text = table.column("text")
        emb = datacomp.embedding_matrix(table, self.key)
        return {
            "lang": self.language(text),
            "num_tokens": fasttext_token_count(text),
            "num_chars": caption_char_count(text),
            "centroid": assign_centroids(emb, self.centroids, self.rule, self.batch_size),
        }

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """english, caption_words, caption_chars, target_cluster."""
        if self.target_ids is None:
            self.setup()
        return {
            "english": scores["lang"] == "en",
            "caption_words": scores["num_tokens"] > 1,
            "caption_chars": scores["num_chars"] > 5,
            "target_cluster": np.isin(scores["centroid"], self.target_ids),
        }
