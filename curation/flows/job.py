"""`curation run JOB.yaml`: a job spec's flow (raw shards → MetaCLIP, or a pool → filters and
balancing), and the lines the CLI prints for it."""

from __future__ import annotations

from typing import Any

from curation.executor.runner import check_output_location
from curation.flows.metaclip import run_metaclip_job
from curation.flows.pool import run_pool_job, run_summary
from curation.io.parts import check_output_not_in_inputs, leased


@leased("out")
def run_job(spec: Any, out: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run a whole job spec into `out`; returns the manifest (also written to OUT)."""
    check_output_location(out)
    # OUT's own layout (OUT/input/ synth shards, OUT/ingest parts) may be an input
    check_output_not_in_inputs(out, list(spec.pool or spec.paths), inputs_inside_out=True)
    flow = run_pool_job if spec.pool else run_metaclip_job
    return flow(spec, out, overwrite=overwrite, progress=progress)


def job_summary(spec: Any, manifest: dict[str, Any], out: str) -> str:
    """What `curation run` prints when a job is done."""
    if spec.pool:
        return run_summary(manifest, out)
    st = manifest["stages"]
    b = manifest["balance"]
    return (
        f"{spec.name}: pairs {st['ingest']['rows_written']:,} → matched "
        f"{st['match']['counters'].get('rows_with_match', 0):,} → curated "
        f"{st['balance']['rows_written']:,} (t = {b['t']:,.0f}, "
        f"p = {b['tail_proportion']:.4f}); quarantined {manifest['quarantined']}\n"
        f"  curated:  {out}/balance/\n  manifest: {out}/manifest.json\n"
        f"  report:   {out}/report/summary.md, {out}/report/entry_counts.png"
    )
