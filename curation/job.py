"""Job specs: a YAML file naming the input, metadata, step parameters, seed and output.

Validated completely when loaded, before any work starts: a bad spec fails with a message that
names the key and says what to fix.

```yaml
name: demo
seed: 0
input:
  paths: ["s3://bucket/crawl/*.warc.wat.gz"]      # or: synth: {shards: 4, pairs_per_shard: 25000}
metadata: metadata/metadata_en.json
ingest: {max_text_chars: 1000}
match: {engine: auto}
balance: {t: 20000}                                 # or: {tail_proportion: 0.1}
output: runs/demo
```
Relative local paths are taken relative to the current directory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

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
}


class JobSpecError(ValueError):
    """A job spec that cannot run; the message names the key and what to fix."""


@dataclass
class SynthInput:
    shards: int
    pairs_per_shard: int
    seed: int = 0
    malformed_rate: float = 0.0


@dataclass
class JobSpec:
    """A validated job spec."""

    name: str
    seed: int
    metadata: str
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _int(v: Any, key: str, where: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise JobSpecError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
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
    for key in ("name", "input", "metadata"):
        if key not in spec:
            raise JobSpecError(f"{where}: missing required key '{key}'")
    for key in ("name", "metadata"):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise JobSpecError(f"{where}: '{key}' must be a non-empty string, got {spec[key]!r}")
    seed = _int(spec.get("seed", 0), "seed", where)
    inp = _section(spec, "input", {"paths", "synth"}, where)
    paths = inp.get("paths") or []
    if isinstance(paths, str):
        paths = [paths]
    synth = None
    if "synth" in inp:
        s = _section(
            inp, "synth", {"shards", "pairs_per_shard", "seed", "malformed_rate"}, f"{where}: input"
        )
        rate = s.get("malformed_rate", 0.0)
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise JobSpecError(f"{where}: input.synth.malformed_rate must be in [0, 1]")
        synth = SynthInput(
            shards=_int(s.get("shards"), "input.synth.shards", where, 1),
            pairs_per_shard=_int(s.get("pairs_per_shard"), "input.synth.pairs_per_shard", where, 1),
            seed=_int(s.get("seed", seed), "input.synth.seed", where),
            malformed_rate=float(rate),
        )
    if bool(paths) == bool(synth):
        raise JobSpecError(f"{where}: 'input' needs exactly one of 'paths' or 'synth'")
    ingest = _section(spec, "ingest", {"max_text_chars"}, where)
    match = _section(spec, "match", {"engine", "script_aware"}, where)
    engine = match.get("engine", "auto")
    if engine not in ENGINES:
        raise JobSpecError(f"{where}: match.engine must be one of {ENGINES}, got {engine!r}")
    bal = _section(spec, "balance", {"t", "tail_proportion"}, where)
    t, p = bal.get("t"), bal.get("tail_proportion")
    if (t is None) == (p is None):
        raise JobSpecError(f"{where}: 'balance' needs exactly one of 't' or 'tail_proportion'")
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
    ):
        raise JobSpecError(f"{where}: balance.t must be a number > 0, got {t!r}")
    if p is not None and (not isinstance(p, (int, float)) or not 0 < p <= 1):
        raise JobSpecError(f"{where}: balance.tail_proportion must be in (0, 1], got {p!r}")
    return JobSpec(
        name=str(spec["name"]),
        seed=seed,
        metadata=str(spec["metadata"]),
        output=spec.get("output"),
        paths=[str(x) for x in paths],
        synth=synth,
        max_text_chars=_int(ingest.get("max_text_chars", 1000), "ingest.max_text_chars", where, 1),
        engine=engine,
        script_aware=bool(match.get("script_aware", False)),
        t=float(t) if t is not None else None,
        tail_proportion=float(p) if p is not None else None,
        description=str(spec.get("description", "")),
        paper=str(spec.get("paper", "")),
    )


def load_job(path: str) -> JobSpec:
    """Load and validate a YAML job spec file."""
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise JobSpecError(f"job spec {path!r} does not exist")
    with fs.open(p, "rb") as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise JobSpecError(f"{path}: not valid YAML ({exc})") from exc
    return parse_job(spec, where=path)
