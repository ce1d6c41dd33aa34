"""Per-language matching (LanguageMatcher) and the MetaCLIP 2 boundary rule, checked against a
literal copy of the reference (facebookresearch/MetaCLIP f47f784,
metaclip/curation/substr_matching.py)."""

# ruff: noqa: SIM103, SIM114 - the reference functions are copied in their own layout
from __future__ import annotations

import pickle
import string

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.stages.match import LanguageMatcher, entry_pattern, is_cjk_or_similar

# -- the reference, written out -------------------------------------------------------------------

additional_punctuation = {
    k: 0
    for k in [
        "\uff0c",
        "\u3002",
        "\u3001",
        "\uff1b",
        "\uff1a",
        "\uff1f",
        "\uff01",
        "\u201c",
        "\u201d",
        "\u2018",
        "\u2019",
        "\uff08",
        "\uff09",
        "\u3010",
        "\u3011",
        "\u300a",
        "\u300b",
        "\u3008",
        "\u3009",
        "\u300c",
        "\u300d",
        "\u300e",
        "\u300f",
        "\uff5e",
        "\u2014",
    ]
}


def ref_is_punctuation(char):
    return char in string.punctuation or char in additional_punctuation


def ref_is_cjk_or_similar(char):
    code_point = ord(char)
    if (
        0x4E00 <= code_point <= 0x9FFF
        or 0x3400 <= code_point <= 0x4DBF
        or 0x20000 <= code_point <= 0x2A6DF
        or 0x2A700 <= code_point <= 0x2B73F
        or 0x2B740 <= code_point <= 0x2B81F
        or 0x2B820 <= code_point <= 0x2CEAF
        or 0x2CEB0 <= code_point <= 0x2EBEF
        or 0xF900 <= code_point <= 0xFAFF
        or 0x2E80 <= code_point <= 0x2EFF
        or 0x2F00 <= code_point <= 0x2FDF
        or 0x2FF0 <= code_point <= 0x2FFF
    ):
        return True
    elif (
        0x0E00 <= code_point <= 0x0E7F
        or 0x0E80 <= code_point <= 0x0EFF
        or 0x1000 <= code_point <= 0x109F
        or 0x1780 <= code_point <= 0x17FF
        or 0x0F00 <= code_point <= 0x0FFF
    ):
        return True
    elif ref_is_punctuation(char):
        return True
    else:
        return False


def ref_spacing(text):
    puncts_to_wrap = [",", ".", ";", ":", "?", "!", "`"]
    chars_to_space = ["\t", "\n", "\r"]
    spaced_text = f" {text} "
    for punct_to_wrap in puncts_to_wrap:
        spaced_text = spaced_text.replace(punct_to_wrap, f" {punct_to_wrap} ")
    for char_to_space in chars_to_space:
        spaced_text = spaced_text.replace(char_to_space, " ")
    return spaced_text


def ref_get_spaced_metadata(metadata):
    spaced_metadata = []
    for idx, entry in enumerate(metadata):
        spaced_entry = entry
        if not ref_is_cjk_or_similar(spaced_entry[0]):
            spaced_entry = f" {spaced_entry}"
        if not ref_is_cjk_or_similar(spaced_entry[-1]):
            spaced_entry = f"{spaced_entry} "
        spaced_metadata.append((idx, spaced_entry))
    return spaced_metadata


def ref_match(entries_by_lang, text, lang):
    """One automaton per metadata language; unmapped languages go to `other` (if it exists).
    `spaced_entry in spacing(text)` per entry is the same id set as the automaton's `iter`."""
    if lang not in entries_by_lang:
        lang = "other"
    if lang not in entries_by_lang or text is None:
        return []
    spaced = ref_spacing(text)
    return sorted(i for i, e in ref_get_spaced_metadata(entries_by_lang[lang]) if e in spaced)


# -- the boundary rule ------------------------------------------------------------------------------


def test_is_cjk_or_similar_equals_the_reference_on_every_code_point():
    diff = [
        cp
        for cp in range(0x110000)
        if not 0xD800 <= cp <= 0xDFFF
        and is_cjk_or_similar(chr(cp)) != ref_is_cjk_or_similar(chr(cp))
    ]
    assert diff == []
    assert len(additional_punctuation) == 25  # the notes say 29; the reference lists 25


