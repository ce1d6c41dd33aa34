"""Stage wiring: per-shard task functions and the drivers behind each CLI command and `run`.

Task functions run inside Ray workers; they build their stage object once per worker process
(`runner.cached`), process one shard, write the part atomically and then the marker.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import __version__, fsio
from curation.runner import (
    Shard,
    cached,
    fingerprint,
    finish_part,
    run_stage,
    shard_names,
    write_marker,
)

# Test hook: when set to a folder, each task crashes its worker process once per (stage, shard)
# before writing output, to prove that retries and reruns give identical results.
FAULT_ENV = "CURATION_FAULT_DIR"


def _maybe_crash(stage: str, shard: str) -> None:
    fault_dir = os.environ.get(FAULT_ENV)
    if not fault_dir:
        return
    sentinel = os.path.join(fault_dir, f"{stage}-{shard}")
    if not os.path.exists(sentinel):
        with open(sentinel, "w") as f:
            f.write("crashed once\n")
        os._exit(1)


# -- task functions (run in Ray workers) -------------------------------------------------------
def synth_task(shard: Shard, stage_dir: str, params: dict) -> dict:
    from curation.synth import generate_shard

    index = int(shard.name.rsplit("-", 1)[-1])
    data, truth = generate_shard(
        params["seed"], index, params["pairs_per_shard"], malformed_rate=params["malformed_rate"]
    )
    fsio.atomic_write_bytes(shard.input, data)
    stats = {
        "shard": shard.name,
        "input": shard.input,
        "counts": {"pairs": truth.pairs},
        "malformed": dict(truth.malformed),
    }
    write_marker(stage_dir, shard.name, stats)
    return stats


def ingest_task(shard: Shard, stage_dir: str, params: dict) -> dict:
    from curation.ingest import Ingestor

    ingestor = cached("ingest:" + fingerprint(params), lambda: Ingestor(**params))
    _maybe_crash("ingest", shard.name)
    result = ingestor.process_shard(shard.input, shard.name)
    return finish_part(
        stage_dir,
        shard,
        result.table,
        result.counts,
        input_bytes=result.input_bytes,
        input_sha256=result.input_sha256,
        quarantine=result.quarantine,
    )


def _matcher(params: dict) -> Any:
    def build() -> Any:
        from curation.match import Matcher
        from curation.metadata import load_metadata

        md = load_metadata(params["metadata"])
        if md.checksum != params["checksum"]:
            raise RuntimeError(
                f"metadata {params['metadata']} changed while the job ran "
                f"({md.checksum} != {params['checksum']})"
            )
        m = Matcher(md.entries, engine=params["engine"], script_aware=params["script_aware"])
        m.setup()
        return m

    return cached("match:" + fingerprint(params), build)


def match_task(shard: Shard, stage_dir: str, params: dict) -> dict:
    matcher = _matcher(params)
    _maybe_crash("match", shard.name)
    return _match_finish(shard, stage_dir, matcher, pq.read_table(shard.input))


def pool_match_task(shard: Shard, stage_dir: str, params: dict) -> dict:
    """Match a pool shard as it is (every Parquet column), adding its row index `pool_row`."""
    from curation.filter_run import POOL_ROW

    matcher = _matcher(params)
    _maybe_crash("match", shard.name)
    table = pq.read_table(shard.input)
    if POOL_ROW not in table.column_names:
        table = table.append_column(POOL_ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return _match_finish(shard, stage_dir, matcher, table)


def _match_finish(shard: Shard, stage_dir: str, matcher: Any, table: pa.Table) -> dict:
    out = matcher.process(table)
    counts: Counter = Counter(rows_read=table.num_rows)
    lengths = pa.compute.list_value_length(out.column("entry_ids"))
    counts["rows_with_match"] = int(pa.compute.sum(pa.compute.greater(lengths, 0)).as_py() or 0)
    counts["matches"] = int(pa.compute.sum(lengths).as_py() or 0)
    return finish_part(stage_dir, shard, out, counts)


def count_task(url: str, num_entries: int) -> np.ndarray:
    from curation.balance import count_entries

    ids = pq.read_table(url, columns=["entry_ids"]).column("entry_ids")
    return count_entries(ids, num_entries)


def balance_task(shard: Shard, stage_dir: str, probs: np.ndarray, seed: int) -> dict:
    from curation.balance import Balancer

    _maybe_crash("balance", shard.name)
    table = pq.read_table(shard.input)
    kept, counts = Balancer(probs, seed).process(table)
    return finish_part(stage_dir, shard, kept, counts)


# -- drivers -------------------------------------------------------------------------------------
def parts_of(folder: str) -> list[Shard]:
    """Shards of a stage output folder (`part-<name>.parquet`), or of a single Parquet file."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(folder)
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


