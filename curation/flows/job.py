"""`curation run JOB.yaml`: a job spec's flow (raw shards → MetaCLIP, or a pool → filters and
balancing), then its `images`, `train` and `eval` sections, and the lines the CLI prints.

After the curation stages (each resumable as before):

- `images` (raw-shard jobs): the curated subset's images are fetched into `OUT/images`
  (`flows.fetch.fetch`, img2dataset) and training reads those tars.
- `train`: `flows.train.train_command` into `OUT/train`. Data: a pool job trains on
  `train.shards` restricted to its curated subset (`OUT/uids.npy`, else the curated folder;
  no subset when the job neither filters nor balances: DataComp's no-filtering baseline); a
  raw-shard job on the fetched images (no subset) or on `train.shards` restricted to
  `OUT/balance`. With `train.balance: online` training does not use the offline balanced
  subset: it reads the rows balancing started from (the filter output, or the whole pool /
  all of `train.shards`) and draws a fresh balanced sample each pass from the job's own match
  output and entry counts (`OUT/match`, `OUT/counts/entry_counts.parquet`), at the job's
  `t` / `tail_proportion` unless `train.t` / `train.tail_proportion` is given.
- `eval`: `flows.evaluate.evaluate_command` of the trained model into `OUT/eval/results.json`.

`OUT/train` and `OUT/eval` are stages like the others: `_stage.json` holds their fingerprint
(the resolved training config and what the curation produced; for eval, the tasks, settings and
the trained model) and `_done/<stage>.json` is written last. A rerun of a finished job skips
them (no new checkpoint); an interrupted training run resumes from its latest checkpoint; a
changed config is refused unless `--overwrite`, which starts them over. The job manifest gets
`train` and `eval` keys without wall times (those stay in `OUT/train/manifest.json` and
`OUT/eval/results.json`), so a rerun writes the same manifest bytes; the report
(`OUT/report/summary.md`) gets the recipe, the subset, the loss curve and the scores.
"""

from __future__ import annotations

import json
from typing import Any

from curation.core import fsio
from curation.core.fingerprint import fingerprint
from curation.core.redact import redact
from curation.executor.runner import check_output_location
from curation.flows.metaclip import run_metaclip_job
from curation.flows.pool import run_pool_job, run_summary
from curation.io.parts import check_output_not_in_inputs, leased, prepare_stage_dir

#: What `curation train` writes in its OUT: cleared with `--overwrite` when the config changed.
TRAIN_OWNED = (
    "checkpoints", "model.safetensors", "train_log.jsonl", "loss_curve.png", "manifest.json",
    "_uids",
)  # fmt: skip
#: Fields of the resolved TrainConfig that do not change what is trained.
_NOT_FINGERPRINTED = ("out", "resume", "sources", "max_failures")


