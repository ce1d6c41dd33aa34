"""Concept metadata: loading, validation and checksums.

Entry ids are positions in the metadata file. The order is part of the data: it is fixed, and its
checksum goes into every manifest, so counts and `entry_ids` are only compared across runs that
used the same file.

Metadata that ships inside the package (`curation/data/`) is named `bundled:<name>`, e.g.
`bundled:metadata_en`: job specs and the CLI use that name instead of a path into a checkout, and
each process (a Ray worker too) resolves it in its own installed copy (`resolve_metadata`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import unicodedata
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources

from fsspec.core import url_to_fs

FORMATS = ("json", "txt", "parquet")

#: Prefix of the names of metadata bundled with the package: `bundled:metadata_en`.
BUNDLED_PREFIX = "bundled:"
_BUNDLED_SUFFIXES = (".json", ".txt", ".parquet")
_as_file_stack = ExitStack()  # keeps files extracted from a zipped install until exit
atexit.register(_as_file_stack.close)


class MetadataError(ValueError):
    """A metadata file that cannot be used as it is; the message names the file and the line."""


@dataclass(frozen=True)
class Metadata:
    """An ordered list of concept entries; `entries[i]` is entry id `i`."""

    entries: tuple[str, ...]
    checksum: str
    source: str

    def __len__(self) -> int:
        return len(self.entries)


def entries_checksum(entries: tuple[str, ...] | list[str]) -> str:
    """sha256 over the entries in order, each as its UTF-8 length (8 bytes, little-endian) and
    its UTF-8 bytes: independent of file format, and no two entry lists share an encoding (an
    entry may contain any character, NUL too)."""
    h = hashlib.sha256()
    for e in entries:
        b = e.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return "sha256:" + h.hexdigest()


def _detect_format(path: str, data: bytes) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith((".txt", ".tsv", ".lst")):
        return "txt"
    if data[:4] == b"PAR1":
        return "parquet"
    if data.lstrip()[:1] == b"[":
        return "json"
    return "txt"


def validate_entries(
    entries: list[str], source: str, line_base: int = 1, *, strict: bool = True
) -> None:
    """Empty and duplicate entries are errors that name the offending line (1-based).

    With `strict` (the default) so are entries with leading or trailing whitespace and
    Unicode twins (two entries equal after NFC normalization, e.g. a precomposed "é" and "e" +
    combining accent): such an entry can never match, or matches what its twin matches, and
    splits the twin's counts. `strict=False` accepts them (exact duplicates stay errors).
    """
    first_seen: dict[str, int] = {}
    nfc_seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        line = i + line_base
        if not isinstance(e, str):
            raise MetadataError(f"{source}: entry {line} is {type(e).__name__}, expected a string")
        if e.strip() == "":
            raise MetadataError(f"{source}: entry {line} is empty; remove it")
        prev = first_seen.get(e)
        if prev is not None:
            raise MetadataError(
                f"{source}: entry {line} {e!r} duplicates entry {prev}; remove one of them"
            )
        first_seen[e] = line
        if not strict:
            continue
        if e != e.strip():
            raise MetadataError(
                f"{source}: entry {line} {e!r} has leading or trailing whitespace; strip it "
                "(or load with strict=False)"
            )
        nfc = e if e.isascii() else unicodedata.normalize("NFC", e)
        prev = nfc_seen.get(nfc)
        if prev is not None:
            raise MetadataError(
                f"{source}: entry {line} {e!r} equals entry {prev} after Unicode NFC "
                "normalization; keep one of them (or load with strict=False)"
            )
        nfc_seen[nfc] = line


def bundled_metadata() -> dict[str, str]:
    """Bundled metadata names (`bundled:<name>`) -> file names in the package's `data/` folder."""
    data = resources.files("curation") / "data"
    names = sorted(e.name for e in data.iterdir() if e.is_file())
    return {n.rsplit(".", 1)[0]: n for n in names if n.endswith(_BUNDLED_SUFFIXES)}


def resolve_metadata(path: str) -> str:
    """A readable path or fsspec URL for `path`: `bundled:<name>` becomes the file in this
    process's installed copy of the package; anything else is returned unchanged.

    Raises `FileNotFoundError` naming the bundled files for an unknown `bundled:` name.
    """
    if not path.startswith(BUNDLED_PREFIX):
        return path
    name = path[len(BUNDLED_PREFIX) :]
    files = bundled_metadata()
    fname = files.get(name) or (name if name in files.values() else None)
    if fname is None:
        known = ", ".join(BUNDLED_PREFIX + n for n in files) or "none"
        raise FileNotFoundError(
            f"no bundled metadata {path!r}; the package bundles: {known} "
            "(or give a path or URL to a metadata file)"
        )
    ref = resources.files("curation") / "data" / fname
    if isinstance(ref, os.PathLike):  # a normal install or a checkout: the file itself
        return os.fspath(ref)
    return str(_as_file_stack.enter_context(resources.as_file(ref)))  # a zipped install