ALPHABET = (
    "ab Cc.,;:?!`'\t\n-+()"
    "\u732b\u718a\u4e2d\u6587"  # CJK ideographs
    "\u3042\u30c6\u30ec\u30d3"  # hiragana, katakana: not in the ranges
    "\u0e44\u0e17\u0e22"  # Thai
    "\u0ea5\u1000\u1780\u0f40"  # Lao, Myanmar, Khmer, Tibetan
    "\u3002\uff0c\u300c\u2014\u00e9\ud55c"  # CJK punctuation, Latin-1, Hangul
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=20))
def test_entry_pattern_equals_get_spaced_metadata(entries):
    assert [(i, entry_pattern(e, True)) for i, e in enumerate(entries)] == ref_get_spaced_metadata(
        entries
    )


# -- per-language matching --------------------------------------------------------------------------

entry_st = st.text(ALPHABET, min_size=1, max_size=5).filter(lambda e: e.strip() == e and e != "")
langs_st = st.sampled_from(["en", "ja", "th", "zh", "other", "xx", None])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    md=st.fixed_dictionaries(
        {
            "en": st.lists(entry_st, min_size=1, max_size=12, unique=True),
            "ja": st.lists(entry_st, min_size=1, max_size=12, unique=True),
            "th": st.lists(entry_st, min_size=1, max_size=12, unique=True),
        },
        optional={"other": st.lists(entry_st, min_size=1, max_size=12, unique=True)},
    ),
    rows=st.lists(
        st.tuples(st.one_of(st.none(), st.text(ALPHABET, max_size=30)), langs_st), max_size=40
    ),
    engine=st.sampled_from(["auto", "ahocorasick"]),
)
def test_language_matcher_equals_the_reference(md, rows, engine):
    texts = pa.array([t for t, _ in rows], pa.string())
    langs = pa.array([la for _, la in rows], pa.string())
    got = LanguageMatcher(md, engine=engine).match(texts, langs).to_pylist()
    want = [ref_match(md, t, la) for t, la in rows]
    assert got == want


def test_no_space_scripts_match_as_substrings_and_latin_as_words():
    md = {
        "en": ["cat", "\u732b", "new york"],
        "ja": ["\u732b", "\u30c6\u30ec\u30d3", "cat"],  # 猫, テレビ
        "zh": ["\u732b", "\u718a\u732b"],  # 猫, 熊猫
        "th": ["\u0e44\u0e17\u0e22"],  # ไทย
    }
    rows = [
        ("\u65b0\u3057\u3044\u30c6\u30ec\u30d3\u3068\u718a\u732b", "ja"),  # 新しいテレビと熊猫
        ("\u6211\u559c\u6b22\u718a\u732b", "zh"),  # 我喜欢熊猫
        ("\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22", "th"),  # ภาษาไทย
        ("tomcat concatenate", "en"),
        ("a cat. New\tyork, new\tyork", "en"),
        ("\u718a\u732b", "en"),  # an English row: only English metadata
        ("cat", "ja"),
    ]
    m = LanguageMatcher(md)
    got = m.match(pa.array([t for t, _ in rows]), pa.array([la for _, la in rows])).to_pylist()
    assert got == [[0], [0, 1], [0], [], [0, 2], [1], [2]]
    assert got == [ref_match(md, t, la) for t, la in rows]


def test_unknown_languages_fall_back_to_other_or_are_counted():
    table = pa.table(
        {"text": ["a cat", "a cat", "a cat", None], "lang": pa.array(["en", "xx", None, "en"])}
    )
    out = LanguageMatcher({"en": ["cat"]}).process(table)
    assert out.table.column("entry_ids").to_pylist() == [[0], [], [], []]
    assert out.counts["rows_no_metadata"] == 2
    assert (out.counts["rows_with_match"], out.counts["matches"]) == (1, 1)
    out = LanguageMatcher({"en": ["cat"], "other": ["dog", "cat"]}).process(table)
    assert out.table.column("entry_ids").to_pylist() == [[0], [1], [1], []]
    assert (out.counts["rows_no_metadata"], out.counts["rows_fallback"]) == (0, 2)
    with pytest.raises(KeyError, match="'lang'"):
        LanguageMatcher({"en": ["cat"]}).process(table.drop_columns(["lang"]))


def test_matchers_are_built_lazily_per_language_and_not_pickled():
    m = LanguageMatcher({"en": ["cat"], "ja": ["\u732b"], "de": ["Katze"]})
    texts = pa.chunked_array([["a cat", "x"], ["\u732b"]])
    assert m.match(texts, pa.array(["en", "en", "ja"])).to_pylist() == [[0], [], [0]]
    assert sorted(m._matchers) == ["en", "ja"]
    clone = pickle.loads(pickle.dumps(m))
    assert clone._matchers == {}
    assert clone.match(texts, pa.array(["de", "en", "ja"])).to_pylist() == [[], [], [0]]
    with pytest.raises(ValueError, match="rows"):
        m.match(texts, pa.array(["en"]))
