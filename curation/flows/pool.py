"""The DataComp pool flow: a job on `input.pool` runs its filters and MetaCLIP balancing in the
spec's order, then writes DataComp's uid file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from curation.core import fsio
from curation.core.accounting import check_handoff, write_quarantine
from curation.core.fingerprint import (
    assets_fingerprint,
    file_identity,
    fingerprint,
    inputs_fingerprint,
    versions,
)
from curation.core.metadata import load_metadata
from curation.core.redact import redact
from curation.core.stage import Shard
from curation.flows.filter import (
    check_pool,
    filter_assets,
    filter_stage,
    pool_shards,
    write_uid_file,
)
from curation.flows.metaclip import count_and_balance, match
from curation.io import datacomp
from curation.io.datacomp import POOL_ROW
from curation.io.parts import parts_of
from curation.stages.filters import combine_filters, filter_from_params


def run_pool_job(spec: Any, out: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """A job on a pool (`input.pool`): its filters and MetaCLIP balancing, in the spec's order.

    The pool (DataComp layout or a `curation score` folder) is read as it is, every Parquet
    column kept. `balance.when: after` (or no balance): filter (`OUT/filter`, with `pool_row`),
    then match → count → balance on the kept rows. `before`: match the pool (adding `pool_row`)
    → count → balance, then filter the balanced rows (global thresholds are fitted on them;
    `.npz` embeddings are found by `pool_row`). The last stage's folder is the curated subset,
    with DataComp's uid file `OUT/uids.npy` when every uid is 32 hex digits. Filters, their
    files and the pool's columns are checked before any work. With neither filters nor
    balance (a job that only trains: DataComp's no-filtering baseline) nothing is curated and
    `outputs.curated` is None.
    """
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
        "inputs": [{"url": s.input, "bytes": _size(s.input)} for s in shards],
        "stages": {},
        "flow": [],
    }
    stage_markers: list[dict[str, dict]] = []
    up = fingerprint({"pool": inputs_fingerprint([s.input for s in shards], out)})

    def run_filters(
        stage_shards: Sequence[Shard], pool_urls: dict[str, str] | None, upstream: str
    ) -> str:
        steps = [asdict(st) for st in spec.filters.steps]
        fp = {
            "stage": "filter",
            "params": {"combine": spec.filters.combine, "steps": steps},
            "assets": assets_fingerprint(filter_assets([st.params for st in spec.filters.steps])),
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
        if pool_urls is not None:  # filtering the balanced rows: it must read them all
            check_handoff("balance", stage_markers[-1], "filter", fl["_markers"])
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
            mt = match(
                shards,
                spec.metadata,
                fsio.join(out, "match"),
                **kw,
                row_index=POOL_ROW,
                check_inputs=True,  # the pool's own shards
                overwrite=overwrite,
                progress=progress,
                upstream=up,
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
            check_handoff("filter", stage_markers[-1], "match", mt["_markers"])
        up = count_and_balance(
            spec, out, mt, up, manifest, stage_markers, overwrite=overwrite, progress=progress
        )
        final = fsio.join(out, "balance")
    if filt is not None and spec.balance_when == "before":
        up = run_filters(parts_of(final), {s.name: s.input for s in shards}, up)
        final = fsio.join(out, "filter")
    if final is None:  # no filters, no balance: `train` on the whole pool (no subset)
        manifest["quarantined"] = write_quarantine(out, stage_markers)
        manifest["outputs"] = {"curated": None, "uids": None}
        fsio.atomic_write_json(fsio.join(out, "manifest.json"), redact(manifest))
        return manifest
    uid_info = write_uid_file(out, final, parts_of(final))
    manifest["quarantined"] = write_quarantine(out, stage_markers)
    manifest["outputs"] = {"curated": final, **uid_info}
    if spec.balance:
        manifest["outputs"].update(
            counts=fsio.join(out, "counts", "entry_counts.parquet"),
            report=fsio.join(out, "report"),
        )
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), redact(manifest))
    return manifest


def run_summary(manifest: dict[str, Any], out: str) -> str:
    """The lines `curation run` prints for a finished pool job."""
    st = manifest["stages"]
    if not manifest["flow"]:
        return (
            f"{manifest['job']['name']}: pool of {len(manifest['inputs'])} shards, no filters "
            f"or balancing (the whole pool)\n  manifest: {out}/manifest.json"
        )
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


def _size(url: str) -> int | None:
    ident = file_identity(url)
    return None if ident is None else ident["size"]
