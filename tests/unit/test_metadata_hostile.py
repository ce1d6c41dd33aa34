"""Hostile metadata: NUL inside entries, deep JSON, whitespace and Unicode twins."""

from __future__ import annotations

import hashlib
import json
import unicodedata

import pytest

from curation.core.metadata import (
    MetadataError,
    entries_checksum,
    load_metadata,
    validate_entries,
)


def test_checksum_is_unambiguous_with_nul_in_entries():
    assert entries_checksum(["a\0b"]) != entries_checksum(["a", "b"])
    assert entries_checksum(["a\0"]) != entries_checksum(["a", ""])
    assert entries_checksum(["ab"]) != entries_checksum(["a", "b"])
    assert entries_checksum([]) != entries_checksum([""])


def test_checksum_encoding_is_length_prefixed_utf8():
    h = hashlib.sha256()
    for e in ("dog", "é", "a\0b"):
        b = e.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    assert entries_checksum(("dog", "é", "a\0b")) == "sha256:" + h.hexdigest()


def test_swapped_metadata_with_nul_gets_another_checksum(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(["a\u0000b"]))
    b.write_text(json.dumps(["a", "b"]))
    assert load_metadata(str(a)).checksum != load_metadata(str(b)).checksum


def test_deeply_nested_json_is_a_one_line_metadata_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MetadataError, match="nested too deeply") as info:
        load_metadata(str(p))
    assert "\n" not in str(info.value)
    assert info.value.__suppress_context__


@pytest.mark.parametrize("bad", [" dog", "dog ", "dog\t", "\u00a0dog", "dog\n"])
def test_surrounding_whitespace_is_refused_naming_the_line(tmp_path, bad):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(["cat", bad]))
    with pytest.raises(MetadataError, match=r"entry 2 .* leading or trailing whitespace"):
        load_metadata(str(p))
    assert load_metadata(str(p), strict=False).entries == ("cat", bad)


def test_whitespace_in_a_text_file_is_refused(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("cat\ndog \nbird\n")
    with pytest.raises(MetadataError, match="entry 2"):
        load_metadata(str(p))


def test_nfc_nfd_twins_are_refused_naming_both_lines(tmp_path):
    nfc = "caf\u00e9"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    p = tmp_path / "m.json"
    p.write_text(json.dumps([nfc, "tea", nfd], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(MetadataError, match=r"entry 3 .* equals entry 1 after Unicode NFC"):
        load_metadata(str(p))
    md = load_metadata(str(p), strict=False)
    assert md.entries == (nfc, "tea", nfd)


def test_a_lone_nfd_entry_is_fine():
    validate_entries([unicodedata.normalize("NFD", "caf\u00e9"), "tea"], "m")


def test_exact_duplicates_stay_errors_when_not_strict():
    with pytest.raises(MetadataError, match="duplicates entry 1"):
        validate_entries(["a", "a"], "m", strict=False)


def test_bundled_metadata_passes_the_strict_checks():
    md = load_metadata("bundled:metadata_en")
    assert len(md) == 176_047
    assert md.checksum == "sha256:ff9cea4045533f9298c8d2790d6478f7d2b3911588caab2fecd5f63740490f31"
