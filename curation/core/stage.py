"""The stage contract: every step of the pipeline is one of these, and none of them knows Ray.

A `Stage` turns one shard's table into another: `setup()` loads what it needs (an automaton, a
model, a table) once per worker process, and `process(table)` returns a `StageOutput`: the
output table, the shard's counters (`rows_read`, `rows_dropped_<reason>`, ...) and the records
it set aside (quarantine entries, see `core.accounting.quarantine_record`). `resources` says
what one copy needs (CPUs, GPUs; `actor=True` asks the executor for a pool of long-lived
actors, for GPU stages and stages whose setup is expensive). A `Source` is the first stage of a
flow: it reads one input shard (`read(shard)`) instead of a table.

Files: a stage names every file its `setup()` opens in `assets()` (name -> local path or URL).
Its parameters and fingerprint keep the driver's paths; on a cluster of several machines the
executor sends each local one to the workers through the object store and, in the worker, calls
`use_assets({name: local copy})` before `setup()` (see `core.assets`). Files on shared storage
(`s3://`, `gs://`, `https://`) and `bundled:` package resources are opened where they are.

Stages are unit-tested by calling `setup()` and `process()` on small tables; the executor
(`curation.executor`) maps them over shards, caches the set-up stage per worker, writes the
part and then the completion marker, and retries transient I/O errors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass(frozen=True)
class Shard:
    """One unit of work: a stable name (from the input file) and the input URL."""

    name: str
    input: str


@dataclass(frozen=True)
class Resources:
    """What one copy of a stage needs; the executor places it accordingly."""

    cpus: float = 1.0
    gpus: float = 0.0
    #: Run on a pool of long-lived actors (GPU stages, expensive setup) instead of tasks.
    actor: bool = False


@dataclass
class StageOutput:
    """What a stage produced for one shard.

    `counts` must reconcile: `rows_read = rows_written + Σ rows_dropped_<reason>` (the executor
    sets `rows_written` from the table). `extra` goes into the shard's marker as it is (e.g. the
    input's checksum, a filter's per-step counts).
    """

    table: pa.Table
    counts: Counter = field(default_factory=Counter)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """A per-shard table transform. Subclasses set `name`, maybe `resources`, and implement
    `process`; `setup` is optional. Objects are pickled to workers before `setup`, so anything
    `setup` loads must stay out of the pickled state."""

    name: str = "stage"
    resources: Resources = Resources()

    def setup(self) -> None:
        """Load models / automata / tables; called once per worker before the first shard."""

    def assets(self) -> dict[str, str]:
        """The files `setup()` opens, by a name of the stage's choosing: each a local path, a
        `file://` or remote URL, or a `bundled:` resource (default: none); after `use_assets`,
        the copies it was given. A stage whose setup opens a file not listed here only works
        where that path exists on every node."""
        return {}

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Open the named assets at these local paths from now on (copies of the files
        `assets()` named, same bytes; some or all of its names). Called in a worker before
        `setup()`; must not change what the stage computes (default: nothing to switch)."""
        if paths:
            raise NotImplementedError(f"{self.name} lists no assets, got {sorted(paths)}")

    def process(self, table: pa.Table) -> StageOutput:
        """The output for one shard's table."""
        raise NotImplementedError


class Source(Stage):
    """The first stage of a flow: reads an input shard itself (`read`), takes no table."""

    def read(self, shard: Shard) -> StageOutput:
        """The output for one input shard (any fsspec URL)."""
        raise NotImplementedError

    def process(self, table: pa.Table) -> StageOutput:  # pragma: no cover - sources read
        raise TypeError(f"{self.name} is a source: call read(shard)")
