"""ClipScorer on the shipped tiny open_clip config: cosine scores, batching, weights loading."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from curation.io.images import decode_images
from curation.stages.score import TINY_MODEL, ClipScorer, load_state_dict

TEXTS = ["a red circle", "two blue stars", "", "a green striped square on white", None, "x" * 400]


@pytest.fixture(scope="module")
def scorer():
    s = ClipScorer(TINY_MODEL, batch_size=4)
    with pytest.warns(UserWarning, match="random weights"):
        s.setup()
    return s


def images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = (rng.random((40 + 7 * i, 64, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def pixels(scorer):
    px, ok, _, _ = decode_images(images(len(TEXTS)), scorer.pixel_transform())
    assert ok.all()
    return px


def test_score_is_the_cosine_of_separately_computed_embeddings(scorer, pixels):
    import open_clip

    res = scorer.score(pixels, TEXTS)
    assert res.clip_score.dtype == np.float32 and res.clip_score.shape == (len(TEXTS),)
    # Independently: open_clip's own preprocess on PIL images, encode, normalize, dot.
    model = scorer._model
    _, _, pre = open_clip.create_model_and_transforms(TINY_MODEL)
    ims = torch.stack([pre(Image.open(io.BytesIO(b))) for b in images(len(TEXTS))])
    tok = open_clip.get_tokenizer(TINY_MODEL)([t or "" for t in TEXTS])
    with torch.no_grad():
        fi = model.encode_image(ims)
        ft = model.encode_text(tok)
    fi = fi / fi.norm(dim=-1, keepdim=True)
    ft = ft / ft.norm(dim=-1, keepdim=True)
    expected = (fi * ft).sum(-1).numpy()
    np.testing.assert_allclose(res.clip_score, expected, atol=2e-6)
    np.testing.assert_allclose(res.image_embedding, fi.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(res.text_embedding, axis=1), 1, atol=1e-5)
    # Scores are not all alike (the plumbing pairs row i with row i).
    assert np.ptp(res.clip_score) > 1e-3


def test_results_do_not_depend_on_batch_size(scorer, pixels):
    ref = scorer.score(pixels, TEXTS)
    for bs in (1, 5, 64):
        other = ClipScorer(TINY_MODEL, batch_size=bs)
        other._model = None
        with pytest.warns(UserWarning):
            other.setup()
        got = other.score(pixels, TEXTS)
        np.testing.assert_allclose(got.clip_score, ref.clip_score, atol=1e-5)
        np.testing.assert_allclose(got.image_embedding, ref.image_embedding, atol=1e-5)


def test_random_weights_are_seeded(scorer, pixels):
    same = ClipScorer(TINY_MODEL, seed=0)
    other = ClipScorer(TINY_MODEL, seed=1)
    with pytest.warns(UserWarning):
        same.setup()
        other.setup()
    a = scorer.embed_texts(TEXTS)
    np.testing.assert_array_equal(same.embed_texts(TEXTS), a)
    assert not np.allclose(other.embed_texts(TEXTS), a, atol=1e-3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_loads_the_saved_weights(tmp_path, scorer, pixels, suffix):
    sd = {k: v.clone() for k, v in scorer._model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:  # an open_clip training checkpoint: wrapped and DDP-prefixed
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    loaded = ClipScorer(TINY_MODEL, checkpoint=str(path), seed=123)
    loaded.setup()  # no random-weights warning: weights come from the file
    assert not loaded.random_weights
    np.testing.assert_array_equal(
        loaded.score(pixels, TEXTS).clip_score, scorer.score(pixels, TEXTS).clip_score
    )


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(str(path))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    s = ClipScorer(TINY_MODEL, checkpoint=str(path))
    with pytest.raises(ValueError, match="do not fit"):
        s.setup()


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipScorer("no-such-model")
    with pytest.raises(FileNotFoundError):
        ClipScorer(TINY_MODEL, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not both"):
        ClipScorer(TINY_MODEL, checkpoint="a.pt", pretrained="openai")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="expected one of"):
        load_state_dict(str(tmp_path / "w.npz"))


def test_uncached_pretrained_tag_fails_at_construction_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        ClipScorer("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="no pretrained tag"):
        ClipScorer("ViT-B-32", pretrained="no-such-tag")


def test_pretrained_weights_are_found_in_the_hub_cache(tmp_path, monkeypatch, scorer, pixels):
    """A tag whose file is in the Hugging Face cache is loaded from there, safetensors first."""
    import huggingface_hub.constants as hc
    from safetensors.torch import save_file

    from curation.stages.score import cached_pretrained_file

    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    save_file(dict(scorer._model.state_dict()), str(snap / "open_clip_model.safetensors"))
    torch.save({"x": torch.zeros(1)}, snap / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    path = cached_pretrained_file({"hf_hub": "org/tiny/"}, TINY_MODEL, "tag")
    assert path.endswith("open_clip_model.safetensors")
    s = ClipScorer(TINY_MODEL, checkpoint=path, seed=9)
    s.setup()
    np.testing.assert_array_equal(
        s.score(pixels, TEXTS).clip_score, scorer.score(pixels, TEXTS).clip_score
    )
    assert s.checkpoint_digest().startswith("sha256:")


def test_cpu_rejects_half_precision():
    s = ClipScorer(TINY_MODEL, precision="bf16", device="cpu")
    with pytest.raises(ValueError, match="CUDA"), pytest.warns(UserWarning):
        s.setup()


def test_pool_shape_never_plans_actors_the_cluster_cannot_place():
    from curation.flows.score import _pool_shape

    gpu = {"CPU": 16.0, "GPU": 1.0}
    assert _pool_shape("auto", None, None, gpu) == ("cuda", 1, {"num_gpus": 1, "num_cpus": 1}, 15)
    with pytest.raises(ValueError, match="only 1 GPU"):
        _pool_shape("cuda", 2, None, gpu)  # would wait forever for a second GPU
    dev, n, opts, decoders = _pool_shape("auto", None, None, {"CPU": 8.0, "GPU": 8.0})
    assert n == 8 and n * opts["num_cpus"] <= 7 and decoders >= 1  # CPUs left to decode
    with pytest.raises(ValueError, match="no CPU"):
        _pool_shape("cuda", None, 2, {"CPU": 4.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="no GPU"):
        _pool_shape("cuda", None, None, {"CPU": 4.0})
    dev, n, opts, _ = _pool_shape("auto", 2, None, {"CPU": 2.0})
    assert dev == "cpu" and n * opts["num_cpus"] <= 1  # fractional: one CPU stays for decoding
    with pytest.raises(ValueError, match="at least 2 CPUs"):
        _pool_shape("cpu", None, None, {"CPU": 1.0})