def load_metadata(path: str, fmt: str | None = None, *, strict: bool = True) -> Metadata:
    """Load metadata from a MetaCLIP-style JSON list, a text file (one entry per line) or Parquet.

    `path` is a path, an fsspec URL or a bundled name such as `bundled:metadata_en` (see
    `resolve_metadata`). MetaCLIP's own `metadata.json` loads unchanged. Raises `MetadataError`
    for empty or duplicate entries and, with `strict`, for entries with surrounding whitespace or
    NFC twins (see `validate_entries`), naming the line, and `FileNotFoundError` for a missing
    file.
    The checksum depends only on the entries, never on where they were read from.
    """
    url = resolve_metadata(path)
    fs, fpath = url_to_fs(url)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"metadata file {path!r} does not exist")
    with fs.open(fpath, "rb") as f:
        data = f.read()
    fmt = fmt or _detect_format(url, data)
    if fmt not in FORMATS:
        raise MetadataError(f"{path}: unknown metadata format {fmt!r}; use one of {FORMATS}")
    if fmt == "json":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MetadataError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise MetadataError(
                f"{path}: JSON nested too deeply; metadata is a flat JSON list of strings"
            ) from None
        if not isinstance(obj, list):
            raise MetadataError(
                f"{path}: expected a JSON list of strings, got {type(obj).__name__}"
            )
        entries = obj
    elif fmt == "txt":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MetadataError(f"{path}: not valid UTF-8 ({exc})") from exc
        entries = text.split("\n")
        if entries and entries[-1] == "":
            entries.pop()
        entries = [e[:-1] if e.endswith("\r") else e for e in entries]
    else:
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if "entry" not in table.column_names:
            raise MetadataError(f"{path}: Parquet metadata needs an 'entry' column")
        col = table.column("entry")
        if col.null_count:
            import pyarrow.compute as pc

            first = pc.index(pc.is_null(col), True).as_py()
            raise MetadataError(f"{path}: entry {first + 1} is null; remove it")
        entries = col.to_pylist()
    validate_entries(entries, path, strict=strict)
    tup = tuple(entries)
    return Metadata(entries=tup, checksum=entries_checksum(tup), source=path)


# -- per-language metadata sets (MetaCLIP 2 "worldwide") ----------------------------------------

#: A metadata language code: the name of a `<lang>.json` file, or a value of the `lang` column.
_LANG_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class MetadataSet:
    """One ordered entry list per metadata language (MetaCLIP 2's `data/metadata/<lang>.json`):
    `languages[lang].entries[i]` is entry id `i` of that language. Languages are kept sorted by
    code, so the set (and its checksum) does not depend on how a folder was listed."""

    languages: dict[str, Metadata]
    checksum: str
    source: str

    def __len__(self) -> int:
        return len(self.languages)

    def __contains__(self, lang: object) -> bool:
        return lang in self.languages

    def __getitem__(self, lang: str) -> Metadata:
        return self.languages[lang]

    def sizes(self) -> dict[str, int]:
        """Entries per language."""
        return {k: len(v) for k, v in self.languages.items()}

    def checksums(self) -> dict[str, str]:
        """Checksum of each language's entry list (`entries_checksum`)."""
        return {k: v.checksum for k, v in self.languages.items()}

    def entries(self) -> dict[str, tuple[str, ...]]:
        """Entry lists by language."""
        return {k: v.entries for k, v in self.languages.items()}


def metadata_set_checksum(checksums: dict[str, str]) -> str:
    """sha256 over the (language, entries checksum) pairs sorted by language: the set's identity,
    independent of file format and listing order."""
    h = hashlib.sha256()
    for lang in sorted(checksums):
        h.update(f"{lang}\0{checksums[lang]}\n".encode())
    return "sha256:" + h.hexdigest()


def _set_language(lang: object, source: str, where: str) -> str:
    if not isinstance(lang, str) or not _LANG_CODE.fullmatch(lang):
        raise MetadataError(
            f"{source}: {where}: {lang!r} is not a language code (letters, digits, '_' or '-', "
            "e.g. 'en', 'zh', 'other')"
        )
    return lang


def _json_entries(data: bytes, source: str) -> list:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{source}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise MetadataError(f"{source}: JSON nested too deeply; expected a list") from None
    if not isinstance(obj, list):
        raise MetadataError(
            f"{source}: expected a JSON list of strings (MetaCLIP 2's data/metadata/<lang>.json), "
            f"got {type(obj).__name__}"
        )
    return obj


