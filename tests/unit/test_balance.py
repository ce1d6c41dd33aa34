"""Balancing: counter-based draws per (seed, uid, text, entry), MetaCLIP's keep probability,
determinism and nesting."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.core.stage import Stage, StageOutput
from curation.stages import balance
from curation.stages.balance import (
    Balancer,
    count_entries,
    entry_probabilities,
    p_to_t,
    row_keys,
    stable_hash64,
    t_to_p,
    uniform_draws,
)

ENTRY_IDS = pa.list_(pa.uint32())
M64 = (1 << 64) - 1


def table(
    uids: list[str], entry_ids: list[list[int] | None], texts: list[str] | None = None
) -> pa.Table:
    return pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "text": pa.array(texts if texts is not None else ["a photo"] * len(uids), pa.string()),
            "entry_ids": pa.array(entry_ids, ENTRY_IDS),
        }
    )


def ref_hash64(s: str) -> int:
    """MurmurHash64A (seed 0) of the UTF-8 bytes, written out by hand from Appleby's C code."""
    data = s.encode("utf-8")
    m, r = 0xC6A4A7935BD1E995, 47
    h = (len(data) * m) & M64
    nblocks = len(data) // 8
    for i in range(nblocks):
        k = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        k = (k * m) & M64
        k ^= k >> r
        k = (k * m) & M64
        h = ((h ^ k) * m) & M64
    tail = data[8 * nblocks :]
    if tail:
        h = ((h ^ int.from_bytes(tail, "little")) * m) & M64
    h ^= h >> r
    h = (h * m) & M64
    return h ^ (h >> r)


def run(balancer: Balancer, t: pa.Table) -> tuple[pa.Table, dict]:
    out = balancer.process(t)
    assert isinstance(out, StageOutput) and out.quarantine == [] and out.extra == {}
    return out.table, out.counts


def kept_uids(balancer: Balancer, t: pa.Table) -> set[str]:
    return set(run(balancer, t)[0].column("uid").to_pylist())


def kept_pairs(balancer: Balancer, t: pa.Table) -> set[tuple[str, str]]:
    kept = run(balancer, t)[0]
    return set(zip(kept.column("uid").to_pylist(), kept.column("text").to_pylist(), strict=True))


# -- stable_hash64 -------------------------------------------------------------------------------

# MurmurHash64A(s, seed 0), as computed by the C implementation in the `murmurhash` package.
PINNED = {
    "": 0x0,
    "a": 0x071717D2D36B6B11,
    "hello": 0x1E68D17C457BF117,
    "ünï": 0xB396DB3FADA6ECA9,
}


def test_stable_hash64_pinned_values():
    # Changing these changes every sampling decision ever made: bump a version if you must.
    got = stable_hash64(pa.array(list(PINNED), pa.string()))
    assert got.dtype == np.uint64
    assert [int(x) for x in got] == list(PINNED.values())
    assert [ref_hash64(s) for s in PINNED] == list(PINNED.values())


def test_stable_hash64_matches_reference_rule_and_is_deterministic():
    strings = ["", "x", "ab", "ba", "uid-123", "a" * 300, "日本語", "tab\there"] + [
        f"u{i}" for i in range(50)
    ]
    arr = pa.array(strings, pa.string())
    got = stable_hash64(arr)
    assert [int(x) for x in got] == [ref_hash64(s) for s in strings]
    assert np.array_equal(got, stable_hash64(arr))
    assert len(set(got.tolist())) == len(strings)  # no collisions on a small set


