"""DataComp baselines (curation.stages.filters) and the DataComp pool layout (curation.io.datacomp)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow as pa
import pytest

from curation.io import datacomp
from curation.stages import filters

# --------------------------------------------------------------------------------------------
# A small hand-made pool. `LANG` is what the stub language id answers for each caption, so the
# expected uids below can be checked by hand; test_real_language_id checks the real model.

DIM = 8
# (caption, lang, width, height, b32, l14, cluster the image embedding sits near)
ROWS = [
    ("A brown dog running on the beach at sunset", "en", 640, 480, 0.30, 0.35, 0),  # 0
    ("Ein brauner Hund läuft am Strand entlang", "de", 640, 480, 0.31, 0.30, 0),  # 1
    ("two words", "en", 640, 480, 0.29, 0.20, 0),  # 2: 2 words
    ("cat", "en", 640, 480, 0.40, 0.40, 2),  # 3: 1 word, 3 chars
    ("Red sports car parked outside", "en", 199, 800, 0.27, 0.29, 2),  # 4: min side 199
    ("Mountain lake with clear blue water", "en", 200, 600, 0.22, 0.26, 1),  # 5: ratio 3.0
    ("Mountain lake with clear blue water today", "en", 200, 601, 0.35, 0.33, 2),  # 6: >3
    ("Fresh bread on a wooden table", "en", 0, 0, 0.25, 0.31, 3),  # 7: 0x0
    ("a b c", "en", 300, 300, 0.26, 0.25, 2),  # 8: 5 chars
    ("Bowl of ramen\nwith eggs", "en", 500, 300, 0.28, 0.32, 1),  # 9: newline
    ("Old map of the city center", "en", None, 400, 0.24, 0.27, 0),  # 10: null width
    ("Sunflowers in a field under blue sky", "en", 1000, 800, 0.28, 0.30, 2),  # 11: b32 = 0.28
    ("hello\nthere", "en", 400, 400, 0.10, 0.10, 2),  # 12: 2 words, 3 fastText tokens
]
LANG = {r[0]: r[1] for r in ROWS}


def stub_language(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Language id by lookup: keeps the expected results independent of the fastText model."""
    return np.array([LANG.get(t, "xx") for t in texts.to_pylist()], dtype=object)


def uid_of(i: int) -> str:
    # 32 hex digits, upper half varies so sorting by (f0, f1) is exercised.
    return f"{(i * 0x9E3779B97F4A7C15) % 2**64:016x}{(i * 7919) % 2**64:016X}"


def cluster_centroids() -> np.ndarray:
    """Four unit centroids along the first four axes."""
    return np.eye(4, DIM, dtype=np.float32)


def pool_embeddings(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = np.eye(4, DIM)[[r[6] for r in ROWS]] + 0.05 * rng.standard_normal((len(ROWS), DIM))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)


def pool_table(rows: list[int] | None = None) -> pa.Table:
    rows = list(range(len(ROWS))) if rows is None else rows
    emb = pool_embeddings()[rows]
    return pa.table(
        {
            "uid": [uid_of(i) for i in rows],
            "url": [f"http://example.com/{i}.jpg" for i in rows],
            "text": [ROWS[i][0] for i in rows],
            "original_width": pa.array([ROWS[i][2] for i in rows], pa.int64()),
            "original_height": pa.array([ROWS[i][3] for i in rows], pa.int64()),
            "clip_b32_similarity_score": pa.array([ROWS[i][4] for i in rows], pa.float64()),
            "clip_l14_similarity_score": pa.array([ROWS[i][5] for i in rows], pa.float64()),
            "l14_img": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
        }
    )


