"""MetaCLIP 2 per-language counts, thresholds, probabilities and balancing (core/worldwide.py,
stages/balance.py LanguageBalancer), checked against a literal copy of the reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.core.worldwide import (
    FLOOR_MIN_COUNT,
    GIVEN,
    KEPT_WHOLE,
    NO_MATCHES,
    P_TO_T,
    count_per_language,
    count_to_prob,
    language_index,
    language_probabilities,
    merge_language_counts,
    per_language_t,
    read_language_counts,
    reference_p_to_t,
    reference_t_to_p,
    write_language_counts,
)
from curation.stages.balance import Balancer, LanguageBalancer, keep_probabilities, p_to_t, t_to_p

# -- the reference, written out (facebookresearch/MetaCLIP f47f784, metaclip/curation/curate.py)


def ref_p_to_t(entry_counts, p=0.1):
    counts = np.sort(entry_counts)
    cumsum_counts = np.cumsum(counts)
    portion = cumsum_counts / counts.sum()
    p_idx = (np.abs(portion - p)).argmin()
    t = counts[p_idx]
    return t


def ref_t_to_p(entry_counts, t=20000):
    return float(entry_counts[entry_counts < t].sum() / entry_counts.sum())


def ref_count_to_prob(entry_count, t):
    p_entry_counts = np.array(entry_count)
    p_entry_counts[p_entry_counts < t] = t
    entry_probs = t / p_entry_counts
    return entry_probs


def ref_global_count(all_lang_entry_counts_ml, t_en=170000):
    """`global_count` minus the file I/O: {lang: (t, float32 probabilities)}."""
    p_t = ref_t_to_p(all_lang_entry_counts_ml["en"], t=t_en)
    out = {}
    for lang_id in all_lang_entry_counts_ml:
        if lang_id == "en":  # noqa: SIM108 - the reference's own layout
            t = t_en
        else:
            t = ref_p_to_t(all_lang_entry_counts_ml[lang_id], p_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            entry_probs = ref_count_to_prob(all_lang_entry_counts_ml[lang_id], t)
        out[lang_id] = (t, entry_probs.astype(np.float32))
    return out


counts_st = st.lists(
    st.one_of(st.just(0), st.integers(1, 5), st.integers(1, 10**6)), min_size=1, max_size=40
).filter(lambda c: sum(c) > 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    en=counts_st,
    others=st.dictionaries(st.sampled_from(["ja", "zh", "th", "de", "other"]), counts_st),
    t_en=st.integers(1, 2 * 10**6),
)
def test_per_language_t_equals_reference_global_count(en, others, t_en):
    counts = {"en": np.array(en, np.uint64)} | {
        k: np.array(v, np.uint64) for k, v in others.items()
    }
    ref = ref_global_count(counts, t_en)
    got = per_language_t(counts, t_en=t_en)
    probs = language_probabilities(counts, got)
    assert sorted(got) == sorted(counts)
    for lang, (t_ref, p_ref) in ref.items():
        th = got[lang]
        c = counts[lang]
        assert th.matches == int(c.sum())
        if lang == "en":
            assert (th.t, th.rule) == (t_en, GIVEN)
        elif t_ref > 0:
            assert (th.t, th.t_p_to_t, th.rule) == (t_ref, t_ref, P_TO_T)
        else:  # the reference drops the language: every matched entry gets probability 0
            assert np.all(p_ref[c > 0] == 0)
            assert (th.t_p_to_t, th.rule) == (0, FLOOR_MIN_COUNT)
            assert th.t == c[c > 0].min()
            assert probs[lang][c == c[c > 0].min()].min() == 1.0
            continue
        assert th.tail_proportion == ref_t_to_p(c, th.t)
        # same float64 division; the reference then rounds to float32
        np.testing.assert_array_equal(probs[lang].astype(np.float32), p_ref)


@settings(max_examples=150, deadline=None)
@given(counts=counts_st, p=st.floats(0.001, 1.0))
def test_reference_p_to_t_t_to_p_are_the_reference(counts, p):
    c = np.array(counts, np.uint64)
    assert reference_p_to_t(c, p) == ref_p_to_t(c, p)
    assert p_to_t(c, p) == max(int(ref_p_to_t(c, p)), 1)  # the English helper: t >= 1
    for t in {1, 3, int(c.max()), int(c.max()) + 1, int(ref_p_to_t(c, p))}:
        assert reference_t_to_p(c, t) == ref_t_to_p(c, t)
        assert t_to_p(c, t) == ref_t_to_p(c, t)
        if t > 0:  # t = 0 is never used here (see the floor rule)
            np.testing.assert_array_equal(count_to_prob(c, t), ref_count_to_prob(c, t))


def test_small_language_t_zero_edge_case_is_floored():
    # en: t_en = 6 gives p = 5 / 100 = 0.05; the reference gives xx t = 0 (notes, section 1)
    counts = {
        "en": np.array([5, 95], np.uint64),
        "xx": np.array([0] * 50 + [1, 1, 3, 5], np.uint64),
    }
    assert ref_global_count(counts, 6)["xx"][0] == 0
    th = per_language_t(counts, t_en=6)
    assert th["en"].tail_proportion == 0.05
    assert (th["xx"].t, th["xx"].t_p_to_t, th["xx"].rule) == (1.0, 0.0, FLOOR_MIN_COUNT)
    p = language_probabilities(counts, th)["xx"]
    np.testing.assert_allclose(p[50:], [1, 1, 1 / 3, 1 / 5])
    # min_matches keeps a small language whole
    th = per_language_t(counts, t_en=6, min_matches=100)
    assert (th["xx"].t, th["xx"].rule) == (5.0, KEPT_WHOLE)
    assert np.all(language_probabilities(counts, th)["xx"] == 1.0)
    assert th["en"].rule == GIVEN  # the reference language is never kept whole


def test_per_language_t_from_tail_proportion_and_errors():
    en = np.array([0, 1, 2, 3, 5, 100, 1000], np.uint64)
    de = np.array([4, 8, 400, 0], np.uint64)
    th = per_language_t({"en": en, "de": de, "fr": np.zeros(3, np.uint64)}, tail_proportion=0.1)
    assert th["en"].t == ref_p_to_t(en, 0.1) == 100
    assert th["de"].t == ref_p_to_t(de, ref_t_to_p(en, 100))
    assert (th["fr"].rule, th["fr"].matches) == (NO_MATCHES, 0)
    with pytest.raises(ValueError, match="exactly one"):
        per_language_t({"en": en}, t_en=3, tail_proportion=0.1)
    with pytest.raises(ValueError, match="reference language 'en'"):
        per_language_t({"de": de}, t_en=3)
    with pytest.raises(ValueError, match="no matches"):
        per_language_t({"en": np.zeros(2, np.uint64)}, t_en=3)
    with pytest.raises(ValueError, match="t_en"):
        per_language_t({"en": en}, t_en=0)
    assert per_language_t({"en": en}, t_en=3)["en"].to_dict()["rule"] == GIVEN


# -- counting ------------------------------------------------------------------------------------


def _ids(lists):
    return pa.array(lists, pa.list_(pa.uint32()))


def test_language_index_fallback_and_nulls():
    langs = pa.array(["en", "xx", None, "other", "ja"])
    assert language_index(langs, ["en", "ja", "other"]).tolist() == [0, 2, 2, 2, 1]
    assert language_index(langs, ["en", "ja"]).tolist() == [0, -1, -1, -1, 1]
    assert language_index(langs, ["en", "ja", "other"], fallback=None).tolist() == [0, -1, -1, 2, 1]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["en", "ja", "other", "xx", None]),
            st.lists(st.integers(0, 4), max_size=4, unique=True),
        ),
        max_size=60,
    ),
    with_other=st.booleans(),
)
def test_count_per_language_equals_a_loop(rows, with_other):
    sizes = {"en": 5, "ja": 3} | ({"other": 5} if with_other else {})
    langs, ids = [], []
    for lang, e in rows:
        target = lang if lang in sizes else ("other" if with_other else None)
        langs.append(lang)
        ids.append([i for i in e if target is not None and i < sizes[target]])
    got = count_per_language(pa.array(langs, pa.string()), _ids(ids), sizes)
    want = {k: np.zeros(n, np.uint64) for k, n in sizes.items()}
    for lang, e in zip(langs, ids, strict=True):
        for i in e:
            want[lang if lang in sizes else "other"][i] += 1
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.uint64
        np.testing.assert_array_equal(got[k], want[k])


def test_count_per_language_rejects_foreign_ids():
    with pytest.raises(ValueError, match="no metadata in this set"):
        count_per_language(pa.array(["xx"]), _ids([[0]]), {"en": 3})
    with pytest.raises(ValueError, match="out of range for language 'ja'"):
        count_per_language(pa.array(["en", "ja"]), _ids([[2], [2]]), {"en": 3, "ja": 2})


def test_language_counts_parquet_round_trip(tmp_path):
    counts = {"ja": np.array([0, 3], np.uint64), "en": np.array([5, 0, 2**40], np.uint64)}
    a = merge_language_counts(counts, {"ja": np.array([1, 1], np.uint64)})
    url = str(tmp_path / "lang_counts.parquet")
    write_language_counts(url, a)
    t = pq.read_table(url)
    assert t.column_names == ["lang", "entry_id", "count"]
    assert t.column("lang").to_pylist() == ["en"] * 3 + ["ja"] * 2
    assert t.schema.field("count").type == pa.uint64()
    back = read_language_counts(url)
    assert list(back) == ["en", "ja"]
    np.testing.assert_array_equal(back["ja"], [1, 4])
    np.testing.assert_array_equal(back["en"], counts["en"])
    with pytest.raises(ValueError, match="different metadata"):
        merge_language_counts(counts, {"ja": np.zeros(5, np.uint64)})
    pq.write_table(t.take([0, 3, 1, 2, 4]), url)
    with pytest.raises(ValueError, match="'en' are not contiguous"):
        read_language_counts(url)


# -- balancing -----------------------------------------------------------------------------------


def _table(n, rng, langs=("en", "ja", "th"), sizes=None, max_ids=3):
    sizes = sizes or {"en": 40, "ja": 30, "th": 20}
    lang = rng.choice(langs, size=n)
    ids = []
    for la in lang.tolist():
        k = int(rng.integers(0, max_ids + 1))
        size = sizes.get(la, 0)
        ids.append(sorted(rng.choice(size, size=min(k, size), replace=False).tolist()))
    return pa.table(
        {
            "uid": pa.array([f"u{i:07d}" for i in range(n)]),
            "text": pa.array([f"text {i % 997}" for i in range(n)]),
            "lang": pa.array(lang.tolist(), pa.string()),
            "entry_ids": _ids(ids),
        }
    )


def test_english_rows_are_balanced_exactly_as_the_english_balancer():
    rng = np.random.default_rng(1)
    table = _table(3000, rng, langs=("en",))
    p = rng.uniform(0, 1, 40)
    keep_en, _ = Balancer(p, seed=7).keep_mask(table)
    keep_ww, _, _ = LanguageBalancer({"en": p, "ja": rng.uniform(0, 1, 30)}, seed=7).keep_mask(
        table
    )
    np.testing.assert_array_equal(keep_en, keep_ww)


def test_balancing_statistics_per_language():
    rng = np.random.default_rng(2)
    table = _table(60_000, rng)
    probs = {"en": rng.uniform(0, 0.6, 40), "ja": rng.uniform(0, 0.3, 30), "th": np.full(20, 0.05)}
    keep, has_match, has_md = LanguageBalancer(probs, seed=3).keep_mask(table)
    assert has_md.all()
    lang = np.array(table.column("lang").to_pylist())
    for la, p in probs.items():
        rows = np.flatnonzero(lang == la)
        sub = table.take(pa.array(rows))
        q = keep_probabilities(sub.column("entry_ids"), p)  # 1 - prod(1 - p_e), per row
        expected, sd = q.sum(), np.sqrt((q * (1 - q)).sum())
        assert abs(int(keep[rows].sum()) - expected) < 5 * sd + 1, la
        assert expected > 500, la  # enough rows for the tolerance to mean something
    assert not keep[~has_match].any()


def test_balancing_is_independent_of_batches_and_order():
    rng = np.random.default_rng(3)
    table = _table(5000, rng)
    probs = {"en": rng.uniform(0, 1, 40), "ja": rng.uniform(0, 1, 30), "th": rng.uniform(0, 1, 20)}
    bal = LanguageBalancer(probs, seed=11)
    whole = bal.keep_mask(table)[0]
    cuts = np.sort(rng.choice(np.arange(1, 5000), size=7, replace=False))
    parts = [
        bal.keep_mask(table.slice(a, b - a))[0]
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, 5000], strict=True)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    perm = rng.permutation(5000)
    shuffled = bal.keep_mask(table.take(pa.array(perm)))[0]
    np.testing.assert_array_equal(shuffled, whole[perm])
    assert not np.array_equal(LanguageBalancer(probs, seed=12).keep_mask(table)[0], whole)


def test_unknown_languages_are_accounted_for():
    rows = pa.table(
        {
            "uid": ["a", "b", "c", "d", "e"],
            "text": ["t1", "t2", "t3", "t4", "t5"],
            "lang": pa.array(["en", "xx", None, "en", "other"], pa.string()),
            "entry_ids": _ids([[0], [], [], [], [1]]),
        }
    )
    out = LanguageBalancer({"en": np.ones(2)}, seed=0).process(rows.slice(0, 4))
    c = out.counts
    assert (c["rows_read"], c["rows_written"]) == (4, 1)
    assert (c["rows_dropped_no_metadata"], c["rows_dropped_no_match"]) == (2, 1)
    assert c["rows_dropped_not_sampled"] == 0
    with pytest.raises(ValueError, match="no probabilities for its language"):
        LanguageBalancer({"en": np.ones(2)}, seed=0).keep_mask(rows)
    # with `other`, unknown languages use its probabilities: the same decision as lang="other"
    probs = {"en": np.ones(2), "other": np.array([0.5, 0.5])}
    rng = np.random.default_rng(4)
    t = _table(4000, rng, langs=("xx", "other"), sizes={"xx": 2, "other": 2})
    bal = LanguageBalancer(probs, seed=5)
    keep, _, has_md = bal.keep_mask(t)
    assert has_md.all()
    as_other = t.set_column(2, "lang", pa.array(["other"] * 4000))
    np.testing.assert_array_equal(keep, bal.keep_mask(as_other)[0])
    with pytest.raises(ValueError, match="out of range for language 'en'"):
        bal.keep_mask(rows.set_column(3, "entry_ids", _ids([[5], [], [], [], []])))
