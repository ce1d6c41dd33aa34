"""Hostile job specs: alias bombs, huge files, absurd counts and seeds fail at load, naming the key."""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from click.testing import CliRunner

from curation.config.job import JobSpecError, load_job, parse_job

MAX_SPEC_BYTES = 1 << 20  # documented limit (curation.config.job.MAX_SPEC_BYTES)

BASE = {
    "name": "hostile",
    "seed": 0,
    "input": {"synth": {"shards": 2, "pairs_per_shard": 10}},
    "metadata": "bundled:metadata_en",
    "balance": {"t": 20},
}


def spec(**sections) -> dict:
    s = copy.deepcopy(BASE)
    for k, v in sections.items():
        s[k] = v
    return s


def write(tmp_path, text: str | bytes, name: str = "job.yaml") -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def bomb(levels: int, width: int) -> str:
    """A YAML "billion laughs": each level is `width` aliases of the level below."""
    lines = ["name: bomb", "input: {synth: {shards: 1, pairs_per_shard: 1}}"]
    lines += ["metadata: bundled:metadata_en", "balance: {t: 20}", "paper:", "  l0: &l0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_objects_are_built(tmp_path):
    # A small bomb (3**4 leaves) so that this test fails rather than hangs without the limit;
    # the 700-byte version (9 levels of 9) expands to ~387 million strings.
    with pytest.raises(JobSpecError, match=r"line 7: YAML aliases \(\*name\) are not allowed"):
        load_job(write(tmp_path, bomb(4, 3)))
    with pytest.raises(JobSpecError, match="aliases"):
        load_job(write(tmp_path, bomb(9, 9)))


def test_merge_key_alias_is_refused_but_an_anchor_alone_is_fine(tmp_path):
    merge = "defaults: &d {t: 20}\n"  # an unknown top key, but the alias is refused first
    with pytest.raises(JobSpecError, match="aliases"):
        load_job(write(tmp_path, merge + "balance: {<<: *d}\n"))
    text = yaml.safe_dump(BASE).replace("balance:", "balance: &b", 1)
    assert load_job(write(tmp_path, text)).t == 20


def test_spec_file_over_the_size_limit_is_refused(tmp_path):
    text = yaml.safe_dump(spec(description="x" * MAX_SPEC_BYTES))
    with pytest.raises(JobSpecError, match=r"at most 1,048,576 bytes"):
        load_job(write(tmp_path, text))
    # just under the limit loads
    small = yaml.safe_dump(spec(description="x" * (MAX_SPEC_BYTES - 1000)), width=math.inf)
    assert len(small) <= MAX_SPEC_BYTES
    assert load_job(write(tmp_path, small)).description.startswith("x")


def test_deeply_nested_yaml_is_a_job_spec_error(tmp_path):
    text = "name: deep\npaper: " + "[" * 200_000 + "]" * 200_000 + "\n"
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job(write(tmp_path, text))


def test_integer_with_too_many_digits_is_a_job_spec_error(tmp_path):
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job(write(tmp_path, "name: big\nseed: " + "9" * 5000 + "\n"))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"input": {"synth": {"shards": 1_000_000_000, "pairs_per_shard": 10}}}, "shards"),
        ({"input": {"synth": {"shards": 1_000_001, "pairs_per_shard": 10}}}, "shards"),
        ({"input": {"synth": {"shards": 2, "pairs_per_shard": 10_000_001}}}, "pairs_per_shard"),
        ({"input": {"synth": {"shards": 2, "pairs_per_shard": 10, "seed": 2**64}}}, "synth.seed"),
        ({"seed": 2**64}, "'seed'"),
        ({"seed": 2**70}, "'seed'"),
        ({"seed": -1}, "'seed'"),
        pytest.param({"seed": 10**400}, "'seed'", id="seed-400-digits"),
        ({"ingest": {"max_text_chars": 10**12}}, "max_text_chars"),
    ],
)
def test_counts_and_seeds_out_of_range_are_refused(changes, key):
    with pytest.raises(JobSpecError, match=key) as info:
        parse_job(spec(**changes))
    assert "must be an integer in [" in str(info.value)
    assert len(str(info.value)) < 300  # a 400-digit seed is not echoed in full


def test_largest_seed_and_counts_are_accepted():
    job = parse_job(
        spec(seed=2**64 - 1, input={"synth": {"shards": 1_000_000, "pairs_per_shard": 10_000_000}})
    )
    assert job.seed == 2**64 - 1
    assert job.synth.shards == 1_000_000 and job.synth.pairs_per_shard == 10_000_000
    assert job.synth.seed == 2**64 - 1


@pytest.mark.parametrize(
    "t",
    [1e308, 1e16, float("inf"), float("nan"), 10**400, -1, 0, True],
    ids=["1e308", "1e16", "inf", "nan", "10**400", "-1", "0", "True"],
)
def test_balance_t_must_be_a_finite_number_in_range(t):
    with pytest.raises(JobSpecError, match=r"balance.t must be a finite number in \(0, 1e\+15\]"):
        parse_job(spec(balance={"t": t}))


def test_balance_t_from_yaml_1e308_has_a_clear_message(tmp_path):
    text = yaml.safe_dump(BASE).replace("t: 20", "t: 1.0e+308")
    with pytest.raises(JobSpecError, match=r"balance.t must be a finite number"):
        load_job(write(tmp_path, text))


@pytest.mark.parametrize("p", [True, float("nan"), 2])
def test_tail_proportion_bool_or_out_of_range_is_refused(p):
    with pytest.raises(JobSpecError, match="tail_proportion"):
        parse_job(spec(balance={"tail_proportion": p}))


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_cli_balance_seed_out_of_range_is_refused(seed):
    from curation.cli import main

    args = ["balance", "m", "--counts", "c", "--t", "20", "--seed", seed, "-o", "o"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert "Invalid value for '--seed'" in r.output
