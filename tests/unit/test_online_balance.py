"""Online balancing: per-pass keep decisions and text choice (MetaCLIP 2's training loader),
deterministic per (seed, pass, uid), with the offline rule's probabilities on average."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.stages.balance import (
    Balancer,
    count_entries,
    entry_probabilities,
    keep_probabilities,
    p_to_t,
)
from curation.train.online import OnlineBalancer, combine_pass_stats, pass_key

ENTRY_IDS = pa.list_(pa.uint32())
PASSES = 400
SIGMAS = 5.0


def matched_table(uids: list[str], texts: list[str], entry_ids: list[list[int]]) -> pa.Table:
    return pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "entry_ids": pa.array(entry_ids, ENTRY_IDS),
        }
    )


def pool(n_images: int, *, max_texts: int, n_entries: int = 60, seed: int = 0) -> pa.Table:
    """A synthetic matched pool: Zipf-like entry popularity, 1..max_texts texts per image, some
    texts without matches, and some images without any matched text."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_entries + 1) ** 1.1
    weights /= weights.sum()
    uids, texts, ids = [], [], []
    for i in range(n_images):
        for j in range(int(rng.integers(1, max_texts + 1))):
            k = int(rng.choice([0, 1, 1, 1, 2, 3]))
            uids.append(f"uid{i:06d}")
            texts.append(f"text {i} {j}")
            ids.append(sorted({int(e) for e in rng.choice(n_entries, size=k, p=weights)}))
    return matched_table(uids, texts, ids)


def counts_of(table: pa.Table, n_entries: int = 60) -> np.ndarray:
    return count_entries(table.column("entry_ids"), n_entries)


def image_uids(table: pa.Table) -> np.ndarray:
    return np.unique(np.asarray(table.column("uid").to_pylist(), dtype=object)).astype(str)


def keep_counts(b: OnlineBalancer, uids: np.ndarray, passes: int = PASSES) -> np.ndarray:
    """How many of `passes` passes kept each uid."""
    total = np.zeros(len(uids), dtype=np.int64)
    for k in range(passes):
        total += b.keep(uids, None, k)[0]
    return total


def assert_binomial(kept: np.ndarray, prob: np.ndarray, passes: int) -> tuple[float, float]:
    """Each count within SIGMAS binomial sigmas of passes·prob (exact where prob is 0 or 1),
    and the sum too; returns (max |z| per image, z of the sum)."""
    mean = passes * prob
    sd = np.sqrt(passes * prob * (1 - prob))
    certain = sd == 0
    assert np.array_equal(kept[certain], mean[certain])
    z = (kept[~certain] - mean[~certain]) / sd[~certain]
    assert np.all(np.abs(z) <= SIGMAS), f"max |z| = {np.abs(z).max():.2f}"
    z_sum = (kept.sum() - mean.sum()) / np.sqrt((sd**2).sum())
    assert abs(z_sum) <= SIGMAS, f"z of the total = {z_sum:.2f}"
    return float(np.abs(z).max()), float(z_sum)


@pytest.fixture(scope="module")
def single() -> tuple[pa.Table, np.ndarray]:
    table = pool(3000, max_texts=1, seed=1)
    return table, counts_of(table)


@pytest.fixture(scope="module")
def multi() -> tuple[pa.Table, np.ndarray]:
    table = pool(1500, max_texts=4, seed=2)
    return table, counts_of(table)


# ------------------------------------------------------------------ determinism


@settings(max_examples=25, deadline=None)
@given(
    perm_seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    pass_index=st.integers(0, 10**6),
)
def test_same_seed_and_pass_same_decisions_whatever_the_chunking_and_order(
    multi, perm_seed, cuts, pass_index
) -> None:
    table, counts = multi
    b = OnlineBalancer(table, counts, t=40, seed=7)
    uids = np.r_[image_uids(table)[:400], ["unknown-1", "unknown-2"]]
    mask, texts = b.keep(uids, None, pass_index)
    perm = np.random.default_rng(perm_seed).permutation(len(uids))
    got_mask = np.zeros(len(uids), dtype=bool)
    got_texts: list[str] = [""] * len(uids)
    for chunk in np.split(perm, sorted(cuts)):
        m, tx = b.keep(uids[chunk], None, pass_index)
        got_mask[chunk] = m
        for i, s in zip(chunk.tolist(), tx, strict=True):
            got_texts[i] = s
    assert np.array_equal(got_mask, mask)
    assert got_texts == texts


