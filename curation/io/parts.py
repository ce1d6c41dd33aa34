"""A stage's output folder: parts, completion markers, the stage fingerprint, resume.

`STAGE_DIR/part-<shard>.parquet` is written first (atomically: one PUT on object stores, temp +
rename on local disks), then `STAGE_DIR/_done/<shard>.json`, the completion marker with the
shard's counters. A shard is done only when its marker exists; one listing of `_done/` tells
what is done. `STAGE_DIR/_stage.json` holds the stage's fingerprint (its parameters, the code
version, the identity of its inputs and assets); a rerun with another fingerprint refuses to
reuse old parts unless told to overwrite.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation import __version__
from curation.core import fsio
from curation.core.fingerprint import modified_time
from curation.core.stage import Shard

log = logging.getLogger(__name__)

MARKER_DIR = "_done"
STAGE_FILE = "_stage.json"


class ResumeError(RuntimeError):
    """An output folder holds results of a different job; says how to proceed."""


def shard_names(inputs: Sequence[str]) -> list[Shard]:
    """Stable, unique shard names from input URLs (a short path hash breaks name collisions)."""
    names = [fsio.shard_name(u) for u in inputs]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    out = []
    for url, name in zip(inputs, names, strict=True):
        if seen[name] > 1:
            name = f"{name}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        out.append(Shard(name=name, input=url))
    return out


def part_url(stage_dir: str, shard: str) -> str:
    return fsio.join(stage_dir, f"part-{shard}.parquet")


def marker_url(stage_dir: str, shard: str) -> str:
    return fsio.join(stage_dir, MARKER_DIR, f"{shard}.json")


def write_marker(stage_dir: str, shard: str, stats: dict[str, Any]) -> None:
    """Write the completion marker last, after the part is in place."""
    fsio.atomic_write_json(marker_url(stage_dir, shard), stats)


def read_marker(stage_dir: str, shard: str) -> dict[str, Any] | None:
    url = marker_url(stage_dir, shard)
    return fsio.read_json(url) if fsio.exists(url) else None


def read_part(url: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One stage part (any fsspec URL)."""
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def finish_part(
    stage_dir: str,
    shard: Shard,
    table: pa.Table,
    counts: dict[str, int],
    *,
    parquet: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write a shard's part, then its marker (counts + `extra`); returns the marker.

    `parquet` holds extra `pyarrow.parquet` writer options for the part.
    """
    fsio.atomic_write_parquet(part_url(stage_dir, shard.name), table, **(parquet or {}))
    counts = dict(counts)
    counts["rows_written"] = table.num_rows
    stats = {"shard": shard.name, "input": shard.input, "counts": dict(sorted(counts.items()))}
    stats.update(extra)
    write_marker(stage_dir, shard.name, stats)
    return stats


def parts_of(folder: str) -> list[Shard]:
    """Shards of a stage output folder (`part-<name>.parquet`), or of a single Parquet file."""
    fs, path = fsio.url_to_fs(folder)
    if fs.isfile(path):
        return [Shard(name=fsio.shard_name(folder).removeprefix("part-"), input=folder)]
    files = sorted(
        p
        for p in fs.find(path)
        if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet") and ".tmp-" not in p
    )
    if not files:
        raise FileNotFoundError(f"{folder} has no part-*.parquet files")
    return [
        Shard(
            name=p.rsplit("/", 1)[-1][len("part-") : -len(".parquet")], input=fsio.full_url(fs, p)
        )
        for p in files
    ]


def prepare_stage_dir(stage_dir: str, fp: dict[str, Any], overwrite: bool) -> None:
    """Create the stage folder, or check that its fingerprint matches (else refuse / wipe).

    The fingerprint always holds the package version: parts written by another version of
    the code are not reused.
    """
    fp = {**fp, "curation": __version__}
    fs, path = fsio.url_to_fs(stage_dir)
    stage_file = fsio.join(stage_dir, STAGE_FILE)
    if fs.exists(path):
        if fs.exists(fsio.url_to_fs(stage_file)[1]):
            old = fsio.read_json(stage_file)
            if old != fp:
                if not overwrite:
                    changed = _changed_keys(old, fp)
                    raise ResumeError(
                        f"{stage_dir} holds results of a different job (changed: "
                        f"{', '.join(changed)}). Rerun with --overwrite to replace them, or "
                        "write to another output folder."
                    )
                fs.rm(path, recursive=True)
        elif overwrite:
            fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    fs.makedirs(fsio.url_to_fs(fsio.join(stage_dir, MARKER_DIR))[1], exist_ok=True)
    if not fs.exists(fsio.url_to_fs(stage_file)[1]):
        fsio.atomic_write_json(stage_file, fp)
    _remove_stale_temps(fs, path)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ, one level into nested mappings (`params.t`)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += _changed_keys(a, b, f"{k}.")
        else:
            out.append(prefix + k)
    return out


def _remove_stale_temps(fs: Any, path: str) -> None:
    for p in fs.find(path):
        if ".tmp-" in p.rsplit("/", 1)[-1]:
            fs.rm(p)


def _marker_listing(stage_dir: str) -> dict[str, dict[str, Any]]:
    """{shard name: listing entry} of the completion markers (one listing of `_done/`)."""
    fs, path = fsio.url_to_fs(fsio.join(stage_dir, MARKER_DIR))
    try:
        listing = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for entry in listing:
        name = entry["name"].rsplit("/", 1)[-1]
        if name.endswith(".json") and ".tmp-" not in name:
            out[name[: -len(".json")]] = entry
    return out


def done_markers(stage_dir: str) -> dict[str, dict[str, Any]]:
    """Every completion marker of a stage folder, by shard name (one listing of `_done/`)."""
    fs, _ = fsio.url_to_fs(stage_dir)
    return {
        name: fsio.read_json(fsio.full_url(fs, entry["name"]))
        for name, entry in sorted(_marker_listing(stage_dir).items())
    }


def done_and_todo(
    stage_dir: str,
    shards: Sequence[Shard],
    fp: dict[str, Any],
    overwrite: bool,
    check_inputs: bool = True,
) -> tuple[dict[str, dict[str, Any]], list[Shard]]:
    """Prepare the stage folder; split shards into done (their markers) and still to do.

    A shard whose input was modified after its marker was written is stale (like `make`): its
    old part is not reused, the shard is done again (outputs are deterministic, so an input
    rewritten with the same bytes gives the same part). `check_inputs=False` skips that for
    steps whose "inputs" are their own working files.
    """
    prepare_stage_dir(stage_dir, fp, overwrite)
    listing = _marker_listing(stage_dir)
    fs, _ = fsio.url_to_fs(stage_dir)
    stale = []
    for s in shards:
        if check_inputs and s.name in listing and _newer(s.input, modified_time(listing[s.name])):
            stale.append(s)
    if stale:
        names = ", ".join(s.input for s in stale[:3])
        log.warning(
            "%s: %d input(s) changed after their results were written (%s%s); redoing them",
            stage_dir, len(stale), names, ", ..." if len(stale) > 3 else "",
        )  # fmt: skip
    stale_names = {s.name for s in stale}
    done = {
        s.name: fsio.read_json(fsio.full_url(fs, listing[s.name]["name"]))
        for s in shards
        if s.name in listing and s.name not in stale_names
    }
    todo = [s for s in shards if s.name not in done]
    return done, todo


def _newer(url: str, than: float | None) -> bool:
    """True when `url` was modified after the time `than` (unknown times: False)."""
    if than is None:
        return False
    fs, path = fsio.url_to_fs(url)
    try:
        mtime = modified_time(fs.info(path))
    except FileNotFoundError:
        return False
    return mtime is not None and mtime > than
