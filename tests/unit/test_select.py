"""The radix selection of `core.select` equals the old in-memory `global_threshold`, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.core import select
from curation.stages import filters
from curation.stages.filters import AllOf, ClipScoreFilter, global_threshold

INF = math.inf
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.25, INF, -INF, math.nan, 5e-324, -5e-324, 1e308, -1e308]


def old_rule(values: np.ndarray, fraction: float, mode: str) -> float:
    """`global_threshold` as it was before the radix selection (concatenate, partition)."""
    total = len(values)
    n = int(total * fraction)
    k = n if mode == "datacomp" else n - 1
    if k < 0:
        return math.inf
    if k >= total:
        return -math.inf
    finite = values[~np.isnan(values)]
    if k >= len(finite):
        return -math.inf if mode == "exact" else math.nan
    pos = len(finite) - 1 - k
    t = float(np.partition(finite, pos)[pos])
    return 0.0 if t == 0.0 else t  # -0.0 -> 0.0


def datacomp_rule(values: np.ndarray, fraction: float) -> float:
    """DataComp's `get_threshold`, literally (it raises IndexError at n == len)."""
    return float(-np.sort(-values)[int(len(values) * fraction)])


def same_bits(a: float, b: float) -> bool:
    """Equal floats, both NaN, and never -0.0 against 0.0."""
    return np.float64(a).tobytes() == np.float64(b).tobytes() or (math.isnan(a) and math.isnan(b))


def split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    """`values` in shards at the `cuts` (empty shards included)."""
    bounds = sorted(min(max(c, 0), len(values)) for c in cuts)
    return [values[a:b] for a, b in zip([0, *bounds], [*bounds, len(values)], strict=True)]


scalar = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=32, allow_nan=True, allow_infinity=True),  # float32-origin scores
    st.sampled_from(SPECIAL),
    st.sampled_from([0.1, 0.2, 0.3]),  # heavy ties
)
fractions = st.one_of(
    st.sampled_from([0.0, 1.0, 0.3, 0.5, 0.29, 1e-9, 1 - 1e-9]),
    st.floats(0.0, 1.0),
)


@settings(max_examples=400, deadline=None)
@given(
    values=st.lists(scalar, max_size=120),
    cuts=st.lists(st.integers(-5, 130), max_size=6),
    fraction=fractions,
    mode=st.sampled_from(["datacomp", "exact"]),
    limit=st.one_of(st.none(), st.integers(0, 130)),
)
def test_radix_selection_equals_old_rule(values, cuts, fraction, mode, limit):
    arr = np.array(values, dtype=np.float64)
    parts = split(arr, cuts)
    want = old_rule(arr, fraction, mode)
    assert same_bits(select.threshold_of_parts(parts, fraction, mode, limit), want)
    assert same_bits(global_threshold(parts, fraction, mode), want)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(scalar, min_size=1, max_size=120),
    cuts=st.lists(st.integers(0, 120), max_size=4),
    fraction=fractions,
    limit=st.integers(0, 130),
)
def test_radix_selection_equals_datacomp_get_threshold(values, cuts, fraction, limit):
    arr = np.array(values, dtype=np.float64)
    if int(len(arr) * fraction) >= len(arr):
        return  # DataComp raises IndexError there; global_threshold returns -inf
    want = datacomp_rule(arr, fraction)
    got = select.threshold_of_parts(split(arr, cuts), fraction, "datacomp", limit)
    assert got == want or (math.isnan(got) and math.isnan(want))
    assert not (got == 0.0 and math.copysign(1.0, got) < 0)  # -0.0 comes back as 0.0


@pytest.mark.parametrize("mode", ["datacomp", "exact"])
@pytest.mark.parametrize("limit", [0, 7, 1000, None])
def test_many_shards_and_passes(mode, limit):
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.normal(0.25, 0.05, 20_000),
            rng.uniform(0.1, 0.4, 20_000).astype(np.float32),
            np.round(rng.uniform(0.1, 0.4, 20_000), 2),  # ties
            [np.nan] * 300 + [np.inf] * 5 + [-np.inf] * 5 + [-0.0, 0.0] * 50,
        ]
    )
    rng.shuffle(values)
    parts = np.array_split(values, 17)
    for fraction in (0.0, 1e-5, 0.1, 0.3, 0.5, 0.9, 0.99, 1.0):
        want = old_rule(values, fraction, mode)
        assert same_bits(select.threshold_of_parts(parts, fraction, mode, limit), want)


def test_all_equal_values_resolve_the_key_in_four_passes():
    calls = []
    values = np.full(1000, 0.3)

    def histogram(prefix, level):
        calls.append(("hist", level))
        return select.prefix_histogram(values, prefix, level)

    def candidates(prefix, level):
        calls.append(("gather", level))
        return select.prefix_candidates(values, prefix, level)

    assert select.radix_threshold(histogram, candidates, 0.3, "datacomp", gather_limit=10) == 0.3
    assert calls == [("hist", 0), ("hist", 1), ("hist", 2), ("hist", 3)]


