"""The uid file's external sort (`io.uidsort`): runs, bounded block merges, the streamed `.npy`."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.io import datacomp, uidsort

DT = datacomp.UID_DTYPE


def pairs(values: list[tuple[int, int]]) -> np.ndarray:
    return np.array(values, dtype=DT).reshape(len(values))


def npsave(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# Few distinct f0 and f1 values: many duplicates and many equal f0 with different f1; the
# extremes check that uint64 is compared unsigned.
U64 = st.sampled_from([0, 1, 2, 2**63 - 1, 2**63, 2**64 - 1])
PAIR = st.tuples(U64, U64)
RUN = st.lists(PAIR, max_size=30).map(lambda v: np.sort(pairs(v)))


def blocks_of(run: np.ndarray, sizes: list[int], log: list[int]):
    """`run` as consecutive blocks of the given sizes (cycled; 0 gives an empty block), each
    block's size logged when it is handed out."""
    i, k = 0, 0
    while i < len(run):
        n = sizes[k % len(sizes)]
        k += 1
        log.append(n)
        yield run[i : i + n]
        i += n


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(RUN, max_size=6),
    sizes=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4).filter(any), max_size=6),
)
def test_merge_blocks_equals_sorting_the_concatenation(runs, sizes):
    sizes = [sizes[i] if i < len(sizes) else [1 + i] for i in range(len(runs))]
    logs: list[list[int]] = [[] for _ in runs]
    sources = [blocks_of(r, s, log) for r, s, log in zip(runs, sizes, logs, strict=True)]
    out = []
    emitted = 0
    for block in uidsort.merge_blocks(sources):
        assert block.dtype == DT and len(block)
        out.append(block)
        emitted += len(block)
        # bounded: what was read but not yet emitted is at most one block per run
        assert sum(map(sum, logs)) - emitted <= sum(max(s) for s in sizes)
    got = np.concatenate(out) if out else np.empty(0, DT)
    want = np.sort(np.concatenate(runs)) if runs else np.empty(0, DT)
    assert got.tobytes() == want.tobytes()


def test_merge_blocks_small_blocks_equal_f0_and_empty_runs():
    a = pairs([(1, 5), (1, 9), (2, 0), (2, 0), (7, 1)])
    b = pairs([(1, 1), (1, 7), (2, 0), (3, 3)])
    empty = np.empty(0, DT)
    merged = np.concatenate(
        list(uidsort.merge_blocks([iter([a[:2], a[2:3], a[3:]]), iter([]), iter([empty, b])]))
    )
    assert merged.tolist() == [
        (1, 1),
        (1, 5),
        (1, 7),
        (1, 9),
        (2, 0),
        (2, 0),
        (2, 0),
        (3, 3),
        (7, 1),
    ]
    assert list(uidsort.merge_blocks([])) == []
    assert list(uidsort.merge_blocks([iter([empty]), iter([])])) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(PAIR, max_size=60))
def test_sort_pairs_is_np_sort(values):
    arr = pairs(values)
    assert uidsort.sort_pairs(arr).tobytes() == np.sort(arr).tobytes()


def test_sort_pairs_on_random_uids_with_equal_f0():
    rng = np.random.default_rng(0)
    arr = np.empty(5000, DT)
    arr["f0"] = rng.integers(0, 50, len(arr), dtype=np.uint64)  # most f0 tie
    arr["f1"] = rng.integers(0, 2**64 - 1, len(arr), dtype=np.uint64, endpoint=True)
    assert uidsort.sort_pairs(arr).tobytes() == np.sort(arr).tobytes()


@pytest.mark.parametrize("count", [0, 1, 2, 9, 10, 99, 1000, 123456])
def test_npy_header_is_what_np_save_writes(count):
    arr = np.zeros(count, DT)
    assert npsave(arr) == uidsort.npy_header(count) + arr.tobytes()


def test_npy_header_of_a_huge_count_parses_back():
    h = uidsort.npy_header(12_800_000_000)
    assert len(h) % 64 == 0
    f = io.BytesIO(h)
    assert np.lib.format.read_magic(f) == (1, 0)
    assert np.lib.format.read_array_header_1_0(f) == ((12_800_000_000,), False, DT)


