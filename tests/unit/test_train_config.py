"""Training presets (DataComp's scale_configs.py, exactly), flag overrides and config errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from curation.config.train import SCALES, WEIGHT_DECAY, TrainConfig, adam_defaults, resolve

BASE = {"shards": ("pool/",), "out": "out/"}


def test_scales_are_datacomps_exactly() -> None:
    assert SCALES == {
        "debug": {"batch_size": 1024, "learning_rate": 1e-4, "train_num_samples": 128_000,
                  "warmup": 500, "model": "ViT-B-32", "beta2": None},
        "small": {"batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 12_800_000,
                  "warmup": 500, "model": "ViT-B-32", "beta2": None},
        "medium": {"batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 128_000_000,
                   "warmup": 500, "model": "ViT-B-32", "beta2": None},
        "large": {"batch_size": 8192, "learning_rate": 5e-4, "train_num_samples": 1_280_000_000,
                  "warmup": 500, "model": "ViT-B-16", "beta2": None},
        "xlarge": {"batch_size": 90112, "learning_rate": 1e-3,
                   "train_num_samples": 12_800_000_000, "warmup": 10000, "model": "ViT-L-14",
                   "beta2": 0.95},
    }  # fmt: skip
    assert WEIGHT_DECAY == 0.2


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_resolve_scale(scale: str) -> None:
    cfg = resolve(scale, BASE)
    p = SCALES[scale]
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.samples_seen, cfg.warmup) == (
        p["model"], p["batch_size"], p["learning_rate"], p["train_num_samples"], p["warmup"],
    )  # fmt: skip
    # beta2 None in DataComp = open_clip_train's default for ViTs (0.98), eps 1e-6
    assert cfg.beta2 == (p["beta2"] if p["beta2"] is not None else 0.98)
    assert (cfg.beta1, cfg.eps, cfg.weight_decay, cfg.schedule) == (0.9, 1e-6, 0.2, "cosine")
    assert cfg.total_steps == p["train_num_samples"] // p["batch_size"]
    h = cfg.hyperparameters()
    assert h["sources"]["lr"] == f"scale:{scale}" and h["scale"] == scale


def test_small_is_the_issue_example() -> None:
    cfg = resolve("small", BASE)
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.warmup, cfg.samples_seen) == (
        "ViT-B-32", 4096, 5e-4, 500, 12_800_000,
    )  # fmt: skip
    assert cfg.total_steps == 3125


def test_flags_override_presets() -> None:
    cfg = resolve(
        "medium",
        {**BASE, "batch_size": 1024, "lr": 1e-3, "warmup": 10, "beta2": 0.95, "model": None},
    )
    assert (cfg.batch_size, cfg.lr, cfg.warmup, cfg.beta2, cfg.model) == (
        1024, 1e-3, 10, 0.95, "ViT-B-32",
    )  # fmt: skip
    src = cfg.hyperparameters()["sources"]
    assert src["batch_size"] == src["lr"] == src["beta2"] == "flag"
    assert src["model"] == "scale:medium" and src["eps"] == "open_clip default"


def test_defaults_without_scale_are_the_tiny_model() -> None:
    cfg = resolve(None, BASE)
    assert cfg.model == "curation-tiny-vit" and cfg.scale is None
    assert (cfg.beta2, cfg.eps) == (0.98, 1e-6)


def test_adam_defaults_follow_open_clip_train() -> None:
    assert adam_defaults("ViT-B-32") == {"beta1": 0.9, "beta2": 0.98, "eps": 1e-6}
    assert adam_defaults("RN50") == {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def test_to_dict_round_trip() -> None:
    cfg = resolve("debug", {**BASE, "eval_shards": ("held/",)})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"batch_size": 10, "num_workers": 3}, "not divisible by --num-workers 3"),
        ({"samples_seen": 10, "batch_size": 64}, "less than one batch"),
        ({"lr": -1.0}, "--lr must be > 0"),
        ({"beta2": 1.0}, r"Adam betas must be in \[0, 1\)"),
        ({"precision": "fp16"}, "--precision must be one of"),
        ({"precision": "bf16", "device": "cpu"}, "needs a GPU"),
        ({"device": "tpu"}, "--device must be one of"),
        ({"loss": "triplet"}, "--loss must be one of"),
        ({"balance": "online"}, "needs --matched MATCHED and --counts COUNTS"),
        ({"balance": "online", "matched": "m", "counts": "c"}, "exactly one of --t and"),
        (
            {"balance": "online", "matched": "m", "counts": "c", "t": 1.0, "tail_proportion": 0.5},
            "exactly one of --t and",
        ),
        ({"t": 5.0}, "need --balance online"),
        ({"checkpoint_every": 0}, "--checkpoint-every must be a positive integer"),
        ({"shards": ()}, "no input shards"),
    ],
)
def test_config_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(None, {**BASE, **overrides})


def test_unknown_scale() -> None:
    with pytest.raises(ValueError, match="unknown --scale 'huge'"):
        resolve("huge", BASE)


def test_cli_unknown_model_is_one_line_without_ray() -> None:
    from curation.cli import main

    res = CliRunner().invoke(main, ["train", "pool/", "-o", "out/", "--model", "ViT-Nope"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: unknown open_clip model 'ViT-Nope'")
    assert "open_clip.list_models()" in lines[0]


def test_cli_config_error_is_one_line() -> None:
    from curation.cli import main

    res = CliRunner().invoke(main, ["train", "pool/", "-o", "out/", "--t", "3"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: --matched/--counts/--t/--tail-proportion need --balance online"
    ]
