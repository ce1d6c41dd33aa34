"""Per-language metadata sets (MetadataSet, load_metadata_set) and the bundled worldwide set."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.core.metadata import (
    MetadataError,
    entries_checksum,
    load_metadata,
    load_metadata_set,
    metadata_set_checksum,
)
from curation.tools.build_metadata import build_worldwide_metadata

REPO = Path(__file__).resolve().parents[2]
WORLDWIDE = REPO / "curation" / "data" / "metadata_worldwide"

MD = {"en": ["cat", "dog", "new york"], "ja": ["\u732b", "\u30c6\u30ec\u30d3"], "other": ["x"]}


def _folder(tmp_path, md=MD, name="md"):
    d = tmp_path / name
    d.mkdir()
    for lang, entries in md.items():
        (d / f"{lang}.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return d


def test_folder_loads_as_metaclip2_writes_it(tmp_path):
    d = _folder(tmp_path)
    (d / "en.pkl").write_bytes(b"\x80 an automaton")  # MetaCLIP 2 keeps these beside the lists
    (d / "README.md").write_text("notes")
    s = load_metadata_set(str(d))
    assert list(s.languages) == ["en", "ja", "other"]
    assert s.entries() == {k: tuple(v) for k, v in MD.items()}
    assert s["ja"].entries[1] == "\u30c6\u30ec\u30d3"  # entry id = index in the list
    assert s.sizes() == {"en": 3, "ja": 2, "other": 1}
    assert s.checksums()["en"] == entries_checksum(MD["en"])
    assert s.checksum == metadata_set_checksum(s.checksums())
    assert "ja" in s and "de" not in s and len(s) == 3
    assert load_metadata_set("file://" + str(d)).checksum == s.checksum


def test_parquet_equals_folder_and_checksum_tracks_content(tmp_path):
    folder = load_metadata_set(str(_folder(tmp_path)))
    rows = [(la, e) for la, es in MD.items() for e in es]
    rows = rows[3:] + rows[:3]  # languages interleaved: order within a language is row order
    path = tmp_path / "md.parquet"
    pq.write_table(pa.table({"lang": [r[0] for r in rows], "entry": [r[1] for r in rows]}), path)
    s = load_metadata_set(str(path))
    assert s.entries() == folder.entries()
    assert s.checksum == folder.checksum
    changed = dict(MD, en=["dog", "cat", "new york"])  # same entries, other ids
    other = load_metadata_set(str(_folder(tmp_path, changed, "md2")))
    assert other.checksum != folder.checksum


@pytest.mark.parametrize(
    ("files", "error", "match"),
    [
        ({"en.json": "[1, 2"}, MetadataError, "not valid JSON"),
        ({"en.json": '{"cat": "w"}'}, MetadataError, "expected a JSON list"),
        ({"en.json": "[]"}, MetadataError, "'en' has no entries"),
        ({"en.json": '["cat", "cat"]'}, MetadataError, r"\[en\].*duplicates entry 1"),
        ({"en.json": '["cat"]', "EN.json": '["dog"]'}, MetadataError, "differ only in case"),
        ({"e n.json": '["cat"]'}, MetadataError, "not a language code"),
        ({"notes.txt": "x"}, MetadataError, "no <lang>.json"),
    ],
)
def test_folder_errors(tmp_path, files, error, match):
    d = tmp_path / "md"
    d.mkdir()
    for name, body in files.items():
        (d / name).write_text(body)
    with pytest.raises(error, match=match):
        load_metadata_set(str(d))


def test_parquet_and_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_metadata_set(str(tmp_path / "nope"))
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"entry": ["cat"]}), p)
    with pytest.raises(MetadataError, match="lang and entry"):
        load_metadata_set(str(p))
    pq.write_table(pa.table({"lang": ["en", None], "entry": ["cat", "dog"]}), p)
    with pytest.raises(MetadataError, match="row 2 has a null lang"):
        load_metadata_set(str(p))
    pq.write_table(pa.table({"lang": ["en", "en"], "entry": ["cat", "cat"]}), p)
    with pytest.raises(MetadataError, match="duplicates"):
        load_metadata_set(str(p))
    bad = tmp_path / "b.parquet"
    bad.write_text("not parquet")
    with pytest.raises(MetadataError, match="not a Parquet file"):
        load_metadata_set(str(bad))
    with pytest.raises(FileNotFoundError, match="bundled:metadata_worldwide"):
        load_metadata_set("bundled:nope")


def test_strict_is_optional_for_merged_lists(tmp_path):
    d = _folder(tmp_path, {"fr": ["\u00e9t\u00e9", "e\u0301te\u0301"]})  # NFC twins
    assert len(load_metadata_set(str(d))["fr"]) == 2
    with pytest.raises(MetadataError, match="NFC"):
        load_metadata_set(str(d), strict=True)


def test_bundled_worldwide_set():
    s = load_metadata_set("bundled:metadata_worldwide", strict=True)
    assert len(s) == 42 and "en" in s and "zh" in s and "ja" in s and "other" not in s
    assert s["en"].entries == load_metadata("bundled:metadata_en").entries
    assert all(n == 10_100 for lang, n in s.sizes().items() if lang != "en")
    size = sum(f.stat().st_size for f in WORLDWIDE.iterdir())
    assert size < 10 * 2**20
    readme = (WORLDWIDE / "README.md").read_text(encoding="utf-8")
    assert s.checksum in readme


def test_bundled_worldwide_set_rebuilds_byte_identical(tmp_path):
    out = tmp_path / "ww"
    info = build_worldwide_metadata("bundled:metadata_en", str(out))
    built = sorted(p.name for p in out.iterdir())
    shipped = sorted(p.name for p in WORLDWIDE.glob("*.json"))
    assert built == shipped
    for name in built:
        assert (out / name).read_bytes() == (WORLDWIDE / name).read_bytes(), name
    assert info["languages"]["no"]["source"]["lang"] == "nb"  # wordfreq code -> wiki code


def test_cli_metadata_info_lists_a_set_per_language(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from curation.cli import main

    (tmp_path / "en.json").write_text(json.dumps(["cat", "dog", "red cat"]))
    (tmp_path / "ja.json").write_text(json.dumps(["猫", "犬"]))
    res = CliRunner().invoke(main, ["metadata", "info", str(tmp_path), "--sample", "1"])
    assert res.exit_code == 0, res.output
    assert "languages: 2" in res.output and "entries:  5" in res.output
    lines = [ln.split() for ln in res.output.splitlines() if ln.startswith("  ")]
    assert [(ln[0], ln[1]) for ln in lines] == [("en", "3"), ("ja", "2")]
    # a single file is still described as a file
    res = CliRunner().invoke(main, ["metadata", "info", str(tmp_path / "en.json")])
    assert res.exit_code == 0 and "entries:  3" in res.output and "languages" not in res.output
