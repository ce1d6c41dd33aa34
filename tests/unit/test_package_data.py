"""Package data: the wheel carries the bundled metadata and the text_based tables, and an
installed copy that is not the checkout loads them (as a Ray worker's runtime_env install does).

The wheel is built from a copy of the sources in a temporary folder, so the checkout gets no
`build/` or `*.egg-info`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "curation" / "data"
TABLES = [
    "words.tsv.gz",
    "lexicon.tsv.gz",
    "exceptions.tsv.gz",
    "imagenet21k_wordnet_ids.txt",
    "LICENSE-WordNet",
    "LICENSE-timm",
]
DATA_FILES = ["README.md", "metadata_en.json", *(f"datacomp_text_based/{t}" for t in TABLES)]


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "curation", src / "curation", ignore=shutil.ignore_patterns("__pycache__")
    )
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), ".", cwd=src)
    (whl,) = (tmp / "dist").glob("curation-*.whl")
    return whl


def test_wheel_contains_the_data_files(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for rel in DATA_FILES:
            member = f"curation/data/{rel}"
            assert member in names, f"{member} is not in {wheel.name}"
            assert zf.read(member) == (DATA / rel).read_bytes(), member


def test_installed_copy_outside_the_checkout_loads_bundled_data(wheel, tmp_path):
    site = tmp_path / "site"
    _pip(
        "install",
        "--no-deps",
        "--no-compile",
        "-q",
        "--target",
        str(site),
        str(wheel),
        cwd=tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = """
import json, sys
import numpy as np
import pyarrow as pa
import curation
from curation.core.metadata import load_metadata, resolve_metadata
from curation.stages.filters.text_based import (
    DATA_DIR, Morphy, TextBasedFilter, load_imagenet21k_ids, load_word_table)
md = load_metadata("bundled:metadata_en")
f = TextBasedFilter(language=lambda t: np.array(["en"] * len(t)))
print(json.dumps({
    "curation": curation.__file__,
    "resolved": resolve_metadata("bundled:metadata_en"),
    "data_dir": str(DATA_DIR),
    "entries": len(md),
    "checksum": md.checksum,
    "words": load_word_table().num_rows,
    "ids": len(load_imagenet21k_ids()),
    "dogss": Morphy.from_files().first_synset("dogss"),
    "keep": f.keep(pa.table({"text": ["a dog on the beach", "a red sunset"]})).tolist(),
}))
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("curation", "resolved", "data_dir"):
        assert Path(got[key]).resolve().is_relative_to(site.resolve()), (key, got[key])
    shipped = (DATA / "metadata_en.json").read_bytes()
    assert Path(got["resolved"]).read_bytes() == shipped
    assert got["entries"] == len(json.loads(shipped))
    readme = (REPO / "metadata" / "README.md").read_text(encoding="utf-8")
    assert got["checksum"] in readme
    words = hashlib.sha256((DATA / "datacomp_text_based" / "words.tsv.gz").read_bytes())
    assert (
        words.hexdigest()
        == hashlib.sha256((Path(got["data_dir"]) / "words.tsv.gz").read_bytes()).hexdigest()
    )
    assert got["words"] > 70_000 and got["ids"] == 21_843
    assert got["dogss"] == ["n", 2084071, "dog"]
    assert got["keep"] == [True, False]