@pytest.mark.parametrize("block_rows, long_bytes", [(1 << 14, 256), (5, 12), (1 << 20, 1 << 40)])
def test_stable_hash64_every_length_offset_and_block(monkeypatch, block_rows, long_bytes):
    # every length 0..70 at every byte alignment, long strings hashed apart, blocks of rows
    monkeypatch.setattr(balance, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(balance, "_LONG_BYTES", long_bytes)
    rng = np.random.default_rng(0)
    alphabet = list("abcxyz é日\t0")
    strings = ["".join(rng.choice(alphabet, size=n)) for n in range(71) for _ in range(3)]
    strings += ["q" * 1000, "", "ü" * 333, None, "24-hex-uid-like-0123456"]
    got = stable_hash64(pa.array(strings, pa.string()))
    assert [int(x) for x in got] == [ref_hash64(s or "") for s in strings]
    uids = [f"{i:024x}" for i in range(100)]  # one length: the fast path
    assert [int(x) for x in stable_hash64(pa.array(uids))] == [ref_hash64(u) for u in uids]


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
    assert len(stable_hash64(pa.chunked_array([], pa.string()))) == 0
    assert stable_hash64(pa.array(["", ""])).tolist() == [0, 0]


def test_row_keys_follow_the_documented_rule():
    uids, texts = ["u1", "u1", "u2", ""], ["alt", "title", "alt", ""]
    got = row_keys(pa.array(uids), pa.chunked_array([texts[:1], texts[1:]]))
    golden = 0x9E3779B97F4A7C15
    want = [
        ref_hash64(u) ^ ((ref_hash64(t) * golden) & M64) for u, t in zip(uids, texts, strict=True)
    ]
    assert [int(x) for x in got] == want
    assert len(set(want[:3])) == 3


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
) -> tuple[list[str], list[list[int]], np.ndarray, list[str]]:
    """Rows matching one entry each, entry e in top/(e+1) rows; images have two texts each."""
    counts = np.maximum(1, (top / np.arange(1, num_entries + 1)).astype(np.int64))
    uids, ids, texts = [], [], []
    for e, c in enumerate(counts):
        for i in range(c):
            uids.append(f"img{len(uids) // 2}")
            texts.append(f"text {e} {i}")
            ids.append([e])
    return uids, ids, counts, texts


def test_expected_kept_per_entry_is_min_count_t():
    uids, ids, counts, texts = zipf_pool()
    t = 100
    probs = entry_probabilities(counts, t)
    kept, stats = run(Balancer(probs, seed=7), table(uids, ids, texts))
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
    kept, stats = run(Balancer(probs, seed=11), tbl)
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
    kept, stats = run(Balancer(np.array([1.0]), seed=0), tbl)
    assert kept.column("uid").to_pylist() == ["c"]
    assert stats["rows_dropped_no_match"] == 2
    assert stats["rows_dropped_not_sampled"] == 0


def test_empty_table_and_missing_columns():
    kept, stats = run(Balancer(np.array([0.5]), seed=0), table([], []))
    assert kept.num_rows == 0 and stats["rows_read"] == 0 and stats["rows_written"] == 0
    full = table(["a"], [[0]], ["t"])
    for col in ("uid", "text", "entry_ids"):
        with pytest.raises(ValueError, match=f"balance needs a '{col}' column"):
            Balancer(np.array([0.5]), seed=0).process(full.drop_columns([col]))


def test_balance_independent_of_order_and_splitting():
    uids, ids, counts, texts = zipf_pool(30, 600)
    probs = entry_probabilities(counts, 40)
    bal = Balancer(probs, seed=5)
    whole = kept_pairs(bal, table(uids, ids, texts))
    assert 0 < len(whole) < len(uids)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(uids))

    def part(idx):
        return table([uids[i] for i in idx], [ids[i] for i in idx], [texts[i] for i in idx])

    assert kept_pairs(bal, part(perm)) == whole
    cut = len(uids) // 3
    a, b = part(perm[:cut]), part(perm[cut:])
    assert kept_pairs(Balancer(probs, seed=5), a) | kept_pairs(Balancer(probs, seed=5), b) == whole
    # a multi-chunk table behaves like a contiguous one
    chunked = pa.concat_tables([a, b])
    assert chunked.column("uid").num_chunks == 2
    assert kept_pairs(bal, chunked) == whole
    # another seed gives another sample
    assert kept_pairs(Balancer(probs, seed=6), table(uids, ids, texts)) != whole


def test_entry_order_within_a_row_does_not_matter():
    n = 3000
    probs = np.array([0.3, 0.5, 0.2])
    uids = [f"r{i}" for i in range(n)]
    k1, _ = Balancer(probs, seed=9).keep_mask(table(uids, [[0, 1, 2]] * n))
    k2, _ = Balancer(probs, seed=9).keep_mask(table(uids, [[2, 0, 1]] * n))
    assert np.array_equal(k1, k2)