def _build_set(per_lang: dict[str, list], source: str, strict: bool) -> MetadataSet:
    if not per_lang:
        raise MetadataError(f"{source}: no languages; expected <lang>.json files or lang rows")
    folded: dict[str, str] = {}
    for lang in per_lang:
        prev = folded.setdefault(lang.lower(), lang)
        if prev != lang:
            raise MetadataError(
                f"{source}: languages {prev!r} and {lang!r} differ only in case; keep one"
            )
    langs: dict[str, Metadata] = {}
    for lang in sorted(per_lang):
        entries = per_lang[lang]
        where = f"{source} [{lang}]"
        if not entries:
            raise MetadataError(f"{where}: language {lang!r} has no entries; remove it")
        validate_entries(entries, where, strict=strict)
        tup = tuple(entries)
        langs[lang] = Metadata(entries=tup, checksum=entries_checksum(tup), source=where)
    checksum = metadata_set_checksum({k: v.checksum for k, v in langs.items()})
    return MetadataSet(languages=langs, checksum=checksum, source=source)


def resolve_metadata_set(path: str) -> str | os.PathLike | object:
    """`bundled:<name>` -> the folder `curation/data/<name>/` of this process's installed copy
    (an `importlib.resources` Traversable in a zipped install); anything else unchanged."""
    if not path.startswith(BUNDLED_PREFIX):
        return path
    name = path[len(BUNDLED_PREFIX) :]
    data = resources.files("curation") / "data"
    ref = data / name
    if not name or "/" in name or not ref.is_dir():
        known = sorted(
            e.name for e in data.iterdir() if e.is_dir() and e.name.startswith("metadata")
        )
        raise FileNotFoundError(
            f"no bundled metadata set {path!r}; the package bundles: "
            f"{', '.join(BUNDLED_PREFIX + n for n in known) or 'none'} "
            "(or give a folder of <lang>.json files or a Parquet file with lang and entry columns)"
        )
    return os.fspath(ref) if isinstance(ref, os.PathLike) else ref


def load_metadata_set(path: str, *, strict: bool = False) -> MetadataSet:
    """Load per-language metadata: a folder of `<lang>.json` (MetaCLIP 2's `data/metadata/` as it
    is: each a JSON list, entry id = index in its list; other files such as the `.pkl` automata
    are ignored) or one Parquet file with `lang` and `entry` columns (a language's ids follow its
    rows' order). `path` may be a local path, an fsspec URL or `bundled:<name>`.

    Raises `FileNotFoundError` for a missing path, `MetadataError` for a bad file, a bad or
    case-duplicated language code, an empty language, and empty or duplicate entries within a
    language. `strict=False` (the default) accepts entries with surrounding whitespace and
    Unicode NFC twins, which MetaCLIP 2's merged per-language lists may contain (see
    `validate_entries`).
    """
    where = resolve_metadata_set(path)
    per_lang: dict[str, list] = {}
    if not isinstance(where, str | os.PathLike):  # a folder inside a zipped install
        files = [(e.name, e.read_bytes) for e in where.iterdir() if e.name.endswith(".json")]
        is_dir = True
    else:
        fs, fpath = url_to_fs(os.fspath(where))
        if not fs.exists(fpath):
            raise FileNotFoundError(f"metadata set {path!r} does not exist")
        is_dir = fs.isdir(fpath)
        files = []
        if is_dir:
            for p in sorted(fs.ls(fpath, detail=False)):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                if name.endswith(".json") and not fs.isdir(p):
                    files.append((name, lambda p=p: fs.cat_file(p)))
    if is_dir:
        for name, read in files:
            lang = _set_language(name[: -len(".json")], path, f"file {name}")
            per_lang[lang] = _json_entries(read(), f"{path}/{name}")
        if not per_lang:
            raise MetadataError(f"{path}: folder has no <lang>.json metadata files")
        return _build_set(per_lang, path, strict)
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(fpath)))
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise MetadataError(
            f"{path}: not a Parquet file ({exc}); give a folder of <lang>.json files or a "
            "Parquet file with lang and entry columns"
        ) from exc
    missing = [c for c in ("lang", "entry") if c not in table.column_names]
    if missing:
        raise MetadataError(f"{path}: Parquet metadata set needs columns lang and entry")
    for col in ("lang", "entry"):
        arr = table.column(col)
        if arr.null_count:
            first = pc.index(pc.is_null(arr), True).as_py()
            raise MetadataError(f"{path}: row {first + 1} has a null {col}; remove it")
    langs = table.column("lang").to_pylist()
    entries = table.column("entry").to_pylist()
    for lang, entry in zip(langs, entries, strict=True):
        per_lang.setdefault(lang, []).append(entry)
    for lang in per_lang:
        _set_language(lang, path, "lang column")
    return _build_set(per_lang, path, strict)


def write_metadata_json(entries: list[str], path: str) -> None:
    """Write entries as a MetaCLIP-style JSON list (one entry per line, stable bytes)."""
    from curation.core.fsio import atomic_write_bytes

    validate_entries(list(entries), path)
    body = "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries) + "\n]\n"
    atomic_write_bytes(path, body.encode("utf-8"))
