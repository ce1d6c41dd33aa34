"""Composition of filters: AllOf (and) and AnyOf (or) over the same input rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from curation.stages.filters.base import Filter, QuantileRequest, Scores


class _Combined(Filter):
    """Filters applied to the same rows; scores are namespaced `<filter name>/<score>`."""

    def __init__(self, filters: Sequence[Filter], name: str | None, joiner: str) -> None:
        if not filters:
            raise ValueError(f"{type(self).__name__} needs at least one filter")
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise ValueError(
                f"{type(self).__name__} needs filters with distinct names, got {names}"
            )
        self.filters = list(filters)
        self.name = name or joiner.join(names)
        self.columns = tuple(dict.fromkeys(c for f in filters for c in f.columns))

    @property
    def embedding_columns(self) -> tuple[str, ...]:
        """Every filter's embedding columns."""
        return tuple(dict.fromkeys(c for f in self.filters for c in f.embedding_columns))

    def setup(self) -> None:
        """Set up every filter."""
        for f in self.filters:
            f.setup()

    def prepare(self) -> None:
        """Prepare every filter (driver side)."""
        for f in self.filters:
            f.prepare()

    def assets(self) -> dict[str, str]:
        """Every filter's files, named `<filter name>/<its name>`."""
        return {f"{f.name}/{k}": v for f in self.filters for k, v in f.assets().items()}

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Hand each filter the local copies of its own files."""
        for f in self.filters:
            prefix = f.name + "/"
            mine = {k[len(prefix) :]: v for k, v in paths.items() if k.startswith(prefix)}
            if mine:
                f.use_assets(mine)

    @property
    def needs_fit(self) -> bool:
        """True while any filter still needs its global parameters."""
        return any(f.needs_fit for f in self.filters)

    @property
    def fit_columns(self) -> tuple[str, ...]:
        """The columns of the filters still to be fitted."""
        return tuple(dict.fromkeys(c for f in self.filters for c in f.fit_columns))

    def _sub(self, f: Filter, scores: Scores) -> dict[str, np.ndarray]:
        prefix = f.name + "/"
        return {k[len(prefix) :]: v for k, v in scores.items() if k.startswith(prefix)}

    def score_for_fit(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The fit scores of the filters still to be fitted, keys prefixed with their names."""
        return {
            f"{f.name}/{k}": v
            for f in self.filters
            if f.needs_fit
            for k, v in f.score_for_fit(table).items()
        }

    def quantile_requests(self) -> list[QuantileRequest]:
        """The thresholds the filters still need, score keys prefixed with their names."""
        return [
            (f"{f.name}/{key}", fraction, mode)
            for f in self.filters
            if f.needs_fit
            for key, fraction, mode in f.quantile_requests()
        ]

    def set_quantile(self, key: str, value: float) -> None:
        """Hand a threshold to the filter whose name prefixes `key`."""
        for f in self.filters:
            if key.startswith(f.name + "/"):
                f.set_quantile(key[len(f.name) + 1 :], value)
                return
        super().set_quantile(key, value)

    def fit(self, all_scores: Sequence[Scores]) -> None:
        """Fit each filter on its own scores (each over the whole input)."""
        for f in self.filters:
            if f.needs_fit:
                f.fit([self._sub(f, s) for s in all_scores])

    def fitted(self) -> dict[str, dict[str, Any]]:
        """Every filter's fitted parameters."""
        out: dict[str, dict[str, Any]] = {}
        for f in self.filters:
            out.update(f.fitted())
        return out

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Every filter's scores, keys prefixed with the filter's name."""
        return {f"{f.name}/{k}": v for f in self.filters for k, v in f.score(table).items()}

    def steps(self, scores: Scores) -> list[tuple[str, np.ndarray]]:
        """Each filter's own kept mask, in order."""
        return [(f.name, f.keep(self._sub(f, scores))) for f in self.filters]


class AllOf(_Combined):
    """Intersection of filters: a row is kept when every filter keeps it.

    `AllOf([ImageBasedFilter(...), ClipScoreFilter(...)])` is DataComp's
    `image_based_intersect_clip_score` (`load_uids_with_image_filter(..., arch, threshold,
    fraction)`: CLIP threshold, then caption filter, then clusters: the same rows as the AND).
    Scores are namespaced `<filter name>/<score>`.
    """

    combine = "and"

    def __init__(self, filters: Sequence[Filter], name: str | None = None) -> None:
        super().__init__(filters, name, "+")

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """Every filter's conditions, prefixed with the filter's name."""
        return {
            f"{f.name}/{k}": v
            for f in self.filters
            for k, v in f.conditions(self._sub(f, scores)).items()
        }


class AnyOf(_Combined):
    """Union of filters: a row is kept when at least one filter keeps it.

    One condition, `any_step`; a dropped row failed every filter (`rows_dropped_any_step`).
    """

    combine = "or"

    def __init__(self, filters: Sequence[Filter], name: str | None = None) -> None:
        super().__init__(filters, name, "|")

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """`any_step`: some filter keeps the row."""
        masks = [m for _, m in self.steps(scores)]
        return {"any_step": np.logical_or.reduce(masks)}
