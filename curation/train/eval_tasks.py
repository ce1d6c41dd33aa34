"""Zero-shot evaluation on task folders in CLIP_benchmark's webdataset layout.

The layout (the one DataComp's 38-task evaluation downloads)::

    TASK/
        classnames.txt                          one class name per line (classification)
        zeroshot_classification_templates.txt   prompt templates with `{c}` (classification)
        dataset_type.txt                        optional: `classification` or `retrieval`
        test/*.tar                              `<key>.<jpg|png|webp>` + `<key>.cls` (int label)
                                                or + `<key>.txt` (captions, one per line)

Without `dataset_type.txt`, a task with `classnames.txt` is a classification task and one
without it a retrieval task. The metrics follow CLIP_benchmark:

- **classification**: per class, every template is embedded, each embedding L2-normalized, the
  mean taken and renormalized (the class weight); image embeddings are L2-normalized; logits are
  `100 · image @ W` in float32. `acc1`, `acc5` (top-k with k = min(5, classes)) and
  `mean_per_class_recall` (sklearn's balanced accuracy: the recall of each class that occurs in
  the labels, averaged).
- **retrieval**: `image_retrieval_recall@k` (text → image: a text is a hit when its image is in
  its top k images) and `text_retrieval_recall@k` (image → text: an image is a hit when any of
  its captions is in its top k texts), k = 1, 5, 10 (capped at the number of candidates).

Images are streamed tar by tar with the bounded reader of `curation.io.images`, decoded with the
model's own eval preprocessing and embedded in batches (`ClipScorer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.core import fsio

__all__ = [
    "KINDS",
    "EvalTask",
    "load_task",
    "classifier_weights",
    "classification_metrics",
    "retrieval_metrics",
    "iter_task_batches",
    "evaluate_task",
]

KINDS = ("classification", "retrieval")
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
#: CLIP_benchmark's image members, in its order of preference
IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")
RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalTask:
    """A parsed task folder: where it is, what kind, its test tars, class names, templates."""

    url: str
    name: str
    kind: str
    shards: tuple[str, ...]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()


def _read_lines(url: str) -> list[str]:
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    return [line.strip() for line in text.splitlines()]


def load_task(url: str) -> EvalTask:
    """Parse the task folder at `url` (any fsspec URL); one-line errors for what is missing."""
    url = url.rstrip("/")
    fs, path = fsio.url_to_fs(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"eval task {url}: no such folder")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    shards = tuple(
        fsio.full_url(fs, p) for p in sorted(fs.glob(f"{path}/test/*.tar")) if fs.isfile(p)
    )
    if not shards:
        raise FileNotFoundError(f"eval task {url}: no test/*.tar shards")
    kind_url = fsio.join(url, DATASET_TYPE)
    has_classes = fsio.exists(fsio.join(url, CLASSNAMES))
    if fsio.exists(kind_url):
        kind = "\n".join(_read_lines(kind_url)).strip().lower()
        if kind not in KINDS:
            raise ValueError(f"eval task {url}: {DATASET_TYPE} says {kind!r}; supported: {KINDS}")
    else:
        kind = "classification" if has_classes else "retrieval"
    if kind == "retrieval":
        return EvalTask(url, name, kind, shards)
    if not has_classes:
        raise FileNotFoundError(f"eval task {url}: a classification task without {CLASSNAMES}")
    classnames = tuple(c for c in _read_lines(fsio.join(url, CLASSNAMES)) if c)
    if not classnames:
        raise ValueError(f"eval task {url}: {CLASSNAMES} is empty")
    t_url = fsio.join(url, TEMPLATES)
    if not fsio.exists(t_url):
        raise FileNotFoundError(f"eval task {url}: a classification task without {TEMPLATES}")
    templates = tuple(t for t in _read_lines(t_url) if t)
    if not templates:
        raise ValueError(f"eval task {url}: {TEMPLATES} is empty")
    return EvalTask(url, name, kind, shards, classnames, templates)


# ---- metrics -------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def classifier_weights(
    embed_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """The zero-shot weights `(d, classes)`: per class, the templates' unit embeddings
    averaged and renormalized (`embed_texts` may return unnormalized embeddings)."""
    cols = []
    for c in classnames:
        e = _unit(embed_texts([t.replace("{c}", c) for t in templates])).mean(axis=0)
        cols.append(e / max(float(np.linalg.norm(e)), 1e-12))
    return np.stack(cols, axis=1).astype(np.float32)


def classification_metrics(logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """acc1, acc5 (k = min(5, classes)) and the mean per-class recall of `logits` `(n, C)`."""
    logits = np.asarray(logits, dtype=np.float32)
    target = np.asarray(target, dtype=np.int64)
    n, classes = logits.shape
    if n == 0:
        raise ValueError("no images to classify")
    k = min(5, classes)
    # stable ordering: ties broken by class index, as a descending argsort of -logits
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    pred = topk[:, 0]
    acc1 = float((pred == target).mean())
    acc5 = float((topk == target[:, None]).any(axis=1).mean())
    recalls = [float((pred[target == c] == c).mean()) for c in np.unique(target)]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(np.mean(recalls))}


def per_class_recall(logits: np.ndarray, target: np.ndarray, classes: int) -> list[float | None]:
    """Top-1 recall of each class index in [0, classes) (None for a class without images)."""
    pred = np.argsort(-np.asarray(logits, dtype=np.float32), axis=1, kind="stable")[:, 0]
    target = np.asarray(target, dtype=np.int64)
    total = np.bincount(target, minlength=classes)
    hit = np.bincount(target[pred == target], minlength=classes)
    return [float(h / t) if t else None for h, t in zip(hit.tolist(), total.tolist(), strict=True)]


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image: Sequence[int],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k both ways for unit embeddings; `text_image[j]` is the image of text j."""
    scores = np.asarray(text_emb, np.float32) @ np.asarray(image_emb, np.float32).T
    n_text, n_img = scores.shape
    if not n_text or not n_img:
        raise ValueError("no images or captions to retrieve")
    owner = np.asarray(text_image, dtype=np.int64)
    t_rank = np.argsort(-scores, axis=1, kind="stable")  # per text: images, best first
    i_rank = np.argsort(-scores.T, axis=1, kind="stable")  # per image: texts
    out: dict[str, float] = {}
    for k in ks:
        kt, ki = min(k, n_img), min(k, n_text)
        t_hit = (t_rank[:, :kt] == owner[:, None]).any(axis=1)
        i_hit = (owner[i_rank[:, :ki]] == np.arange(n_img)[:, None]).any(axis=1)
        out[f"image_retrieval_recall@{k}"] = float(t_hit.mean())
        out[f"text_retrieval_recall@{k}"] = float(i_hit.mean())
    out["mean_recall"] = float(np.mean([v for v in out.values()]))
    return out


