"""Each stage must read exactly what the previous one wrote (shards and rows)."""

from __future__ import annotations

import pytest

from curation.core.accounting import check_handoff


def _m(**rows: tuple[int, int]) -> dict[str, dict]:
    return {k: {"counts": {"rows_read": r, "rows_written": w}} for k, (r, w) in rows.items()}


def test_same_shards_and_rows_pass():
    check_handoff("ingest", _m(a=(5, 4), b=(3, 3)), "match", _m(a=(4, 4), b=(3, 3)))


def test_a_shard_the_next_stage_did_not_see_fails_loudly():
    with pytest.raises(RuntimeError, match=r"match read 1 shard\(s\) but ingest wrote 2.*'b'"):
        check_handoff("ingest", _m(a=(5, 4), b=(3, 3)), "match", _m(a=(4, 4)))


def test_a_shard_read_with_other_rows_fails_loudly():
    with pytest.raises(RuntimeError, match="read 2 rows of shard 'b' but ingest wrote 3"):
        check_handoff("ingest", _m(a=(5, 4), b=(3, 3)), "match", _m(a=(4, 4), b=(2, 2)))
