"""`score_shards(..., decode="device")` on the local Ray cluster: the same rows, schema and
accounting as the exact path, scores close to it, and a resume with the other mode refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from curation.flows.score import OUTPUT_COLUMNS, score_shards
from curation.io.parts import ResumeError
from curation.stages.score import TINY_MODEL, ClipScorer
from curation.synth.images import write_synthetic_image_pool

from .conftest import read_parts


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[str]:
    """Synthetic image tars (`curation synth --images`) with truncated / non-image / bomb faults."""
    folder = tmp_path_factory.mktemp("decode") / "pool"
    write_synthetic_image_pool(str(folder), 2, 40, 3, image_size=96, fault_rate=0.15)
    return sorted(str(p) for p in folder.glob("*.tar"))


def run(pool, out, **kw):
    scorer = ClipScorer(TINY_MODEL, batch_size=8)
    return score_shards(pool, str(out), scorer, chunk_rows=16, progress=False, **kw)


def test_device_decode_matches_the_exact_path(pool, tmp_path):
    exact = run(pool, tmp_path / "pil")
    dev = run(pool, tmp_path / "device", decode="device")

    for k in ("shards", "rows_read", "rows_written", "rows_dropped"):
        assert dev[k] == exact[k], k
    assert sum(exact["rows_dropped"].values()) >= 6  # the faults are there and dropped
    assert dev["rows_read"] == dev["rows_written"] + sum(dev["rows_dropped"].values())
    counters = dev["counters"]
    assert counters["images_decoded_device"] == dev["rows_written"]  # synth images: all JPEG
    assert counters.get("images_device_fallback", 0) == 0

    a, b = read_parts(tmp_path / "pil"), read_parts(tmp_path / "device")
    assert b.column_names == list(OUTPUT_COLUMNS) and b.schema == a.schema
    same = ["uid", "key", "url", "text", "original_width", "original_height"]
    assert b.select(same).equals(a.select(same))
    delta = np.abs(b.column("clip_score").to_numpy() - a.column("clip_score").to_numpy())
    assert delta.max() < 2e-3, delta.max()

    qa = (tmp_path / "pil" / "quarantine.jsonl").read_text().splitlines()
    qb = (tmp_path / "device" / "quarantine.jsonl").read_text().splitlines()
    assert sorted(qa) == sorted(qb)
    manifest = json.loads((tmp_path / "device" / "manifest.json").read_text())
    assert manifest["params"]["decode"] == "device"

    # A resume with the other decode mode is another job.
    with pytest.raises(ResumeError, match="different job"):
        run(pool, tmp_path / "device")
    with pytest.raises(ValueError, match="--decode must be one of"):
        run(pool, tmp_path / "x", decode="gpu")


def test_device_decode_reruns_identically(pool, tmp_path):
    out = Path(tmp_path / "device")
    run(pool, out, decode="device")
    first = read_parts(out)
    run(pool, tmp_path / "again", decode="device")
    assert read_parts(tmp_path / "again").equals(first)