# ---- data ----------------------------------------------------------------------------------
def _samples(url: str, limits: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of a tar, streamed with the bounded reader of curation.io.images."""
    from curation.io.images import _Chunker, _tar_samples

    chunks = _Chunker(fsio.shard_name(url), url, 1)
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        yield from _tar_samples(f, limits, chunks)


def iter_task_batches(
    task: EvalTask, transform: Any, batch_size: int = 256, limits: Any = None
) -> Iterator[tuple[np.ndarray, list[Any]]]:
    """Batches `(pixels uint8 (n, H, W, 3), targets)`: int labels for classification, lists of
    captions for retrieval. Samples without an image or a label, or whose image does not
    decode, are skipped (counted by the caller from what is returned)."""
    from curation.io.images import ImageLimits, decode_images

    limits = limits or ImageLimits()
    blobs: list[bytes] = []
    targets: list[Any] = []

    def flush() -> tuple[np.ndarray, list[Any]]:
        px, ok, _, _ = decode_images(blobs, transform, limits)
        kept = [t for t, good in zip(targets, ok, strict=True) if good]
        blobs.clear()
        targets.clear()
        return px, kept

    for url in task.shards:
        for key, parts in _samples(url, limits):
            ext = next((e for e in IMAGE_MEMBERS if parts.get(e)), None)
            if ext is None or "_oversize" in parts:
                continue
            if task.kind == "classification":
                raw = parts.get("cls")
                try:
                    target: Any = int(raw.decode("ascii").strip()) if raw else None
                except (UnicodeDecodeError, ValueError):
                    target = None
                if target is None or not 0 <= target < len(task.classnames):
                    raise ValueError(
                        f"eval task {task.url}: sample {key!r} in {url} has no valid .cls "
                        f"label (0..{len(task.classnames) - 1})"
                    )
            else:
                raw = parts.get("txt")
                target = raw.decode("utf-8", "replace").splitlines() if raw else []
                if not target:
                    raise ValueError(
                        f"eval task {task.url}: sample {key!r} in {url} has no .txt captions"
                    )
            blobs.append(parts[ext])
            targets.append(target)
            if len(blobs) >= batch_size:
                yield flush()
    if blobs:
        yield flush()


def evaluate_task(
    scorer: Any,
    task: EvalTask,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run `task` with a set-up-able `ClipScorer`; {task, kind, metrics, images, classes}."""
    scorer.setup()
    transform = scorer.pixel_transform()
    images = 0
    owner: list[int] = []  # retrieval: the image of each caption
    if task.kind == "classification":
        w = classifier_weights(scorer.embed_texts, task.classnames, task.templates)
        logits, labels = [], []
        for px, tgt in iter_task_batches(task, transform, batch_size):
            if len(px):
                logits.append(100.0 * (scorer.embed_images(px).astype(np.float32) @ w))
                labels.extend(tgt)
                images += len(px)
            if progress:
                progress(len(px))
        if not images:
            raise ValueError(f"eval task {task.url}: no decodable images")
        logits_all, target = np.concatenate(logits), np.asarray(labels)
        metrics = classification_metrics(logits_all, target)
        per_class = per_class_recall(logits_all, target, len(task.classnames))
        classes: int | None = len(task.classnames)
    else:
        img_parts, txt_parts = [], []
        for px, caps in iter_task_batches(task, transform, batch_size):
            if len(px):
                img_parts.append(scorer.embed_images(px))
                flat = [c for cs in caps for c in cs]
                txt_parts.append(scorer.embed_texts(flat))
                owner.extend(images + i for i, cs in enumerate(caps) for _ in cs)
                images += len(px)
            if progress:
                progress(len(px))
        if not images:
            raise ValueError(f"eval task {task.url}: no decodable images")
        metrics = retrieval_metrics(np.concatenate(img_parts), np.concatenate(txt_parts), owner)
        classes = None
        per_class = None
    texts = len(owner) if task.kind == "retrieval" else None
    return {
        "task": task.name,
        "url": task.url,
        "kind": task.kind,
        "metrics": metrics,
        "images": images,
        "classes": classes,
        "texts": texts,
        "per_class_recall": per_class,
    }
