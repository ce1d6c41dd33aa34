"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Where `make wordnet` (scripts/fetch_wordnet.py) puts Princeton's WordNet 3.0 files.
WORDNET_CACHE = REPO / ".cache" / "wordnet" / "dict"
WORDNET_FILES = [f"{k}.{p}" for k in ("data", "index") for p in ("noun", "verb", "adj", "adv")]
WORDNET_FILES += [f"{p}.exc" for p in ("noun", "verb", "adj", "adv")]


@pytest.fixture(scope="session")
def wordnet_dir() -> Path:
    """Princeton's WordNet 3.0 database files (the ones NLTK uses) for the rebuild tests.

    `make test` fetches them and sets `$CURATION_WORDNET_DIR`; when it is set, a folder without
    them fails the test. Without it, `.cache/wordnet/dict` is used when present, else the test is
    skipped with what to run.
    """
    env = os.environ.get("CURATION_WORDNET_DIR")
    d = Path(env) if env else WORDNET_CACHE
    missing = [f for f in WORDNET_FILES if not (d / f).is_file()]
    if missing and env:
        pytest.fail(f"CURATION_WORDNET_DIR={env} lacks {', '.join(missing)}; run `make wordnet`")
    if missing:
        pytest.skip(f"WordNet 3.0 files absent from {d}; run `make wordnet` (or `make test`)")
    return d
