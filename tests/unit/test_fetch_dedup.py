"""Duplicate uids before a fetch: whole-column dedup over the curated parts, staged once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.core.stage import Shard
from curation.flows import fetch


def reference(parts: list[list[str]]) -> list[list[bool]]:
    """The rule, row by row: keep the first row of each uid in input order."""
    seen: set[str] = set()
    out = []
    for part in parts:
        keep = []
        for u in part:
            keep.append(u not in seen)
            seen.add(u)
        out.append(keep)
    return out


def first_seen(parts: list[list[str]]) -> list[list[bool]]:
    seen = fetch.SeenUids()
    return [seen.first_seen(pa.array(p, pa.string())).tolist() for p in parts]


def test_first_occurrence_inside_and_across_parts():
    parts = [
        ["a", "b", "a", "c"],  # "a" again inside the part
        ["c", "d", "b", "e", "d"],  # "c" and "b" from part 0, "d" twice here
        [],
        ["a"],  # only a duplicate: nothing kept
        ["f", "a_much_longer_uid-0", "f"],  # longer uids widen what was seen before
        ["a_much_longer_uid-0", "ab", "a", "a_much_longer_uid-1"],  # prefixes are not equal
    ]
    assert first_seen(parts) == [
        [True, True, False, True],
        [False, True, False, True, False],
        [],
        [False],
        [True, True, False],
        [False, True, False, True],
    ]


def test_chunked_and_sliced_columns():
    seen = fetch.SeenUids()
    col = pa.chunked_array([pa.array(["x", "y", "z", "y"]).slice(1), pa.array(["w", "z"])])
    assert seen.first_seen(col).tolist() == [True, True, False, True, False]
    assert seen.first_seen(pa.array(["x", "w"], pa.large_string())).tolist() == [True, False]
    assert len(seen) == 4
    with pytest.raises(ValueError, match="null uid"):
        seen.first_seen(pa.array(["q", None]))


def test_matches_the_row_by_row_rule_on_many_parts():
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ab0_-"))
    parts = []
    for _ in range(60):
        n = int(rng.integers(0, 40))
        lengths = rng.integers(1, 6, n)
        parts.append(["".join(rng.choice(alphabet, k)) for k in lengths])
    seen = fetch.SeenUids()
    got = [seen.first_seen(pa.array(p, pa.string())).tolist() for p in parts]
    assert got == reference(parts)
    distinct = len({u for p in parts for u in p})
    assert len(seen) == distinct
    assert len(seen._runs) <= np.log2(distinct) + 1  # runs are merged as they grow


def test_plan_reads_uids_once_and_stages_first_rows(tmp_path, monkeypatch):
    uids = [["u1", "u2", "u1", "u3"], ["u2", "u4", "u5"], ["u4"], ["u6", "u7"]]
    parts = []
    for i, rows in enumerate(uids):
        url = str(tmp_path / f"part-{i}.parquet")
        n = len(rows)
        texts = [f"{u} in part {i} row {r}" for r, u in enumerate(rows)]
        urls = [f"http://x/{i}/{r}.jpg" for r in range(n)]
        pq.write_table(pa.table({"uid": rows, "url": urls, "text": texts}), url)
        parts.append(Shard(f"p{i}", url))
    staged_dir = str(tmp_path / "staged")

    def no_full_read(url):
        raise AssertionError("planning reads only the uid column")

    with monkeypatch.context() as m:
        m.setattr(fetch, "_read_part", no_full_read)
        staging = fetch._plan_inputs(parts, staged_dir, per_shard=2)
    assert staging.counts == {"rows_read": 10, "rows_dropped_duplicate_uid": 3}
    assert [(p.name, p.start, p.end) for p in staging.planned] == [
        ("p0-00000", 0, 2),
        ("p0-00001", 2, 3),
        ("p1-00000", 0, 2),
        ("p3-00000", 0, 2),  # part 2 has only a duplicate: no shard
    ]
    assert [p.i2d_id for p in staging.planned] == [0, 1, 2, 3]
    # only parts with duplicates keep a mask; a part with none is staged whole
    assert [keep is None for _, keep in staging.staged.values()] == [False, False, True]

    fetch._stage_inputs(staging)
    staged = {p.staged for p in staging.planned}
    assert sorted(staged) == sorted(staging.staged)
    rows = [pq.read_table(u).to_pydict() for u in sorted(staged)]
    assert [r["uid"] for r in rows] == [["u1", "u2", "u3"], ["u4", "u5"], ["u6", "u7"]]
    assert rows[0]["text"] == ["u1 in part 0 row 0", "u2 in part 0 row 1", "u3 in part 0 row 3"]
    assert rows[1]["url"] == ["http://x/1/1.jpg", "http://x/1/2.jpg"]


def test_plan_refuses_bad_uids_before_writing(tmp_path):
    url = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"uid": ["ok", "not.ok"], "url": ["a", "b"], "text": ["", ""]}), url)
    with pytest.raises(ValueError, match="'not.ok' cannot be a webdataset key"):
        fetch._plan_inputs([Shard("bad", url)], str(tmp_path / "staged"), per_shard=2)
    pq.write_table(pa.table({"uid": ["ok"], "url": ["a"]}), url)
    with pytest.raises(ValueError, match="no column"):
        fetch._plan_inputs([Shard("bad", url)], str(tmp_path / "staged"), per_shard=2)
    assert not (tmp_path / "staged").exists()
