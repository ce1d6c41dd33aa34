"""Zero-shot eval tasks (no Ray): metrics against literal CLIP_benchmark formulas, task folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curation.synth.eval_tasks import write_caption_task, write_color_task
from curation.train.eval_tasks import (
    classification_metrics,
    classifier_weights,
    evaluate_task,
    load_task,
    per_class_recall,
    retrieval_metrics,
)


# ---- CLIP_benchmark's formulas, written out literally (torch; sklearn's balanced accuracy) ----
def cb_classifier(embed, classnames, templates):
    ws = []
    for c in classnames:
        e = F.normalize(embed([t.format(c=c) for t in templates]), dim=-1).mean(dim=0)
        e /= e.norm()
        ws.append(e)
    return torch.stack(ws, dim=1)


def cb_accuracy(output, target, topk):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


def balanced_accuracy(y_true, y_pred):
    labels = np.union1d(y_true, y_pred)
    cm = np.zeros((len(labels), len(labels)))
    for t, p in zip(np.searchsorted(labels, y_true), np.searchsorted(labels, y_pred), strict=True):
        cm[t, p] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(cm) / cm.sum(axis=1)
    return float(np.mean(per_class[~np.isnan(per_class)]))


def cb_recall_at_k(scores, positive_pairs, k):
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    onehot = F.one_hot(topk_indices, num_classes=nb_images)
    nb_true_positive = (onehot * positive_pairs.view(nb_texts, 1, nb_images)).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


@pytest.mark.parametrize("seed,classes", [(0, 10), (1, 7), (2, 30)])
def test_classification_matches_clip_benchmark(seed: int, classes: int) -> None:
    rng = np.random.default_rng(seed)
    d, n = 16, 200
    table = {}

    def embed(texts):  # a fixed random embedding per text (unnormalized)
        return torch.stack(
            [table.setdefault(t, torch.from_numpy(rng.normal(size=d)).float()) for t in texts]
        )

    names = [f"class{i}" for i in range(classes)]
    templates = ["a {c}", "a photo of a {c}", "{c} again"]
    ref_w = cb_classifier(embed, names, templates)
    w = classifier_weights(lambda t: embed(t).numpy(), names, templates)
    np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-6)
    img = F.normalize(torch.from_numpy(rng.normal(size=(n, d))).float(), dim=-1)
    target = torch.from_numpy(rng.integers(0, classes - 2, n))  # two classes never occur
    logits = 100.0 * img @ ref_w
    acc1, acc5 = cb_accuracy(logits, target, (1, 5))
    got = classification_metrics(logits.numpy(), target.numpy())
    assert got["acc1"] == pytest.approx(acc1)
    assert got["acc5"] == pytest.approx(acc5)
    bal = balanced_accuracy(target.numpy(), logits.argmax(dim=1).numpy())
    assert got["mean_per_class_recall"] == pytest.approx(bal)


def test_classification_few_classes_topk_capped() -> None:
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, 4.0, 0.0]])
    got = classification_metrics(logits, np.array([2, 1, 1]))
    assert got["acc1"] == pytest.approx(0.0)
    assert got["acc5"] == pytest.approx(1.0)  # k = 3 classes
    # recall of class 2: 0/1, class 1: 0/2 -> 0
    assert got["mean_per_class_recall"] == 0.0


def test_per_class_recall_matches_mean_per_class_recall() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    target = rng.integers(0, 6, 200)  # class 6 has no image
    logits[np.arange(200)[:100], target[:100]] += 3.0
    per = per_class_recall(logits, target, 7)
    assert per[6] is None and len(per) == 7
    pred = logits.argmax(1)
    assert per[:6] == [float((pred[target == c] == c).mean()) for c in range(6)]
    got = classification_metrics(logits, target)["mean_per_class_recall"]
    assert got == pytest.approx(np.mean(per[:6]))


def test_retrieval_hand_made_multi_caption() -> None:
    # 3 images (one-hot axes), 5 texts: image 0 has texts 0, 1; image 1 has 2; image 2 has 3, 4
    img = np.eye(3, dtype=np.float32)
    txt = np.array(
        [
            [1.0, 0.0, 0.0],  # -> image 0 (hit)
            [0.1, 0.5, 0.9],  # -> images 2, 1, 0: miss at 1 and 2, hit at 3
            [0.0, 1.0, 0.0],  # -> image 1 (hit)
            [0.0, 0.8, 0.6],  # -> image 1 first: miss at 1, hit at 2
            [0.0, 0.6, 0.8],  # -> image 2 (hit)
        ],
        dtype=np.float32,
    )
    owner = [0, 0, 1, 2, 2]
    m = retrieval_metrics(img, txt, owner, ks=(1, 2, 10))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@10"] == 1.0
    # image -> text: image 0's best text is 0 (hit); image 1's best is 2 (1.0 vs 0.8: hit);
    # image 2's best is text 1 (0.9 > 0.8), image 0's: a miss at 1, hit at 2 (text 4)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0

    # the same numbers as CLIP_benchmark's recall_at_k (> 0, averaged)
    scores = torch.from_numpy(txt @ img.T)
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(5), torch.tensor(owner)] = True
    for k in (1, 2):
        ir = (cb_recall_at_k(scores, pos, k) > 0).float().mean().item()
        tr = (cb_recall_at_k(scores.T, pos.T, k) > 0).float().mean().item()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(ir)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(tr)


def test_retrieval_random_matches_clip_benchmark() -> None:
    rng = np.random.default_rng(3)
    img = F.normalize(torch.from_numpy(rng.normal(size=(40, 8))).float(), dim=-1)
    owner = torch.from_numpy(np.repeat(np.arange(40), rng.integers(1, 4, 40)))
    txt = F.normalize(img[owner] + 0.8 * torch.randn(len(owner), 8), dim=-1)
    m = retrieval_metrics(img.numpy(), txt.numpy(), owner.tolist())
    scores = txt @ img.T
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(owner)), owner] = True
    for k in (1, 5, 10):
        ir = (cb_recall_at_k(scores, pos, k) > 0).float().mean().item()
        tr = (cb_recall_at_k(scores.T, pos.T, k) > 0).float().mean().item()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(ir)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(tr)


# ---- task folders ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    color = write_color_task(str(root / "color"), n=24, shards=2)
    caps = write_caption_task(str(root / "caps"), n=12)
    return root, color, caps


def test_load_generated_tasks(tasks) -> None:
    root, color, caps = tasks
    t = load_task(str(root / "color"))
    assert t.kind == "classification" and t.name == "color"
    assert len(t.shards) == 2 and len(t.classnames) == 12
    assert all("{c}" in x for x in t.templates)
    r = load_task(str(root / "caps") + "/")
    assert r.kind == "retrieval" and r.classnames == ()
    assert caps["texts"] > caps["images"]  # several captions for some images


def test_task_errors(tmp_path, tasks) -> None:
    root, _, _ = tasks
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_task(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match=r"no test/\*.tar"):
        load_task(str(tmp_path / "empty"))
    nocls = tmp_path / "nocls"
    (nocls / "test").mkdir(parents=True)
    (nocls / "test" / "0.tar").write_bytes((root / "color" / "test" / "0.tar").read_bytes())
    (nocls / "dataset_type.txt").write_text("classification\n")
    with pytest.raises(FileNotFoundError, match="without classnames.txt"):
        load_task(str(nocls))
    (nocls / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="multilabel"):
        load_task(str(nocls))


def test_evaluate_task_random_model(tasks) -> None:
    from curation.stages.score import TINY_MODEL, ClipScorer

    root, color, _ = tasks
    scorer = ClipScorer(TINY_MODEL, batch_size=8)
    with pytest.warns(UserWarning, match="random weights"):
        scorer.setup()
    r = evaluate_task(scorer, load_task(str(root / "color")), batch_size=8)
    assert r["images"] == color["images"] and r["classes"] == 12
    assert 0.0 <= r["metrics"]["acc1"] <= r["metrics"]["acc5"] <= 1.0
    rr = evaluate_task(scorer, load_task(str(root / "caps")), batch_size=5)
    assert rr["images"] == 12 and rr["texts"] > 12
    assert 0.0 <= rr["metrics"]["mean_recall"] <= 1.0
    assert rr["metrics"]["image_retrieval_recall@10"] >= rr["metrics"]["image_retrieval_recall@1"]


def test_task_on_an_fsspec_url() -> None:
    from curation.io.images import PixelTransform
    from curation.train.eval_tasks import iter_task_batches

    write_color_task("memory://eval-tasks/color", n=10)
    t = load_task("memory://eval-tasks/color")
    assert t.shards == ("memory:///eval-tasks/color/test/0.tar",)
    batches = list(iter_task_batches(t, PixelTransform(32, "bicubic", "shortest"), 4))
    assert [len(px) for px, _ in batches] == [4, 4, 2]
    assert all(0 <= y < 12 for _, ys in batches for y in ys)
