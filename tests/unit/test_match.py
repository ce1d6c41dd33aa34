"""Matching: every engine equals MetaCLIP's reference loop (`naive_match`) exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curation.stages.match as match_mod
from curation.stages.match import (
    Matcher,
    entry_pattern,
    is_cjk_or_similar,
    naive_match,
    spacing,
)

ENGINES = ("ahocorasick", "ngram", "auto")
SCRIPT_ENGINES = ("ahocorasick", "auto")  # "ngram" alone refuses partial-boundary entries


def expected(texts: list[str | None], entries: list[str], script_aware: bool = False):
    return [[] if t is None else naive_match(t, entries, script_aware) for t in texts]


def run(engine: str, entries: list[str], texts: list[str | None], script_aware: bool = False):
    m = Matcher(entries, engine=engine, script_aware=script_aware)
    m.setup()
    out = m.match(pa.array(texts, type=pa.string()))
    assert out.type == pa.list_(pa.uint32())
    assert len(out) == len(texts)
    return out.to_pylist()


def check_all(entries, texts, engines=ENGINES, script_aware=False):
    want = expected(texts, entries, script_aware)
    for engine in engines:
        got = run(engine, entries, texts, script_aware)
        if got != want:
            bad = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]
            raise AssertionError(f"engine {engine!r} differs from the reference: {bad[:5]}")


HAND_ENTRIES = [
    "new york",
    "york city",
    "new york city",
    "york",
    ".",
    ",",
    "`",
    "!",
    "st. louis",
    "st",
    "louis",
    "a  b",
    " b",
    "b ",
    "b",
    "a",
    "a . b",
    "a , b",
    "C++",
    "c++",
    "Hello",
    "hello",
    "naïve café",
    "café",
    "中国",
    "中",
    "東京 タワー",
    "x\ty",
    "x\ny",
    "tab\t",
    "AT&T",
    "e.g",
    "?",
    ";",
    ":",
    "it's",
    "rock 'n' roll",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism movement",
    "exactly8",
    "fifteen_bytes__",
    "sixteen_bytes___",
    "ünïcødé_lõñg_tøkęn",
]

HAND_TEXTS = [
    "I love New York",
    "new york city, at night!",
    "welcome to new york city",
    "new  york",
    "new\tyork",
    "new\nyork\rcity",
    "st. louis",
    "St. Louis",
    "st louis",
    "a.b",
    "a,b",
    "a , b",
    "a  b",
    "a   b",
    " b",
    "a, b",
    "b.",
    "b",
    "",
    " ",
    "  ",
    "C++ and c++",
    "hello Hello.",
    "HELLO",
    "naïve café!",
    "café.",
    "中国 中 x",
    "中国人",
    "東京 タワー",
    "x\ty",
    "x y",
    "AT&T rocks",
    "e.g. this",
    "what?!",
    "`code`",
    "semi;colon:colon",
    "it's rock 'n' roll",
    "supercalifragilisticexpialidocious!",
    "antidisestablishmentarianism movement",
    "exactly8 fifteen_bytes__ sixteen_bytes___",
    "exactly8x fifteen_bytes_ sixteen_bytes____",
    "ünïcødé_lõñg_tøkęn",
    "a\x00 b",
    "york",
    None,
]


@pytest.mark.parametrize("engine", ENGINES)
def test_hand_cases_equal_reference(engine):
    want = expected(HAND_TEXTS, HAND_ENTRIES)
    assert run(engine, HAND_ENTRIES, HAND_TEXTS) == want


def test_hand_cases_known_answers():
    e = {name: i for i, name in enumerate(HAND_ENTRIES)}
    got = dict(zip(HAND_TEXTS, run("auto", HAND_ENTRIES, HAND_TEXTS), strict=True))
    # overlapping matches all count
    assert {e["new york"], e["york city"], e["new york city"], e["york"]} <= set(
        got["welcome to new york city"]
    )
    # spacing splits "st." so "st. louis" can never match, but its parts can
    assert e["st. louis"] not in got["st. louis"]
    assert {e["st"], e["louis"], e["."]} <= set(got["st. louis"])
    assert e["a . b"] in got["a.b"] and e["a , b"] in got["a,b"]
    assert e["`"] in got["`code`"]
    assert e["a  b"] in got["a  b"] and e["a  b"] not in got["a   b"]
    assert e[" b"] in got["a, b"]  # ",  b": the punctuation's space plus the text's space
    assert e["Hello"] in got["hello Hello."] and e["hello"] in got["hello Hello."]
    assert got["HELLO"] == []  # case-sensitive
    assert e["x\ty"] not in got["x\ty"]  # tabs become spaces in the text, never in entries
    assert got[None] == [] and got[""] == []


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_example(engine):
    entries = ["new york", "york city", "new york city"]
    assert run(engine, entries, ["new york city"]) == [[0, 1, 2]]


def test_spacing_is_metaclip():
    assert spacing("a,b.c") == " a , b . c "
    assert spacing("x\ty\nz\r") == " x y z  "
    assert spacing("`q`?!;:") == "  ` q `  ?  !  ;  :  "
    assert spacing("") == "  "


@pytest.mark.parametrize("engine", ENGINES)
def test_output_sorted_unique_and_typed(engine):
    entries = ["b", "a", "a b", "c"]
    m = Matcher(entries, engine=engine)
    out = m.match(pa.array(["a b a b c a", None, "c c c"]))
    assert out.type == pa.list_(pa.uint32())
    assert out.null_count == 0
    assert out.to_pylist() == [[0, 1, 2, 3], [], [3]]


@pytest.mark.parametrize("engine", ENGINES)
def test_input_kinds(engine):
    entries = ["a b", "c", "d"]
    texts = ["x a b", "c", None, "", "d d", "a b c d"]
    want = expected(texts, entries)
    m = Matcher(entries, engine=engine)
    assert m.match(pa.array(texts, pa.large_string())).to_pylist() == want
    assert m.match(pa.array(texts, pa.string_view())).to_pylist() == want
    chunked = pa.chunked_array(
        [pa.array(texts[:2]), pa.array([], pa.string()), pa.array(texts[2:])]
    )
    assert m.match(chunked).to_pylist() == want
    assert m.match(pa.array(texts).slice(2, 3)).to_pylist() == want[2:5]
    assert m.match(pa.array([], pa.string())).to_pylist() == []
    assert m.match(pa.chunked_array([], pa.string())).to_pylist() == []
    assert m.match(pa.nulls(3)).to_pylist() == [[], [], []]
    with pytest.raises(TypeError, match="strings"):
        m.match(pa.array([1, 2]))


@pytest.mark.parametrize("engine", ENGINES)
def test_many_batches(engine, monkeypatch):
    monkeypatch.setattr(match_mod, "_BATCH_BYTES", 16)
    monkeypatch.setattr(match_mod, "_BATCH_ROWS", 3)
    entries = ["a b", "b", "long text here", "."]
    texts = ["a b", "b.", None, "x" * 100 + " long text here", "", "b b b"] * 5
    assert run(engine, entries, texts) == expected(texts, entries)


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicate_and_empty_entries(engine):
    entries = ["a", "b", "a", "", "a b", "b", "a", "c"]
    texts = ["a b", "a  b", "", "b", None, "x,y"]
    assert run(engine, entries, texts) == expected(texts, entries)


@pytest.mark.parametrize("engine", ENGINES)
def test_nul_and_joiner_characters(engine):
    entries = ["a\x00", "a", "\x00", "b\x01c", "\ufdd0"]
    texts = ["a\x00 b", "a", "\x00", "b\x01c \x00", "\ufdd0 a", "x\x00"]
    assert run(engine, entries, texts) == expected(texts, entries)


def test_setup_idempotent_and_lazy():
    m = Matcher(["a"])
    assert m.match(pa.array(["a"])).to_pylist() == [[0]]  # setup() runs on first use
    m.setup()
    m.setup()
    assert m.match(pa.array(["b a"])).to_pylist() == [[0]]


def test_engine_name_is_validated():
    with pytest.raises(ValueError, match="unknown match engine"):
        Matcher(["a"], engine="regex")


def test_process_adds_entry_ids_and_keeps_columns():
    table = pa.table(
        {"uid": ["u1", "u2", "u3"], "text": ["a cat", None, "dog, cat"], "n": [1, 2, 3]}
    )
    out = Matcher(["cat", "dog"]).process(table)
    assert out.column_names == ["uid", "text", "n", "entry_ids"]
    assert out.select(["uid", "text", "n"]).equals(table)
    assert out.column("entry_ids").type == pa.list_(pa.uint32())
    assert out.column("entry_ids").to_pylist() == [[0], [], [0, 1]]
    again = Matcher(["dog"]).process(out)
    assert again.column_names == out.column_names
    assert again.column("entry_ids").to_pylist() == [[], [], [0]]


def test_process_requires_text_column():
    with pytest.raises(KeyError, match="'text' column"):
        Matcher(["a"]).process(pa.table({"caption": ["a"]}))


# ----------------------------------------------------------------------------------------------
# property tests

TOKENS = ["a", "b", "ab", "new", "york", "A", "中", "é", "xyzxyzxyzxyzxyzxyz"]
SEPS = [" ", "  ", "\t", "\n", "\r", ",", ".", ";", ":", "?", "!", "`", ", ", ". ", "", "'"]

text_st = st.lists(st.sampled_from(TOKENS + SEPS), max_size=14).map("".join)
entry_st = st.one_of(
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=3).map(" ".join),
    st.lists(st.sampled_from(TOKENS + SEPS), min_size=1, max_size=5).map("".join),
    st.lists(st.sampled_from(TOKENS + ["", " "]), min_size=1, max_size=4).map(" ".join),
)
entries_st = st.lists(entry_st, min_size=1, max_size=12)
texts_st = st.lists(st.one_of(text_st, st.none()), min_size=1, max_size=12)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(entries=entries_st, texts=texts_st)
def test_property_engines_equal_reference(entries, texts):
    check_all(entries, texts)


@SETTINGS
@given(entries=entries_st, texts=texts_st)
def test_property_script_aware_equals_reference(entries, texts):
    check_all(entries, texts, engines=SCRIPT_ENGINES, script_aware=True)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab ,.\t\n`é中")), max_size=20))
def test_property_single_text_all_substrings(text):
    # every space-delimited piece of the spaced text, used as an entry, must match it
    spaced = spacing(text)
    entries = sorted(
        {spaced[i + 1 : j] for i in range(len(spaced)) for j in range(i + 1, len(spaced))}
    )
    entries = [e for e in entries if f" {e} " in spaced][:40] + ["a", "b a", "é"]
    check_all(entries, [text])


# ----------------------------------------------------------------------------------------------
# a realistic generated corpus


def _corpus(n_texts: int, seed: int = 7):
    import wordfreq

    words = wordfreq.top_n_list("en", 3000)
    rng = np.random.default_rng(seed)
    bigrams = sorted({" ".join(rng.choice(words[:300], 2)) for _ in range(1500)})
    entries = list(dict.fromkeys(words + bigrams + [".", "u.s", "e.g", "New York"]))
    seps = [" ", " ", " ", " ", ", ", ". ", "! ", "\n", "\t", " - ", ": ", "  "]
    texts = []
    for _ in range(n_texts):
        k = int(rng.integers(1, 14))
        toks = rng.choice(words[:2500], k)
        parts = []
        for t in toks:
            r = rng.random()
            t = t.capitalize() if r < 0.15 else t.upper() if r < 0.18 else str(t)
            parts.append(t)
            parts.append(seps[int(rng.integers(len(seps)))])
        if rng.random() < 0.4:
            parts.insert(2 * int(rng.integers(k)), bigrams[int(rng.integers(len(bigrams)))] + " ")
        texts.append("".join(parts).strip() + (".", "", "?")[int(rng.integers(3))])
    return entries, texts


def test_generated_corpus_equals_reference():
    entries, texts = _corpus(2500)
    assert len(entries) > 4000
    want = expected(texts, entries)
    assert sum(map(len, want)) > 5 * len(texts)
    for engine in ENGINES:
        assert run(engine, entries, texts) == want, engine


def test_generated_corpus_script_aware_equals_reference():
    entries, texts = _corpus(300, seed=11)
    entries = entries + ["中国", "北京 大学", "東京", "ภาษา", "ລາວ", "(band)", "C++", "タワー"]
    texts = texts + ["我爱中国", "北京 大学生", "東京タワー", "ภาษาไทย", "a (band) b", "C++11"]
    want = expected(texts, entries, script_aware=True)
    for engine in SCRIPT_ENGINES:
        assert run(engine, entries, texts, script_aware=True) == want, engine


# ----------------------------------------------------------------------------------------------
# MetaCLIP 2 boundary rule


def test_metaclip2_character_classes():
    for ch in "中国東京ภລမខབ，。（）.!-_()'\"":
        assert is_cjk_or_similar(ch), ch
    for ch in "aZé0 タあ한Я":  # kana and Hangul keep their boundary spaces in MetaCLIP 2
        assert not is_cjk_or_similar(ch), ch


def test_entry_pattern():
    assert entry_pattern("new york") == " new york "
    assert entry_pattern("中国") == " 中国 "
    assert entry_pattern("new york", script_aware=True) == " new york "
    assert entry_pattern("中国", script_aware=True) == "中国"
    assert entry_pattern("中国 city", script_aware=True) == "中国 city "
    assert entry_pattern("city 中国", script_aware=True) == " city 中国"
    assert entry_pattern("C++", script_aware=True) == " C++"
    assert entry_pattern("タワー", script_aware=True) == " タワー "
    assert entry_pattern("", script_aware=True) == "  "


def test_script_aware_examples():
    entries = ["中国", "国人", "new york", "C++", "タワー", "ภาษา"]
    texts = ["我爱中国人", "new york", "C++11", "東京タワー", "東京 タワー", "ภาษาไทย"]
    want = [[0, 1], [2], [3], [], [4], [5]]
    assert expected(texts, entries, script_aware=True) == want
    for engine in SCRIPT_ENGINES:
        assert run(engine, entries, texts, script_aware=True) == want
    # MetaCLIP 1 semantics by default
    assert run("auto", entries, texts) == [[], [2], [], [], [4], []]


def test_ngram_engine_refuses_partial_boundary_entries():
    m = Matcher(["中国", "a"], engine="ngram", script_aware=True)
    with pytest.raises(ValueError, match="engine='auto'"):
        m.setup()
    # all entries with both boundary spaces: fine
    m = Matcher(["a", "b c"], engine="ngram", script_aware=True)
    assert m.match(pa.array(["b c a"])).to_pylist() == [[0, 1]]


@pytest.mark.parametrize("engine", ENGINES)
def test_no_usable_entries(engine):
    texts = ["st. louis", "x\ty", "", None]
    for entries in ([], ["st. louis"], ["x\ty", "tab\t"]):
        assert run(engine, entries, texts) == [[], [], [], []]


@pytest.mark.parametrize("engine", SCRIPT_ENGINES)
def test_script_aware_only_partial_entries(engine):
    entries = ["中国", "ไทย"]
    texts = ["我爱中国", "ภาษาไทย", "中 国", None]
    assert run(engine, entries, texts, script_aware=True) == [[0], [1], [], []]


def test_pickle_ships_entries_not_tables():
    import pickle

    m = Matcher(["a", "b c", "a"], engine="auto")
    m.setup()
    clone = pickle.loads(pickle.dumps(m))
    assert clone._ngram is None and clone._aho is None  # rebuilt lazily on the worker
    assert clone.match(pa.array(["b c a"])).to_pylist() == [[0, 1, 2]]
