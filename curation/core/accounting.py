"""Accounting: every row read is written or dropped for a named reason; every set-aside record
is listed once, in one schema.

Counters follow one naming rule: `rows_read`, `rows_written`, `rows_dropped_<reason>` (these
must reconcile per shard and per stage), plus free-form counters (`records_read`,
`texts_truncated`, ...). A quarantine entry is `{"stage", "shard" (the shard's name), "input"
(its URL), "reason", "detail", ...}` with optional locators (`record`, `offset`, `key`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from curation.core import fsio
from curation.core.fingerprint import versions
from curation.core.redact import redact

QUARANTINE_DETAIL_CHARS = 300


def quarantine_record(
    stage: str, shard: str, input_url: str, reason: str, detail: str = "", **extra: Any
) -> dict[str, Any]:
    """One quarantine entry: the stage, the shard's name and URL, the reason and a detail.

    URLs in it (the input, one quoted in the detail) have their secrets redacted.
    """
    entry = {
        "stage": stage,
        "shard": shard,
        "input": input_url,
        "reason": reason,
        "detail": str(detail)[:QUARANTINE_DETAIL_CHARS],
    }
    entry.update(extra)
    return redact(entry)


def drop_rows(
    counts: Counter,
    quarantine: list[dict[str, Any]],
    stage: str,
    shard: str,
    input_url: str,
    dropped: Iterable[tuple[Any, tuple[str, str]]],
) -> None:
    """Count (`rows_dropped_<reason>`) and quarantine (`quarantine_record` with its `key`) each
    dropped row `(key, (reason, detail))` of a shard."""
    for key, (reason, detail) in dropped:
        counts[f"rows_dropped_{reason}"] += 1
        quarantine.append(quarantine_record(stage, shard, input_url, reason, detail, key=key))


def summarize(stage: str, markers: dict[str, dict]) -> dict[str, Any]:
    """Sum per-shard counters and check that rows read = written + dropped by reason."""
    total: Counter = Counter()
    for m in markers.values():
        total.update(m.get("counts", {}))
    dropped = {
        k[len("rows_dropped_") :]: v
        for k, v in sorted(total.items())
        if k.startswith("rows_dropped_")
    }
    read, written = total.get("rows_read", 0), total.get("rows_written", 0)
    if "rows_read" in total and read != written + sum(dropped.values()):
        raise RuntimeError(
            f"{stage}: counts do not reconcile: read {read} != written {written} + dropped "
            f"{sum(dropped.values())} ({dropped})"
        )
    return {
        "shards": len(markers),
        "rows_read": read,
        "rows_written": written,
        "rows_dropped": dropped,
        "counters": dict(sorted(total.items())),
    }


def public(summary: dict) -> dict:
    """A summary without its private (`_`-prefixed) keys, for manifests and printing."""
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def write_quarantine(out: str, stage_markers: list[dict[str, dict]]) -> int:
    """`OUT/quarantine.jsonl` from the markers of the given stages; returns the line count."""
    lines = []
    for markers in stage_markers:
        for m in markers.values():
            for q in m.get("quarantine", []):
                lines.append(json.dumps(q, sort_keys=True, ensure_ascii=False))
    fsio.atomic_write_bytes(
        fsio.join(out, "quarantine.jsonl"),
        # a lone surrogate (from a "\\ud800" escape in the input) becomes that JSON escape again
        ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8", "backslashreplace"),
    )
    return len(lines)


def write_stage_manifest(out_dir: str, stage: str, summary: dict[str, Any], **extra: Any) -> None:
    """A standalone command's manifest: versions, the stage's reconciled counts, parameters
    (URLs with their secrets redacted)."""
    body = {"stage": stage, "versions": versions(), "summary": public(summary)}
    body.update(extra)
    fsio.atomic_write_json(fsio.join(out_dir, "manifest.json"), redact(body))


def check_handoff(
    prev: str, prev_markers: dict[str, dict], stage: str, markers: dict[str, dict]
) -> None:
    """Check that `stage` read exactly what `prev` wrote: the same shards, row for row.

    A stage finds its input by listing the previous stage's folder; on a cluster whose output
    folder is not visible from every node (a local path), that listing silently misses parts.
    The previous stage's markers say what was written, so a mismatch fails loudly here.
    """
    missing = sorted(set(prev_markers) - set(markers))
    extra = sorted(set(markers) - set(prev_markers))
    if missing or extra:
        raise RuntimeError(
            f"{stage} read {len(markers)} shard(s) but {prev} wrote {len(prev_markers)} "
            f"(not read: {missing[:5]}, not written by {prev}: {extra[:5]}); the output folder "
            "must be on storage that every node of the cluster sees"
        )
    bad = [
        (name, prev_markers[name]["counts"].get("rows_written"), m["counts"].get("rows_read"))
        for name, m in sorted(markers.items())
        if prev_markers[name]["counts"].get("rows_written") != m["counts"].get("rows_read")
    ]
    if bad:
        name, wrote, read = bad[0]
        raise RuntimeError(
            f"{stage} read {read} rows of shard {name!r} but {prev} wrote {wrote} "
            f"({len(bad)} shard(s) differ); its part changed or was not visible"
        )