def kept_rows(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


# --------------------------------------------------------------------------------------------
# datacomp.py: uids and shards


def test_uid_pairs_match_datacomp_conversion_and_round_trip():
    uids = [uid_of(i) for i in range(50)] + ["ffffffffffffffff0000000000000000", "0" * 32]
    pairs = datacomp.uids_to_pairs(pa.array(uids))
    ref = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    assert pairs.dtype == ref.dtype
    assert np.array_equal(pairs, ref)
    assert datacomp.pairs_to_uids(pairs).tolist() == [u.lower() for u in uids]


def test_save_uids_is_byte_identical_to_datacomp_and_sorted(tmp_path):
    uids = [uid_of(i) for i in range(1, 40)] + [uid_of(3)]  # a duplicate is kept
    ref = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    ref.sort()  # DataComp's apply_filter: uids.sort(); np.save(path, uids)
    expected = io.BytesIO()
    np.save(expected, ref)

    out = tmp_path / "kept.npy"
    assert datacomp.save_uids(str(out), pa.chunked_array([uids[:10], uids[10:]])) == len(uids)
    assert out.read_bytes() == expected.getvalue()

    back = datacomp.load_uids(str(out))
    assert np.array_equal(back, ref)
    hexes = datacomp.pairs_to_uids(back).tolist()
    assert hexes == sorted(u.lower() for u in uids)  # numeric order == lower-case hex order
    assert [int(h, 16) for h in hexes] == sorted(int(u, 16) for u in uids)


@pytest.mark.parametrize("bad", ["abc", "g" * 32, "0" * 33])
def test_bad_uids_raise_naming_the_input(bad):
    with pytest.raises(ValueError, match="shard-7"):
        datacomp.uids_to_pairs([uid_of(1), bad], where="shard-7")


def test_load_uids_refuses_non_uid_arrays(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.arange(3))
    with pytest.raises(ValueError, match="not a DataComp uid file"):
        datacomp.load_uids(str(p))


def test_shard_round_trip_with_npz_embeddings(tmp_path):
    table = pool_table().drop_columns(["l14_img"])
    emb = {"l14_img": pool_embeddings(), "b32_img": np.ones((len(ROWS), 4), np.float16)}
    url = str(tmp_path / "00000000.parquet")
    datacomp.write_shard(url, table, emb)
    assert (tmp_path / "00000000.npz").exists()

    got = datacomp.read_shard(url, columns=["uid", "text"], embeddings=["l14_img"])
    assert got.column_names == ["uid", "text", "l14_img"]
    m = datacomp.embedding_matrix(got, "l14_img", dtype=np.float16)
    assert np.array_equal(m, emb["l14_img"])
    assert datacomp.embedding_matrix(got.slice(3, 2), "l14_img").tolist() == (
        emb["l14_img"][3:5].astype(np.float32).tolist()
    )
    assert datacomp.list_shards(str(tmp_path)) == [url]
    with pytest.raises(ValueError, match="no embedding 'b32_txt'"):
        datacomp.read_shard(url, embeddings=["b32_txt"])


def test_read_shard_rejects_misaligned_npz(tmp_path):
    url = str(tmp_path / "s.parquet")
    datacomp.write_shard(url, pool_table().drop_columns(["l14_img"]), {})
    np.savez(tmp_path / "s.npz", l14_img=np.zeros((3, DIM), np.float16))
    with pytest.raises(ValueError, match="row-aligned"):
        datacomp.read_shard(url, embeddings=["l14_img"])


# --------------------------------------------------------------------------------------------
# Caption statistics


TRICKY = [
    "",
    "   ",
    "a",
    "a  b\tc\nd\re",
    "x\x1cy\x1dz",  # Python splits on \x1c-\x1f; fastText does not
    "one\u3000two\u00a0three\u2028four",
    "\n\nlead and trail\n",
    "emoji 🐶 dog",
    "nul\x00sep",
]


def _fasttext_tokens(text: str) -> int:
    """fastText Dictionary::readWord, transcribed: the reference for the token count."""
    n, word = 0, False
    for ch in text:
        if ch in " \n\r\t\v\f\0":
            if word:
                n, word = n + 1, False
            if ch == "\n":
                n += 1  # "</s>"
        else:
            word = True
    return n + word


def test_caption_counts_match_python_and_fasttext():
    rng = np.random.default_rng(0)
    alphabet = list("ab é") + ["\n", "\t", "\x0b", "\x1e", "\u2003", "\x85", "\x00", "中"]
    rand = ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(300)]
    texts = TRICKY + rand
    arr = pa.array(texts + [None])
    assert filters.caption_word_count(arr).tolist() == [len(t.split()) for t in texts] + [0]
    assert filters.caption_char_count(arr).tolist() == [len(t) for t in texts] + [0]
    ft = [_fasttext_tokens(t) for t in texts] + [0]
    assert filters.fasttext_token_count(arr).tolist() == ft


def test_python_whitespace_class_is_complete():
    ws = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    assert filters.caption_word_count(pa.array(["a" + ws + "b", ws])).tolist() == [2, 0]


# --------------------------------------------------------------------------------------------
# Language id (real model, offline)


def test_real_language_id_offline_and_batched():
    lid = filters.LanguageId(batch_size=2)
    lid.setup()
    texts = pa.chunked_array(
        [
            [ROWS[0][0], ROWS[1][0], "Le chat dort sur le canapé du salon"],
            ["Bowl of ramen\nwith eggs and green onions", None],
        ]
    )
    codes = lid(texts)
    assert codes.tolist()[:3] == ["en", "de", "fr"]
    assert codes[3] == "en"  # the newline became a space, as DataComp does
    # batched prediction agrees with one-at-a-time prediction (DataComp's get_fasttext_language)
    one = [lid._model.predict(t.replace("\n", " "))[0][0][9:] for t in texts.to_pylist()[:4]]
    assert codes.tolist()[:4] == one


def test_language_model_path_missing_raises(tmp_path):
    with pytest.raises(ValueError):
        filters.LanguageId(model_path=str(tmp_path / "missing.bin")).setup()


# --------------------------------------------------------------------------------------------
# Baselines on the hand-made pool


def test_no_filter_keeps_everything():
    f = filters.make_filter("no_filter")
    assert f.keep(pool_table()).all() and len(f.keep(pool_table())) == len(ROWS)


def test_basic_filter_hand_checked():
    f = filters.BasicFilter(language=stub_language)
    table = pool_table()
    scores = f.score(table)
    # 0 ok; 1 German; 2 two words; 3 one word; 4 side 199; 5 ratio 3.0 ok; 6 ratio > 3;
    # 7 0x0; 8 five chars; 9 ok; 10 null width; 11 ok; 12 two words
    assert kept_rows(f.keep(scores)) == [0, 5, 9, 11]
    assert kept_rows(f.keep(table)) == [0, 5, 9, 11]
    dropped = f.dropped(scores)
    assert dropped["dropped_english"] == 1
    assert dropped["dropped_caption_words"] == 3  # rows 2, 3, 12 ("a b c" has 3 words)
    assert dropped["dropped_caption_chars"] == 2  # rows 3, 8
    assert dropped["dropped_min_dim"] == 3  # rows 4, 7, 10 (null width)
    assert dropped["dropped_aspect_ratio"] == 4  # rows 4, 6, 7 (0/0), 10