def test_decisions_do_not_depend_on_the_matched_folder_layout(multi) -> None:
    table, counts = multi
    a = OnlineBalancer(table, counts, t=40, seed=3)
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    b = OnlineBalancer(shuffled, counts, t=40, seed=3)
    uids = image_uids(table)
    for k in range(3):
        (ma, ta), (mb, tb) = a.keep(uids, None, k), b.keep(uids, None, k)
        assert np.array_equal(ma, mb) and ta == tb


def test_passes_and_seeds_differ(multi) -> None:
    table, counts = multi
    b = OnlineBalancer(table, counts, t=40, seed=3)
    uids = image_uids(table)
    m0, t0 = b.keep(uids, None, 0)
    m1, t1 = b.keep(uids, None, 1)
    assert not np.array_equal(m0, m1)
    other = OnlineBalancer(table, counts, t=40, seed=4).keep(uids, None, 0)[0]
    assert not np.array_equal(m0, other)
    # the text choice is redrawn each pass too
    both = m0 & m1
    assert any(a != c for a, c, k in zip(t0, t1, both, strict=True) if k)
    assert pass_key(3, 0) != pass_key(3, 1) != pass_key(4, 1)
    with pytest.raises(ValueError, match="pass_index"):
        b.keep(uids, None, -1)


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("rule", ["text", "union"])
def test_keep_frequency_is_the_probability(multi, rule) -> None:
    table, counts = multi
    b = OnlineBalancer(table, counts, t=40, seed=11, rule=rule)
    uids = image_uids(table)
    # the probability per image, computed here from the rows
    p = entry_probabilities(counts, 40)
    rows_p = keep_probabilities(table.column("entry_ids"), p)
    by_uid: dict[str, list[int]] = {}
    for i, u in enumerate(table.column("uid").to_pylist()):
        by_uid.setdefault(u, []).append(i)
    ids = table.column("entry_ids").to_pylist()
    expected = []
    for u in uids:
        rows = [i for i in by_uid[u] if ids[i]]
        if not rows:
            expected.append(0.0)
        elif rule == "text":
            expected.append(float(np.mean(rows_p[rows])))
        else:
            union = sorted({e for i in rows for e in ids[i]})
            expected.append(1.0 - float(np.prod(1.0 - p[union])))
    expected_arr = np.array(expected)
    np.testing.assert_allclose(b.probabilities_of(uids), expected_arr, rtol=1e-12, atol=0)
    assert ((expected_arr > 0) & (expected_arr < 1)).mean() > 0.2  # a real test
    kept = keep_counts(b, uids)
    assert_binomial(kept, expected_arr, PASSES)
    assert b.expected_kept == pytest.approx(expected_arr.sum())


def test_head_entries_are_capped_near_t_and_tail_entries_kept(single) -> None:
    table, counts = single
    t = 40
    b = OnlineBalancer(table, counts, t=t, seed=5)
    uids = np.asarray(table.column("uid").to_pylist(), dtype=str)  # one text per image
    ids = table.column("entry_ids")
    flat = pa.compute.list_flatten(ids).to_numpy().astype(np.int64)
    parents = pa.compute.list_parent_indices(ids).to_numpy()
    p_rows = keep_probabilities(ids, entry_probabilities(counts, t))
    # expected kept matches per entry: sum of its rows' probabilities (>= min(count, t))
    mean = np.bincount(flat, weights=p_rows[parents], minlength=len(counts))
    var = np.bincount(flat, weights=(p_rows * (1 - p_rows))[parents], minlength=len(counts))
    assert np.all(mean >= np.minimum(counts, t) - 1e-9)
    total = np.zeros(len(counts))
    tail = (counts > 0) & (counts <= t)
    head = counts > t
    assert head.sum() >= 5 and tail.sum() >= 5
    for k in range(PASSES):
        mask = b.keep(uids, None, k)[0]
        per_entry = np.bincount(flat[mask[parents]], minlength=len(counts))
        assert np.array_equal(per_entry[tail], counts[tail])  # tail entries: every match, always
        total += per_entry
    avg = total / PASSES
    z = (avg[head] - mean[head]) / np.sqrt(var[head] / PASSES)
    assert np.all(np.abs(z) <= SIGMAS), f"max |z| = {np.abs(z).max():.2f}"
    # the head is flattened: far below its count, near t (co-matches with other entries add)
    assert np.all(avg[head] < 0.5 * counts[head] + t)
    assert np.all(avg[head] <= counts[head])
    # in expectation a head entry is kept t times for its texts' own draws, plus at most once
    # per text that a co-matched entry keeps: t <= mean <= alone·t/count + (count - alone)
    single_row = np.diff(ids.combine_chunks().offsets.to_numpy()) == 1
    alone = np.bincount(flat[single_row[parents]], minlength=len(counts)).astype(float)
    c = counts.astype(float)
    assert np.all(mean[head] <= alone[head] * t / c[head] + (c[head] - alone[head]) + 1e-9)
    assert np.all(avg[head] >= t - SIGMAS * np.sqrt(var[head] / PASSES))