@leased("out")
def run_job(spec: Any, out: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run a whole job spec into `out`; returns the manifest (also written to OUT)."""
    check_output_location(out)
    extra = list(spec.train.shards) if spec.train is not None else []
    extra += list(spec.eval.tasks) if spec.eval is not None else []
    # OUT's own layout (OUT/input/ synth shards, OUT/ingest parts) may be an input
    check_output_not_in_inputs(out, list(spec.pool or spec.paths) + extra, inputs_inside_out=True)
    _check_sections(spec, out, overwrite)  # one-line errors before any work
    flow = run_pool_job if spec.pool else run_metaclip_job
    if getattr(spec, "langid", None) is not None:
        from curation.flows.worldwide import run_worldwide_job

        flow = run_worldwide_job
    manifest = flow(spec, out, overwrite=overwrite, progress=progress)
    if spec.images is None and spec.train is None:
        return manifest
    if spec.images is not None:
        manifest["images"] = _fetch_images(spec, out, manifest, overwrite, progress)
        manifest["outputs"]["images"] = fsio.join(out, "images")
    if spec.train is not None:
        manifest["train"] = _train(spec, out, manifest, overwrite, progress)
        manifest["outputs"]["train"] = fsio.join(out, "train")
        if spec.eval is not None:
            manifest["eval"] = _eval(spec, out, manifest["train"], overwrite, progress)
            manifest["outputs"]["eval"] = fsio.join(out, "eval", "results.json")
        _report(spec, out, manifest)
        manifest["outputs"]["report"] = fsio.join(out, "report")
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), redact(manifest))
    return manifest


def _check_sections(spec: Any, out: str, overwrite: bool) -> None:
    """The images options, the model name, an OUT/train of another training config and the
    eval task folders, checked up front."""
    if spec.metadata is not None and not spec.pool:
        _check_metadata_kind(spec)
    if spec.images is not None:
        from curation.flows.fetch import FetchOptions

        FetchOptions(**spec.images)
    if spec.train is not None:
        from curation.flows.train import check_model

        online = _online_data(out, spec) if spec.train.online else {}
        cfg = _config(spec, out, shards=spec.train.shards or [fsio.join(out, "images")], **online)
        check_model(cfg.model)
        if cfg.pretrained and not fsio.exists(cfg.pretrained):
            raise FileNotFoundError(f"train.pretrained {cfg.pretrained!r} does not exist")
        if not overwrite:
            _check_train_unchanged(out, cfg)
    if spec.eval is not None:
        from curation.train.eval_tasks import load_task

        for t in spec.eval.tasks:
            load_task(t)


def _check_metadata_kind(spec: Any) -> None:
    """A worldwide job's metadata set, LID mapping and model load; an English job's metadata
    is not a folder (a metadata set), checked before any work."""
    if getattr(spec, "langid", None) is not None:
        from curation.core.metadata import load_metadata_set
        from curation.flows.worldwide import _model_identity
        from curation.stages.langid import LangIdStage

        load_metadata_set(spec.metadata)
        LangIdStage(spec.langid.model, spec.langid.mapping)
        _model_identity(spec.langid.model)
    elif not spec.metadata.startswith("bundled:") and fsio.exists(spec.metadata):
        fs, path = fsio.url_to_fs(spec.metadata)
        if fs.isdir(path):
            raise ValueError(
                f"metadata {spec.metadata} is a folder (a per-language metadata set): a "
                "worldwide job needs a 'langid' section; an English job names one file"
            )


#: TrainConfig fields that name the job's data (compared only once the curation has run).
_DATA_FIELDS = ("shards", "subset", "matched", "counts")


def _check_train_unchanged(out: str, cfg: Any) -> None:
    """Refuse, before the curation stages run again, an OUT/train of another training config
    (its `_stage.json`); the data the config names is compared once it is known (`_train`)."""
    from curation.io.parts import STAGE_FILE, ResumeError

    url = fsio.join(out, "train", STAGE_FILE)
    if not fsio.exists(url):
        return
    old = (fsio.read_json(url) or {}).get("config") or {}
    new = cfg.to_dict()
    changed = sorted(
        k for k in set(old) | set(new)
        if k not in _NOT_FINGERPRINTED + _DATA_FIELDS and old.get(k) != new.get(k)
    )  # fmt: skip
    if changed:
        raise ResumeError(
            f"{fsio.join(out, 'train')} holds a training run of another config (changed: "
            f"{', '.join('config.' + k for k in changed)}). Rerun with --overwrite to train "
            "again from scratch, or write to another output folder."
        )


def _config(spec: Any, out: str, *, shards: list[str], **data: Any) -> Any:
    """The run's TrainConfig: the spec's `train` section with the job's data and defaults
    (one worker per GPU; 1 + loader_workers CPUs per worker, as `curation train`)."""
    from curation.config.train import resolve
    from curation.executor.runner import cluster_resources

    params = dict(spec.train.params)
    if params.get("num_workers") is None:
        gpus = 0
        if params.get("device", "auto") != "cpu":
            gpus = int(cluster_resources().get("GPU", 0))
        params["num_workers"] = max(1, gpus)
    params.setdefault("cpus_per_worker", 1 + params.get("loader_workers", 2))
    return resolve(
        spec.train.scale,
        {**params, **data, "shards": tuple(shards), "out": fsio.join(out, "train")},
    )


def _fetch_images(
    spec: Any, out: str, manifest: dict[str, Any], overwrite: bool, progress: bool
) -> dict[str, Any]:
    from curation.flows.fetch import FetchOptions, fetch

    summary = fetch(
        manifest["outputs"]["curated"],
        fsio.join(out, "images"),
        FetchOptions(**spec.images),
        overwrite=overwrite,
        progress=progress,
    )
    summary.pop("inputs", None)
    return summary


def _online_data(out: str, spec: Any = None) -> dict[str, str]:
    """Online balancing's inputs: the job's own match output and entry counts (a worldwide
    job's per-language counts: `train.online.OnlineBalancer.load` tells them by `lang`)."""
    worldwide = getattr(spec, "langid", None) is not None
    return {
        "matched": fsio.join(out, "match"),
        "counts": fsio.join(
            out, "counts", "lang_counts.parquet" if worldwide else "entry_counts.parquet"
        ),
    }


def _train_data(spec: Any, out: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """shards, subset and (online balancing) matched / counts of the job's training run."""
    o = manifest["outputs"]
    if spec.images is not None:
        return {"shards": [fsio.join(out, "images")]}
    data: dict[str, Any] = {"shards": list(spec.train.shards)}
    if spec.train.online:
        data.update(_online_data(out, spec))
        if spec.filters is not None:  # balance.when is after: the rows balancing started from
            data["subset"] = fsio.join(out, "filter")
    elif o.get("curated"):
        data["subset"] = o.get("uids") or o["curated"]
    return data


def _train(
    spec: Any, out: str, manifest: dict[str, Any], overwrite: bool, progress: bool
) -> dict[str, Any]:
    from curation.flows.train import train_command

    data = _train_data(spec, out, manifest)
    cfg = _config(spec, out, **data, resume=True)
    _check_cpus(cfg)
    tdir = fsio.join(out, "train")
    config = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED}
    upstream = {k: v for k, v in manifest.items() if k not in ("job", "train", "eval")}
    fp = {"stage": "train", "config": config, "upstream": fingerprint(upstream)}
    prepare_stage_dir(tdir, fp, overwrite, owned=TRAIN_OWNED)
    marker = fsio.join(tdir, "_done", "train.json")
    if fsio.exists(marker):
        return fsio.read_json(marker)
    m = train_command(cfg, progress=progress)
    r = m["result"]
    summary = {
        "out": tdir,
        "hyperparameters": m["hyperparameters"],
        "data": {
            "shards": len(m["inputs"]["shards"]),
            "subset": m["inputs"]["subset"],
            "online_balance": bool(spec.train.online),
            "image_size": m["data"]["image_size"],
            "samples_per_pass": m["data"]["samples_per_pass"],
            "steps_per_pass": m["data"]["steps_per_pass"],
        },
        "result": {
            "steps": r["steps"],
            "total_steps": r["total_steps"],
            "samples_seen": r["samples_seen"],
            "final_loss": r["final_loss"],
            "device": r["device"],
            "precision": r["precision"],
            "world_size": r["world_size"],
            "model": fsio.join(tdir, r["model"]),
            "manifest": fsio.join(tdir, "manifest.json"),
        },
    }
    if m.get("balance"):
        b = m["balance"]
        summary["data"]["balance"] = {k: v for k, v in b.items() if k != "passes"}
        summary["data"]["balance"]["passes"] = b.get("passes", [])
    fsio.atomic_write_json(marker, redact(summary))
    return fsio.read_json(marker)  # as the next rerun reads it: the same manifest bytes


def _check_cpus(cfg: Any) -> None:
    from curation.executor.runner import cluster_resources

    cpus = float(cluster_resources().get("CPU", 0))
    if cfg.cpus_per_worker * cfg.num_workers > cpus:
        raise ValueError(
            f"train: {cfg.num_workers} worker(s) x {cfg.cpus_per_worker} CPUs (cpus_per_worker, "
            f"default 1 + loader_workers) is more than the Ray cluster's {cpus:g} CPUs: lower "
            "train.loader_workers or train.cpus_per_worker"
        )


def _local_weights(url: str, tmp: str) -> str:
    """A driver-local path of the weights (copied into `tmp` from a remote OUT)."""
    import os

    from curation.core.assets import is_shared

    fs, path = fsio.url_to_fs(url)
    if not is_shared(url):
        return path
    dest = os.path.join(tmp, os.path.basename(path))
    fs.get(path, dest)
    return dest


def _eval(
    spec: Any, out: str, train: dict[str, Any], overwrite: bool, progress: bool
) -> dict[str, Any]:
    import tempfile

    from curation.flows.evaluate import evaluate_command

    ev = spec.eval
    edir = fsio.join(out, "eval")
    trained = {"hyperparameters": train["hyperparameters"], "result": train["result"]}
    fp = {
        "stage": "eval",
        "tasks": list(ev.tasks),
        "batch_size": ev.batch_size,
        "device": ev.device,
        "model": fingerprint(trained),
    }
    prepare_stage_dir(edir, fp, overwrite, owned=("results.json",))
    marker = fsio.join(edir, "_done", "eval.json")
    if fsio.exists(marker):
        return fsio.read_json(marker)
    with tempfile.TemporaryDirectory(prefix="curation-eval-") as tmp:
        model = {
            "model": train["hyperparameters"]["model"],
            "checkpoint": _local_weights(train["result"]["model"], tmp),
            "pretrained": None,
        }
        results = fsio.join(edir, "results.json")
        doc = evaluate_command(
            model, ev.tasks, results, device=ev.device, batch_size=ev.batch_size,
            progress=progress,
        )  # fmt: skip
    summary = {
        "results": results,
        "device": doc["device"],
        "tasks": [
            {k: v for k, v in r.items() if k not in ("seconds", "per_class_recall")}
            for r in doc["tasks"]
        ],
        "average": doc["average"],
    }
    fsio.atomic_write_json(marker, redact(summary))
    return fsio.read_json(marker)


def _report(spec: Any, out: str, manifest: dict[str, Any]) -> None:
    """The job's training section of OUT/report/summary.md, with OUT/report/loss_curve.png."""
    from curation.flows.train import write_loss_curve
    from curation.io.report import write_job_report

    tdir = fsio.join(out, "train")
    rows = []
    log = fsio.join(tdir, "train_log.jsonl")
    if fsio.exists(log):
        fs, path = fsio.url_to_fs(log)
        with fs.open(path, "rb") as f:
            rows = [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]
    curve = None
    if rows:
        curve = "loss_curve.png"
        title = f"{spec.name}: {manifest['train']['hyperparameters']['model']}"
        write_loss_curve(rows, fsio.join(out, "report", curve), title)
    write_job_report(out, _recipe(spec, manifest), manifest["train"], manifest.get("eval"), curve)


def _recipe(spec: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """What was curated, for the report: the job, its filters and balancing, the subset size."""
    steps = []
    if spec.filters is not None:
        for s in spec.filters.steps:
            params = ", ".join(f"{k}={v}" for k, v in sorted(s.params.items()))
            steps.append(f"{s.name} ({s.baseline}{': ' + params if params else ''})")
    st = manifest["stages"]
    flow = manifest.get("flow") or []
    last = next((s for s in reversed(flow) if s in ("filter", "balance")), None)
    first = st[flow[0]] if flow and flow[0] in st else {}
    b = manifest.get("balance")
    return {
        "name": spec.name,
        "paper": spec.paper,
        "filters": f" {spec.filters.combine} ".join(steps) if steps else None,
        "balance": (
            {"t": b["t"], "tail_proportion": b["tail_proportion"], "when": b.get("when")}
            if b
            else None
        ),
        "flow": [s for s in flow if s != "count"],
        "pool_rows": first.get("rows_read"),
        "subset_rows": st[last]["rows_written"] if last else None,
        "online": bool(spec.train is not None and spec.train.online),
    }


def job_summary(spec: Any, manifest: dict[str, Any], out: str) -> str:
    """What `curation run` prints when a job is done."""
    if spec.pool:
        text = run_summary(manifest, out)
    else:
        st = manifest["stages"]
        b = manifest["balance"]
        text = (
            f"{spec.name}: pairs {st['ingest']['rows_written']:,} → matched "
            f"{st['match']['counters'].get('rows_with_match', 0):,} → curated "
            f"{st['balance']['rows_written']:,} (t = {b['t']:,.0f}, "
            f"p = {b['tail_proportion']:.4f}); quarantined {manifest['quarantined']}\n"
            f"  curated:  {out}/balance/\n  manifest: {out}/manifest.json\n"
            f"  report:   {out}/report/summary.md, {out}/report/entry_counts.png"
        )
        if getattr(spec, "langid", None) is not None:
            langs = [r for r in manifest["languages"] if r["rows"]]
            text = text.replace("(t = ", "(t_en = ").replace(
                "entry_counts.png", "languages.png"
            ) + (
                f"\n  languages: {len(langs)} in the pool, "
                f"{sum(r['rows'] for r in langs if r['rule'] == 'no_metadata'):,} rows without "
                "metadata; per-language t in the manifest (languages)"
            )
    return text + "".join(f"\n  {line}" for line in train_lines(manifest))


def train_lines(manifest: dict[str, Any]) -> list[str]:
    """The images / train / eval lines of a job's summary (none when it has no such section)."""
    lines = []
    if "images" in manifest:
        i = manifest["images"]
        lines.append(
            f"images:   {i['rows_written']:,} of {i['rows_read']:,} fetched → "
            f"{manifest['outputs']['images']}/"
        )
    if "train" in manifest:
        t = manifest["train"]
        r, h = t["result"], t["hyperparameters"]
        lines.append(
            f"train:    {h['model']}, {r['steps']}/{r['total_steps']} steps, "
            f"{r['samples_seen']:,} samples seen, final loss {r['final_loss']:.4f} → {r['model']}"
        )
    if "eval" in manifest:
        e = manifest["eval"]
        for task in e["tasks"]:
            m = task["metrics"]
            score = (
                f"acc1 {m['acc1']:.4f}"
                if task["kind"] == "classification"
                else f"mean recall {m['mean_recall']:.4f}"
            )
            lines.append(f"eval:     {task['task']}: {score}")
        lines.append(f"results:  {e['results']}")
    if "train" in manifest:
        lines.append(f"report:   {manifest['outputs']['report']}/summary.md")
    return lines
