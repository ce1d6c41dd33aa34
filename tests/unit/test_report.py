"""Report: head/tail table, top entries, and deterministic report files."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from curation.io.report import head_tail, top_entries, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_head_tail_hand_example():
    counts = np.array([0, 5, 10, 3, 0, 20, 9], dtype=np.uint64)
    assert head_tail(counts, 10) == {
        "head_entries": 2,  # 10 and 20: count == t is head
        "head_matches": 30,
        "tail_entries": 3,  # 5, 3, 9 (zeros are unmatched, not tail)
        "tail_matches": 17,
        "unmatched_entries": 2,
    }


def test_head_tail_partitions_all_entries_and_matches():
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, size=500).astype(np.uint64) * rng.integers(0, 2, size=500).astype(
        np.uint64
    )
    for t in (1, 2, 7.5, 100, 10**9):
        h = head_tail(counts, t)
        assert h["head_entries"] + h["tail_entries"] + h["unmatched_entries"] == len(counts)
        assert h["head_matches"] + h["tail_matches"] == int(counts.sum())
        assert h["head_entries"] == int((counts >= t).sum())


def test_head_tail_extremes():
    counts = np.array([1, 2, 3], dtype=np.uint64)
    assert head_tail(counts, 1)["head_entries"] == 3
    assert head_tail(counts, 4)["tail_matches"] == 6
    assert head_tail(np.array([], dtype=np.uint64), 5) == {
        "head_entries": 0,
        "head_matches": 0,
        "tail_entries": 0,
        "tail_matches": 0,
        "unmatched_entries": 0,
    }


def test_top_entries_order_and_ties_by_entry_id():
    counts = np.array([3, 5, 5, 0, 3, 5, 7], dtype=np.uint64)
    entries = ["a", "b", "c", "d", "e", "f", "g"]
    got = top_entries(counts, entries, n=5)
    assert got == [
        {"entry_id": 6, "entry": "g", "count": 7},
        {"entry_id": 1, "entry": "b", "count": 5},
        {"entry_id": 2, "entry": "c", "count": 5},
        {"entry_id": 5, "entry": "f", "count": 5},
        {"entry_id": 0, "entry": "a", "count": 3},
    ]
    # ties with reversed entry names still go by id, not by name
    got = top_entries(np.array([2, 2, 2], dtype=np.uint64), ["z", "y", "x"], n=3)
    assert [x["entry_id"] for x in got] == [0, 1, 2]


def test_top_entries_skips_zero_counts_and_limits_n():
    counts = np.array([0, 1, 0, 4], dtype=np.uint64)
    got = top_entries(counts, ["a", "b", "c", "d"], n=10)
    assert [x["entry"] for x in got] == ["d", "b"]
    assert len(top_entries(np.arange(100, dtype=np.uint64), [str(i) for i in range(100)])) == 20
    assert top_entries(np.zeros(4, dtype=np.uint64), list("abcd")) == []


def test_top_entries_large_counts_exact():
    big = 3_000_000_000_000
    got = top_entries(np.array([big, big + 1], dtype=np.uint64), ["a", "b"])
    assert got[0] == {"entry_id": 1, "entry": "b", "count": big + 1}
    assert json.dumps(got)  # plain ints, JSON serializable


def _report_files(out: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(out)
    return {
        p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.find(root.rstrip("/") + "/report"))
    }


@pytest.fixture
def report_inputs():
    before = np.array([100, 50, 5, 0, 12], dtype=np.uint64)
    after = np.array([10, 10, 5, 0, 10], dtype=np.uint64)
    entries = ["alpha", "beta", "gamma", "delta", "eps"]
    return before, after, entries


def test_write_report_files(tmp_path, report_inputs):
    before, after, entries = report_inputs
    summary = write_report(str(tmp_path), before, after, entries, 10, 0.25)
    files = _report_files(str(tmp_path))
    assert set(files) == {"entry_counts.png", "summary.json", "summary.md"}
    png = files["entry_counts.png"]
    assert png[:8] == PNG_SIGNATURE
    assert png[12:16] == b"IHDR" and png[-8:-4] == b"IEND"
    on_disk = json.loads(files["summary.json"])
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["t"] == 10 and on_disk["tail_proportion"] == 0.25
    assert on_disk["before"] == head_tail(before, 10)
    assert on_disk["after"] == head_tail(after, 10)
    assert on_disk["top_before"][0] == {"entry_id": 0, "entry": "alpha", "count": 100}
    assert [x["entry_id"] for x in on_disk["top_after"]] == [0, 1, 4, 2]  # ties by id
    md = files["summary.md"].decode()
    assert md.startswith("# Curation report")
    assert "| before | 3 | 162 | 1 | 5 | 1 |" in md
    assert "| after | 3 | 30 | 1 | 5 | 1 |" in md
    assert "| 1 | alpha | 100 | alpha | 10 |" in md
    assert "entry_counts.png" in md
    # atomic writes leave no temporary files behind
    assert not [p for p in (tmp_path / "report").iterdir() if ".tmp-" in p.name]


def test_write_report_twice_is_byte_identical(tmp_path, report_inputs):
    before, after, entries = report_inputs
    write_report(str(tmp_path / "a"), before, after, entries, 10, 0.25)
    first = _report_files(str(tmp_path / "a"))
    write_report(str(tmp_path / "a"), before, after, entries, 10, 0.25)
    write_report(str(tmp_path / "b"), before, after, entries, 10, 0.25)
    assert _report_files(str(tmp_path / "a")) == first
    assert _report_files(str(tmp_path / "b")) == first


def test_write_report_memory_url_and_nothing_matched():
    out = "memory://report-unit/run"
    z = np.zeros(3, dtype=np.uint64)
    summary = write_report(out, z, z, ["a", "b", "c"], 5, 0.1)
    assert summary["top_before"] == [] and summary["before"]["unmatched_entries"] == 3
    files = _report_files(out)
    assert files["entry_counts.png"][:8] == PNG_SIGNATURE
    assert json.loads(files["summary.json"])["after"]["head_entries"] == 0