def test_all_tail_image_is_kept_every_pass_and_unmatched_never() -> None:
    table = matched_table(
        ["tail", "tail", "head", "nomatch", "nomatch"],
        ["rare", "rarer", "common", "no entity", "nothing"],
        [[1], [2, 1], [0], [], []],
    )
    counts = np.array([1000, 3, 2], dtype=np.uint64)
    b = OnlineBalancer(table, counts, t=10, seed=0)
    uids = np.array(["tail", "head", "nomatch", "never-matched"])
    kept = keep_counts(b, uids, 300)
    assert kept[0] == 300
    assert 0 < kept[1] < 30  # p = 10 / 1000
    assert kept[2] == 0 and kept[3] == 0
    np.testing.assert_allclose(b.probabilities_of(uids), [1.0, 0.01, 0.0, 0.0], rtol=1e-12)
    stats = b.pass_stats(b.keep(uids, None, 0)[0], uids, pass_index=0)
    assert stats["unmatched"] == 2
    assert len(b) == 2 and b.rows_unmatched == 2


def test_text_choice_is_a_matched_text_uniform_over_passes() -> None:
    texts = ["alt one", "title two", "caption three", "no match here"]
    table = matched_table(["img"] * 4, texts, [[0], [1], [0, 1], []])
    counts = np.array([5, 5], dtype=np.uint64)  # all tail: always kept
    for rule in ("text", "union"):
        b = OnlineBalancer(table, counts, t=10, seed=9, rule=rule)
        seen = []
        for k in range(600):
            mask, chosen = b.keep(np.array(["img"]), ["tar text"], k)
            assert mask[0]
            assert chosen == b.keep(np.array(["img"]), ["tar text"], k)[1]  # deterministic
            assert chosen == b.chosen_texts(["img"], k)
            seen.append(chosen[0])
        assert set(seen) == set(texts[:3])
        freq = np.array([seen.count(s) for s in texts[:3]])
        sd = np.sqrt(600 * (1 / 3) * (2 / 3))
        assert np.all(np.abs(freq - 200) <= SIGMAS * sd), freq


def test_text_rule_keeps_the_chosen_text_with_its_probability() -> None:
    # MetaCLIP 2: choose a text, keep the image with that text's probability
    table = matched_table(["img", "img"], ["head text", "tail text"], [[0], [1]])
    counts = np.array([1000, 3], dtype=np.uint64)
    b = OnlineBalancer(table, counts, t=100, seed=2, rule="text")
    u = OnlineBalancer(table, counts, t=100, seed=2, rule="union")
    n = 4000
    kept = {"head text": 0, "tail text": 0}
    union_kept = {"head text": 0, "tail text": 0}
    for k in range(n):
        m, tx = b.keep(["img"], None, k)
        if m[0]:
            kept[tx[0]] += 1
        m, tx = u.keep(["img"], None, k)
        assert m[0]  # union: the tail entry makes p = 1
        union_kept[tx[0]] += 1
    for got, p in ((kept["tail text"], 0.5), (kept["head text"], 0.05)):
        assert abs(got - n * p) <= SIGMAS * np.sqrt(n * p * (1 - p)), (got, p)
    assert abs(union_kept["head text"] - n / 2) <= SIGMAS * np.sqrt(n / 4)
    assert b.probabilities_of(["img"])[0] == pytest.approx(0.55)
    assert u.probabilities_of(["img"])[0] == 1.0


