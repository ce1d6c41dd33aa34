"""The executor's contract with stages, on the session's local Ray cluster: a stage is set up
once per worker and reused across shards; transient I/O errors are retried, never recorded."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from curation.core.stage import Shard, Stage, StageOutput
from curation.executor.runner import run_stage

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


class CountingSetups(Stage):
    """Doubles `x`; every setup() leaves a file named after its process and a counter."""

    name = "double"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.ready = False

    def setup(self) -> None:
        n = len(os.listdir(self.log_dir))
        Path(self.log_dir, f"setup-{os.getpid()}-{n}").write_text("")
        self.ready = True

    def process(self, table: pa.Table) -> StageOutput:
        assert self.ready, "process before setup"
        out = table.set_column(0, "x", pa.compute.multiply(table.column("x"), 2))
        return StageOutput(out, Counter(rows_read=table.num_rows))


class FailsOnce(Stage):
    """Raises an OSError (a storage blip) the first time it sees each shard."""

    name = "flaky"

    def __init__(self, marks: str, error: type[OSError] = ConnectionResetError) -> None:
        self.marks, self.error = marks, error

    def process(self, table: pa.Table) -> StageOutput:
        key = Path(self.marks, str(table.column("shard")[0]))
        if not key.exists():
            key.write_text("")
            raise self.error("injected")
        return StageOutput(table, Counter(rows_read=table.num_rows))


def _shards(tmp_path: Path, n: int) -> list[Shard]:
    shards = []
    for i in range(n):
        p = tmp_path / "in" / f"part-s{i}.parquet"
        p.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"x": [i, i + 1], "shard": [f"s{i}", f"s{i}"]}), p)
        shards.append(Shard(f"s{i}", str(p)))
    return shards


def test_setup_runs_once_per_worker_not_once_per_shard(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    shards = _shards(tmp_path, 12)
    markers = run_stage(
        CountingSetups(str(log)), shards, str(tmp_path / "out"), fp={"t": 1}, progress=False
    )
    assert len(markers) == 12
    setups = os.listdir(log)
    pids = {s.split("-")[1] for s in setups}
    assert len(setups) == len(pids)  # never twice in one process
    assert len(setups) < len(shards)
    got = pq.read_table(tmp_path / "out" / "part-s3.parquet").column("x").to_pylist()
    assert got == [6, 8]


def test_transient_io_error_is_retried_and_the_shard_completes(tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    shards = _shards(tmp_path, 3)
    markers = run_stage(
        FailsOnce(str(marks)), shards, str(tmp_path / "out"), fp={"t": 1}, progress=False
    )
    assert sorted(os.listdir(marks)) == ["s0", "s1", "s2"]  # each failed once
    assert all(m["counts"]["rows_written"] == 2 for m in markers.values())
    assert all("quarantine" not in m for m in markers.values())


def test_a_missing_file_is_not_retried(tmp_path):
    import ray

    marks = tmp_path / "marks"
    marks.mkdir()
    shards = _shards(tmp_path, 1)
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        run_stage(
            FailsOnce(str(marks), FileNotFoundError),
            shards,
            str(tmp_path / "out"),
            fp={"t": 1},
            progress=False,
        )
    assert isinstance(info.value.as_instanceof_cause(), FileNotFoundError)
    assert not (tmp_path / "out" / "_done" / "s0.json").exists()


def _square_plus(x: int) -> np.ndarray:
    return np.array([x, x * x, 1], dtype=np.int64)


def test_reduce_over_shards_is_a_tree_of_tasks_with_the_exact_total():
    """Every shape of tree (one item per leaf, fan-in 2, the default plan) gives the same exact
    total; only the final value reaches the driver."""
    from curation.executor.runner import reduce_over_shards, sum_over_shards

    items = list(range(37))
    want = np.array([sum(items), sum(x * x for x in items), len(items)])
    for batch, fan_in in ((1, 2), (3, 4), (None, 16)):
        got = reduce_over_shards(_square_plus, items, batch=batch, fan_in=fan_in)
        assert np.array_equal(got, want), (batch, fan_in)
    assert reduce_over_shards(_square_plus, []) is None
    assert sum_over_shards(_square_plus, [], 3).tolist() == [0, 0, 0]
