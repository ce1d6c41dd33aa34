"""The CLIP-score threshold on Ray: selected by histograms over the shards, equal to the
in-memory `global_threshold` bit for bit, and no score column ever reaches the driver."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

import curation.flows.filter as flow
from curation.core import select
from curation.flows.filter import run_filter
from curation.io import datacomp
from curation.stages.filters import AllOf, ClipScoreFilter, NoFilter, filter_shards
from curation.stages.filters.base import global_threshold, json_number

SIZES = (400, 0, 250, 400, 60)
COLUMN = "clip_l14_similarity_score"


def scores(rng: np.random.Generator, rows: int) -> pa.Array:
    """Ties (2 decimals), float32-origin values, -0.0/0.0, ±inf and nulls."""
    v = np.round(rng.uniform(-0.05, 0.4, rows), 2)
    f32 = rng.random(rows) < 0.3
    v[f32] = rng.uniform(0.1, 0.4, int(f32.sum())).astype(np.float32)
    v[rng.random(rows) < 0.05] = -0.0
    v[rng.random(rows) < 0.01] = np.inf
    v[rng.random(rows) < 0.01] = -np.inf
    return pa.array(v, mask=rng.random(rows) < 0.04)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thpool")
    rng = np.random.default_rng(7)
    urls = []
    for s, rows in enumerate(SIZES):
        table = pa.table(
            {
                "uid": pa.array([f"{s:08x}{i:024x}" for i in range(rows)], pa.string()),
                COLUMN: scores(rng, rows),
            }
        )
        url = str(folder / f"{s:08d}.parquet")
        datacomp.write_shard(url, table, {})
        urls.append(url)
    return folder, urls


def all_scores(urls: list[str]) -> np.ndarray:
    cols = [datacomp.read_shard(u, columns=[COLUMN]).column(COLUMN) for u in urls]
    return np.concatenate([c.to_numpy(zero_copy_only=False).astype(np.float64) for c in cols])


class Spy:
    """Records what the threshold's `reduce_over_shards` hand back to the driver, and refuses
    `map_shards` of the fit scores (every shard's score column to the driver)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[np.ndarray] = []
        reduce, map_ = flow.reduce_over_shards, flow.map_shards
        mine = (flow._score_histogram, flow._score_candidates)

        def spy_reduce(fn, items, *args, **kwargs):
            out = reduce(fn, items, *args, **kwargs)
            if getattr(fn, "func", None) in mine:
                self.results.append(out)
            return out

        def spy_map(fn, *args, **kwargs):
            if fn is flow._fit_scores:
                raise AssertionError("map_shards brought every shard's scores to the driver")
            return map_(fn, *args, **kwargs)

        monkeypatch.setattr(flow, "reduce_over_shards", spy_reduce)
        monkeypatch.setattr(flow, "map_shards", spy_map)


@pytest.mark.parametrize("mode", ["datacomp", "exact"])
@pytest.mark.parametrize("limit", [0, 40, None])  # every pass / an early gather / gather at once
def test_ray_threshold_equals_in_memory(pool, tmp_path, monkeypatch, mode, limit):
    folder, urls = pool
    if limit is not None:
        monkeypatch.setattr(select, "GATHER_LIMIT", limit)
    spy = Spy(monkeypatch)
    fraction = 0.3
    params = {"arch": "l14", "fraction": fraction, "threshold_mode": mode}
    out = tmp_path / "out"
    s = run_filter(ClipScoreFilter(**params), [str(folder)], str(out), params=params, progress=0)

    values = all_scores(urls)
    want = global_threshold(values, fraction, mode)
    got = s["fit"]["clip_score"]["threshold"]
    assert json.dumps(got) == json.dumps(json_number(want))  # bit for bit, -0.0 as 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["clip_score"]["threshold"] == got
    if mode == "datacomp":  # DataComp's get_threshold, literally
        assert got == float(-np.sort(-values)[int(len(values) * fraction)])
    ref = filter_shards(ClipScoreFilter(**params), urls)
    assert np.array_equal(datacomp.load_uids(str(out / "uids.npy")), ref)

    # only fixed-size histograms and at most `limit` candidates reached the driver
    hists = [r for r in spy.results if r.dtype == np.int64]
    gathered = [r for r in spy.results if r.dtype == np.uint64]
    assert hists and all(r.shape == (select.HIST_SIZE,) for r in hists)
    assert len(hists) + len(gathered) == len(spy.results) and len(gathered) <= 1
    assert len(hists) <= select.PASSES
    assert all(len(r) <= select.GATHER_LIMIT for r in gathered)
    if limit == 0:
        assert len(hists) == select.PASSES and not gathered  # the key is known after 4 passes


def test_combined_filter_fits_its_clip_step_on_ray(pool, tmp_path, monkeypatch):
    folder, urls = pool
    monkeypatch.setattr(select, "GATHER_LIMIT", 25)
    spy = Spy(monkeypatch)
    filt = AllOf([NoFilter(), ClipScoreFilter(fraction=0.5, threshold_mode="exact")], name="nc")
    s = run_filter(filt, [str(folder)], str(tmp_path / "nc"), params={}, progress=False)
    want = json_number(global_threshold(all_scores(urls), 0.5, "exact"))
    assert json.dumps(s["fit"]["clip_score"]["threshold"]) == json.dumps(want)
    assert spy.results and all(len(r) <= select.HIST_SIZE for r in spy.results)
