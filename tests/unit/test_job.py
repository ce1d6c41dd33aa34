"""Job specs: the shipped jobs load; every kind of bad spec fails naming the offending key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from curation.config.job import (
    EvalSpec,
    FilterSpec,
    FilterStep,
    JobSpec,
    JobSpecError,
    SynthInput,
    TrainSpec,
    load_job,
    parse_job,
)

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))

BASE = {
    "name": "unit",
    "seed": 3,
    "input": {"paths": ["data/*.parquet"]},
    "metadata": "metadata/metadata_en.json",
    "ingest": {"max_text_chars": 500},
    "match": {"engine": "ngram"},
    "balance": {"t": 20},
    "output": "runs/unit",
}


def spec(**changes) -> dict:
    s = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is _DELETE:
            s.pop(k, None)
        else:
            s[k] = v
    return s


_DELETE = object()


def test_shipped_jobs_exist():
    names = {p.name for p in JOBS}
    assert {"demo.yaml", "metaclip_400m.yaml", "metaclip_2_5b.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_jobs_load(path):
    job = load_job(str(path))
    assert isinstance(job, JobSpec)
    assert job.name == path.stem
    assert sum(map(bool, (job.paths, job.synth, job.pool))) == 1
    if job.pool:
        assert job.filters is not None or job.balance or job.train is not None
        assert path.read_text().startswith("# "), "a shipped job says what it reproduces"
    else:
        assert job.balance
    assert (job.t is None or job.tail_proportion is None) and job.balance == (
        job.metadata is not None
    )
    raw = yaml.safe_load(path.read_text())
    assert job.seed == raw.get("seed", 0)
    assert job.metadata == raw.get("metadata")


def test_shipped_job_values():
    by_name = {p.stem: load_job(str(p)) for p in JOBS}
    assert by_name["metaclip_400m"].t == 20000
    assert by_name["metaclip_2_5b"].t == 170000
    demo = by_name["demo"]
    assert demo.synth == SynthInput(shards=4, pairs_per_shard=25000, seed=0, malformed_rate=0.005)
    assert demo.t == 20 and demo.paths == []
    assert demo.filters is None and demo.pool == [] and demo.balance_when is None
    # DataComp's best baseline: image_based AND top 30% by L/14 CLIP score, no balancing
    best = by_name["datacomp_image_based_clip"]
    assert not best.balance and best.metadata is None
    assert best.filters.combine == "and"
    assert [(s.baseline, s.name) for s in best.filters.steps] == [
        ("image_based", "image_based"),
        ("clip_score", "clip_score"),
    ]
    assert best.filters.steps[0].params["embedding_key"] == "l14_img"
    assert best.filters.steps[1].params == {
        "score_column": "clip_l14_similarity_score",
        "fraction": 0.3,
        "threshold_mode": "datacomp",
    }
    basic = by_name["datacomp_basic_then_metaclip"]
    assert [s.baseline for s in basic.filters.steps] == ["basic_filter"]
    assert basic.t == 20000 and basic.balance_when == "after"


def test_parse_valid_spec_fields():
    job = parse_job(spec())
    assert job.name == "unit"
    assert job.seed == 3
    assert job.paths == ["data/*.parquet"]
    assert job.synth is None
    assert job.max_text_chars == 500
    assert job.engine == "ngram"
    assert job.t == 20.0 and job.tail_proportion is None
    assert job.output == "runs/unit"
    d = job.to_dict()
    assert d["t"] == 20.0 and d["paths"] == ["data/*.parquet"]


def test_parse_defaults_and_string_path_and_tail_proportion():
    s = spec(input={"paths": "one.parquet"}, balance={"tail_proportion": 0.25})
    for k in ("seed", "ingest", "match", "output"):
        s.pop(k)
    job = parse_job(s)
    assert job.paths == ["one.parquet"]
    assert job.seed == 0 and job.engine == "auto" and job.max_text_chars == 1000
    assert job.tail_proportion == 0.25 and job.t is None
    assert job.output is None


def test_parse_synth_input_seed_defaults_to_job_seed():
    job = parse_job(spec(input={"synth": {"shards": 2, "pairs_per_shard": 10}}))
    assert job.synth == SynthInput(shards=2, pairs_per_shard=10, seed=3, malformed_rate=0.0)
    assert job.paths == []


def test_tail_proportion_one_is_allowed():
    assert parse_job(spec(balance={"tail_proportion": 1})).tail_proportion == 1.0


BAD = {
    "unknown_top_level_key": (spec(steps=[]), "steps"),
    "missing_metadata": (spec(metadata=_DELETE), "metadata"),
    "missing_name": (spec(name=_DELETE), "name"),
    "missing_input": (spec(input=_DELETE), "input"),
    "both_paths_and_synth": (
        spec(input={"paths": ["a.parquet"], "synth": {"shards": 1, "pairs_per_shard": 1}}),
        "paths",
    ),
    "neither_paths_nor_synth": (spec(input={}), "paths"),
    "empty_paths": (spec(input={"paths": []}), "paths"),
    "unknown_input_key": (spec(input={"paths": ["a"], "glob": "x"}), "glob"),
    "both_t_and_tail_proportion": (
        spec(balance={"t": 5, "tail_proportion": 0.2}),
        "tail_proportion",
    ),
    "neither_t_nor_tail_proportion": (spec(balance={}), "tail_proportion"),
    "missing_balance": (spec(balance=_DELETE), "balance"),
    "negative_t": (spec(balance={"t": -5}), "balance.t"),
    "zero_t": (spec(balance={"t": 0}), "balance.t"),
    "string_t": (spec(balance={"t": "20k"}), "balance.t"),
    "bool_t": (spec(balance={"t": True}), "balance.t"),
    "tail_proportion_zero": (spec(balance={"tail_proportion": 0}), "tail_proportion"),
    "tail_proportion_above_one": (spec(balance={"tail_proportion": 1.5}), "tail_proportion"),
    "tail_proportion_string": (spec(balance={"tail_proportion": "0.1"}), "tail_proportion"),
    "bad_engine": (spec(match={"engine": "regex"}), "match.engine"),
    "unknown_match_key": (spec(match={"engine": "auto", "fuzzy": True}), "fuzzy"),
    "non_integer_seed_float": (spec(seed=1.5), "seed"),
    "non_integer_seed_string": (spec(seed="0"), "seed"),
    "bool_seed": (spec(seed=True), "seed"),
    "negative_seed": (spec(seed=-1), "seed"),
    "max_text_chars_zero": (spec(ingest={"max_text_chars": 0}), "max_text_chars"),
    "section_not_mapping": (spec(balance=[20]), "balance"),
    "synth_shards_zero": (
        spec(input={"synth": {"shards": 0, "pairs_per_shard": 5}}),
        "input.synth.shards",
    ),
    "synth_missing_pairs": (spec(input={"synth": {"shards": 1}}), "pairs_per_shard"),
    "synth_bad_malformed_rate": (
        spec(input={"synth": {"shards": 1, "pairs_per_shard": 5, "malformed_rate": 2}}),
        "malformed_rate",
    ),
}


def check_names_the_key(bad: dict, key: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job(bad, where="my.yaml")
    msg = str(info.value)
    assert key in msg, msg
    assert msg.startswith("my.yaml"), msg


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_names_the_key(case):
    check_names_the_key(*BAD[case])


def test_top_level_not_mapping():
    with pytest.raises(JobSpecError, match="mapping"):
        parse_job(["name", "x"])  # type: ignore[arg-type]


def test_job_spec_error_is_value_error():
    assert issubclass(JobSpecError, ValueError)


def test_load_job_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ninput: {paths: [a\nbalance: : :\n")
    with pytest.raises(JobSpecError, match="not valid YAML") as info:
        load_job(str(p))
    assert str(p) in str(info.value)


def test_load_job_empty_file(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    with pytest.raises(JobSpecError, match="mapping"):
        load_job(str(p))


def test_load_job_missing_file(tmp_path):
    with pytest.raises(JobSpecError, match="does not exist"):
        load_job(str(tmp_path / "nope.yaml"))


def test_load_job_error_names_file_and_key(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text(yaml.safe_dump(spec(balanse={"t": 3})))
    with pytest.raises(JobSpecError) as info:
        load_job(str(p))
    assert "balanse" in str(info.value) and str(p) in str(info.value)


def test_load_job_round_trip(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert load_job(str(p)) == parse_job(BASE)


def test_load_job_from_memory_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/jobs/unit.yaml", yaml.safe_dump(BASE).encode())
    assert load_job("memory://jobs/unit.yaml").name == "unit"


@pytest.mark.parametrize(
    "bad, key",
    [
        (spec(metadata=None), "metadata"),  # `metadata:` with no value in YAML
        (spec(metadata=""), "metadata"),
        (spec(name=None), "name"),
    ],
    ids=["metadata_null", "metadata_empty", "name_null"],
)
def test_null_or_empty_required_value_rejected(bad, key):
    # str(None) == "None" must not become a metadata path / job name silently.
    with pytest.raises(JobSpecError) as info:
        parse_job(bad)
    assert key in str(info.value)


@pytest.mark.parametrize("t", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_t_rejected(t):
    # t = .nan makes every p_e NaN, so balancing silently keeps nothing.
    with pytest.raises(JobSpecError, match="balance.t"):
        parse_job(spec(balance={"t": t}))


# -- pool jobs: filters and balancing --------------------------------------------------------------
POOL = {
    "name": "pool",
    "input": {"pool": "pool/metadata"},
    "filters": {
        "combine": "or",
        "steps": [
            {"baseline": "basic_filter"},
            {"baseline": "clip_score", "score_column": "clip_score", "fraction": 0.3},
            {"baseline": "clip_score", "name": "b32", "arch": "b32", "threshold": 0.28},
        ],
    },
    "metadata": "metadata/metadata_en.json",
    "balance": {"t": 20, "when": "before"},
}


def pool_spec(**changes) -> dict:
    s = copy.deepcopy(POOL)
    for k, v in changes.items():
        if v is _DELETE:
            s.pop(k, None)
        else:
            s[k] = v
    return s


def test_parse_pool_job_with_filters_and_balance():
    job = parse_job(pool_spec())
    assert job.pool == ["pool/metadata"] and job.paths == [] and job.synth is None
    assert job.filters == FilterSpec(
        combine="or",
        steps=[
            FilterStep("basic_filter", "basic_filter", {}),
            FilterStep("clip_score", "clip_score", {"score_column": "clip_score", "fraction": 0.3}),
            FilterStep("clip_score", "b32", {"arch": "b32", "threshold": 0.28}),
        ],
    )
    assert job.balance and job.t == 20 and job.balance_when == "before"
    assert job.to_dict()["filters"]["steps"][2]["name"] == "b32"


def test_parse_pool_job_filters_only_and_balance_only():
    only = parse_job(
        pool_spec(
            metadata=_DELETE,
            balance=_DELETE,
            filters={"steps": [{"baseline": "no_filter"}]},
        )
    )
    assert only.filters.combine == "and"  # the default
    assert not only.balance and only.metadata is None and only.balance_when is None
    bal = parse_job(pool_spec(filters=_DELETE, balance={"t": 5}))
    assert bal.filters is None and bal.t == 5 and bal.balance_when is None


POOL_BAD = {
    "filters_without_pool": (
        spec(filters={"steps": [{"baseline": "basic_filter"}]}),
        "input.pool",
    ),
    "pool_and_paths": (pool_spec(input={"pool": "p", "paths": ["a"]}), "'pool'"),
    "pool_not_paths": (pool_spec(input={"pool": [3]}), "input.pool"),
    "pool_with_ingest": (pool_spec(ingest={"max_text_chars": 5}), "'ingest'"),
    "pool_nothing_to_do": (pool_spec(filters=_DELETE, balance=_DELETE), "'filters', 'balance'"),
    "metadata_without_balance": (pool_spec(balance=_DELETE), "'metadata'"),
    "balance_without_metadata": (pool_spec(metadata=_DELETE), "'metadata'"),
    "match_without_balance": (
        pool_spec(balance=_DELETE, metadata=_DELETE, match={"engine": "auto"}),
        "'match'",
    ),
    "when_missing": (pool_spec(balance={"t": 20}), "balance.when"),
    "when_bad": (pool_spec(balance={"t": 20, "when": "during"}), "balance.when"),
    "when_without_filters": (pool_spec(filters=_DELETE), "balance.when"),
    "when_on_wat_job": (spec(balance={"t": 20, "when": "after"}), "balance.when"),
    "filters_is_list": (pool_spec(filters=[{"baseline": "basic_filter"}]), "'steps'"),
    "filters_unknown_key": (pool_spec(filters={"steps": [], "mode": "and"}), "mode"),
    "combine_bad": (
        pool_spec(filters={"combine": "xor", "steps": [{"baseline": "no_filter"}]}),
        "filters.combine",
    ),
    "steps_empty": (pool_spec(filters={"steps": []}), "filters.steps"),
    "steps_missing": (pool_spec(filters={"combine": "and"}), "filters.steps"),
    "step_not_mapping": (pool_spec(filters={"steps": ["basic_filter"]}), "filters.steps[0]"),
    "step_without_baseline": (
        pool_spec(filters={"steps": [{"fraction": 0.3}]}),
        "filters.steps[0]",
    ),
    "unknown_baseline": (
        pool_spec(filters={"steps": [{"baseline": "no_filter"}, {"baseline": "clip"}]}),
        "filters.steps[1]: unknown baseline 'clip'",
    ),
    "param_of_other_baseline": (
        pool_spec(filters={"steps": [{"baseline": "basic_filter", "fraction": 0.3}]}),
        "filters.steps[0]: basic_filter does not take ['fraction']",
    ),
    "clip_needs_one_rule": (
        pool_spec(filters={"steps": [{"baseline": "clip_score"}]}),
        "'threshold' or 'fraction'",
    ),
    "image_based_needs_files": (
        pool_spec(filters={"steps": [{"baseline": "image_based", "centroids": "c.npy"}]}),
        "'target_embeddings'",
    ),
    "duplicate_step_names": (
        pool_spec(
            filters={
                "steps": [
                    {"baseline": "clip_score", "threshold": 0.2},
                    {"baseline": "clip_score", "fraction": 0.3},
                ]
            }
        ),
        "filters.steps[1]: a step is already named 'clip_score'",
    ),
    "step_name_with_slash": (
        pool_spec(filters={"steps": [{"baseline": "no_filter", "name": "a/b"}]}),
        "filters.steps[0].name",
    ),
}


@pytest.mark.parametrize("case", sorted(POOL_BAD))
def test_bad_pool_spec_names_the_key(case):
    check_names_the_key(*POOL_BAD[case])


# -- train / eval / images sections -----------------------------------------------------------------
TRAIN = {"shards": "pool/shards/", "model": "curation-tiny-vit", "batch_size": 32,
         "samples_seen": 256}  # fmt: skip


def train_spec(train=None, **changes) -> dict:
    s = pool_spec(balance={"t": 20, "when": "after"}, **changes)
    s["train"] = dict(TRAIN, **(train or {}))
    return s


def test_datacomp_small_jobs_differ_only_in_the_filter():
    small = {p.stem: load_job(str(p)) for p in JOBS if p.stem.startswith("datacomp_small_")}
    assert sorted(small) == sorted(
        f"datacomp_small_{k}"
        for k in ("no_filter", "basic", "text_based", "image_based", "laion",
                  "clip_score_l14_30", "image_based_clip_l14_30")
    )  # fmt: skip
    for name, job in small.items():
        assert job.train == TrainSpec(
            shards=["s3://YOUR-BUCKET/datacomp/small/shards/"], scale="small", params={"seed": 0}
        ), name
        assert len(job.eval.tasks) == 38 and len(set(job.eval.tasks)) == 38, name
        assert job.pool == ["s3://YOUR-BUCKET/datacomp/small/metadata/"] and not job.balance
    assert small["datacomp_small_no_filter"].filters is None
    baselines = {n: [s.baseline for s in j.filters.steps] for n, j in small.items() if j.filters}
    assert baselines == {
        "datacomp_small_basic": ["basic_filter"],
        "datacomp_small_text_based": ["text_based"],
        "datacomp_small_image_based": ["image_based"],
        "datacomp_small_laion": ["laion2b"],
        "datacomp_small_clip_score_l14_30": ["clip_score"],
        "datacomp_small_image_based_clip_l14_30": ["image_based", "clip_score"],
    }
    l14 = small["datacomp_small_clip_score_l14_30"].filters.steps[0].params
    assert l14["score_column"] == "clip_l14_similarity_score" and l14["fraction"] == 0.3


def test_parse_train_and_eval_sections():
    s = train_spec({"scale": "small", "lr": 1e-3, "compile": True, "balance": "online"})
    s["eval"] = {"tasks": "tasks/cifar10", "batch_size": 64, "device": "cuda:1"}
    job = parse_job(s)
    assert job.train.shards == ["pool/shards/"] and job.train.scale == "small"
    assert job.train.online and job.train.params["t"] == 20.0  # the job's balance.t
    assert job.train.params["seed"] == 0 and job.train.params["compile"] is True
    assert job.eval == EvalSpec(tasks=["tasks/cifar10"], batch_size=64, device="cuda:1")
    assert job.to_dict()["train"]["params"]["lr"] == 1e-3
    # DataComp's no-filtering baseline: a pool job that only trains
    nf = pool_spec(filters=_DELETE, balance=_DELETE, metadata=_DELETE, train=dict(TRAIN))
    job = parse_job(nf)
    assert job.filters is None and not job.balance and job.train.params["seed"] == 0
    # a raw-shard job fetches its curated images
    raw = spec(images={"threads": 8, "resize_mode": "center_crop", "image_size": 64})
    raw["train"] = {"batch_size": 32, "samples_seen": 64, "seed": 9}
    job = parse_job(raw)
    assert job.images == {"threads": 8, "resize_mode": "center_crop", "image_size": 64}
    assert job.train.shards == [] and job.train.params["seed"] == 9


def test_images_section_matches_fetch_options():
    """The spec's copy of FetchOptions' fields and choices stays in step with fetch.py."""
    import dataclasses

    from curation.config import job
    from curation.flows import fetch

    assert set(job.IMAGES_TYPES) == {f.name for f in dataclasses.fields(fetch.FetchOptions)}
    assert job.FETCH_DISTRIBUTORS == fetch.DISTRIBUTORS
    assert job.FETCH_RESIZE_MODES == fetch.RESIZE_MODES


TRAIN_BAD = {
    "unknown_train_key": (train_spec({"epochs": 3}), "unknown key(s) ['epochs'] in 'train'"),
    "pool_without_shards": (train_spec({"shards": None}), "train.shards is required"),
    "shards_not_paths": (train_spec({"shards": [1]}), "train.shards must be a path"),
    "bad_scale": (train_spec({"scale": "huge"}), "train.scale must be one of"),
    "batch_not_int": (train_spec({"batch_size": "32"}), "'train.batch_size' must be an integer"),
    "lr_string": (train_spec({"lr": "1e-3"}), "train.lr must be a finite number"),
    "lr_zero": (train_spec({"lr": 0}), "train.lr must be > 0"),
    "compile_not_bool": (train_spec({"compile": "yes"}), "train.compile must be true or false"),
    "bad_precision": (train_spec({"precision": "fp16"}), "train.precision must be one of"),
    "bf16_on_cpu": (train_spec({"precision": "bf16", "device": "cpu"}), "train.precision bf16"),
    "samples_below_batch": (
        train_spec({"samples_seen": 16}),
        "train.samples_seen 16 is less than one batch",
    ),
    "batch_not_divisible": (
        train_spec({"num_workers": 3}),
        "train.batch_size 32 is not divisible by train.num_workers 3",
    ),
    "beta2_out_of_range": (train_spec({"beta2": 1.0}), "train.beta2 must be in [0, 1)"),
    "seed_too_large": (train_spec({"seed": 2**63}), "train.seed must be at most"),
    "bad_balance_mode": (train_spec({"balance": "offline"}), "train.balance must be 'online'"),
    "t_without_online": (train_spec({"t": 5}), "apply only with train.balance: online"),
    "online_without_job_balance": (
        pool_spec(balance=_DELETE, metadata=_DELETE, train=dict(TRAIN, balance="online")),
        "the job needs 'metadata' and 'balance'",
    ),
    "online_with_balance_before": (
        pool_spec(train=dict(TRAIN, balance="online")),
        "balance.when: after",
    ),
    "online_both_t_and_p": (
        train_spec({"balance": "online", "t": 5, "tail_proportion": 0.2}),
        "exactly one of train.t and train.tail_proportion",
    ),
    "raw_job_without_images": (
        dict(spec(), train={"batch_size": 32, "samples_seen": 64}),
        "add an 'images' section",
    ),
    "raw_job_images_and_shards": (
        dict(spec(), images={}, train={"shards": "s/", "samples_seen": 512}),
        "not both",
    ),
    "raw_job_online_with_images": (
        dict(spec(), images={}, train={"balance": "online", "samples_seen": 512}),
        "offline-balanced subset",
    ),
    "images_on_pool_job": (dict(train_spec(), images={}), "name them in train.shards"),
    "images_bad_resize_mode": (
        dict(spec(), images={"resize_mode": "stretch"}),
        "images.resize_mode must be one of",
    ),
    "images_zero_threads": (dict(spec(), images={"threads": 0}), "images.threads"),
    "images_unknown_key": (dict(spec(), images={"thread": 4}), "in 'images'"),
    "eval_without_train": (dict(spec(), eval={"tasks": ["t/"]}), "add a 'train' section"),
    "eval_without_tasks": (dict(train_spec(), eval={"batch_size": 4}), "eval.tasks must list"),
    "eval_bad_device": (dict(train_spec(), eval={"tasks": ["t"], "device": "tpu"}), "eval.device"),
    "eval_zero_batch": (dict(train_spec(), eval={"tasks": ["t"], "batch_size": 0}), "eval.batch"),
    "eval_unknown_key": (dict(train_spec(), eval={"tasks": ["t"], "top_k": 5}), "in 'eval'"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_BAD))
def test_bad_train_eval_spec_says_what_to_fix(case):
    check_names_the_key(*TRAIN_BAD[case])


# -- worldwide (MetaCLIP 2) job specs ------------------------------------------------------------
WORLDWIDE = {
    "metadata": "bundled:metadata_worldwide",
    "langid": {"model": "lid.176.bin", "mapping": "map.yaml"},
    "balance": {"t": 170000, "min_matches": 10},
}


def test_parse_worldwide_job():
    job = parse_job(spec(**WORLDWIDE))
    assert job.worldwide and job.langid.model == "lid.176.bin" and job.langid.mapping == "map.yaml"
    assert job.t == 170000 and job.min_matches == 10
    assert job.script_aware is True  # MetaCLIP 2's spacing of scripts without spaces
    d = job.to_dict()
    assert d["langid"] == {"model": "lid.176.bin", "mapping": "map.yaml"}
    empty = parse_job(spec(**{**WORLDWIDE, "langid": None, "balance": {"tail_proportion": 0.2}}))
    assert empty.worldwide and empty.langid.model is None and empty.min_matches is None


def test_english_spec_dict_has_no_worldwide_keys():
    d = parse_job(spec(input={"synth": {"shards": 1, "pairs_per_shard": 5}})).to_dict()
    assert "langid" not in d and "min_matches" not in d and "languages" not in d["synth"]


def test_synth_worldwide_languages():
    s = {"synth": {"shards": 1, "pairs_per_shard": 5, "languages": "worldwide"}}
    assert parse_job(spec(input=s, **WORLDWIDE)).synth.languages == "worldwide"
    with pytest.raises(JobSpecError, match="input.synth.languages"):
        parse_job(spec(input={"synth": {"shards": 1, "pairs_per_shard": 5, "languages": "xx"}}))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"metadata": "bundled:metadata_worldwide"}, "needs a 'langid' section"),
        ({**WORLDWIDE, "metadata": "bundled:metadata_en"}, "must be a per-language set"),
        ({"balance": {"t": 20, "min_matches": 5}}, "balance.min_matches"),
        ({**WORLDWIDE, "balance": {"t": 20, "min_matches": -1}}, "balance.min_matches"),
        ({**WORLDWIDE, "langid": {"model": 3}}, "langid.model"),
        ({**WORLDWIDE, "langid": {"threshold": 0.5}}, "unknown key"),
        ({**WORLDWIDE, "langid": ["en"]}, "'langid' must be a mapping"),
        (
            {**WORLDWIDE, "input": {"pool": ["p/"]}, "ingest": _DELETE},
            "applies to raw-shard jobs",
        ),
    ],
)
def test_bad_worldwide_spec(changes, match):
    with pytest.raises(JobSpecError, match=match):
        parse_job(spec(**changes))


def test_worldwide_online_balancing():
    s = spec(**WORLDWIDE, train={"shards": ["s/"], "balance": "online"})
    with pytest.raises(JobSpecError, match="leave out balance.min_matches"):
        parse_job(s)
    s["balance"] = {"t": 170000}
    job = parse_job(s)
    assert job.train.online and job.train.params["t"] == 170000
