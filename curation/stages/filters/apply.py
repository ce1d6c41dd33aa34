"""The filter stage: one DataComp filter (or a composition) applied to a shard.

`load(shard)` reads what the filter needs: a pool shard (DataComp Parquet + `.npz`, or a scored
folder's Parquet with embedding columns) or a table derived from one (with `pool_row`), whose
embeddings are then read from its pool shard at those rows. `process(table)` keeps the rows
every condition passes and writes only the input's own columns (embeddings read from an
`.npz` are not copied). Each dropped row is counted once, under the first condition it fails
in the filter's order; the marker also holds each step's rows in / kept (see `step_counts`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.core import fsio
from curation.core.stage import Shard, Stage, StageOutput
from curation.io import datacomp
from curation.io.datacomp import POOL_ROW
from curation.stages.filters.base import Filter, Scores

_KEEP = b"curation.keep_columns"


def first_failure_counts(conditions: dict[str, np.ndarray], n: int) -> Counter:
    """rows_dropped_<reason> with each dropped row counted once, under its first failed reason."""
    counts: Counter = Counter()
    alive = np.ones(n, dtype=bool)
    for reason, ok in conditions.items():
        fail = alive & ~ok
        counts[f"rows_dropped_{reason.replace('/', '_')}"] = int(fail.sum())
        alive &= ok
    return counts


def step_counts(filt: Filter, scores: Scores, n: int) -> list[dict[str, Any]]:
    """Each step's rows in / kept, read in order, and alone.

    `and`: a row leaves at its first failing step; `or`: it is kept by its first passing step,
    and the next step sees the rest. `rows_passed_alone` is the step on its own over all rows.
    """
    out = []
    left = np.ones(n, dtype=bool)  # and: rows still in; or: rows not yet kept
    for name, ok in filt.steps(scores):
        entry = {"name": name, "rows_in": int(left.sum()), "rows_passed_alone": int(ok.sum())}
        if filt.combine == "or":
            entry["rows_kept"] = int((left & ok).sum())
            left &= ~ok
        else:
            left &= ok
            entry["rows_kept"] = int(left.sum())
        out.append(entry)
    return out


class FilterStage(Stage):
    """Applies a fitted `Filter` to shards (`setup` loads its models once per worker).

    `pool_urls` maps shard names to their pool shards when the shards are derived tables with
    a `pool_row` column; `row_index` adds `pool_row` to the output of pool shards.
    """

    name = "filter"

    def __init__(
        self,
        filt: Filter,
        pool_urls: Mapping[str, str] | None = None,
        row_index: bool = False,
    ) -> None:
        self.filt = filt
        self.pool_urls = dict(pool_urls or {})
        self.row_index = row_index

    def assets(self) -> dict[str, str]:
        """The files the filter's setup opens (LID model, target embeddings, tables)."""
        return self.filt.assets()

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Open the filter's files at local copies."""
        self.filt.use_assets(paths)

    def setup(self) -> None:
        """Load the filter's models (fastText, centroids) once."""
        self.filt.setup()

    def load(self, shard: Shard, columns: Sequence[str] | None = None) -> pa.Table:
        """The table the filter reads for one shard (all columns when `columns` is None); the
        columns its output keeps are named in the schema metadata."""
        emb = list(self.filt.embedding_columns)
        pool_url = self.pool_urls.get(shard.name)
        names = datacomp.parquet_columns(shard.input)
        if pool_url is None:
            cols = None
            if columns is not None:
                cols = [c for c in dict.fromkeys(["uid", *columns]) if c not in emb]
            table = datacomp.read_shard(shard.input, columns=cols, embeddings=emb)
            if self.row_index and POOL_ROW not in names:
                rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
                table = table.append_column(POOL_ROW, rows)
                names = [*names, POOL_ROW]
            keep = [c for c in table.column_names if c in names]
        else:
            cols = None
            if columns is not None:
                wanted = dict.fromkeys(["uid", POOL_ROW, *columns])
                cols = [c for c in wanted if c not in emb or c in names]
            fs, path = fsio.url_to_fs(shard.input)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=cols)
            keep = list(table.column_names)
            need = [e for e in emb if e not in table.column_names]
            if need:
                if POOL_ROW not in table.column_names:
                    raise ValueError(
                        f"{shard.input}: no {POOL_ROW!r} column to find embeddings {need} in "
                        f"{pool_url}"
                    )
                rows = table.column(POOL_ROW)
                for key, col in datacomp.read_embeddings(pool_url, need, rows).items():
                    table = table.append_column(key, col)
        meta = {**(table.schema.metadata or {}), _KEEP: json.dumps(keep).encode()}
        return table.replace_schema_metadata(meta)

    def fit_scores(self, shard: Shard) -> dict[str, np.ndarray]:
        """Pass 1 of the barrier: one shard's scores for the global fit (only what it needs)."""
        return self.filt.score_for_fit(self.load(shard, list(self.filt.fit_columns)))

    def process(self, table: pa.Table) -> StageOutput:
        """Kept rows (the input's own columns), first-failure counts and per-step counts."""
        meta = dict(table.schema.metadata or {})
        keep_cols = json.loads(meta.pop(_KEEP)) if _KEEP in meta else list(table.column_names)
        scores = self.filt.score(table)
        conds = self.filt.conditions(scores)
        n = table.num_rows
        keep = np.ones(n, dtype=bool)
        for ok in conds.values():
            keep &= ok
        counts = first_failure_counts(conds, n)
        counts["rows_read"] = n
        kept = table.select(keep_cols).filter(pa.array(keep)).replace_schema_metadata(meta or None)
        return StageOutput(kept, counts, extra={"steps": step_counts(self.filt, scores, n)})