def test_driver_sees_fixed_size_histograms_and_few_candidates():
    rng = np.random.default_rng(0)
    parts = [rng.uniform(0, 1, 5000) for _ in range(8)]
    seen = []

    def histogram(prefix, level):
        out = sum(select.prefix_histogram(p, prefix, level) for p in parts)
        seen.append(("hist", len(out)))
        return out

    def candidates(prefix, level):
        out = np.concatenate([select.prefix_candidates(p, prefix, level) for p in parts])
        seen.append(("gather", len(out)))
        return out

    got = select.radix_threshold(histogram, candidates, 0.3, "datacomp", gather_limit=100)
    assert same_bits(got, old_rule(np.concatenate(parts), 0.3, "datacomp"))
    hists = [n for kind, n in seen if kind == "hist"]
    gathers = [n for kind, n in seen if kind == "gather"]
    assert hists and set(hists) == {select.HIST_SIZE} and len(hists) <= select.PASSES
    assert len(gathers) == 1 and gathers[0] <= 100


def test_changed_input_between_passes_is_refused():
    values = [np.arange(1000.0)]

    def histogram(prefix, level):
        if level:
            values[0] = np.arange(999.0)
        return select.prefix_histogram(values[0], prefix, level)

    with pytest.raises(RuntimeError, match="changed between passes"):
        select.radix_threshold(
            histogram, lambda p, lv: select.prefix_candidates(values[0], p, lv), 0.5, "exact", 10
        )


def test_keys_preserve_order_and_round_trip():
    v = np.array([-np.inf, -1e308, -1.0, -5e-324, -0.0, 0.0, 5e-324, 0.5, 1e308, np.inf, np.nan])
    keys = select.float_keys(v)
    assert len(keys) == 10 and np.all(np.diff(keys.astype(object)) >= 0)
    assert keys[4] == keys[5]  # -0.0 and 0.0 are one key
    back = select.key_floats(keys)
    assert back.tobytes() == np.where(v[:10] == 0, 0.0, v[:10]).tobytes()
    rng = np.random.default_rng(1)
    r = rng.standard_normal(10_000) * 10.0 ** rng.integers(-300, 300, 10_000)
    assert np.array_equal(
        np.argsort(select.float_keys(r), kind="stable"), np.argsort(r, kind="stable")
    )


def test_negative_zero_threshold_is_zero():
    assert same_bits(global_threshold([np.array([-0.0, -0.0, 1.0])], 0.5), 0.0)
    assert same_bits(global_threshold([np.array([-0.0, -0.0])], 0.5, "exact"), 0.0)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="fraction"):
        select.threshold_of_parts([np.ones(3)], 1.5, "datacomp")
    with pytest.raises(ValueError, match="mode"):
        select.threshold_of_parts([np.ones(3)], 0.5, "median")


def test_empty_pool():
    assert select.threshold_of_parts([], 0.3, "datacomp") == -INF
    assert select.threshold_of_parts([np.zeros(0)], 0.3, "exact") == INF
    assert select.radix_threshold(lambda p, lv: None, lambda p, lv: None, 0.5, "exact") == INF


def test_filters_ask_for_their_quantiles_and_take_them():
    clip = ClipScoreFilter(fraction=0.3, threshold_mode="exact")
    fixed = ClipScoreFilter(threshold=0.2)
    assert clip.quantile_requests() == [("clip_score", 0.3, "exact")]
    assert fixed.quantile_requests() == []
    both = AllOf([filters.NoFilter(), clip])
    assert both.quantile_requests() == [("clip_score/clip_score", 0.3, "exact")]
    both.set_quantile("clip_score/clip_score", -0.0)
    assert same_bits(clip.threshold, 0.0) and not both.needs_fit
    assert both.quantile_requests() == []
    with pytest.raises(KeyError):
        both.set_quantile("no_filter/present", 1.0)


def test_in_memory_fit_uses_the_shared_selection():
    rng = np.random.default_rng(2)
    shards = [{"clip_score": rng.uniform(0.1, 0.4, n)} for n in (0, 50, 300)]
    f = ClipScoreFilter(fraction=0.3)
    f.fit(shards)
    want = old_rule(np.concatenate([s["clip_score"] for s in shards]), 0.3, "datacomp")
    assert same_bits(f.threshold, want)
    assert f.fitted() == {
        "clip_score": {
            "threshold": want,
            "fraction": 0.3,
            "threshold_mode": "datacomp",
            "column": "clip_l14_similarity_score",
        }
    }