def test_clip_score_fixed_threshold():
    f = filters.make_filter("clip_score", arch="b32", threshold=0.28)
    assert f.columns == ("clip_b32_similarity_score",)
    assert kept_rows(f.keep(pool_table())) == [0, 1, 2, 3, 6, 9, 11]  # 0.28 itself is kept
    f14 = filters.ClipScoreFilter(arch="l14", threshold=0.30)
    assert kept_rows(f14.keep(pool_table())) == [0, 1, 3, 6, 7, 9, 11]


def test_laion2b_english_and_b32_at_least_028():
    f = filters.make_filter("laion2b", language=stub_language)
    # b32 >= 0.28: 0, 1, 2, 3, 6, 9, 11; row 1 is German
    assert kept_rows(f.keep(pool_table())) == [0, 2, 3, 6, 9, 11]


def test_global_threshold_datacomp_quirk_and_exact():
    shards = [np.array([0.9, 0.1, 0.5]), np.array([0.7, 0.3]), np.array([0.2, 0.8, 0.6, 0.4, 0.0])]
    # n = int(10 * 0.3) = 3; DataComp: -sort(-x)[3] = 0.6 -> keeps 4 rows (one more than 30 %)
    assert filters.global_threshold(shards, 0.3) == 0.6
    assert filters.global_threshold(shards, 0.3, mode="exact") == 0.7
    allv = np.concatenate(shards)
    assert (allv >= filters.global_threshold(shards, 0.3)).sum() == 4
    assert (allv >= filters.global_threshold(shards, 0.3, mode="exact")).sum() == 3
    # ties at the threshold are all kept (>=)
    tied = [np.array([0.5, 0.5, 0.5, 0.1])]
    assert filters.global_threshold(tied, 0.25, mode="exact") == 0.5
    # NaN sorts last in DataComp's descending order: it never sets the threshold...
    with_nan = [np.array([np.nan, 0.9, 0.8, 0.7])]
    assert filters.global_threshold(with_nan, 0.5) == 0.7
    # ...unless the index falls on it: NaN threshold keeps nothing
    assert np.isnan(filters.global_threshold(with_nan, 0.75))
    assert filters.global_threshold(shards, 1.0) == -np.inf
    assert filters.global_threshold(shards, 0.0, mode="exact") == np.inf
    # the same float expression as DataComp: int(100 * 0.29) == 28
    hundred = np.arange(100, dtype=float)
    assert filters.global_threshold(hundred, 0.29) == 99 - 28
    with pytest.raises(ValueError):
        filters.global_threshold(shards, 1.5)


def test_global_threshold_when_n_covers_every_score():
    # 6 rows, 2 of them null/NaN: only 4 scores can be ranked
    with_null = [np.array([0.9, np.nan, 0.5]), pa.array([0.7, None, 0.1])]
    # exact: n = 6 (fraction 1.0) or 5 covers all 4 scores -> -inf keeps them all, never NaN
    assert filters.global_threshold(with_null, 1.0, mode="exact") == -np.inf
    assert filters.global_threshold(with_null, 0.9, mode="exact") == -np.inf
    assert filters.global_threshold(with_null, 0.7, mode="exact") == 0.1  # n = 4: the 4th
    assert filters.global_threshold(with_null, 0.5, mode="exact") == 0.5  # n = 3
    # datacomp (as DataComp's get_threshold): index n = 4 falls on a NaN -> NaN, keeps nothing;
    # n == len (fraction 1.0) raises IndexError in DataComp, -inf here
    assert np.isnan(filters.global_threshold(with_null, 0.7))
    assert filters.global_threshold(with_null, 1.0) == -np.inf
    assert filters.global_threshold(with_null, 0.5) == 0.1  # index 3
    # all scores null: exact keeps nothing to rank either way
    assert filters.global_threshold([np.array([np.nan, np.nan])], 1.0, mode="exact") == -np.inf


@pytest.mark.parametrize(
    "fraction,mode,threshold,kept",
    [
        (1.0, "exact", "-inf", [0, 2, 3, 5]),  # every row with a score
        (0.7, "datacomp", "nan", []),  # DataComp's NaN threshold keeps nothing
        (0.0, "exact", "inf", []),
        (0.5, "exact", 0.3, [2, 3, 5]),
    ],
)
def test_fitted_threshold_is_json_and_equal_on_refit(tmp_path, fraction, mode, threshold, kept):
    import json

    from curation.io.parts import ResumeError, prepare_stage_dir

    scores = pa.array([0.1, None, 0.3, 0.4, float("nan"), 0.5])
    table = pa.table({"uid": [f"{i:032x}" for i in range(6)], "clip_score": scores})

    def fitted_filter():
        f = filters.ClipScoreFilter(column="clip_score", fraction=fraction, threshold_mode=mode)
        f.fit([f.score_for_fit(table)])
        return f

    f = fitted_filter()
    assert kept_rows(f.keep(table)) == kept
    fit = f.fitted()
    assert fit["clip_score"]["threshold"] == threshold
    json.dumps(fit, allow_nan=False)  # strict JSON: no NaN / Infinity
    # a rerun of the same job fits the same threshold and resumes (NaN != NaN would refuse it)
    stage = str(tmp_path / "stage")
    prepare_stage_dir(stage, {"stage": "filter", "fit": fit}, overwrite=False)
    prepare_stage_dir(stage, {"stage": "filter", "fit": fitted_filter().fitted()}, False)
    with pytest.raises(ResumeError, match="changed: fit"):
        prepare_stage_dir(stage, {"stage": "filter", "fit": {"clip_score": {}}}, False)


