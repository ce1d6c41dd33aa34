"""Balancing: counter-based draws, MetaCLIP's keep probability, determinism and nesting."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.stages.balance import (
    Balancer,
    count_entries,
    entry_probabilities,
    p_to_t,
    stable_hash64,
    t_to_p,
    uniform_draws,
)

ENTRY_IDS = pa.list_(pa.uint32())
M64 = (1 << 64) - 1


def table(uids: list[str], entry_ids: list[list[int] | None]) -> pa.Table:
    return pa.table(
        {"uid": pa.array(uids, pa.string()), "entry_ids": pa.array(entry_ids, ENTRY_IDS)}
    )


def ref_hash64(s: str) -> int:
    """The documented rule written out by hand: FNV-1a 64, xor length, then SplitMix64."""
    data = s.encode("utf-8")
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    h = ((h ^ len(data)) * 0x100000001B3) & M64
    x = (h + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def kept_uids(balancer: Balancer, t: pa.Table) -> set[str]:
    kept, _ = balancer.process(t)
    return set(kept.column("uid").to_pylist())


# -- stable_hash64 -------------------------------------------------------------------------------

PINNED = {
    "": 0x71B8262BB6E2E086,
    "a": 0x266EF8C8C52F4B42,
    "hello": 0x8A9C4CDC09AE015C,
    "ünï": 0x7D473DB3A4CFE1A9,
}


def test_stable_hash64_pinned_values():
    # Changing these changes every sampling decision ever made: bump a version if you must.
    got = stable_hash64(pa.array(list(PINNED), pa.string()))
    assert got.dtype == np.uint64
    assert [int(x) for x in got] == list(PINNED.values())


def test_stable_hash64_matches_reference_rule_and_is_deterministic():
    strings = ["", "x", "ab", "ba", "uid-123", "a" * 300, "日本語", "tab\there"] + [
        f"u{i}" for i in range(50)
    ]
    arr = pa.array(strings, pa.string())
    got = stable_hash64(arr)
    assert [int(x) for x in got] == [ref_hash64(s) for s in strings]
    assert np.array_equal(got, stable_hash64(arr))
    assert len(set(got.tolist())) == len(strings)  # no collisions on a small set


def test_stable_hash64_nulls_hash_as_empty_string():
    got = stable_hash64(pa.array([None, "", "a"], pa.string()))
    assert got[0] == got[1] == PINNED[""]
    assert got[2] == PINNED["a"]


def test_stable_hash64_sliced_and_chunked_equal_contiguous():
    strings = [f"item-{i}" * (i % 5 + 1) for i in range(40)]
    whole = stable_hash64(pa.array(strings))
    for start, length in ((0, 40), (3, 10), (17, 23), (39, 1)):
        sliced = pa.array(strings).slice(start, length)
        assert np.array_equal(stable_hash64(sliced), whole[start : start + length])
        large = pa.array(strings, pa.large_string()).slice(start, length)
        assert np.array_equal(stable_hash64(large), whole[start : start + length])
    chunked = pa.chunked_array([strings[:7], strings[7:8], strings[8:]])
    assert np.array_equal(stable_hash64(chunked), whole)
    chunked_sliced = pa.chunked_array([pa.array(strings).slice(0, 20), pa.array(strings)[20:]])
    assert np.array_equal(stable_hash64(chunked_sliced), whole)


def test_stable_hash64_empty():
    assert len(stable_hash64(pa.array([], pa.string()))) == 0


# -- uniform_draws -------------------------------------------------------------------------------


def test_uniform_draws_pinned_and_seeded():
    h = np.array([0, 1, 0xDEADBEEF], dtype=np.uint64)
    e = np.array([0, 5, 7])
    assert uniform_draws(h, e, 0).tolist() == pytest.approx(
        [0.9711020828012883, 0.3861190062557679, 0.6972815264931357], abs=0
    )
    assert not np.array_equal(uniform_draws(h, e, 0), uniform_draws(h, e, 123))
    assert np.array_equal(uniform_draws(h, e, 5), uniform_draws(h, e, 5))


def test_uniform_draws_are_uniform():
    n = 200_000
    h = stable_hash64(pa.array([f"uid-{i}" for i in range(n)]))
    entries = np.arange(n) % 97
    d = uniform_draws(h, entries, seed=42)
    assert d.dtype == np.float64
    assert d.min() >= 0.0 and d.max() < 1.0
    assert abs(d.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(d.var() - 1 / 12) < 0.002
    # Kolmogorov-Smirnov statistic against U(0, 1); 1.95/sqrt(n) is the 0.1% critical value.
    s = np.sort(d)
    ecdf_hi = np.arange(1, n + 1) / n
    ecdf_lo = np.arange(n) / n
    ks = max(np.max(ecdf_hi - s), np.max(s - ecdf_lo))
    assert ks < 1.95 / np.sqrt(n)
    hist, _ = np.histogram(d, bins=20, range=(0, 1))
    expected = n / 20
    assert np.all(np.abs(hist - expected) < 5 * np.sqrt(expected))


def test_uniform_draws_independent_across_entries_of_one_uid():
    n = 100_000
    h = stable_hash64(pa.array([f"u{i}" for i in range(n)]))
    d0 = uniform_draws(h, np.zeros(n, np.int64), seed=1)
    d1 = uniform_draws(h, np.ones(n, np.int64), seed=1)
    assert abs(np.corrcoef(d0, d1)[0, 1]) < 5 / np.sqrt(n)
    both = np.mean((d0 < 0.3) & (d1 < 0.5))
    assert abs(both - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n)


# -- entry_probabilities / t_to_p / p_to_t -------------------------------------------------------


def test_entry_probabilities():
    counts = np.array([0, 1, 50, 100, 101, 1000], dtype=np.uint64)
    p = entry_probabilities(counts, 100)
    assert p.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 100 / 101, 0.1])
    assert entry_probabilities(np.array([4]), 2.5).tolist() == [pytest.approx(2.5 / 4)]


@pytest.mark.parametrize("t", [0, -1, -0.5, float("nan"), float("inf")])
def test_entry_probabilities_rejects_non_positive_or_non_finite_t(t):
    with pytest.raises(ValueError, match="t must be a finite number > 0"):
        entry_probabilities(np.array([1, 2]), t)


def metaclip_t_to_p(counts, t):
    counts = np.asarray(counts)
    return counts[counts < t].sum() / counts.sum()


def metaclip_p_to_t(counts, p):
    sorted_counts = np.sort(np.asarray(counts))
    portion = np.cumsum(sorted_counts) / sorted_counts.sum()
    return sorted_counts[np.abs(portion - p).argmin()]


def test_t_to_p_hand_examples():
    counts = np.array([10, 1, 4, 3, 2], dtype=np.uint64)  # total 20
    assert t_to_p(counts, 4) == pytest.approx(6 / 20)  # 1 + 2 + 3; count == t is head
    assert t_to_p(counts, 1) == 0.0
    assert t_to_p(counts, 11) == 1.0
    assert t_to_p(counts, 10) == pytest.approx(10 / 20)
    assert t_to_p(np.zeros(3, np.uint64), 5) == 0.0
    for t in (1, 2, 3, 4, 5, 10, 11):
        assert t_to_p(counts, t) == pytest.approx(metaclip_t_to_p(counts, t))


def test_p_to_t_hand_examples():
    counts = np.array([10, 1, 4, 3, 2], dtype=np.uint64)  # sorted 1 2 3 4 10; cum .05 .15 .3 .5 1
    assert p_to_t(counts, 0.3) == 3
    assert p_to_t(counts, 0.31) == 3
    assert p_to_t(counts, 0.45) == 4
    assert p_to_t(counts, 0.8) == 10
    assert p_to_t(counts, 1.0) == 10
    assert p_to_t(counts, 0.01) == 1
    for p in (0.01, 0.1, 0.2, 0.3, 0.4, 0.6, 0.9, 1.0):
        assert p_to_t(counts, p) == metaclip_p_to_t(counts, p)
    assert isinstance(p_to_t(counts, 0.3), int)


def test_p_to_t_matches_metaclip_on_zipf_counts():
    counts = (1_000_000 / np.arange(1, 5001) ** 1.1).astype(np.uint64)
    for p in (0.05, 0.1, 0.2, 0.5):
        t = p_to_t(counts, p)
        assert t == metaclip_p_to_t(counts, p)
        # the tail share of the derived t is close to p (the round trip MetaCLIP relies on)
        assert abs(t_to_p(counts, t) - p) < 0.02


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_p_to_t_rejects_bad_p(p):
    with pytest.raises(ValueError, match="tail proportion"):
        p_to_t(np.array([1, 2, 3]), p)


def test_p_to_t_rejects_all_zero_counts():
    with pytest.raises(ValueError, match="no entry"):
        p_to_t(np.zeros(4, np.uint64), 0.5)


# -- count_entries -------------------------------------------------------------------------------


def test_count_entries():
    ids = pa.array([[0, 2], [], None, [2, 2, 4], [1]], ENTRY_IDS)
    got = count_entries(ids, 6)
    assert got.dtype == np.uint64
    assert got.tolist() == [1, 1, 3, 0, 1, 0]
    chunked = pa.chunked_array([ids[:2], ids[2:]])
    assert count_entries(chunked, 6).tolist() == [1, 1, 3, 0, 1, 0]
    assert count_entries(pa.chunked_array([], ENTRY_IDS), 3).tolist() == [0, 0, 0]
    assert count_entries(pa.array([], ENTRY_IDS), 2).tolist() == [0, 0]


def test_count_entries_rejects_out_of_range_id():
    with pytest.raises(ValueError, match="out of range"):
        count_entries(pa.array([[0, 1], [5]], ENTRY_IDS), 5)


# -- Balancer ------------------------------------------------------------------------------------


def zipf_pool(
    num_entries: int = 50, top: int = 2000
) -> tuple[list[str], list[list[int]], np.ndarray]:
    counts = np.maximum(1, (top / np.arange(1, num_entries + 1)).astype(np.int64))
    uids, ids = [], []
    for e, c in enumerate(counts):
        for i in range(c):
            uids.append(f"e{e}-r{i}")
            ids.append([e])
    return uids, ids, counts


def test_expected_kept_per_entry_is_min_count_t():
    uids, ids, counts = zipf_pool()
    t = 100
    probs = entry_probabilities(counts, t)
    kept, stats = Balancer(probs, seed=7).process(table(uids, ids))
    per_entry = count_entries(kept.column("entry_ids"), len(counts)).astype(np.float64)
    expected = np.minimum(counts, t)
    sd = np.sqrt(counts * probs * (1 - probs))
    assert np.all(np.abs(per_entry - expected) <= 5 * sd + 1e-9)
    # entries at or below t keep every row, entries above t are sampled down
    assert np.array_equal(per_entry[counts <= t], counts[counts <= t])
    assert np.all(per_entry[counts > 2 * t] < counts[counts > 2 * t])
    total_sd = np.sqrt((sd**2).sum())
    assert abs(per_entry.sum() - expected.sum()) < 5 * total_sd
    assert stats["rows_written"] == kept.num_rows


@pytest.mark.parametrize(
    "probs",
    [
        [0.3, 0.5],
        [0.3],
        [0.5],
        [0.3, 0.5, 0.1],
    ],
)
def test_row_kept_with_one_minus_prod_one_minus_p(probs):
    n = 40_000
    entries = list(range(len(probs)))
    vec = np.array(probs + [1.0], dtype=np.float64)  # an unused extra entry
    t = table([f"row-{i}" for i in range(n)], [entries] * n)
    keep, has_match = Balancer(vec, seed=3).keep_mask(t)
    assert has_match.all()
    want = 1 - np.prod(1 - np.array(probs))
    assert abs(keep.mean() - want) < 5 * np.sqrt(want * (1 - want) / n)


def test_probability_one_and_zero_are_exact():
    n = 2000
    t = table([f"r{i}" for i in range(n)], [[0]] * (n // 2) + [[1]] * (n // 2))
    keep, _ = Balancer(np.array([1.0, 0.0]), seed=0).keep_mask(t)
    assert keep[: n // 2].all()
    assert not keep[n // 2 :].any()


def test_rows_without_matches_dropped_and_counters_reconcile():
    uids = [f"u{i}" for i in range(400)]
    ids: list[list[int] | None] = []
    for i in range(400):
        ids.append([] if i % 4 == 0 else None if i % 4 == 1 else [i % 3, (i + 1) % 3])
    probs = np.array([0.2, 0.4, 0.6])
    tbl = table(uids, ids)
    kept, stats = Balancer(probs, seed=11).process(tbl)
    assert stats["rows_read"] == 400
    assert stats["rows_dropped_no_match"] == 200
    assert stats["rows_written"] == kept.num_rows
    assert (
        stats["rows_read"]
        == stats["rows_written"]
        + stats["rows_dropped_no_match"]
        + stats["rows_dropped_not_sampled"]
    )
    assert 0 < stats["rows_dropped_not_sampled"] < 200
    assert all(len(x) > 0 for x in kept.column("entry_ids").to_pylist())
    assert kept.schema == tbl.schema
    keep, has_match = Balancer(probs, seed=11).keep_mask(tbl)
    assert has_match.sum() == 200 and keep.sum() == kept.num_rows
    assert not keep[~has_match].any()


def test_no_match_rows_dropped_even_with_probability_one():
    tbl = table(["a", "b", "c"], [[], None, [0]])
    kept, stats = Balancer(np.array([1.0]), seed=0).process(tbl)
    assert kept.column("uid").to_pylist() == ["c"]
    assert stats["rows_dropped_no_match"] == 2
    assert stats["rows_dropped_not_sampled"] == 0


def test_empty_table_and_missing_columns():
    kept, stats = Balancer(np.array([0.5]), seed=0).process(table([], []))
    assert kept.num_rows == 0 and stats["rows_read"] == 0 and stats["rows_written"] == 0
    with pytest.raises(ValueError, match="entry_ids"):
        Balancer(np.array([0.5]), seed=0).process(pa.table({"uid": ["a"]}))
    with pytest.raises(ValueError, match="uid"):
        Balancer(np.array([0.5]), seed=0).process(
            pa.table({"entry_ids": pa.array([[0]], ENTRY_IDS)})
        )


def test_balance_independent_of_order_and_splitting():
    uids, ids, counts = zipf_pool(30, 600)
    probs = entry_probabilities(counts, 40)
    bal = Balancer(probs, seed=5)
    whole = kept_uids(bal, table(uids, ids))
    assert 0 < len(whole) < len(uids)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(uids))
    shuffled = kept_uids(bal, table([uids[i] for i in perm], [ids[i] for i in perm]))
    assert shuffled == whole
    cut = len(uids) // 3
    a = table([uids[i] for i in perm[:cut]], [ids[i] for i in perm[:cut]])
    b = table([uids[i] for i in perm[cut:]], [ids[i] for i in perm[cut:]])
    assert kept_uids(Balancer(probs, seed=5), a) | kept_uids(Balancer(probs, seed=5), b) == whole
    # a multi-chunk table behaves like a contiguous one
    chunked = pa.concat_tables([a, b])
    assert chunked.column("uid").num_chunks == 2
    assert kept_uids(bal, chunked) == whole
    # another seed gives another sample
    assert kept_uids(Balancer(probs, seed=6), table(uids, ids)) != whole


def test_entry_order_within_a_row_does_not_matter():
    n = 3000
    probs = np.array([0.3, 0.5, 0.2])
    uids = [f"r{i}" for i in range(n)]
    k1, _ = Balancer(probs, seed=9).keep_mask(table(uids, [[0, 1, 2]] * n))
    k2, _ = Balancer(probs, seed=9).keep_mask(table(uids, [[2, 0, 1]] * n))
    assert np.array_equal(k1, k2)


def test_nested_larger_t_keeps_superset():
    uids, ids, counts = zipf_pool(40, 1500)
    # add multi-entry rows too
    for i in range(500):
        uids.append(f"multi-{i}")
        ids.append([i % 40, (i * 7) % 40])
    counts = count_entries(pa.array(ids, ENTRY_IDS), 40)
    tbl = table(uids, ids)
    previous: set[str] | None = None
    sizes = []
    for t in (5, 20, 50, 200, 2000):
        kept = kept_uids(Balancer(entry_probabilities(counts, t), seed=123), tbl)
        if previous is not None:
            assert previous <= kept
        previous = kept
        sizes.append(len(kept))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[-1] == len(uids)  # t above every count keeps everything