def uid_hex(rng: np.random.Generator, n: int) -> list[str]:
    f0 = rng.integers(0, 8, n)  # equal upper halves, different lower halves
    return [
        f"{int(a):016x}{int(b):016x}" for a, b in zip(f0, rng.integers(0, 2**62, n), strict=True)
    ]


def write_part(path, uids) -> str:
    pq.write_table(pa.table({"uid": pa.array(uids, pa.string())}), str(path))
    return str(path)


@pytest.mark.parametrize("block_rows", [1, 3, 1 << 19])
def test_runs_merged_and_streamed_equal_save_uids(tmp_path, block_rows):
    rng = np.random.default_rng(1)
    parts_uids = [uid_hex(rng, n) for n in (40, 0, 1, 25, 33, 40)]
    parts_uids[3] += parts_uids[0][:5] + parts_uids[3][:2]  # duplicates across and within
    parts_uids[4] = [u.upper() for u in parts_uids[4]]
    runs = []
    for i, uids in enumerate(parts_uids):
        part = write_part(tmp_path / f"part-{i}.parquet", uids)
        r = uidsort.write_part_run(part, str(tmp_path / "tmp" / f"{i}.run"))
        assert (r["rows"], r["bad"], r["first"]) == (len(uids), 0, None)
        assert (r["run"] is None) == (not uids)
        runs.append((r["run"], r["rows"]))
    # two levels: runs 0-2 and 3-5 merged, then the .npy
    m1 = uidsort.merge_runs(runs[:3], str(tmp_path / "tmp" / "m1.run"), block_rows)
    m2 = uidsort.merge_runs(runs[3:], str(tmp_path / "tmp" / "m2.run"), block_rows)
    assert m1[1] == 41 and m2[1] == len(parts_uids[3]) + 73
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["m1.run", "m2.run"]
    out = tmp_path / "uids.npy"
    all_uids = [u for uids in parts_uids for u in uids]
    assert uidsort.write_uid_npy([m1, m2], str(out), block_rows) == len(all_uids)
    datacomp.save_uids(str(tmp_path / "ref.npy"), all_uids)
    assert out.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_empty_uid_file_equals_save_uids(tmp_path):
    assert uidsort.write_uid_npy([(None, 0)], str(tmp_path / "a.npy")) == 0
    assert uidsort.merge_runs([(None, 0)], str(tmp_path / "m.run")) == (None, 0)
    datacomp.save_uids(str(tmp_path / "b.npy"), [])
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_merge_runs_is_idempotent_when_retried_after_deleting_inputs(tmp_path):
    a, b = pairs([(1, 1), (3, 3)]), pairs([(2, 2)])
    (tmp_path / "a.run").write_bytes(a.tobytes())
    (tmp_path / "b.run").write_bytes(b.tobytes())
    runs = [(str(tmp_path / "a.run"), 2), (str(tmp_path / "b.run"), 1)]
    out = str(tmp_path / "m.run")
    assert uidsort.merge_runs(runs, out, 1) == (out, 3)
    assert not (tmp_path / "a.run").exists() and not (tmp_path / "b.run").exists()
    assert uidsort.merge_runs(runs, out, 1) == (out, 3)  # a retry after the deletion
    assert (tmp_path / "m.run").read_bytes() == np.sort(np.concatenate([a, b])).tobytes()
    (tmp_path / "m.run").unlink()
    with pytest.raises(FileNotFoundError):
        uidsort.merge_runs(runs, out, 1)