# ------------------------------------------------------------------ offline equality


def test_single_text_images_have_the_offline_probability(single) -> None:
    table, counts = single
    t = float(p_to_t(counts, 0.5))
    uids = table.column("uid")
    on = OnlineBalancer(table, counts, tail_proportion=0.5, seed=0)
    assert on.t == t
    p_offline = keep_probabilities(table.column("entry_ids"), entry_probabilities(counts, t))
    by_hand = np.array(
        [1.0 - np.prod(1.0 - t / np.maximum(counts[e].astype(float), t)) if e else 0.0
         for e in table.column("entry_ids").to_pylist()]
    )  # fmt: skip
    np.testing.assert_allclose(p_offline, by_hand, rtol=1e-12, atol=0)
    for rule in ("text", "union"):
        on = OnlineBalancer(table, counts, t=t, seed=0, rule=rule)
        assert np.array_equal(on.probabilities_of(uids), p_offline)
    # and the offline Balancer keeps rows at that rate (over seeds), as online does (over passes)
    sub = table.slice(0, 800)
    bal = Balancer(entry_probabilities(counts, t), 0)
    offline = np.zeros(sub.num_rows, dtype=np.int64)
    for s in range(PASSES):
        bal.seed = s
        offline += bal.keep_mask(sub)[0]
    assert_binomial(offline, p_offline[:800], PASSES)
    online = keep_counts(on, np.asarray(sub.column("uid").to_pylist(), dtype=str))
    assert_binomial(online, p_offline[:800], PASSES)


def test_keep_probabilities_counts_an_entry_once_and_empty_rows_zero() -> None:
    p = np.array([0.5, 0.25, 1.0])
    ids = pa.array([[0, 0], [0, 1], [], None, [2]], ENTRY_IDS)
    got = keep_probabilities(ids, p)
    np.testing.assert_allclose(got, [0.5, 1 - 0.5 * 0.75, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="out of range"):
        keep_probabilities(pa.array([[3]], ENTRY_IDS), p)


# ------------------------------------------------------------------ stats, loading


def test_pass_stats_account_for_every_sample(multi) -> None:
    table, counts = multi
    t = 40
    b = OnlineBalancer(table, counts, t=t, seed=1)
    uids = np.r_[image_uids(table), ["x1", "x2", "x3"]]
    mask, chosen = b.keep(uids, None, 4)
    parts = [
        b.pass_stats(mask[i : i + 97], uids[i : i + 97], pass_index=4)
        for i in range(0, len(uids), 97)
    ]
    s = combine_pass_stats(parts)
    assert s == b.pass_stats(mask, uids, pass_index=4)
    assert s["read"] == len(uids) == s["kept"] + s["unmatched"] + s["not_sampled"]
    matched_uids = {
        u
        for u, e in zip(*(table.column(c).to_pylist() for c in ("uid", "entry_ids")), strict=True)
        if e
    }
    assert s["kept"] == mask.sum()
    assert s["unmatched"] == 3 + len(image_uids(table)) - len(matched_uids) > 3
    # the head/tail matches of the kept samples' chosen texts, counted by hand
    text_ids = {
        (u, x): e
        for u, x, e in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
    }
    head = tail = 0
    for u, x, k in zip(uids.tolist(), chosen, mask.tolist(), strict=True):
        if k:
            e = np.array(text_ids[(u, x)], dtype=np.int64)
            head += int((counts[e] > t).sum())
            tail += int((counts[e] <= t).sum())
    assert (s["kept_head_matches"], s["kept_tail_matches"]) == (head, tail)
    assert s["head_share"] == pytest.approx(head / (head + tail))
    assert s["head_share"] + s["tail_share"] == pytest.approx(1.0)
    # balancing shifts the matches toward the tail compared with the unbalanced pool
    flat = pa.compute.list_flatten(table.column("entry_ids")).to_numpy().astype(np.int64)
    assert s["tail_share"] > (counts[flat] <= t).mean()


def write_run(tmp_path, table: pa.Table, counts: np.ndarray) -> tuple[str, str]:
    match = tmp_path / "match"
    match.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), match / "part-a.parquet")
    pq.write_table(table.slice(half), match / "part-b.parquet")
    (tmp_path / "counts").mkdir()
    pq.write_table(
        pa.table(
            {
                "entry_id": pa.array(np.arange(len(counts)), pa.uint32()),
                "entry": [f"e{i}" for i in range(len(counts))],
                "count": pa.array(counts, pa.uint64()),
            }
        ),
        tmp_path / "counts" / "entry_counts.parquet",
    )
    return str(match), str(tmp_path / "counts" / "entry_counts.parquet")


