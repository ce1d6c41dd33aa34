"""DataComp `text_based`: English AND some `text.split()` word's first WordNet synset
(NLTK 3.8.1 `wordnet.synsets(word)[0]`) is an ImageNet-21k class. Offline, no Ray, no sleep."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curation.stages.filters.text_based import (
    DATA_DIR,
    Morphy,
    TextBasedFilter,
    load_imagenet21k_ids,
    load_word_table,
    split_words,
)

REPO = Path(__file__).resolve().parents[2]


def fake_language(texts):
    """'en' unless the caption contains 'hund' (German); no fastText needed."""
    return np.array(["de" if "hund" in (t or "") else "en" for t in texts.to_pylist()])


@pytest.fixture(scope="module")
def filt() -> TextBasedFilter:
    f = TextBasedFilter(language=fake_language)
    f.setup()
    return f


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[str, int, str]]:
    t = load_word_table().to_pylist()
    return {r["word"]: (r["pos"], r["offset"], r["lemma"]) for r in t}


# ---------------------------------------------------------------------------------------------
# shipped data


def test_imagenet21k_ids_are_datacomps_file():
    path = DATA_DIR / "imagenet21k_wordnet_ids.txt"
    # sha256 of DataComp's imagenet21k_wordnet_ids.txt (baselines/utils.py: download())
    want = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want
    ids = load_imagenet21k_ids()
    assert len(ids) == 21843 and 2084071 in ids and 2958343 in ids


def test_word_table_entries(table):
    assert table["dog"] == ("n", 2084071, "dog")  # dog.n.01
    assert table["dogs"] == ("n", 2084071, "dog")
    assert table["car"] == ("n", 2958343, "car")  # car.n.01
    assert table["cars"] == ("n", 2958343, "car")
    assert table["geese"] == ("n", 1855672, "goose")  # noun.exc
    assert table["t-shirt"][0] == "n"
    # first synsets that are not ImageNet-21k classes
    for w in ["the", "a", "sunset", "photo", "red", "running", "men", "hot_dog", "assess"]:
        assert w not in table, w
    words = list(table)
    assert words == sorted(words) and all(w == w.lower() for w in words)
    assert 70_000 < len(words) < 80_000


# ---------------------------------------------------------------------------------------------
# tokenization and matching


def test_split_words_is_python_split_lowercased():
    texts = pa.array(["  A Dog\tran\n", "", None, "cat\u00a0sat", "x\u200by"])
    tokens, parents = split_words(texts)
    assert tokens.to_pylist() == ["a", "dog", "ran", "cat", "sat", "x\u200by"]
    assert parents.tolist() == [0, 0, 0, 3, 3, 4]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A dog on the beach", True),
        ("DOG", True),  # synsets() lower-cases
        ("two Cars parked", True),  # morphy: cars -> car
        ("a flock of geese", True),  # exception list
        ("dog.", False),  # text.split() keeps punctuation; "dog." has no synset
        ("(dog)", False),
        ("dog's bowl", True),  # "bowl"; "dog's" itself has no synset
        ("a red sunset", False),
        ("men running", False),  # work_force.n.01, run.n.05
        ("hot_dog", False),  # hotdog.n.01 is the show-off person
        ("hot dog", True),  # "dog"
        ("dogss", True),  # NLTK 3.8.1 keeps applying rules: dogss -> dogs -> dog
        ("Glassesss", True),  # -> glasses (spectacles.n.01)
        ("assess", False),  # 3.8.1: noun ass (buttocks.n.01) comes first, not IN-21k
        ("cat\u00a0sat", True),  # NBSP is whitespace for str.split()
        ("cat\u200bsat", False),  # zero-width space is not
        ("", False),
        ("!!! ???", False),
    ],
)
def test_word_hits(filt, caption, expected):
    assert filt.word_hits(pa.array([caption])).tolist() == [expected]


def test_word_hits_vectorized_rows_and_chunks(filt):
    caps = ["dog.", "a dog", None, "", "a red sunset", "dogss and cats"]
    got = filt.word_hits(pa.chunked_array([caps[:3], caps[3:]]))
    assert got.tolist() == [False, True, False, False, False, True]


def test_score_conditions_keep(filt):
    t = pa.table({"text": ["a dog on the beach", "ein hund", "a red sunset", "two cars"]})
    scores = filt.score(t)
    assert scores["lang"].tolist() == ["en", "de", "en", "en"]
    assert scores["in_imagenet21k"].tolist() == [True, False, False, True]
    cond = filt.conditions(scores)
    assert set(cond) == {"english", "imagenet21k_word"}
    assert filt.keep(t).tolist() == [True, False, False, True]
    assert filt.dropped(scores) == {"dropped_english": 1, "dropped_imagenet21k_word": 2}


def test_missing_text_column(filt):
    with pytest.raises(ValueError, match="text"):
        filt.score(pa.table({"uid": ["x"]}))


# ---------------------------------------------------------------------------------------------
# NLTK 3.8.1 morphy semantics on a toy lexicon


def toy() -> Morphy:
    first = {
        "dog": {"n": 1, "v": 2},
        "ass": {"n": 3},
        "assess": {"v": 4},
        "run": {"n": 5, "v": 6},
        "goose": {"n": 7},
        "big": {"a": 8},
    }
    return Morphy(first, {"n": {"geese": ["goose"]}, "v": {}, "a": {}, "r": {}})


def test_morphy_nouns_first_and_rules():
    m = toy()
    assert m.first_synset("Dogs") == ("n", 1, "dog")
    assert m.first_synset("runs") == ("n", 5, "run")  # nouns before verbs
    assert m.first_synset("assessed") == ("v", 4, "assess")  # no noun rule applies
    assert m.first_synset("running") is None  # rules do not undouble: "runn" (real WordNet
    # has "running" as a lemma and in verb.exc)
    assert m.first_synset("geese") == ("n", 7, "goose")
    assert m.first_synset("bigger") is None  # "bigg" is no lemma; rules do not double letters
    assert m.first_synset("biggest") is None
    assert m.first_synset("xyz") is None


def test_morphy_chains_rules_like_nltk_381():
    m = toy()
    assert m.first_synset("assess") == ("n", 3, "ass")  # asses -> ass, before verb "assess"
    assert m.first_synset("dogsss") == ("n", 1, "dog")
    assert m.morphy("assess", "v") == ["assess"]


# ---------------------------------------------------------------------------------------------
# rebuild


def _build_script():
    spec = importlib.util.spec_from_file_location(
        "build_text_based_table", REPO / "scripts" / "build_text_based_table.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rebuild_is_deterministic_and_matches_shipped(tmp_path, wordnet_dir):
    """Princeton's WordNet 3.0 files (`make wordnet`) rebuild the shipped tables byte for byte."""
    _build_script().main(["--wordnet-dir", str(wordnet_dir), "--out-dir", str(tmp_path)])
    for name in ["words.tsv.gz", "lexicon.tsv.gz", "exceptions.tsv.gz"]:
        built = gzip.decompress((tmp_path / name).read_bytes())
        assert built == gzip.decompress((DATA_DIR / name).read_bytes()), name
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_rebuild_refuses_non_princeton_offsets(tmp_path, wordnet_dir):
    """A WordNet copy whose verb synsets lie at other byte offsets (Debian's wordnet-base is
    regenerated from the lexicographer files) would give other ImageNet-21k collisions."""
    import shutil

    copy = tmp_path / "wn"
    shutil.copytree(wordnet_dir, copy)
    index = copy / "index.verb"
    lines = index.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith("run v "))
    lines[i] = lines[i].replace(" 01926311 ", " 01926329 ")  # run.v.01, as Debian has it
    index.write_text("".join(lines))
    with pytest.raises(SystemExit, match="run.v starts at offset 1926329"):
        _build_script().main(["--wordnet-dir", str(copy), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_shipped_tables_follow_princeton_offsets(table):
    """Words whose first synset is a verb or adjective at a byte offset that happens to be an
    ImageNet-21k id count (DataComp compares offsets without the POS) -- with Princeton's
    offsets, which NLTK's WordNet has, not those of Debian's regenerated wordnet-base."""
    assert table["athletic"] == ("a", 2907656, "athletic")  # athletic.a.01 (Debian: 02907657)
    assert "aromatic" not in table  # aromatic.a.01 is 02641378 (Debian: 02641379, an id)


def test_imagenet21k_ids_equal_timms_package_data():
    """The shipped id list is timm's `imagenet21k_goog_synsets.txt` (the task's source), line
    for line; DataComp's file is the same list (sha256 above)."""
    timm = pytest.importorskip("timm")
    timm_file = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    if not timm_file.exists():
        pytest.skip(f"this timm ({timm.__version__}) has no {timm_file.name}")
    ours = (DATA_DIR / "imagenet21k_wordnet_ids.txt").read_text().split()
    theirs = timm_file.read_text().split()
    assert ours == theirs
    assert load_imagenet21k_ids() == {int(x[1:]) for x in theirs}


def test_make_filter_text_based_and_pickling(filt):
    import pickle

    from curation.stages.filters import filter_from_params, make_filter

    f = make_filter("text_based", language=fake_language)
    assert isinstance(f, TextBasedFilter) and f.columns == ("text",)
    assert f.keep(pa.table({"text": ["a dog", "a red sunset"]})).tolist() == [True, False]
    clone = pickle.loads(pickle.dumps(f))  # a worker reloads the tables in setup()
    assert clone._words is None and clone._morphy is None
    assert clone.data_dir is None  # not the driver's path: a worker finds its own install's tables
    assert clone.keep(pa.table({"text": ["two cars", "ein hund"]})).tolist() == [True, False]
    g = filter_from_params("text_based", {"lid_model": "/m/lid.176.bin"}, name="tb")
    assert g.name == "tb" and g.language.model_path == "/m/lid.176.bin"