def test_nested_larger_t_keeps_superset():
    uids, ids, counts, texts = zipf_pool(40, 1500)
    # add multi-entry rows too, three texts per image
    for i in range(500):
        uids.append(f"multi-{i // 3}")
        texts.append(f"multi text {i}")
        ids.append([i % 40, (i * 7) % 40])
    counts = count_entries(pa.array(ids, ENTRY_IDS), 40)
    tbl = table(uids, ids, texts)
    previous: set[tuple[str, str]] | None = None
    sizes = []
    for t in (5, 20, 50, 200, 2000):
        kept = kept_pairs(Balancer(entry_probabilities(counts, t), seed=123), tbl)
        if previous is not None:
            assert previous <= kept
        previous = kept
        sizes.append(len(kept))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[-1] == len(uids)  # t above every count keeps everything


def test_balancer_is_a_stage_returning_stage_output():
    assert issubclass(Balancer, Stage) and Balancer.name == "balance"
    out = Balancer(np.array([1.0, 0.0]), seed=0).process(table(["a", "b", "c"], [[0], [1], []]))
    assert isinstance(out, StageOutput)
    assert out.table.column("uid").to_pylist() == ["a"]
    assert dict(out.counts) == {
        "rows_read": 3,
        "rows_written": 1,
        "rows_dropped_no_match": 1,
        "rows_dropped_not_sampled": 1,
    }
    assert out.quarantine == [] and out.extra == {}


# -- per text, as in MetaCLIP --------------------------------------------------------------------


def test_texts_of_one_image_are_sampled_independently():
    # MetaCLIP draws per text: an image's alt and title (or its texts on many pages) are kept or
    # dropped independently, not together.
    n = 20_000
    uids = [f"img{i}" for i in range(n) for _ in range(2)]
    texts = [t for i in range(n) for t in (f"alt of {i}", f"title of {i}")]
    keep, _ = Balancer(np.array([0.5]), seed=4).keep_mask(table(uids, [[0]] * (2 * n), texts))
    alt, title = keep[0::2], keep[1::2]
    sd = np.sqrt(0.25 / n)
    assert abs(alt.mean() - 0.5) < 5 * sd and abs(title.mean() - 0.5) < 5 * sd
    assert abs(np.mean(alt != title) - 0.5) < 5 * sd
    assert abs(np.mean(alt & title) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)


def test_same_uid_and_text_twice_agree():
    # the same pair seen twice (one image with one alt text on two pages) is kept or dropped once
    n = 5000
    uids = [f"img{i}" for i in range(n)]
    texts = [f"a cat number {i % 50}" for i in range(n)]
    ids = [[i % 3, 3] for i in range(n)]
    probs = np.array([0.2, 0.5, 0.7, 0.1])
    bal = Balancer(probs, seed=8)
    perm = np.random.default_rng(1).permutation(n)
    twice = table(
        uids + [uids[i] for i in perm],
        ids + [ids[i] for i in perm],
        texts + [texts[i] for i in perm],
    )
    keep, _ = bal.keep_mask(twice)
    assert np.array_equal(keep[n:], keep[:n][perm])
    assert 0 < keep[:n].sum() < n
    # and the same in another table, another chunk layout, another worker
    alone, _ = Balancer(probs, seed=8).keep_mask(
        pa.concat_tables([twice.slice(0, 7), twice.slice(7, n - 7)])
    )
    assert np.array_equal(alone, keep[:n])


@pytest.mark.parametrize("probs", [[0.3, 0.5], [0.5], [0.3, 0.5, 0.1]])
def test_keep_probability_holds_for_the_texts_of_one_image(probs):
    # every row is the same image with another text: the rows are still kept with
    # 1 - prod(1 - p_e) each, since the draws are per text
    n = 20_000
    entries = list(range(len(probs)))
    t = table(["one-image"] * n, [entries] * n, [f"caption {i}" for i in range(n)])
    keep, _ = Balancer(np.array(probs), seed=3).keep_mask(t)
    want = 1 - np.prod(1 - np.array(probs))
    assert abs(keep.mean() - want) < 5 * np.sqrt(want * (1 - want) / n)