def _relative_to(url: str, root: str | None) -> str:
    """`url` relative to the run folder when it lies inside it (so a moved folder resumes)."""
    if root:
        base = root.rstrip("/") + "/"
        if url.startswith(base):
            return "./" + url[len(base) :]
    return url


def _inputs_fingerprint(urls: Sequence[str], root: str | None = None) -> list[list]:
    from fsspec.core import url_to_fs

    out = []
    for u in urls:
        fs, p = url_to_fs(u)
        try:
            size = fs.info(p).get("size")
        except FileNotFoundError:
            size = None
        out.append([_relative_to(u, root), size])
    return out


def fp_inputs(inputs: list[dict]) -> list[list]:
    """Inputs as (file name, sha256) for downstream fingerprints: content, not location."""
    return [[i["url"].rsplit("/", 1)[-1], i["sha256"]] for i in inputs]


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


def versions() -> dict[str, str]:
    import importlib.metadata as im

    out = {"curation": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pyarrow", "polars", "ray", "pyahocorasick", "fastwarc", "fsspec"):
        try:
            out[pkg] = im.version(pkg)
        except im.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def write_quarantine(out: str, stage_markers: list[dict[str, dict]]) -> int:
    lines = []
    for markers in stage_markers:
        for m in markers.values():
            for q in m.get("quarantine", []):
                lines.append(json.dumps(q, sort_keys=True, ensure_ascii=False))
    fsio.atomic_write_bytes(
        fsio.join(out, "quarantine.jsonl"), ("\n".join(lines) + ("\n" if lines else "")).encode()
    )
    return len(lines)


def ingest(
    inputs: Sequence[str],
    out: str,
    *,
    max_text_chars: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    stage_dir: str | None = None,
) -> dict:
    """Ingest input shards into `stage_dir or out` (one part per shard). Returns the summary."""
    from curation.ingest import INPUT_SUFFIXES, Ingestor, detect_format

    Ingestor(max_text_chars=max_text_chars)  # validates parameters before any work
    urls = fsio.expand_inputs(inputs, suffixes=INPUT_SUFFIXES, allow_missing=True)
    if not any(fsio.exists(u) for u in urls):
        raise FileNotFoundError(f"none of the inputs exist: {', '.join(urls[:5])}")
    for u in urls:
        detect_format(u)  # an unknown format fails before any work starts
    shards = shard_names(urls)
    params = {"max_text_chars": max_text_chars}
    stage_dir = stage_dir or out
    fp = {"stage": "ingest", "params": params, "inputs": _inputs_fingerprint(urls, out)}
    markers = run_stage(
        "ingest",
        stage_dir,
        shards,
        ingest_task,
        (params,),
        fp=fp,
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize("ingest", markers)
    summary["inputs"] = [
        {"url": m["input"], "bytes": m.get("input_bytes"), "sha256": m.get("input_sha256")}
        for m in markers.values()
    ]
    summary["input_bytes"] = sum(m.get("input_bytes") or 0 for m in markers.values())
    summary["per_shard"] = {name: m["counts"] for name, m in markers.items()}
    summary["_markers"] = markers
    return summary


def match(
    inp: str,
    metadata: str,
    stage_dir: str,
    *,
    engine: str = "auto",
    script_aware: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    upstream: str = "",
) -> dict:
    return _match_stage(
        parts_of(inp),
        metadata,
        stage_dir,
        match_task,
        engine=engine,
        script_aware=script_aware,
        overwrite=overwrite,
        progress=progress,
        upstream=upstream,
    )


def _match_stage(
    shards: Sequence[Shard],
    metadata: str,
    stage_dir: str,
    task: Any,
    *,
    engine: str,
    script_aware: bool,
    overwrite: bool,
    progress: bool,
    upstream: str,
    extra: dict[str, Any] | None = None,
) -> dict:
    from curation.metadata import load_metadata

    md = load_metadata(metadata)
    params = {
        "metadata": metadata,
        "checksum": md.checksum,
        "engine": engine,
        "script_aware": script_aware,
        **(extra or {}),
    }
    fp = {
        "stage": "match",
        "params": params,
        "upstream": upstream,
        "inputs": [] if upstream else _inputs_fingerprint([s.input for s in shards]),
    }
    markers = run_stage(
        "match",
        stage_dir,
        shards,
        task,
        (params,),
        fp=fp,
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize("match", markers)
    summary["metadata"] = {"path": metadata, "entries": len(md), "checksum": md.checksum}
    summary["_markers"] = markers
    return summary


def match_metadata(matched: str, metadata: str | None) -> str:
    """The metadata file `matched` was produced with; `metadata`, when given, must agree."""
    from curation.metadata import load_metadata
    from curation.runner import STAGE_FILE

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


def count(inp: str, metadata: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Global entry counts over every part of `inp` (the barrier before balancing)."""
    import ray

    from curation.metadata import load_metadata

    md = load_metadata(metadata)
    remote = ray.remote(num_cpus=1, max_retries=3)(count_task)
    refs = [remote.remote(s.input, len(md)) for s in parts_of(inp)]
    total = np.zeros(len(md), dtype=np.uint64)
    for ref in refs:
        total += ray.get(ref)
    return total, md.entries


def write_counts(counts: np.ndarray, entries: Sequence[str], path: str) -> None:
    table = pa.table(
        {
            "entry_id": pa.array(np.arange(len(entries), dtype=np.uint32)),
            "entry": pa.array(list(entries), pa.string()),
            "count": pa.array(counts.astype(np.uint64)),
        }
    )
    fsio.atomic_write_parquet(path, table)


def read_counts(path: str) -> np.ndarray:
    t = pq.read_table(path, columns=["entry_id", "count"])
    ids = t.column("entry_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{path}: entry_id must be 0..N-1 in order (one row per metadata entry)")
    return t.column("count").to_numpy().astype(np.uint64)


def resolve_t(
    counts: np.ndarray, t: float | None, tail_proportion: float | None
) -> tuple[float, float]:
    from curation.balance import p_to_t, t_to_p

    if (t is None) == (tail_proportion is None):
        raise ValueError("give exactly one of t or tail_proportion")
    if t is None:
        t = float(p_to_t(counts, tail_proportion))
    return float(t), t_to_p(counts, t)


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
    from curation.balance import entry_probabilities

    probs = entry_probabilities(counts, t)
    shards = parts_of(inp)
    fp = {
        "stage": "balance",
        "t": t,
        "seed": seed,
        "upstream": upstream,
        "counts": fingerprint(counts.tolist()),
        "inputs": [] if upstream else _inputs_fingerprint([s.input for s in shards]),
    }
    markers = run_stage(
        "balance",
        stage_dir,
        shards,
        balance_task,
        (probs, seed),
        fp=fp,
        overwrite=overwrite,
        progress=progress,
    )
    summary = summarize("balance", markers)
    summary["_markers"] = markers
    return summary


def public(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def run_job(spec: Any, out: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run a whole job: (synth →) ingest → match → count → balance → report → manifest.json.

    Every stage resumes from its completion markers; a changed spec refuses to reuse old parts
    unless `overwrite`. The manifest holds no timestamps, so same inputs ⇒ same bytes. A job on
    `input.pool` runs `run_pool_job` instead.
    """
    from curation.metadata import load_metadata

    if spec.pool:
        return run_pool_job(spec, out, overwrite=overwrite, progress=progress)

    load_metadata(spec.metadata)  # fail before any work if the metadata is bad
    inputs = list(spec.paths)
    manifest: dict[str, Any] = {"job": spec.to_dict(), "versions": versions(), "stages": {}}
    stage_markers: list[dict[str, dict]] = []
    if spec.synth is not None:
        s = spec.synth
        from curation.synth import shard_file_name

        sdir = fsio.join(out, "input")
        shards = [
            Shard(name=f"synth-{i:05d}", input=fsio.join(sdir, shard_file_name(i)))
            for i in range(s.shards)
        ]
        params = {
            "seed": s.seed,
            "pairs_per_shard": s.pairs_per_shard,
            "malformed_rate": s.malformed_rate,
        }
        markers = run_stage(
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
        from curation.ingest import INPUT_SUFFIXES

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
    up = fingerprint({"ingest": ing["counters"], "inputs": fp_inputs(manifest["inputs"])})

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
    manifest["flow"] = ["ingest"]
    _count_and_balance(
        spec, out, mt, up, manifest, stage_markers, overwrite=overwrite, progress=progress
    )
    manifest["quarantined"] = write_quarantine(out, stage_markers)
    manifest["outputs"] = {
        "curated": fsio.join(out, "balance"),
        "counts": fsio.join(out, "counts", "entry_counts.parquet"),
        "report": fsio.join(out, "report"),
        "quarantine": fsio.join(out, "quarantine.jsonl"),
    }
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), manifest)
    return manifest


def _count_and_balance(
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
    from curation.report import write_report

    stage_markers.append(mt.pop("_markers"))
    manifest["metadata"] = mt.pop("metadata")
    manifest["stages"]["match"] = mt
    before, entries = count(fsio.join(out, "match"), spec.metadata)
    write_counts(before, entries, fsio.join(out, "counts", "entry_counts.parquet"))
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
    stage_markers.append(bl.pop("_markers"))
    manifest["stages"]["balance"] = bl
    after, _ = count(fsio.join(out, "balance"), spec.metadata)
    write_counts(after, entries, fsio.join(out, "counts", "entry_counts_balanced.parquet"))
    report = write_report(out, before, after, entries, t, p)
    manifest["report"] = {"head_tail_before": report["before"], "head_tail_after": report["after"]}
    manifest["flow"] += ["match", "count", "balance"]
    return fingerprint({"balance": bl["counters"], "up": up})


def run_pool_job(spec: Any, out: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """A job on a pool (`input.pool`): its filters and MetaCLIP balancing, in the spec's order.

    The pool (DataComp layout or a `curation score` folder) is read as it is, every Parquet
    column kept. `balance.when: after` (or no balance): filter (`OUT/filter`, with `pool_row`),
    then match → count → balance on the kept rows. `before`: match the pool (adding `pool_row`)
    → count → balance, then filter the balanced rows (global thresholds are fitted on them;
    `.npz` embeddings are found by `pool_row`). The last stage's folder is the curated subset,
    with DataComp's uid file `OUT/uids.npy` when every uid is 32 hex digits. Filters, their
    files and the pool's columns are checked before any work.
    """
    from curation import datacomp
    from curation.filter_run import (
        POOL_ROW,
        check_pool,
        datacomp_size,
        filter_stage,
        pool_shards,
        write_uid_file,
    )
    from curation.filters import combine_filters, filter_from_params
    from curation.metadata import load_metadata

    urls = datacomp.list_shards(spec.pool)
    if not urls:
        raise FileNotFoundError(f"input.pool {spec.pool}: no .parquet shards")
    shards = pool_shards(urls)
    needs = ["uid", "text"] if spec.balance else ["uid"]
    filt = None
    if spec.filters is not None:
        filt = combine_filters(
            [
                filter_from_params(
                    st.baseline, st.params, name=st.name, where=f"filters.steps[{i}]"
                )
                for i, st in enumerate(spec.filters.steps)
            ],
            spec.filters.combine,
        )
        filt.prepare()
        check_pool(filt, urls[0], extra=needs)
    else:
        datacomp.check_shard_columns(urls[0], needs)
    if spec.balance:
        load_metadata(spec.metadata)

    manifest: dict[str, Any] = {
        "job": spec.to_dict(),
        "versions": versions(),
        "inputs": [{"url": s.input, "bytes": datacomp_size(s.input)} for s in shards],
        "stages": {},
        "flow": [],
    }
    stage_markers: list[dict[str, dict]] = []
    up = fingerprint({"pool": _inputs_fingerprint([s.input for s in shards], out)})

    def run_filters(
        stage_shards: Sequence[Shard], pool_urls: dict[str, str] | None, upstream: str
    ) -> str:
        steps = [asdict(st) for st in spec.filters.steps]
        assets: list[str] = []
        for st in spec.filters.steps:
            assets += [st.params[k] for k in ("centroids",) if k in st.params]
            assets += st.params.get("target_embeddings", [])
        fp = {
            "stage": "filter",
            "params": {"combine": spec.filters.combine, "steps": steps},
            "assets": _inputs_fingerprint(assets),
            "upstream": upstream,
        }
        fl = filter_stage(
            filt,
            stage_shards,
            fsio.join(out, "filter"),
            fp=fp,
            pool_urls=pool_urls,
            row_index=True,
            overwrite=overwrite,
            progress=progress,
        )
        stage_markers.append(fl.pop("_markers"))
        manifest["stages"]["filter"] = fl
        manifest["flow"].append("filter")
        return fingerprint({"filter": fl["counters"], "fit": fl["fit"], "up": upstream})

    final = None
    if filt is not None and spec.balance_when != "before":
        up = run_filters(shards, None, up)
        final = fsio.join(out, "filter")
    if spec.balance:
        kw = {"engine": spec.engine, "script_aware": spec.script_aware}
        if final is None:
            mt = _match_stage(
                shards,
                spec.metadata,
                fsio.join(out, "match"),
                pool_match_task,
                **kw,
                overwrite=overwrite,
                progress=progress,
                upstream=up,
                extra={"row_index": POOL_ROW},
            )
        else:
            mt = match(
                final,
                spec.metadata,
                fsio.join(out, "match"),
                **kw,
                overwrite=overwrite,
                progress=progress,
                upstream=up,
            )
        up = _count_and_balance(
            spec, out, mt, up, manifest, stage_markers, overwrite=overwrite, progress=progress
        )
        final = fsio.join(out, "balance")
    if filt is not None and spec.balance_when == "before":
        up = run_filters(parts_of(final), {s.name: s.input for s in shards}, up)
        final = fsio.join(out, "filter")
    assert final is not None  # parse_job: a pool job has filters, balance or both
    uid_info = write_uid_file(out, final, parts_of(final))
    manifest["quarantined"] = write_quarantine(out, stage_markers)
    manifest["outputs"] = {"curated": final, **uid_info}
    if spec.balance:
        manifest["outputs"].update(
            counts=fsio.join(out, "counts", "entry_counts.parquet"),
            report=fsio.join(out, "report"),
        )
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), manifest)
    return manifest


def run_summary(manifest: dict[str, Any], out: str) -> str:
    """The lines `curation run` prints for a finished pool job."""
    st = manifest["stages"]
    first = st[manifest["flow"][0]]
    parts = [f"pool {first['rows_read']:,}"]
    for stage in manifest["flow"]:
        if stage == "filter":
            f = st["filter"]
            steps = f" {f['combine']} ".join(x["name"] for x in f["steps"])
            parts.append(f"filter ({steps}) {f['rows_written']:,}")
        elif stage == "balance":
            b = manifest["balance"]
            parts.append(f"balance (t = {b['t']:,.0f}) {st['balance']['rows_written']:,}")
    o = manifest["outputs"]
    uids = o["uids"] or "not written (uids are not 32 hex digits; see the manifest)"
    return (
        f"{manifest['job']['name']}: " + " → ".join(parts) + f"\n  curated:  {o['curated']}/"
        f"\n  uids:     {uids}\n  manifest: {out}/manifest.json"
    )


def status(out: str) -> dict[str, Any]:
    """What is done, pending and quarantined in a run folder (reads markers only)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(out)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{out} is not a run folder")
    res: dict[str, Any] = {"stages": {}}
    expected: int | None = None
    for stage in ("input", "ingest", "match", "balance"):
        sdir = fsio.join(out, stage)
        stage_file = fsio.join(sdir, "_stage.json")
        if not fsio.exists(stage_file):
            continue
        fp = fsio.read_json(stage_file)
        if stage == "input":
            expected = fp.get("shards")
        elif stage == "ingest":
            expected = len(fp.get("inputs", [])) or expected
        done = len(fs.glob(url_to_fs(fsio.join(sdir, "_done", "*.json"))[1]))
        entry = {"done": done}
        if expected is not None:
            entry["pending"] = max(0, expected - done)
        res["stages"][stage] = entry
        expected = done if stage != "input" else expected
    if fsio.exists(fsio.join(out, "filter", "_stage.json")):  # pool jobs: before or after balance
        pattern = url_to_fs(fsio.join(out, "filter", "_done", "*.json"))[1]
        res["stages"]["filter"] = {"done": len(fs.glob(pattern))}
    q = fsio.join(out, "quarantine.jsonl")
    if fsio.exists(q):
        with fs.open(url_to_fs(q)[1], "rb") as f:
            lines = [json.loads(x) for x in f.read().splitlines() if x.strip()]
        res["quarantined"] = dict(sorted(Counter(x["reason"] for x in lines).items()))
    res["complete"] = fsio.exists(fsio.join(out, "manifest.json"))
    return res
