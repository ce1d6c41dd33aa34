"""Metadata: the WordNet parser, the default-metadata builder, the loader and the shipped file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.core.metadata import (
    MetadataError,
    bundled_metadata,
    entries_checksum,
    load_metadata,
    resolve_metadata,
    validate_entries,
    write_metadata_json,
)
from curation.tools.build_metadata import (
    BuildInfo,
    WordNetFormatError,
    build_default_metadata,
    find_wordnet_dir,
    keep_unigram,
    merge_parts,
    numbers_part,
    read_wordnet_lemmas,
    wordfreq_unigrams,
)

REPO = Path(__file__).resolve().parents[2]
WORDNET_MINI = REPO / "tests" / "data" / "wordnet_mini"
SHIPPED = REPO / "curation" / "data" / "metadata_en.json"  # package data: bundled:metadata_en
SHIPPED_README = REPO / "metadata" / "README.md"

# Every lemma of every synset in the fixture, `_` -> space, markers stripped, codepoint order.
MINI_LEMMAS = [
    "10",
    "Canis familiaris",
    "St. Louis ten",
    "Ten",
    "X",
    "able",
    "aboard",
    "all at once",
    "all of a sudden",
    "asleep",
    "decade",
    "dicker",
    "dog",
    "domestic dog",
    "dormant",
    "elder",
    "frump",
    "galore",
    "half a score",
    "in abundance",
    "jack-o'-lantern",
    "look for",
    "older",
    "run",
    "search",
    "suddenly",
    "ten",
    "ten spot",
    "tenner",
    "unable",
    "will-o'-the-wisp",
]

# A high threshold keeps the unigram part of fixture builds small (about a hundred words).
MINI_ZIPF = 6.0


# --- WordNet parser ----------------------------------------------------------------------------


def test_wordnet_parser_on_fixture_gives_exact_lemmas():
    assert read_wordnet_lemmas(str(WORDNET_MINI)) == MINI_LEMMAS


def test_wordnet_fixture_has_the_tricky_cases():
    noun = (WORDNET_MINI / "data.noun").read_text(encoding="utf-8")
    adj = (WORDNET_MINI / "data.adj").read_text(encoding="utf-8")
    assert noun.startswith("  1 This software and database")
    assert " n 0a ten 0 " in noun  # hexadecimal w_cnt (10 words)
    assert "galore(ip)" in adj and "asleep(p)" in adj and "elder(a)" in adj


def test_wordnet_parser_accepts_nltk_and_parent_layouts(tmp_path):
    nltk_dir = tmp_path / "nltk_data" / "corpora" / "wordnet"
    shutil.copytree(WORDNET_MINI, nltk_dir)
    assert read_wordnet_lemmas(str(nltk_dir)) == MINI_LEMMAS
    assert read_wordnet_lemmas(str(tmp_path / "nltk_data")) == MINI_LEMMAS
    assert find_wordnet_dir(str(tmp_path / "nltk_data")) == str(nltk_dir)


def test_wordnet_missing_file_is_an_error(tmp_path):
    d = tmp_path / "wn"
    shutil.copytree(WORDNET_MINI, d)
    (d / "data.verb").unlink()
    with pytest.raises(FileNotFoundError, match="data.verb"):
        read_wordnet_lemmas(str(d))


@pytest.mark.parametrize(
    "bad_line, why",
    [
        ("00000999 05 n zz dog 0 000 | bad count\n", "not hexadecimal"),
        ("00000999 05 n 03 dog 0 cat 0 | too short\n", "does not fit"),
        ("00000999 05 q 01 dog 0 000 | bad type\n", "ss_type"),
        ("00000999 05 n 01 dog x 000 | bad lex_id\n", "lex_id"),
    ],
)
def test_wordnet_malformed_line_names_file_and_line(tmp_path, bad_line, why):
    d = tmp_path / "wn"
    shutil.copytree(WORDNET_MINI, d)
    lines = (d / "data.adv").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "data.adv").write_text("".join(lines) + bad_line, encoding="utf-8")
    with pytest.raises(WordNetFormatError, match=why) as exc:
        read_wordnet_lemmas(str(d))
    assert f"data.adv:{len(lines) + 1}:" in str(exc.value)


# --- builder -----------------------------------------------------------------------------------


def test_keep_unigram_rules():
    for w in ["dog", "o'clock", "mp3", "co2", "x-ray", "café"]:
        assert keep_unigram(w), w
    for w in ["00", "0000s", "u.s", "e.g", "don't", "women's", "we'll", "😂", "_", "a b", "2"]:
        assert not keep_unigram(w), w


def test_merge_parts_first_occurrence_wins_case_sensitive():
    entries, counts = merge_parts(
        [("a", ["dog", "Dog", "dog", ""]), ("b", ["cat", "dog", " "]), ("c", ["Dog", "x"])]
    )
    assert entries == ["dog", "Dog", "cat", "x"]
    assert counts == {"a": 2, "b": 1, "c": 1}


def test_wordfreq_unigrams_rank_order_and_threshold():
    import wordfreq

    top = wordfreq_unigrams(MINI_ZIPF)
    assert top[0] == "the"
    assert all(wordfreq.zipf_frequency(w, "en") >= MINI_ZIPF for w in top)
    assert len(wordfreq_unigrams(5.0)) > len(top)
    assert wordfreq_unigrams(5.0)[: len(top)] == top  # a lower threshold only appends


def test_build_is_deterministic(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    info_a = build_default_metadata(str(WORDNET_MINI), str(a), unigram_min_zipf=MINI_ZIPF)
    info_b = build_default_metadata(str(WORDNET_MINI), str(b), unigram_min_zipf=MINI_ZIPF)
    assert a.read_bytes() == b.read_bytes()
    assert info_a.checksum == info_b.checksum
    assert info_a.to_dict() | {"out_path": ""} == info_b.to_dict() | {"out_path": ""}


def test_build_writes_through_a_symlink(tmp_path):
    """A checkout's metadata/metadata_en.json links to the package data: a rebuild there must
    update the package file, not replace the link by a file."""
    target = tmp_path / "data" / "m.json"
    target.parent.mkdir()
    target.write_text("[]\n")
    link = tmp_path / "m.json"
    link.symlink_to(Path("data") / "m.json")
    build_default_metadata(str(WORDNET_MINI), str(link), unigram_min_zipf=MINI_ZIPF)
    assert link.is_symlink()
    assert load_metadata(str(target)).entries[: len(MINI_LEMMAS)] == tuple(MINI_LEMMAS)


def test_build_parts_order_and_contents(tmp_path):
    out = tmp_path / "m.json"
    info = build_default_metadata(str(WORDNET_MINI), str(out), unigram_min_zipf=MINI_ZIPF)
    assert isinstance(info, BuildInfo)
    entries = json.loads(out.read_text(encoding="utf-8"))
    n_wn, n_uni, n_num = info.parts["wordnet"], info.parts["unigrams"], info.parts["numbers"]
    assert list(info.parts) == ["wordnet", "unigrams", "numbers"]
    assert n_wn + n_uni + n_num == info.total == len(entries)
    assert entries[:n_wn] == MINI_LEMMAS
    unigrams = [w for w in wordfreq_unigrams(MINI_ZIPF) if w not in set(MINI_LEMMAS)]
    assert entries[n_wn : n_wn + n_uni] == unigrams
    # The numbers part: "0".."99" not already present ("10" is a WordNet lemma in the fixture).
    present = set(entries[: n_wn + n_uni])
    assert entries[n_wn + n_uni :] == [n for n in numbers_part() if n not in present]
    assert "10" in entries[:n_wn] and entries.count("10") == 1
    assert set(numbers_part()) <= set(entries)
    # No duplicates, no empties; the file loads and the checksum matches.
    assert len(set(entries)) == len(entries)
    assert all(e.strip() for e in entries)
    md = load_metadata(str(out))
    assert md.entries == tuple(entries)
    assert md.checksum == info.checksum == entries_checksum(entries)
    assert info.unigram_min_zipf == MINI_ZIPF
    names = [s["name"] for s in info.sources]
    assert names == ["WordNet", "wordfreq", "numbers"]
    assert info.sources[0]["version"] == "3.0"


# --- loader ------------------------------------------------------------------------------------

LOADER_ENTRIES = ["dog", "hot dog", "Dog", "café", "東京", "10"]


def _write_variants(tmp_path: Path, entries: list[str]) -> dict[str, Path]:
    paths = {
        "json": tmp_path / "m.json",
        "txt": tmp_path / "m.txt",
        "parquet": tmp_path / "m.parquet",
    }
    paths["json"].write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    paths["txt"].write_text("".join(e + "\n" for e in entries), encoding="utf-8")
    pq.write_table(pa.table({"entry": pa.array(entries, pa.string())}), paths["parquet"])
    return paths


def test_loader_formats_agree(tmp_path):
    paths = _write_variants(tmp_path, LOADER_ENTRIES)
    written = tmp_path / "w.json"
    write_metadata_json(LOADER_ENTRIES, str(written))
    loaded = [load_metadata(str(p)) for p in [*paths.values(), written]]
    for md in loaded:
        assert md.entries == tuple(LOADER_ENTRIES)
        assert md.checksum == entries_checksum(LOADER_ENTRIES)
        assert len(md) == len(LOADER_ENTRIES)


def test_loader_txt_crlf(tmp_path):
    p = tmp_path / "m.txt"
    p.write_bytes("".join(e + "\r\n" for e in LOADER_ENTRIES).encode("utf-8"))
    assert load_metadata(str(p)).entries == tuple(LOADER_ENTRIES)


@pytest.mark.parametrize("fmt", ["json", "txt", "parquet"])
def test_loader_duplicate_names_the_line(tmp_path, fmt):
    entries = ["dog", "cat", "bird", "cat"]
    path = _write_variants(tmp_path, entries)[fmt]
    with pytest.raises(MetadataError, match=r"entry 4 'cat' duplicates entry 2"):
        load_metadata(str(path))


@pytest.mark.parametrize("fmt", ["json", "txt", "parquet"])
def test_loader_empty_entry_names_the_line(tmp_path, fmt):
    entries = ["dog", "cat", "", "bird"]
    path = _write_variants(tmp_path, entries)[fmt]
    with pytest.raises(MetadataError, match=r"entry 3 is empty"):
        load_metadata(str(path))


def test_validate_entries_whitespace_only_is_empty():
    with pytest.raises(MetadataError, match=r"x: entry 2 is empty"):
        validate_entries(["a", "  "], "x")


def test_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_metadata(str(tmp_path / "nope.json"))


# --- shipped file ------------------------------------------------------------------------------


def _readme_value(label: str, pattern: str) -> str:
    text = SHIPPED_README.read_text(encoding="utf-8")
    m = re.search(rf"^\|\s*{label}[^|]*\|\s*{pattern}\s*\|", text, flags=re.MULTILINE)
    assert m, f"metadata/README.md has no '{label}' row"
    return m.group(1)


def test_shipped_metadata_matches_readme():
    md = load_metadata(str(SHIPPED))
    assert md.checksum == _readme_value("Checksum", r"`(sha256:[0-9a-f]{64})`")
    assert len(md) == int(_readme_value("Entries", r"\*\*([0-9,]+)\*\*").replace(",", ""))
    assert set(numbers_part()) <= set(md.entries)
    assert SHIPPED.stat().st_size < 5_000_000


def test_bundled_name_loads_the_shipped_file():
    assert bundled_metadata() == {"metadata_en": "metadata_en.json"}
    assert Path(resolve_metadata("bundled:metadata_en")) == SHIPPED
    assert resolve_metadata("bundled:metadata_en.json") == resolve_metadata("bundled:metadata_en")
    assert resolve_metadata("s3://b/m.json") == "s3://b/m.json"  # anything else is unchanged
    md = load_metadata("bundled:metadata_en")
    assert md.source == "bundled:metadata_en"
    assert md.entries == load_metadata(str(SHIPPED)).entries
    assert md.checksum == _readme_value("Checksum", r"`(sha256:[0-9a-f]{64})`")
    assert md.checksum in (SHIPPED.parent / "README.md").read_text(encoding="utf-8")


def test_unknown_bundled_name_lists_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match=r"'bundled:nope'.*bundled:metadata_en"):
        load_metadata("bundled:nope")


def test_repo_root_paths_link_to_the_package_data():
    """`metadata/metadata_en.json` and `metadata/datacomp_text_based` stay valid for checkouts."""
    for name in ("metadata_en.json", "datacomp_text_based"):
        link = REPO / "metadata" / name
        assert link.is_symlink(), link
        assert link.resolve() == (REPO / "curation" / "data" / name).resolve()
    assert load_metadata(str(REPO / "metadata" / "metadata_en.json")).entries == (
        load_metadata("bundled:metadata_en").entries
    )


def test_job_specs_name_the_bundled_metadata():
    import yaml

    for spec in sorted((REPO / "jobs").glob("*.yaml")):
        md = yaml.safe_load(spec.read_text(encoding="utf-8")).get("metadata")
        if md is not None:  # worldwide jobs name the bundled per-language set
            assert md in ("bundled:metadata_en", "bundled:metadata_worldwide"), spec.name


def _wordfreq_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("wordfreq")


@pytest.mark.skipif(
    _wordfreq_version() != "3.1.1", reason="the shipped file was built with wordfreq 3.1.1"
)
def test_shipped_metadata_rebuilds_byte_identical(tmp_path, wordnet_dir):
    """Princeton's WordNet 3.0 files (`make wordnet`) and wordfreq 3.1.1 rebuild it byte for
    byte (Debian's wordnet-base gives the same lemmas, so the same file, too)."""
    out = tmp_path / "metadata_en.json"
    info = build_default_metadata(str(wordnet_dir), str(out))
    assert out.read_bytes() == SHIPPED.read_bytes()
    assert info.checksum == load_metadata(str(SHIPPED)).checksum
    assert info.parts == {"wordnet": 148_730, "unigrams": 27_317, "numbers": 0}
