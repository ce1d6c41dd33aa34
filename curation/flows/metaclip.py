"""The MetaCLIP flow: (synth →) ingest → match → count → balance → report, and its steps as
standalone commands.

Each function plans one stage on the driver (inputs, fingerprint, checks before any work) and
hands the stage object to the executor; the driver never holds a column of the pool. Counting is
the barrier: per-shard entry counts are summed by a tree of tasks (only the total reaches the
driver) and persisted with the identity of the parts counted, so a resumed job does not count
again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from curation.core import fsio
from curation.core.accounting import (
    check_handoff,
    summarize,
    write_quarantine,
    write_stage_manifest,
)
from curation.core.fingerprint import (
    content_inputs,
    fingerprint,
    inputs_fingerprint,
    versions,
)
from curation.core.metadata import load_metadata
from curation.core.redact import redact
from curation.core.stage import Shard
from curation.executor.runner import check_output_location, run_stage, run_tasks, sum_over_shards
from curation.io.parts import (
    STAGE_FILE,
    check_output_not_in_inputs,
    leased,
    parts_of,
    read_part,
    shard_names,
    write_marker,
)
from curation.io.paths_listing import PathsListing
from curation.io.report import write_report
from curation.stages.balance import (
    Balancer,
    count_entries,
    entry_probabilities,
    read_counts,
    resolve_t,
)
from curation.stages.ingest import INPUT_SUFFIXES, Ingestor, detect_format
from curation.stages.match import MatchStage


def synth_task(shard: Shard, stage_dir: str, params: dict) -> dict:
    """Write one synthetic WAT shard (the input of a `synth:` job) and its marker."""
    from curation.synth.wat import generate_shard

    index = int(shard.name.rsplit("-", 1)[-1])
    data, truth = generate_shard(
        params["seed"], index, params["pairs_per_shard"], malformed_rate=params["malformed_rate"],
        languages=params.get("languages", True),  # "worldwide" only in a worldwide synth job
    )  # fmt: skip
    fsio.atomic_write_bytes(shard.input, data)
    stats = {
        "shard": shard.name,
        "input": shard.input,
        "counts": {"pairs": truth.pairs},
        "malformed": dict(truth.malformed),
    }
    write_marker(stage_dir, shard.name, stats)
    return stats


def ingest(
    inputs: Sequence[str],
    out: str,
    *,
    max_text_chars: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    stage_dir: str | None = None,
    listing: PathsListing | None = None,
) -> dict:
    """Ingest input shards into `stage_dir or out` (one part per shard). Returns the summary.

    `listing` (`io.paths_listing.read_paths_listing`, e.g. a CommonCrawl `wat.paths.gz`) names
    the inputs instead of `inputs`: its URLs are read as they are (no globs), a missing one is
    quarantined like a missing file. Either way each input's identity goes into the stage's
    fingerprint; the listing's provenance goes into the summary (`paths_listing`).
    """
    stage = Ingestor(max_text_chars=max_text_chars)  # validates parameters before any work
    if listing is not None:
        if inputs:
            raise ValueError("give input paths or a paths listing, not both")
        urls = sorted(dict.fromkeys(listing.urls))
    else:
        urls = fsio.expand_inputs(inputs, suffixes=INPUT_SUFFIXES, allow_missing=True)
    # one listing per folder on object stores, concurrent requests where none can be listed
    # (http(s)://): a CommonCrawl listing names ~10^5 URLs
    fp_inputs = inputs_fingerprint(urls, out)
    if not any(identity is not None for _, identity in fp_inputs):
        raise FileNotFoundError(f"none of the inputs exist: {', '.join(urls[:5])}")
    for u in urls:
        detect_format(u)  # an unknown format fails before any work starts
    params = {"max_text_chars": max_text_chars}
    fp = {"stage": "ingest", "params": params, "inputs": fp_inputs}
    markers = run_stage(
        stage, shard_names(urls), stage_dir or out, fp=fp, overwrite=overwrite, progress=progress,
        # HTTP has no folder listing to read modification times from: a changed object is
        # told by its identity (size, ETag) in the fingerprint instead
        check_inputs=not any(fsio.is_http_url(u) for u in urls),
    )  # fmt: skip
    summary = summarize("ingest", markers)
    if listing is not None:
        summary["paths_listing"] = listing.describe()
    summary["inputs"] = [
        {"url": m["input"], "bytes": m.get("input_bytes"), "sha256": m.get("input_sha256")}
        for m in markers.values()
    ]
    summary["input_bytes"] = sum(m.get("input_bytes") or 0 for m in markers.values())
    summary["per_shard"] = {name: m["counts"] for name, m in markers.items()}
    summary["_markers"] = markers
    return summary


def match(
    inp: str | Sequence[Shard],
    metadata: str,
    stage_dir: str,
    *,
    engine: str = "auto",
    script_aware: bool = False,
    row_index: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    upstream: str = "",
    check_inputs: bool | None = None,
) -> dict:
    """Match every part of `inp` (a folder, or shards) against `metadata` into `stage_dir`.

    `upstream` fingerprints the stage before it in a job (its outputs' identity); a standalone
    run fingerprints its input files instead (and redoes a shard whose input changed since;
    `check_inputs` says so explicitly, e.g. for a job's pool shards).
    """
    shards = parts_of(inp) if isinstance(inp, str) else list(inp)
    md = load_metadata(metadata)
    stage = MatchStage(metadata, md.checksum, engine, script_aware, row_index=row_index)
    params = {
        "metadata": metadata,
        "checksum": md.checksum,
        "engine": engine,
        "script_aware": script_aware,
        **({"row_index": row_index} if row_index else {}),
    }
    summary = run_part_stage(
        "match", stage, shards, stage_dir, {"params": params}, upstream=upstream,
        overwrite=overwrite, progress=progress, check_inputs=check_inputs,
    )  # fmt: skip
    summary["metadata"] = {"path": metadata, "entries": len(md), "checksum": md.checksum}
    return summary


def match_metadata(matched: str, metadata: str | None) -> str:
    """The metadata file `matched` was produced with; `metadata`, when given, must agree."""
    stage_file = fsio.join(matched, STAGE_FILE)
    recorded = fsio.read_json(stage_file)["params"] if fsio.exists(stage_file) else None
    if metadata is None:
        if recorded is None:
            raise ValueError(f"{matched} has no {STAGE_FILE}; pass the metadata file with -m")
        return recorded["metadata"]
    if recorded is not None and load_metadata(metadata).checksum != recorded["checksum"]:
        raise ValueError(
            f"{metadata} is not the metadata {matched} was matched with "
            f"({recorded['metadata']}, {recorded['checksum']}); entry ids would not line up"
        )
    return metadata


class _PartCounter:
    """Entry counts of one part (a picklable function for `sum_over_shards`)."""

    def __init__(self, num_entries: int) -> None:
        self.num_entries = num_entries

    def __call__(self, url: str) -> np.ndarray:
        ids = read_part(url, columns=["entry_ids"]).column("entry_ids")
        return count_entries(ids, self.num_entries)


def count(inp: str, metadata: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Global entry counts over every part of `inp` (the barrier before balancing)."""
    md = load_metadata(metadata)
    urls = [s.input for s in parts_of(inp)]
    return sum_over_shards(_PartCounter(len(md)), urls, len(md)), md.entries


#: Suffix of the file beside a job's counts file holding the identity of the parts counted.
COUNTS_SOURCE_SUFFIX = ".counted-from"


T = TypeVar("T")


def write_counts(counts: np.ndarray, entries: Sequence[str], path: str) -> None:
    """`entry_counts.parquet`: entry_id, entry, count (uint64), one row per metadata entry."""
    table = pa.table(
        {
            "entry_id": pa.array(np.arange(len(entries), dtype=np.uint32)),
            "entry": pa.array(list(entries), pa.string()),
            "count": pa.array(counts.astype(np.uint64)),
        }
    )
    fsio.atomic_write_parquet(path, table)


def persisted_count(
    inp: str, metadata: str, markers: dict[str, dict], path: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Global entry counts of the stage folder `inp` (whose done markers are `markers`), kept
    in `path` (with the key in `path + ".counted-from"`): a resumed job whose parts are
    unchanged reads them back instead of recounting.

    The key is the stage's fingerprint (`_stage.json`) and every shard's marker counts: a
    redone or changed stage gives a new key, and the counts are computed again.
    """
    md = load_metadata(metadata)

    def recount() -> tuple[np.ndarray, tuple[str, ...]]:
        counts, entries = count(inp, metadata)
        write_counts(counts, entries, path)
        return counts, entries

    return reuse_or_recount(
        inp,
        markers,
        md.checksum,
        path,
        read=lambda: (read_counts(path), md.entries),
        fits=lambda got: len(got[0]) == len(md),
        recount=recount,
    )


def reuse_or_recount(
    inp: str,
    markers: dict[str, dict],
    checksum: str,
    path: str,
    *,
    read: Callable[[], T],
    fits: Callable[[T], bool],
    recount: Callable[[], T],
) -> T:
    """Counts of the stage folder `inp` kept in `path`: `read()` them when the key in
    `path + ".counted-from"` (the stage's fingerprint, every shard's marker counts and the
    metadata `checksum`) is unchanged and they `fits` the metadata; else `recount()` (which
    writes `path`), then write the key. A redone or changed stage gives a new key."""
    stage_file = fsio.join(inp, STAGE_FILE)
    source = fingerprint(
        {
            "stage": fsio.read_json(stage_file) if fsio.exists(stage_file) else None,
            "markers": {name: m.get("counts") for name, m in sorted(markers.items())},
            "checksum": checksum,
        }
    )
    key_url = path + COUNTS_SOURCE_SUFFIX
    if fsio.exists(key_url) and fsio.exists(path) and fsio.read_json(key_url) == source:
        got = read()
        if fits(got):
            return got
    got = recount()
    fsio.atomic_write_json(key_url, source)  # after the counts: a crash between recounts
    return got


def balance(
    inp: str,
    counts: np.ndarray,
    stage_dir: str,
    *,
    t: float,
    seed: int,
    overwrite: bool = False,
    progress: bool = True,
    upstream: str = "",
) -> dict:
    """Keep rows of every part of `inp` by MetaCLIP's rule with the global `counts`."""
    stage = Balancer(entry_probabilities(counts, t), seed)
    shards = parts_of(inp)
    params = {"t": t, "seed": seed, "counts": fingerprint(counts.tolist())}
    return run_part_stage(
        "balance", stage, shards, stage_dir, params, upstream=upstream, overwrite=overwrite,
        progress=progress,
    )  # fmt: skip


def run_part_stage(
    name: str,
    stage: Any,
    shards: Sequence[Shard],
    stage_dir: str,
    params: dict[str, Any],
    *,
    upstream: str,
    overwrite: bool,
    progress: bool,
    check_inputs: bool | None = None,
    fingerprint_inputs: bool = True,
) -> dict:
    """Run a per-part `stage` over `shards` into `stage_dir`; its summary with `_markers`.

    The fingerprint is `{"stage": name, **params, "upstream": ..., "inputs": ...}`: the input
    files' identities only when there is no upstream fingerprint (and `fingerprint_inputs`).
    Inputs are checked against their identities likewise unless `check_inputs` says."""
    fp = {
        "stage": name,
        **params,
        "upstream": upstream,
        "inputs": (
            inputs_fingerprint([s.input for s in shards])
            if fingerprint_inputs and not upstream
            else []
        ),
    }
    markers = run_stage(
        stage, shards, stage_dir, fp=fp, overwrite=overwrite, progress=progress,
        check_inputs=not upstream if check_inputs is None else check_inputs,
    )  # fmt: skip
    summary = summarize(name, markers)
    summary["_markers"] = markers
    return summary


def synth_and_ingest(
    spec: Any,
    out: str,
    manifest: dict[str, Any],
    stage_markers: list[dict[str, dict]],
    *,
    overwrite: bool,
    progress: bool,
) -> str:
    """(synth →) ingest of a raw-shard job into OUT/input and OUT/ingest: fills `manifest`
    (stages.synth, inputs, stages.ingest) and `stage_markers`; returns the next upstream."""
    inputs = list(spec.paths)
    if spec.synth is not None:
        from curation.synth.wat import shard_file_name

        s = spec.synth
        sdir = fsio.join(out, "input")
        shards = [
            Shard(name=f"synth-{i:05d}", input=fsio.join(sdir, shard_file_name(i)))
            for i in range(s.shards)
        ]
        params = {
            "seed": s.seed,
            "pairs_per_shard": s.pairs_per_shard,
            "malformed_rate": s.malformed_rate,
            **({"languages": s.languages} if getattr(s, "languages", None) else {}),
        }
        markers = run_tasks(
            "synth",
            sdir,
            shards,
            synth_task,
            (params,),
            fp={"stage": "synth", "params": params, "shards": s.shards},
            overwrite=overwrite,
            progress=progress,
        )
        manifest["stages"]["synth"] = {
            "shards": len(markers),
            "pairs": sum(m["counts"]["pairs"] for m in markers.values()),
        }
        inputs = [sh.input for sh in shards]
    else:
        inputs = fsio.expand_inputs(inputs, suffixes=INPUT_SUFFIXES, allow_missing=True)

    ing = ingest(
        inputs,
        out,
        max_text_chars=spec.max_text_chars,
        overwrite=overwrite,
        progress=progress,
        stage_dir=fsio.join(out, "ingest"),
    )
    stage_markers.append(ing.pop("_markers"))
    manifest["inputs"] = ing.pop("inputs")
    manifest["stages"]["ingest"] = ing
    return fingerprint({"ingest": ing["counters"], "inputs": content_inputs(manifest["inputs"])})


def run_metaclip_job(
    spec: Any, out: str, *, overwrite: bool = False, progress: bool = True
) -> dict:
    """A job on raw shards: (synth →) ingest → match → count → balance → report → manifest.

    Every stage resumes from its completion markers; a changed spec refuses to reuse old parts
    unless `overwrite`. The manifest holds no timestamps, so same inputs ⇒ same bytes.
    """
    load_metadata(spec.metadata)  # fail before any work if the metadata is bad
    manifest: dict[str, Any] = {"job": spec.to_dict(), "versions": versions(), "stages": {}}
    stage_markers: list[dict[str, dict]] = []
    up = synth_and_ingest(
        spec, out, manifest, stage_markers, overwrite=overwrite, progress=progress
    )

    mt = match(
        fsio.join(out, "ingest"),
        spec.metadata,
        fsio.join(out, "match"),
        engine=spec.engine,
        script_aware=spec.script_aware,
        overwrite=overwrite,
        progress=progress,
        upstream=up,
    )
    check_handoff("ingest", stage_markers[-1], "match", mt["_markers"])
    manifest["flow"] = ["ingest"]
    count_and_balance(
        spec, out, mt, up, manifest, stage_markers, overwrite=overwrite, progress=progress
    )
    manifest["quarantined"] = write_quarantine(out, stage_markers)
    manifest["outputs"] = {
        "curated": fsio.join(out, "balance"),
        "counts": fsio.join(out, "counts", "entry_counts.parquet"),
        "report": fsio.join(out, "report"),
        "quarantine": fsio.join(out, "quarantine.jsonl"),
    }
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), redact(manifest))
    return manifest


def count_and_balance(
    spec: Any,
    out: str,
    mt: dict,
    up: str,
    manifest: dict[str, Any],
    stage_markers: list[dict[str, dict]],
    *,
    overwrite: bool,
    progress: bool,
) -> str:
    """count → balance → report after a match stage (both job kinds); the next upstream."""
    stage_markers.append(mt.pop("_markers"))
    manifest["metadata"] = mt.pop("metadata")
    manifest["stages"]["match"] = mt
    before, entries = persisted_count(
        fsio.join(out, "match"),
        spec.metadata,
        stage_markers[-1],
        fsio.join(out, "counts", "entry_counts.parquet"),
    )
    t, p = resolve_t(before, spec.t, spec.tail_proportion)
    manifest["balance"] = {
        "t": t,
        "tail_proportion": p,
        "seed": spec.seed,
        "t_given": spec.t is not None,
        "when": spec.balance_when,
    }
    manifest["stages"]["count"] = {
        "entries": len(entries),
        "matches": int(before.sum()),
        "entries_matched": int((before > 0).sum()),
    }
    up = fingerprint({"match": mt["counters"], "up": up})
    bl = balance(
        fsio.join(out, "match"),
        before,
        fsio.join(out, "balance"),
        t=t,
        seed=spec.seed,
        overwrite=overwrite,
        progress=progress,
        upstream=up,
    )
    check_handoff("match", stage_markers[-1], "balance", bl["_markers"])
    stage_markers.append(bl.pop("_markers"))
    manifest["stages"]["balance"] = bl
    after, _ = persisted_count(
        fsio.join(out, "balance"),
        spec.metadata,
        stage_markers[-1],
        fsio.join(out, "counts", "entry_counts_balanced.parquet"),
    )
    report = write_report(out, before, after, entries, t, p)
    manifest["report"] = {"head_tail_before": report["before"], "head_tail_after": report["after"]}
    manifest["flow"] += ["match", "count", "balance"]
    return fingerprint({"balance": bl["counters"], "up": up})


# -- standalone commands: each writes its stage's manifest (and quarantine) ---------------------
@leased("out")
def ingest_command(inputs: Sequence[str], out: str, **kwargs: Any) -> dict:
    """`curation ingest`: the stage, then `OUT/quarantine.jsonl` and `OUT/manifest.json`.

    `listing=` (a `PathsListing`) names the inputs instead of `inputs` (see `ingest`)."""
    check_output_location(out)
    # an HTTP input is never a folder that OUT could be in (and probing it costs a GET)
    check_output_not_in_inputs(out, [i for i in inputs if not fsio.is_http_url(str(i))])
    listing = kwargs.get("listing")
    for u in listing.urls if listing is not None else ():
        if not fsio.is_http_url(u) and fsio.is_within(u, out):
            raise ValueError(
                f"input {u} (from paths listing {listing.source}) is inside output folder "
                f"{out}; writing there could replace or remove it: write elsewhere"
            )
    summary = ingest(inputs, out, **kwargs)
    quarantined = write_quarantine(out, [summary.pop("_markers")])
    write_stage_manifest(out, "ingest", summary, quarantined=quarantined)
    summary["quarantined"] = quarantined
    return summary


@leased("out")
def match_command(inp: str, metadata: str, out: str, **kwargs: Any) -> dict:
    """`curation match`: the stage, then `OUT/manifest.json`."""
    check_output_location(out)
    check_output_not_in_inputs(out, [inp])
    summary = match(inp, metadata, out, **kwargs)
    summary.pop("_markers")
    write_stage_manifest(
        out, "match", summary, engine=kwargs.get("engine", "auto"),
        script_aware=kwargs.get("script_aware", False),
    )  # fmt: skip
    return summary


def count_command(matched: str, metadata: str | None, out_path: str) -> tuple[np.ndarray, int]:
    """`curation count`: global counts of MATCHED (its recorded metadata) into COUNTS.parquet."""
    metadata = match_metadata(matched, metadata)
    counts, entries = count(matched, metadata)
    write_counts(counts, entries, out_path)
    return counts, len(entries)


@leased("out")
def balance_command(
    matched: str,
    counts_path: str,
    out: str,
    *,
    t: float | None,
    tail_proportion: float | None,
    seed: int,
    **kwargs: Any,
) -> dict:
    """`curation balance`: resolve t from the counts file, run the stage, write the manifest."""
    check_output_location(out)
    check_output_not_in_inputs(out, [matched, counts_path])
    counts = read_counts(counts_path)
    t, p = resolve_t(counts, t, tail_proportion)
    summary = balance(matched, counts, out, t=t, seed=seed, **kwargs)
    summary.pop("_markers")
    write_stage_manifest(
        out, "balance", summary, t=t, tail_proportion=p, seed=seed, counts=counts_path
    )
    summary.update(t=t, tail_proportion=p)
    return summary