def test_json_number():
    assert [filters.json_number(x) for x in (0.25, np.float32(0.5), 3)] == [0.25, 0.5, 3.0]
    assert [filters.json_number(x) for x in (np.nan, np.inf, -np.inf)] == ["nan", "inf", "-inf"]


def test_clip_score_fraction_needs_the_barrier():
    f = filters.ClipScoreFilter(arch="l14", fraction=0.3)
    a, b = pool_table(list(range(7))), pool_table(list(range(7, len(ROWS))))
    sa, sb = f.score(a), f.score(b)
    assert f.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        f.keep(sa)
    f.fit([sa, sb])
    # l14 sorted desc: .40 .35 .33 .32 .31 .30 .30 ...; n = int(13 * .3) = 3 -> t = .32
    assert f.threshold == 0.32
    assert kept_rows(f.keep(sa)) == [0, 3, 6] and kept_rows(f.keep(sb)) == [2]


def test_image_based_hand_checked():
    centroids = cluster_centroids()
    targets = [np.eye(4, DIM)[[0]], np.eye(4, DIM)[[2, 2]] * 0.5]  # two "embedding files"
    f = filters.make_filter(
        "image_based", centroids=centroids, target_embeddings=targets, language=stub_language
    )
    f.setup()
    assert f.target_ids.tolist() == [0, 2]
    scores = f.score(pool_table())
    assert scores["centroid"].tolist() == [r[6] for r in ROWS]
    # caption: English, > 1 fastText token, > 5 chars (no image-size test):
    # drops 1 (de), 3 (1 token), 8 (5 chars); keeps 2 (2 tokens) and 12 (newline = 3 tokens).
    # clusters {0, 2}: drops 5, 9 (cluster 1) and 7 (cluster 3)
    assert kept_rows(f.keep(scores)) == [0, 2, 4, 6, 10, 11, 12]


def test_image_based_intersect_clip_score():
    f = filters.make_filter(
        "image_based_intersect_clip_score",
        centroids=cluster_centroids(),
        target_ids=np.array([2, 0]),
        language=stub_language,
        arch="l14",
        fraction=0.3,
    )
    table = pool_table()
    scores = f.score(table)
    assert f.needs_fit
    f.fit([scores])
    # image_based keeps [0, 2, 4, 6, 10, 11, 12]; L/14 >= 0.32 keeps [0, 3, 6, 9]
    assert kept_rows(f.keep(scores)) == [0, 6]
    assert f.dropped(scores)["dropped_clip_score/clip_score"] == len(ROWS) - 4


