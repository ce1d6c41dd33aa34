"""The hostile corpus (tests/hostile/make_corpus.py) through the real readers: every run finishes,
every row is accounted for, and every bad file or record is in quarantine.jsonl with a reason."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import REPO, cli_env, run_cli, short_ray_tmp


def _make_corpus():
    spec = importlib.util.spec_from_file_location(
        "make_corpus", REPO / "tests" / "hostile" / "make_corpus.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, _make_corpus()(root)


def _quarantine(out: Path) -> dict[str, set[str]]:
    """{input file name relative to the corpus: reasons}."""
    got: dict[str, set[str]] = defaultdict(set)
    for line in (out / "quarantine.jsonl").read_text().splitlines():
        q = json.loads(line)
        assert q.get("reason"), q
        p = Path(q["input"])
        got[f"{p.parent.name}/{p.name}"].add(q["reason"])
    return got


def _check_expected(expected: dict[str, list[str]], got: dict[str, set[str]], kinds: tuple):
    for name, reasons in expected.items():
        if not name.startswith(kinds):
            continue
        assert name in got, f"{name} not in quarantine.jsonl: {dict(got)}"
        for alternatives in reasons:
            ok = set(alternatives.split("|"))
            assert ok & got[name], f"{name}: wanted one of {ok}, got {got[name]}"


def test_ingest_of_the_hostile_corpus_finishes_and_accounts_for_everything(corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    tmp = short_ray_tmp()
    try:
        proc = run_cli(
            ["ingest", root / "wat", root / "jsonl", root / "parquet", "-o", out, "--quiet"],
            env=cli_env(tmp),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0
    s = json.loads((out / "manifest.json").read_text())["summary"]
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values()), s
    assert s["rows_written"] > 0  # the good records of the bad files are kept
    got = _quarantine(out)
    _check_expected(expected, got, ("wat/", "jsonl/", "parquet/"))
    assert "jsonl/long_line.jsonl" not in got  # long, not bad: kept and cut
    assert s["counters"].get("texts_truncated", 0) >= 1


def test_score_of_the_hostile_image_tar_finishes_and_accounts_for_everything(corpus, tmp_path):
    from curation.flows.score import score_shards
    from curation.stages.score import TINY_MODEL, ClipScorer

    root, expected = corpus
    out = tmp_path / "scores"
    s = score_shards(
        [str(root / "images")], str(out), ClipScorer(TINY_MODEL, batch_size=8), progress=False
    )
    assert s["rows_read"] == s["rows_written"] + sum(s["rows_dropped"].values()), s
    got = _quarantine(out)
    _check_expected(expected, got, ("images/",))
    # The symlink member is never followed: its sample has no image.
    assert "no_image" in got["images/hostile.tar"]
    assert s["rows_written"] == 2  # ok and ../evil (a key, never a path)


def test_alias_bomb_job_and_deep_metadata_are_refused_up_front(corpus):
    root, _ = corpus
    for args in (
        ["run", root / "jobs" / "alias_bomb.yaml", "-o", root / "never"],
        ["metadata", "info", root / "metadata" / "deep.json"],
    ):
        proc = run_cli(args, check=False, timeout=60)
        assert proc.returncode != 0, proc.stdout
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: "), proc.stderr[-3000:]
        assert not (root / "never").exists()