def test_load_from_a_run_folder(tmp_path, multi) -> None:
    table, counts = multi
    matched, counts_url = write_run(tmp_path, table, counts)
    b = OnlineBalancer.load(matched, counts_url, t=40, seed=3)
    ref = OnlineBalancer(table, counts, t=40, seed=3)
    uids = image_uids(table)
    assert np.array_equal(b.keep(uids, None, 2)[0], ref.keep(uids, None, 2)[0])
    d = b.describe()
    assert d["t"] == 40 and d["seed"] == 3 and d["rule"] == "text"
    assert d["counts"].startswith("sha256:") and d["matched"] == matched
    assert d["images"] == len(b) and d["multi_text_images"] > 0
    assert d["expected_kept_per_pass"] == pytest.approx(b.probabilities_of(uids).sum())
    by_p = OnlineBalancer.load(matched, counts_url, tail_proportion=0.3, seed=3)
    assert by_p.t == p_to_t(counts, 0.3)
    with pytest.raises(ValueError, match="exactly one"):
        OnlineBalancer.load(matched, counts_url, seed=3)
    with pytest.raises(ValueError, match="exactly one"):
        OnlineBalancer.load(matched, counts_url, t=4, tail_proportion=0.3)
    with pytest.raises(ValueError, match="different metadata"):
        OnlineBalancer(table, counts[:10], t=4)
    with pytest.raises(ValueError, match="rule"):
        OnlineBalancer(table, counts, t=4, rule="random")


def test_balancer_pickles_for_loader_workers(multi) -> None:
    import pickle

    table, counts = multi
    b = OnlineBalancer(table, counts, t=40, seed=3)
    c = pickle.loads(pickle.dumps(b))
    uids = image_uids(table)
    assert c.keep(uids, None, 1)[1] == b.keep(uids, None, 1)[1]


def test_a_text_seen_twice_is_one_text_and_uid_types_agree() -> None:
    # the same (uid, text) on two pages is one text: the choice is uniform over distinct texts
    table = matched_table(["img"] * 3, ["same alt", "same alt", "other"], [[0], [0], [1]])
    b = OnlineBalancer(table, np.array([1, 1], dtype=np.uint64), t=5, seed=0)
    assert b.num_texts == 2
    seen = [b.chosen_texts(["img"], k)[0] for k in range(1000)]
    assert abs(seen.count("same alt") - 500) <= SIGMAS * np.sqrt(250)
    as_np = b.keep(np.array(["img", "x"]), ["a", "b"], 3)
    as_list = b.keep(["img", "x"], np.array(["a", "b"]), 3)
    as_arrow = b.keep(pa.array(["img", "x"]), pa.array(["a", "b"]), 3)
    assert as_np[1] == as_list[1] == as_arrow[1] and as_np[1][1] == "b"
    assert np.array_equal(as_np[0], as_arrow[0])
    with pytest.raises(ValueError, match="texts"):
        b.keep(["img", "x"], ["a"], 0)


def test_colliding_uid_hashes_are_refused(monkeypatch) -> None:
    from curation.train import online

    monkeypatch.setattr(online, "stable_hash64", lambda a: np.zeros(len(a), dtype=np.uint64))
    table = matched_table(["a", "b"], ["x", "y"], [[0], [0]])
    with pytest.raises(ValueError, match="same 64-bit hash"):
        OnlineBalancer(table, np.array([2], dtype=np.uint64), t=1)