def test_assignment_rule_inner_product_vs_l2():
    x = np.array([[1.0, 0.0]], np.float32)
    c = np.array([[1.0, 0.0], [3.0, 3.0]], np.float32)
    assert filters.assign_centroids(x, c, rule="ip").tolist() == [1]  # DataComp: unnormalized IP
    assert filters.assign_centroids(x, c, rule="l2").tolist() == [0]
    big = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)
    cs = np.random.default_rng(2).standard_normal((7, 16)).astype(np.float32)
    ref = np.argmin(((big[:, None, :] - cs[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(filters.assign_centroids(big, cs, rule="l2", batch_size=64), ref)
    assert np.array_equal(filters.assign_centroids(big, cs, batch_size=64), (big @ cs.T).argmax(1))


def test_kmeans_deterministic_and_finds_blobs():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16)) * 5
    x = (centers[rng.integers(0, 4, 4000)] + rng.standard_normal((4000, 16))).astype(np.float32)
    idx = np.concatenate([filters.sample_rows(2000, 0.5, seed=3, shard_index=s) for s in (0, 1)])
    assert np.array_equal(
        idx,
        np.concatenate([filters.sample_rows(2000, 0.5, seed=3, shard_index=s) for s in (0, 1)]),
    )
    assert len(idx) == 2000 and not np.array_equal(idx[:1000], idx[1000:])
    c1 = filters.train_centroids(x, 8, seed=7)
    c2 = filters.train_centroids(x, 8, seed=7)
    assert c1.shape == (8, 16) and c1.dtype == np.float32
    assert np.array_equal(c1, c2)  # same seed, same centroids
    assert not np.array_equal(c1, filters.train_centroids(x, 8, seed=8))
    labels = filters.assign_centroids(x, c1, rule="l2")
    blob = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
    # more clusters than blobs: no centroid spans two well-separated blobs
    assert all(len(np.unique(blob[labels == c])) <= 1 for c in range(8))
    with pytest.raises(ValueError, match="num_clusters"):
        filters.train_centroids(x[:3], 4)


def _write_pool(tmp_path) -> list[str]:
    urls = []
    for name, rows in (("00000000", list(range(7))), ("00000001", list(range(7, len(ROWS))))):
        t = pool_table(rows)
        url = str(tmp_path / f"{name}.parquet")
        emb = datacomp.embedding_matrix(t, "l14_img", dtype=np.float16)
        datacomp.write_shard(url, t.drop_columns(["l14_img"]), {"l14_img": emb})
        urls.append(url)
    return urls


def test_filter_shards_two_passes_writes_datacomp_uids(tmp_path):
    urls = _write_pool(tmp_path)
    out = str(tmp_path / "uids" / "clip.npy")
    f = filters.ClipScoreFilter(arch="l14", fraction=0.3)
    pairs = filters.filter_shards(f, datacomp.list_shards(str(tmp_path)), out)
    expected = sorted(uid_of(i).lower() for i in (0, 3, 6, 9))
    assert datacomp.pairs_to_uids(datacomp.load_uids(out)).tolist() == expected
    assert datacomp.pairs_to_uids(pairs).tolist() == expected

    img = filters.ImageBasedFilter(
        cluster_centroids(), target_ids=np.array([0, 2]), language=stub_language
    )
    got = datacomp.pairs_to_uids(filters.filter_shards(img, urls)).tolist()
    assert got == sorted(uid_of(i).lower() for i in (0, 2, 4, 6, 10, 11, 12))


def test_missing_columns_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="exactly one"):
        filters.ClipScoreFilter(arch="b32")
    with pytest.raises(ValueError, match="arch"):
        filters.ClipScoreFilter(arch="h14", threshold=0.2)
    with pytest.raises(ValueError, match="l14_img"):
        filters.ImageBasedFilter(
            cluster_centroids(), target_ids=np.array([0]), language=stub_language
        ).score(pool_table().drop_columns(["l14_img"]))
    with pytest.raises(ValueError, match="unknown DataComp baseline"):
        filters.make_filter("text_baseed")


def test_pool_centroids_from_caption_filtered_shards_and_target_files(tmp_path):
    pytest.importorskip("faiss")
    urls = _write_pool(tmp_path)
    texts = pool_table().column("text")
    assert kept_rows(filters.caption_filter(texts, stub_language)) == [
        0, 2, 4, 5, 6, 7, 9, 10, 11, 12,
    ]  # fmt: skip
    c = filters.train_pool_centroids(urls, 4, sample_ratio=None, seed=0, language=stub_language)
    assert c.shape == (4, DIM)
    assert np.array_equal(c, filters.train_pool_centroids(urls, 4, seed=0, language=stub_language))
    # 10 caption-passing rows sit near 4 axes: each trained centroid is one axis' cluster
    labels = filters.assign_centroids(pool_embeddings().astype(np.float32), c, rule="l2")
    kept = filters.caption_filter(texts, stub_language)
    clusters = np.array([r[6] for r in ROWS])
    assert all(len(np.unique(clusters[kept][labels[kept] == j])) == 1 for j in range(4))
    with pytest.raises(ValueError, match="num_clusters"):
        filters.train_pool_centroids(urls, 11, language=stub_language)

    # targets given as embedding files (.npy and .npz), any number of them
    np.save(tmp_path / "t0.npy", np.eye(4, DIM, dtype=np.float32)[[0]])
    np.savez(tmp_path / "t1.npz", image_features=np.eye(4, DIM, dtype=np.float16)[[2]])
    f = filters.ImageBasedFilter(
        cluster_centroids(),
        target_embeddings=[str(tmp_path / "t0.npy"), str(tmp_path / "t1.npz")],
        language=stub_language,
    )
    f.setup()
    assert f.target_ids.tolist() == [0, 2]


# --------------------------------------------------------------------------------------------
# Our scored output as input: embeddings in Parquet fixed-size-list columns, 24-hex uids


def scored_table(n: int = 6, dim: int = 4, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """A table in `curation score`'s output format (no .npz)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim)).astype(np.float16)
    txt = rng.standard_normal((n, dim)).astype(np.float16)
    table = pa.table(
        {
            "uid": [f"{i:024x}" for i in range(n)],
            "key": [f"{i:09d}" for i in range(n)],
            "url": [f"http://x/{i}.jpg" for i in range(n)],
            "text": [ROWS[i % len(ROWS)][0] for i in range(n)],
            "original_width": pa.array(np.full(n, 300), pa.int32()),
            "original_height": pa.array(np.full(n, 300), pa.int32()),
            "clip_score": pa.array(np.linspace(0.1, 0.35, n), pa.float32()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), dim),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), dim),
        }
    )
    return table, img


def test_read_shard_takes_embeddings_from_parquet_columns(tmp_path):
    import pyarrow.parquet as pq

    table, img = scored_table()
    url = str(tmp_path / "part-00000.parquet")
    pq.write_table(table, url)
    got = datacomp.read_shard(url, columns=["uid"], embeddings=["image_embedding"])
    assert got.column_names == ["uid", "image_embedding"]
    assert got.schema.field("image_embedding").type == pa.list_(pa.float16(), 4)
    assert np.array_equal(datacomp.embedding_matrix(got, "image_embedding", np.float16), img)
    # all columns: the embedding is not duplicated
    assert datacomp.read_shard(url, embeddings=["image_embedding"]).column_names == (
        table.column_names
    )
    picked = datacomp.read_embeddings(url, ["image_embedding"], rows=np.array([4, 1]))
    m = datacomp.embedding_matrix(pa.table(picked), "image_embedding", np.float16)
    assert np.array_equal(m, img[[4, 1]])
    with pytest.raises(ValueError, match=r"no column 'l14_img' and no .*00000\.npz"):
        datacomp.read_shard(url, embeddings=["l14_img"])
    with pytest.raises(ValueError, match="image_embedding"):  # names what the shard has
        datacomp.check_shard_columns(url, ["uid"], ["l14_img"])
    datacomp.check_shard_columns(url, ["uid", "clip_score"], ["image_embedding"])


def test_npz_embeddings_gathered_by_row(tmp_path):
    url = str(tmp_path / "s.parquet")
    emb = pool_embeddings()
    datacomp.write_shard(url, pool_table().drop_columns(["l14_img"]), {"l14_img": emb})
    picked = datacomp.read_embeddings(url, ["l14_img"], rows=pa.array([12, 0, 5]))
    m = datacomp.embedding_matrix(pa.table(picked), "l14_img", np.float16)
    assert np.array_equal(m, emb[[12, 0, 5]])
    with pytest.raises(ValueError, match="l14_txt"):
        datacomp.check_shard_columns(url, ["uid"], ["l14_txt"])


def test_embedding_matrix_list_columns_and_nulls():
    lists = pa.table({"e": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))})
    assert datacomp.embedding_matrix(lists, "e").tolist() == [[1, 2], [3, 4]]
    ragged = pa.table({"e": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match="different lengths"):
        datacomp.embedding_matrix(ragged, "e")
    nulls = pa.table({"e": pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2))})
    with pytest.raises(ValueError, match="null embedding.*row 1"):
        datacomp.embedding_matrix(nulls, "e")


def test_uid_file_problem_for_non_datacomp_uids():
    ok = pa.array([uid_of(1), uid_of(2).upper()])
    assert datacomp.uid_file_problem(ok) is None
    ours = pa.chunked_array([[f"{i:024x}" for i in range(3)], [uid_of(3)]])
    msg = datacomp.uid_file_problem(ours, where="runs/x/filter")
    assert msg.startswith("3 of 4 uids in runs/x/filter are not 32 hex digits")
    assert "'000000000000000000000000'" in msg and "not written" in msg
    mask = datacomp.is_datacomp_uid(pa.array([uid_of(1), None, "g" * 32, uid_of(2) + "0"]))
    assert mask.tolist() == [True, False, False, False]


# --------------------------------------------------------------------------------------------
# Score columns, composition, parameters


def test_clip_score_on_a_named_column_and_fitted():
    table, _ = scored_table(n=10)
    f = filters.ClipScoreFilter(column="clip_score", fraction=0.3, threshold_mode="exact")
    assert f.columns == ("clip_score",) and f.fit_columns == ("clip_score",)
    f.fit([f.score_for_fit(table)])
    # scores 0.1 .. 0.35 in 10 steps; exact top 3 -> threshold is the 3rd largest
    want = float(np.linspace(0.1, 0.35, 10).astype(np.float32)[7])
    assert f.threshold == pytest.approx(want)
    assert kept_rows(f.keep(table)) == [7, 8, 9]
    assert f.fitted() == {
        "clip_score": {
            "threshold": f.threshold,
            "fraction": 0.3,
            "threshold_mode": "exact",
            "column": "clip_score",
        }
    }
    assert f.fit_columns == () and f.score_for_fit(table) == {}  # nothing left to fit
    l2b = filters.Laion2bFilter(language=stub_language, column="clip_score")
    assert l2b.columns == ("text", "clip_score")


def test_all_of_and_any_of_hand_checked():
    from curation.stages.filters.apply import first_failure_counts, step_counts

    basic = filters.BasicFilter(language=stub_language)  # keeps [0, 5, 9, 11]
    clip = filters.ClipScoreFilter(arch="l14", threshold=0.33)  # keeps [0, 3, 6]
    table = pool_table()
    both = filters.AllOf([basic, clip])
    either = filters.AnyOf([basic, clip])
    assert both.name == "basic_filter+clip_score" and either.name == "basic_filter|clip_score"
    assert (both.combine, either.combine) == ("and", "or")
    sb, se = both.score(table), either.score(table)
    assert kept_rows(both.keep(sb)) == [0]
    assert kept_rows(either.keep(se)) == [0, 3, 5, 6, 9, 11]
    assert list(either.conditions(se)) == ["any_step"]
    assert first_failure_counts(either.conditions(se), len(ROWS)) == {"rows_dropped_any_step": 7}
    assert [(n, kept_rows(m)) for n, m in either.steps(se)] == [
        ("basic_filter", [0, 5, 9, 11]),
        ("clip_score", [0, 3, 6]),
    ]
    # and: a row leaves at its first failing step; or: it is kept by its first passing step
    assert step_counts(both, sb, len(ROWS)) == [
        {"name": "basic_filter", "rows_in": 13, "rows_kept": 4, "rows_passed_alone": 4},
        {"name": "clip_score", "rows_in": 4, "rows_kept": 1, "rows_passed_alone": 3},
    ]
    assert step_counts(either, se, len(ROWS)) == [
        {"name": "basic_filter", "rows_in": 13, "rows_kept": 4, "rows_passed_alone": 4},
        {"name": "clip_score", "rows_in": 9, "rows_kept": 2, "rows_passed_alone": 3},
    ]
    assert step_counts(basic, basic.score(table), len(ROWS)) == [
        {"name": "basic_filter", "rows_in": 13, "rows_kept": 4, "rows_passed_alone": 4}
    ]
    assert filters.combine_filters([basic], "or") is basic
    with pytest.raises(ValueError, match="distinct names"):
        filters.AnyOf([clip, filters.ClipScoreFilter(arch="b32", threshold=0.2)])


def test_combination_fits_each_step_on_the_whole_input():
    # the top 30% of the whole input, not of the rows the first step kept (as DataComp does)
    basic = filters.BasicFilter(language=stub_language)
    clip = filters.ClipScoreFilter(arch="l14", fraction=0.3)
    both = filters.AllOf([basic, clip])
    assert both.needs_fit and both.fit_columns == ("clip_l14_similarity_score",)
    table = pool_table()
    fit_scores = both.score_for_fit(table)
    assert list(fit_scores) == ["clip_score/clip_score"]  # basic is not scored for the fit
    both.fit([fit_scores])
    assert clip.threshold == 0.32 and not both.needs_fit
    assert both.fitted()["clip_score"]["threshold"] == 0.32
    assert kept_rows(both.keep(table)) == [0, 9]  # basic [0, 5, 9, 11] and l14 >= .32


BAD_PARAMS = [
    ("nope", {}, "unknown baseline 'nope'"),
    ("basic_filter", {"fraction": 0.3}, "basic_filter does not take ['fraction']"),
    ("no_filter", {"lid_model": "x"}, "takes: no parameters"),
    ("clip_score", {}, "exactly one of 'threshold' or 'fraction'"),
    ("clip_score", {"threshold": 0.2, "fraction": 0.3}, "exactly one"),
    ("clip_score", {"fraction": 1.5}, "'fraction' must be in [0, 1]"),
    ("clip_score", {"fraction": "0.3"}, "'fraction' must be a number"),
    ("clip_score", {"threshold": True}, "'threshold' must be a number"),
    ("clip_score", {"threshold": float("nan")}, "'threshold' must be a number"),
    ("clip_score", {"fraction": 0.3, "arch": "h14"}, "'arch' must be one of"),
    ("clip_score", {"fraction": 0.3, "arch": "l14", "score_column": "s"}, "not both"),
    ("clip_score", {"threshold": 0.3, "threshold_mode": "exact"}, "applies to 'fraction'"),
    ("clip_score", {"fraction": 0.3, "threshold_mode": "x"}, "'threshold_mode' must be"),
    ("clip_score", {"fraction": 0.3, "score_column": ""}, "'score_column' must be a non-empty"),
    ("image_based", {"target_embeddings": ["t.npy"]}, "needs 'centroids'"),
    ("image_based", {"centroids": "c.npy"}, "needs 'target_embeddings'"),
    ("image_based", {"centroids": "c.npy", "target_embeddings": []}, "'target_embeddings'"),
    ("image_based", {"centroids": "c.npy", "target_embeddings": [3]}, "'target_embeddings'"),
    ("image_based", {"centroids": 3, "target_embeddings": "t.npy"}, "'centroids'"),
    (
        "image_based",
        {"centroids": "c", "target_embeddings": "t", "assign_rule": "cos"},
        "'assign_rule' must be one of",
    ),
    ("laion2b", {"fraction": 0.3}, "laion2b does not take ['fraction']"),
]


@pytest.mark.parametrize(("baseline", "params", "message"), BAD_PARAMS)
def test_validate_params_names_the_key(baseline, params, message):
    with pytest.raises(ValueError) as info:
        filters.validate_params(baseline, params, where="steps[2]")
    assert str(info.value).startswith("steps[2]: ")
    assert message in str(info.value)


def test_filter_from_params_builds_each_baseline(tmp_path):
    torch = pytest.importorskip("torch")
    np.save(tmp_path / "c.npy", cluster_centroids())
    torch.save(torch.eye(4, DIM)[[0, 2]], tmp_path / "t.pt")  # a DataComp-style torch asset
    f = filters.filter_from_params(
        "image_based",
        {
            "centroids": str(tmp_path / "c.npy"),
            "target_embeddings": str(tmp_path / "t.pt"),
            "embedding_key": "image_embedding",
            "assign_rule": "l2",
            "lid_model": "/models/lid.176.bin",
        },
        name="ib",
    )
    assert isinstance(f, filters.ImageBasedFilter) and f.name == "ib"
    assert (f.key, f.rule, f.embedding_columns) == ("image_embedding", "l2", ("image_embedding",))
    assert f.language.model_path == "/models/lid.176.bin"
    f.prepare()  # targets -> centroid ids once, on the driver; the embeddings are dropped
    assert f.target_ids.tolist() == [0, 2] and f._target_embeddings is None
    clip = filters.filter_from_params("clip_score", {"score_column": "clip_score", "fraction": 0.3})
    assert (clip.key, clip.fraction, clip.threshold_mode) == ("clip_score", 0.3, "datacomp")
    b32 = filters.filter_from_params("clip_score", {"arch": "b32", "threshold": 0.25})
    assert (b32.key, b32.threshold) == ("clip_b32_similarity_score", 0.25)
    assert filters.filter_from_params("laion2b", {}).key == "clip_b32_similarity_score"
    assert filters.filter_from_params("text_based", {}).name == "text_based"
    both = filters.filter_from_params(
        "image_based_intersect_clip_score",
        {"centroids": str(tmp_path / "c.npy"), "target_embeddings": [str(tmp_path / "t.pt")]}
        | {"fraction": 0.3},
    )
    assert isinstance(both, filters.AllOf) and both.name == "image_based_intersect_clip_score"
    assert both.embedding_columns == ("l14_img",)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        filters.filter_from_params(
            "image_based",
            {"centroids": str(tmp_path / "missing.npy"), "target_embeddings": "t.npy"},
        )


def test_language_id_and_prepared_filters_pickle_without_models():
    import pickle

    lid = filters.LanguageId()
    lid.setup()
    clone = pickle.loads(pickle.dumps(lid))
    assert clone._model is None and lid._model is not None
    assert clone(pa.array(["a small dog sleeping on the sofa"])).tolist() == ["en"]


def test_cli_baselines_are_the_filters():
    from curation import cli

    assert cli.BASELINES == filters.BASELINES
    assert set(filters.STEP_PARAMS) == set(filters.BASELINES)


# --------------------------------------------------------------------------------------------
# DataComp torch assets


def test_convert_torch_assets(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.randn(5, DIM)
    torch.save(x, tmp_path / "c.pt")
    info = datacomp.convert_torch_asset(str(tmp_path / "c.pt"), str(tmp_path / "c.npy"))
    assert info["shape"] == [5, DIM] and info["dtype"] == "float32"
    assert np.array_equal(np.load(tmp_path / "c.npy"), x.numpy())
    # float16 stays float16; --dtype float16 casts; a dict with one 2-D tensor is accepted
    torch.save({"features": x.half(), "n": 5}, tmp_path / "f.pt")
    datacomp.convert_torch_asset(str(tmp_path / "f.pt"), str(tmp_path / "f.npy"))
    assert np.load(tmp_path / "f.npy").dtype == np.float16
    datacomp.convert_torch_asset(str(tmp_path / "c.pt"), str(tmp_path / "h.npy"), "float16")
    assert np.array_equal(np.load(tmp_path / "h.npy"), x.numpy().astype(np.float16))
    assert np.array_equal(datacomp.load_embedding_file(str(tmp_path / "c.pt")), x.numpy())
    torch.save(x.to(torch.bfloat16), tmp_path / "b.pt")
    assert datacomp.load_torch_matrix(str(tmp_path / "b.pt")).dtype == np.float32
    torch.save({"a": x, "b": x * 2}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"2 2-D tensors \['a', 'b'\]"):
        datacomp.load_torch_matrix(str(tmp_path / "two.pt"))
    assert np.array_equal(datacomp.load_torch_matrix(str(tmp_path / "two.pt"), "b"), 2 * x)
    torch.save(torch.zeros(3), tmp_path / "one_d.pt")
    with pytest.raises(ValueError, match="2-D"):
        datacomp.load_torch_matrix(str(tmp_path / "one_d.pt"))
    torch.save(torch.zeros(3, 2, dtype=torch.int64), tmp_path / "ints.pt")
    with pytest.raises(ValueError, match="float tensor"):
        datacomp.load_torch_matrix(str(tmp_path / "ints.pt"))
    with pytest.raises(ValueError, match=r"\.npy"):
        datacomp.convert_torch_asset(str(tmp_path / "c.pt"), str(tmp_path / "c.npz"))


class _Sneaky:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_file_with_a_pickled_object_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    sentinel = tmp_path / "pwned"
    torch.save({"centroids": torch.zeros(2, 2), "x": _Sneaky(str(sentinel))}, tmp_path / "bad.pt")
    for load in (
        lambda: datacomp.load_torch_matrix(str(tmp_path / "bad.pt")),
        lambda: datacomp.convert_torch_asset(str(tmp_path / "bad.pt"), str(tmp_path / "o.npy")),
        lambda: datacomp.load_embedding_file(str(tmp_path / "bad.pt")),
    ):
        with pytest.raises(ValueError, match="refused"):
            load()
    assert not sentinel.exists() and not (tmp_path / "o.npy").exists()
    # a plain pickle (not a torch zip) is refused too, not unpickled
    import pickle

    (tmp_path / "plain.pt").write_bytes(pickle.dumps(_Sneaky(str(sentinel))))
    with pytest.raises(ValueError, match="refused"):
        datacomp.load_torch_matrix(str(tmp_path / "plain.pt"))
    assert not sentinel.exists()


def test_cli_convert_assets_and_filter_usage_errors(tmp_path):
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from curation.cli import main

    torch.save(torch.ones(3, 4), tmp_path / "c.pt")
    runner = CliRunner()
    res = runner.invoke(
        main, ["filter", "convert-assets", str(tmp_path / "c.pt"), "-o", str(tmp_path / "c.npy")]
    )
    assert res.exit_code == 0, res.output
    assert "(3, 4) float32" in res.output and np.load(tmp_path / "c.npy").shape == (3, 4)
    res = runner.invoke(main, ["filter", "--help"])
    assert "convert-assets" in res.output and "apply" in res.output
    # options a baseline does not take are refused before Ray starts (ray.init raises here)
    res = runner.invoke(
        main,
        ["filter", str(tmp_path), "--baseline", "basic_filter", "--fraction", "0.3", "-o", "x"],
    )
    assert res.exit_code == 2 and "does not take [--fraction]" in res.output
    res = runner.invoke(main, ["filter", str(tmp_path), "--baseline", "clip_score", "-o", "x"])
    assert res.exit_code == 2 and "exactly one of --threshold or --fraction" in res.output
