"""Training presets and the resolved configuration of a `curation train` run.

`SCALES` are DataComp's `scale_configs.py` verbatim (github.com/mlfoundations/datacomp): the
model, the global batch, the peak learning rate, the samples seen over the run, the warmup
steps and Adam's β2 (`None`: open_clip's default for the model, 0.98 for ViTs). Every scale
trains with weight decay 0.2 and a cosine schedule after a linear warmup, as DataComp's
`train.py` runs open_clip. `resolve(scale, overrides)` starts from a preset (or from the
defaults below without one) and lets every explicitly given flag win; `TrainConfig` checks the
result and says what is wrong in one line.

This module imports nothing of the package but `config`, and no torch or open_clip: whether a
model name exists is checked where open_clip is loaded (`curation.flows.train`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BALANCE_MODES",
    "DEFAULT_MODEL",
    "DEVICES",
    "LOSSES",
    "PRECISIONS",
    "SCALES",
    "SCHEDULE",
    "WEIGHT_DECAY",
    "TrainConfig",
    "adam_defaults",
    "resolve",
]

#: DataComp's scale_configs.py, exactly (beta2 None = open_clip's default for the model).
SCALES: dict[str, dict[str, Any]] = {
    "debug": {
        "batch_size": 1024,
        "learning_rate": 1e-4,
        "train_num_samples": 128_000,
        "warmup": 500,
        "model": "ViT-B-32",
        "beta2": None,
    },
    "small": {
        "batch_size": 4096,
        "learning_rate": 5e-4,
        "train_num_samples": 12_800_000,
        "warmup": 500,
        "model": "ViT-B-32",
        "beta2": None,
    },
    "medium": {
        "batch_size": 4096,
        "learning_rate": 5e-4,
        "train_num_samples": 128_000_000,
        "warmup": 500,
        "model": "ViT-B-32",
        "beta2": None,
    },
    "large": {
        "batch_size": 8192,
        "learning_rate": 5e-4,
        "train_num_samples": 1_280_000_000,
        "warmup": 500,
        "model": "ViT-B-16",
        "beta2": None,
    },
    "xlarge": {
        "batch_size": 90112,
        "learning_rate": 1e-3,
        "train_num_samples": 12_800_000_000,
        "warmup": 10000,
        "model": "ViT-L-14",
        "beta2": 0.95,
    },
}
#: open_clip_train's default weight decay, which DataComp keeps at every scale.
WEIGHT_DECAY = 0.2
SCHEDULE = "cosine"
DEFAULT_MODEL = "curation-tiny-vit"
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
LOSSES = ("clip", "siglip")
BALANCE_MODES = (None, "online")

# Defaults without --scale: a laptop-sized run of the shipped tiny model.
_DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "batch_size": 256,
    "lr": 5e-4,
    "warmup": 100,
    "samples_seen": 256_000,
    "beta2": None,
}


def adam_defaults(model: str) -> dict[str, float]:
    """open_clip_train's `get_default_params`: Adam β1/β2/ε by model family (CLIP paper)."""
    if "vit" in model.lower():
        return {"beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, resolved (no `None` left where a number is meant)."""

    shards: tuple[str, ...]
    out: str
    model: str = DEFAULT_MODEL
    scale: str | None = None
    pretrained: str | None = None
    batch_size: int = 256  # global: samples per optimizer step over all workers
    lr: float = 5e-4
    warmup: int = 100
    samples_seen: int = 256_000
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = WEIGHT_DECAY
    schedule: str = SCHEDULE
    grad_clip_norm: float | None = None
    loss: str = "clip"
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (one per GPU)
    cpus_per_worker: int = 1
    loader_workers: int = 2  # DataLoader processes per Ray Train worker (0 = in process)
    shuffle_buffer: int = 2048
    #: data streams per rank (0: max(1, loader_workers)); they set the data order, so a resumed
    #: run takes its checkpoint's number whatever --loader-workers says
    streams: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    resume: bool = False
    subset: str | None = None
    balance: str | None = None
    matched: str | None = None
    counts: str | None = None
    t: float | None = None
    tail_proportion: float | None = None
    eval_shards: tuple[str, ...] = ()
    compile: bool = False
    grad_checkpointing: bool = False
    max_failures: int = 0
    #: internal: stop after this many optimizer steps (the schedule still spans the whole run);
    #: used to test that a resumed run equals an uninterrupted one.
    stop_after: int | None = None
    #: internal: each rank records the uids of its batches (`OUT/_uids/rank-<r>.jsonl`).
    record_uids: bool = False
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("no input shards given")
        if not self.out:
            raise ValueError("no output folder given (-o OUT)")
        if self.scale is not None and self.scale not in SCALES:
            raise ValueError(f"unknown --scale {self.scale!r}; choose one of {list(SCALES)}")
        for name in ("batch_size", "samples_seen", "num_workers", "cpus_per_worker",
                     "checkpoint_every", "log_every"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {v!r}")
        for name in ("warmup", "loader_workers", "shuffle_buffer", "seed", "max_failures",
                     "streams"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{_flag(name)} must be an integer >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"Adam betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ValueError("eps must be > 0 and weight decay >= 0")
        if self.schedule != SCHEDULE:
            raise ValueError(f"only the {SCHEDULE} schedule is supported, got {self.schedule!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"--grad-clip-norm must be > 0, got {self.grad_clip_norm}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.precision == "bf16" and self.device == "cpu":
            raise ValueError("--precision bf16 needs a GPU; on CPU training runs in fp32")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"--batch-size {self.batch_size} is not divisible by --num-workers "
                f"{self.num_workers}: every worker takes the same share of the global batch"
            )
        if self.samples_seen < self.batch_size:
            raise ValueError(
                f"--samples-seen {self.samples_seen} is less than one batch ({self.batch_size})"
            )
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"--balance must be 'online', got {self.balance!r}")
        if self.balance == "online":
            if not self.matched or not self.counts:
                raise ValueError("--balance online needs --matched MATCHED and --counts COUNTS")
            if (self.t is None) == (self.tail_proportion is None):
                raise ValueError("--balance online needs exactly one of --t and --tail-proportion")
            if self.t is not None and not self.t > 0:
                raise ValueError(f"--t must be > 0, got {self.t}")
            if self.tail_proportion is not None and not 0 < self.tail_proportion < 1:
                raise ValueError(f"--tail-proportion must be in (0, 1), got {self.tail_proportion}")
        elif any(v is not None for v in (self.matched, self.counts, self.t, self.tail_proportion)):
            raise ValueError("--matched/--counts/--t/--tail-proportion need --balance online")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: samples seen // global batch."""
        return self.samples_seen // self.batch_size

    def hyperparameters(self) -> dict[str, Any]:
        """The resolved hyperparameters (what the manifest records), with where each came from."""
        keys = ("model", "scale", "pretrained", "batch_size", "lr", "warmup", "samples_seen",
                "beta1", "beta2", "eps", "weight_decay", "schedule", "grad_clip_norm", "loss",
                "precision", "seed", "num_workers", "compile", "grad_checkpointing")  # fmt: skip
        out = {k: getattr(self, k) for k in keys}
        out["total_steps"] = self.total_steps
        out["sources"] = dict(sorted(self.sources.items()))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shards"] = list(self.shards)
        d["eval_shards"] = list(self.eval_shards)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["shards"] = tuple(d["shards"])
        d["eval_shards"] = tuple(d.get("eval_shards", ()))
        return cls(**d)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(scale: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """A `TrainConfig` from a DataComp scale (or the tiny-model defaults) and explicit flags.

    `overrides` maps TrainConfig fields to values; a `None` value means "not given" and keeps the
    preset. Adam's β2 comes from the preset when it sets one (xlarge: 0.95), else from
    open_clip's default for the model (0.98 for ViTs), unless given explicitly; ε likewise.
    `sources` records, per hyperparameter, whether it came from the scale, the defaults or a flag.
    """
    if scale is not None and scale not in SCALES:
        raise ValueError(f"unknown --scale {scale!r}; choose one of {list(SCALES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown TrainConfig fields {sorted(unknown)}")
    if scale is not None:
        p = SCALES[scale]
        base = {
            "model": p["model"],
            "batch_size": p["batch_size"],
            "lr": p["learning_rate"],
            "warmup": p["warmup"],
            "samples_seen": p["train_num_samples"],
            "beta2": p["beta2"],
        }
        origin = f"scale:{scale}"
    else:
        base = dict(_DEFAULTS)
        origin = "default"
    sources = {k: origin for k in base}
    values = dict(base)
    for k, v in given.items():
        values[k] = v
        if k in base or k in ("beta1", "eps"):
            sources[k] = "flag"
    adam = adam_defaults(values["model"])
    for k in ("beta1", "beta2", "eps"):
        if values.get(k) is None:
            values[k] = adam[k]
            sources[k] = "open_clip default"
    values["scale"] = scale
    values["sources"] = sources
    return TrainConfig(**values)
