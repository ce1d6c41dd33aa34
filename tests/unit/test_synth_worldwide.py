"""The synthetic WAT pool's `languages="worldwide"` mode: the language of every pair is known.

The default modes must keep their bytes (pinned below), so pools and benchmarks made before
this mode existed are reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from curation.core.stage import Shard
from curation.stages.ingest import Ingestor
from curation.synth.wat import KIND_LANGUAGES, generate_shard, write_synthetic_pool

WORLD = {"en", "boilerplate", "de", "fr", "es", "zh", "ja", "th", "ru", "pt", "ko", "ar"}


@pytest.mark.parametrize(
    ("kwargs", "digest"),
    [
        ({}, "feb1332aaf03ba19"),
        ({"languages": False}, "8e293e31c3d3e8f7"),
        ({"malformed_rate": 0.2}, "4f06d049614dd993"),
    ],
)
def test_existing_modes_keep_their_bytes(kwargs, digest):
    data, _ = generate_shard(5, 1, 3000, **kwargs)
    assert hashlib.sha256(data).hexdigest()[:16] == digest


def test_truth_languages_per_mode():
    for languages, allowed in (
        (False, {"en", "boilerplate"}),
        (True, {"en", "boilerplate", "de", "fr", "es", "zh", "ja"}),
        ("worldwide", WORLD),
    ):
        _, truth = generate_shard(4, 0, 4000, languages=languages)
        assert sum(truth.languages.values()) == truth.pairs == 4000
        assert set(truth.languages) <= allowed
        if languages == "worldwide":
            assert set(truth.languages) == WORLD
    assert set(KIND_LANGUAGES) == WORLD


def test_bad_languages_value():
    with pytest.raises(ValueError, match="worldwide"):
        generate_shard(0, 0, 10, languages="world")


def _texts(path: str) -> list[str]:
    out = Ingestor().read(Shard(name="s", input=path))
    return out.table.column("text").to_pylist()


def test_worldwide_pool_truth_matches_the_scripts(tmp_path):
    s = write_synthetic_pool(str(tmp_path), 2, 1500, 7, malformed_rate=0.01, languages="worldwide")
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    assert truth["params"]["languages"] == "worldwide"
    total = truth["pairs_per_language"]
    assert sum(total.values()) == truth["total_pairs"] == s.total_pairs == 3000
    for f in s.files:
        per = truth["pairs_per_language_per_file"][f]
        assert sum(per.values()) == truth["pairs_per_file"][f]
        texts = _texts(f)
        assert len(texts) == truth["pairs_per_file"][f]
        # Thai script occurs in Thai captions only, and every Thai caption is in Thai script
        thai = sum(bool(re.search(r"[\u0e00-\u0e7f]", t)) for t in texts)
        assert thai == per["th"] > 0
        hangul = sum(bool(re.search(r"[\uac00-\ud7a3]", t)) for t in texts)
        assert 0.9 * per["ko"] <= hangul <= per["ko"]
        cyr = sum(bool(re.search(r"[\u0400-\u04ff]", t)) for t in texts)
        assert 0.9 * per["ru"] <= cyr <= per["ru"]


def test_default_pool_truth_has_no_language_keys(tmp_path):
    write_synthetic_pool(str(tmp_path), 1, 200, 7)
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    assert "pairs_per_language" not in truth