def test_a_count_mismatch_commits_nothing(tmp_path):
    (tmp_path / "a.run").write_bytes(pairs([(1, 1)]).tobytes())
    with pytest.raises(ValueError, match="merged 1 uids, expected 2"):
        uidsort.write_uid_npy([(str(tmp_path / "a.run"), 2)], str(tmp_path / "u.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.run"]


def test_truncated_run_is_refused(tmp_path):
    (tmp_path / "a.run").write_bytes(pairs([(1, 1)]).tobytes()[:-3])
    with open(tmp_path / "a.run", "rb") as f, pytest.raises(ValueError, match="truncated"):
        list(uidsort.iter_blocks(f, 4))


def test_a_bad_part_writes_no_run(tmp_path):
    part = write_part(tmp_path / "p.parquet", ["0" * 32, "abc", None, "f" * 32])
    r = uidsort.write_part_run(part, str(tmp_path / "p.run"))
    assert (r["rows"], r["bad"], r["first"], r["run"]) == (4, 2, "abc", None)
    assert not (tmp_path / "p.run").exists()


UID = st.one_of(
    st.text("0123456789abcdefABCDEF", min_size=32, max_size=32),
    st.text("0123456789abcdefg", min_size=0, max_size=34),
    st.none(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(UID, max_size=6), max_size=5))
def test_summed_checks_say_what_uid_file_problem_says(batches):
    checks = [datacomp.uid_check(pa.array(b, pa.string())) for b in batches]
    first = next((c[2] for c in checks if c[1]), None)
    got = datacomp.uid_problem_message(
        sum(c[0] for c in checks), sum(c[1] for c in checks), first, where="w"
    )
    whole = pa.chunked_array([pa.array(b, pa.string()) for b in batches], pa.string())
    assert got == datacomp.uid_file_problem(whole, where="w") == old_uid_file_problem(whole, "w")


def old_uid_file_problem(uids: pa.ChunkedArray, where: str) -> str | None:
    """`uid_file_problem` as it was when the uid file was written in the driver."""
    ok = datacomp.is_datacomp_uid(uids)
    if ok.all():
        return None
    bad = int(np.flatnonzero(~ok)[0])
    first = uids[bad].as_py() if hasattr(uids[bad], "as_py") else uids[bad]
    return (
        f"{int((~ok).sum()):,} of {len(ok):,} uids in {where} are not 32 hex digits (the first: "
        f"{first!r}); DataComp's uid file (u8,u8 pairs of 32-hex uids) cannot hold them, so it "
        "was not written; the kept rows and their uids, as given, are in the Parquet parts"
    )


# -- uids in more than one part --------------------------------------------------------------------
def python_repeated(parts: list[list[str | None]]) -> int:
    seen: dict[str, int] = {}
    for p in parts:
        for u in {u for u in p if u is not None}:
            seen[u] = seen.get(u, 0) + 1
    return sum(1 for n in seen.values() if n > 1)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.lists(st.one_of(st.none(), st.text("abcAB", max_size=3)), max_size=8), max_size=6
    ),
    block=st.integers(1, 4),
)
def test_count_repeated_keys_of_parts(parts, block):
    keys = [uidsort.uid_keys(pa.array(p, pa.string())) for p in parts]
    for k in keys:
        assert k.tobytes() == np.unique(k).tobytes()  # distinct, sorted
    sources = [blocks_of(k, [block], []) for k in keys]
    assert uidsort.count_repeated_blocks(uidsort.merge_blocks(sources)) == python_repeated(parts)


@pytest.mark.parametrize("block_rows", [1, 2, 1 << 19])
def test_count_repeated_from_run_files(tmp_path, block_rows):
    parts = [["a", "b", "b", None], ["b", "c", "a"], [], ["d", "a"], ["é", "e"], ["e"]]
    runs = []
    for i, uids in enumerate(parts):
        part = write_part(tmp_path / f"part-{i}.parquet", uids)
        runs.append(uidsort.write_part_keys(part, uidsort.part_run_url(str(tmp_path / "s"), i)))
    assert runs[2] == (None, 0) and [n for _, n in runs] == [2, 3, 0, 2, 2, 1]
    assert uidsort.count_repeated(runs, block_rows) == 3  # a, b, e


def test_count_repeated_blocks_across_block_boundaries():
    blocks = [pairs([(1, 1)]), pairs([(1, 1)]), pairs([(1, 1), (2, 2)]), pairs([]), pairs([(2, 2)])]
    assert uidsort.count_repeated_blocks(blocks) == 2
    assert uidsort.count_repeated_blocks([pairs([(1, 1), (1, 2)]), pairs([(1, 2), (3, 0)])]) == 1
    assert uidsort.count_repeated_blocks([]) == 0
