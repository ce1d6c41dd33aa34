"""`curation status`: what is done, pending and quarantined in a run folder (markers only)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from curation.core import fsio
from curation.io.parts import MARKER_DIR, STAGE_FILE


def status(out: str) -> dict[str, Any]:
    """What is done, pending and quarantined in a run folder (reads markers only)."""
    fs, path = fsio.url_to_fs(out)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{out} is not a run folder")
    res: dict[str, Any] = {"stages": {}}
    expected: int | None = None
    for stage in ("input", "ingest", "match", "balance"):
        sdir = fsio.join(out, stage)
        stage_file = fsio.join(sdir, STAGE_FILE)
        if not fsio.exists(stage_file):
            continue
        fp = fsio.read_json(stage_file)
        if stage == "input":
            expected = fp.get("shards")
        elif stage == "ingest":
            expected = len(fp.get("inputs", [])) or expected
        done = len(fs.glob(fsio.url_to_fs(fsio.join(sdir, MARKER_DIR, "*.json"))[1]))
        entry = {"done": done}
        if expected is not None:
            entry["pending"] = max(0, expected - done)
        res["stages"][stage] = entry
        expected = done if stage != "input" else expected
    if fsio.exists(fsio.join(out, "filter", STAGE_FILE)):  # pool jobs: before or after balance
        pattern = fsio.url_to_fs(fsio.join(out, "filter", MARKER_DIR, "*.json"))[1]
        res["stages"]["filter"] = {"done": len(fs.glob(pattern))}
    q = fsio.join(out, "quarantine.jsonl")
    if fsio.exists(q):
        with fs.open(fsio.url_to_fs(q)[1], "rb") as f:
            lines = [json.loads(x) for x in f.read().splitlines() if x.strip()]
        res["quarantined"] = dict(sorted(Counter(x["reason"] for x in lines).items()))
    res["complete"] = fsio.exists(fsio.join(out, "manifest.json"))
    return res
