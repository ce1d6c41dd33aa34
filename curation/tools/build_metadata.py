"""Build the default English concept metadata from sources that need no download.

MetaCLIP's metadata has four parts: WordNet synsets, Wikipedia unigrams (count >= 100),
Wikipedia bigrams with high PMI and Wikipedia article titles. The default metadata shipped here
(`curation/data/metadata_en.json`, `bundled:metadata_en`) keeps the first part and replaces the Wikipedia parts with what is
available offline:

1. **wordnet**: every lemma of every synset in the WordNet 3.0 database files
   (`data.noun`, `data.verb`, `data.adj`, `data.adv`), `_` replaced by a space, case kept as
   WordNet has it, adjective markers `(a)`, `(p)`, `(ip)` stripped; sorted by codepoint.
2. **unigrams**: English words from wordfreq's `best` (= `large`) list with Zipf frequency
   >= `unigram_min_zipf`, in wordfreq rank order (descending frequency, alphabetical within a
   frequency band), skipping those already present and those that cannot be a MetaCLIP entry
   (see `keep_unigram`).
3. **numbers**: `"0"` .. `"99"` in numeric order, skipping those already present.

The parts are concatenated in that order and de-duplicated exactly (case-sensitive, first
occurrence wins), so the same sources give a byte-identical file.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from curation.core.metadata import entries_checksum, write_metadata_json

#: Default Zipf threshold for the unigram part: frequency >= 10**-6.5 (about 3 per 10 million
#: tokens). With wordfreq 3.1.1: 51,574 English words pass `keep_unigram`, 27,317 of them not
#: already in WordNet. (MetaCLIP used Wikipedia unigrams with count >= 100.)
DEFAULT_UNIGRAM_MIN_ZIPF = 2.5

#: WordNet database files read, in this order.
WORDNET_DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

#: Where `build_default_metadata(None, ...)` looks for a WordNet database, in order (after
#: `$WNSEARCHDIR` and `$WNHOME/dict`).
WORDNET_SEARCH_PATHS = (
    "/usr/share/wordnet",
    "/usr/local/share/wordnet",
    "/usr/local/WordNet-3.0/dict",
    "~/nltk_data/corpora/wordnet",
    "/usr/share/nltk_data/corpora/wordnet",
    "/usr/local/share/nltk_data/corpora/wordnet",
    "/usr/lib/nltk_data/corpora/wordnet",
    "/usr/local/lib/nltk_data/corpora/wordnet",
)

_SS_TYPES = frozenset("nvasr")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_VERSION_RE = re.compile(r"WordNet (\d+(?:\.\d+)+) Copyright")
# Characters MetaCLIP's text normalization surrounds with spaces (or turns into spaces): an entry
# containing one can never match, because the normalized text never has it next to a letter.
_SEPARATORS = frozenset(",.;:?!\t\n\r")
# wordfreq replaces every run of 2+ digits with zeros ("2024" -> "0000"): such tokens stand for
# a class of numbers, not a literal string.
_MULTI_DIGIT = re.compile(r"\d\d")
# English clitics and possessives ("don't", "it's", "women's", "we'll"): inflected forms of words
# that are (or could be) entries themselves, not concepts of their own.
_CLITIC = re.compile(r"'(?:s|t|re|ll|ve|m|d)$")


class WordNetFormatError(ValueError):
    """A WordNet data file that does not parse; the message names the file and the line."""


@dataclass(frozen=True)
class BuildInfo:
    """What `build_default_metadata` wrote: counts per part, checksum and sources."""

    out_path: str
    parts: dict[str, int]
    total: int
    checksum: str
    unigram_min_zipf: float
    sources: list[dict[str, str]] = field(default_factory=list)
    order: str = "wordnet (codepoint order), unigrams (wordfreq rank order), numbers 0..99"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the CLI and the run manifest)."""
        return asdict(self)


def find_wordnet_dir(wordnet_dir: str | None = None) -> str:
    """Resolve a WordNet database directory holding `data.noun` etc.

    Accepts the database directory itself (Debian `/usr/share/wordnet`, NLTK
    `nltk_data/corpora/wordnet`), or a parent holding it as `dict/`, `wordnet/` or
    `corpora/wordnet/`. With `None`, tries `$WNSEARCHDIR`, `$WNHOME/dict` and
    `WORDNET_SEARCH_PATHS`. Raises `FileNotFoundError` when none has all four data files.
    """
    if wordnet_dir is not None:
        candidates = [wordnet_dir]
    else:
        candidates = []
        if os.environ.get("WNSEARCHDIR"):
            candidates.append(os.environ["WNSEARCHDIR"])
        if os.environ.get("WNHOME"):
            candidates.append(os.path.join(os.environ["WNHOME"], "dict"))
        candidates.extend(WORDNET_SEARCH_PATHS)
    for cand in candidates:
        base = os.path.expanduser(cand)
        for sub in ("", "dict", "wordnet", os.path.join("corpora", "wordnet")):
            d = os.path.join(base, sub) if sub else base
            if all(os.path.isfile(os.path.join(d, f)) for f in WORDNET_DATA_FILES):
                return d
    where = repr(wordnet_dir) if wordnet_dir is not None else ", ".join(candidates)
    raise FileNotFoundError(
        f"no WordNet 3.0 database ({', '.join(WORDNET_DATA_FILES)}) found in {where}; install "
        "one (in a checkout: make wordnet, into .cache/wordnet/dict; Debian/Ubuntu: apt-get "
        "install wordnet-base; or nltk.download('wordnet')) and pass "
        "its directory"
    )


def _parse_data_file(path: str, lemmas: set[str]) -> str | None:
    """Add the lemmas of one `data.*` file to `lemmas`; return the version in its header."""
    version = None
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if line.startswith("  "):  # licence header
                if version is None:
                    m = _VERSION_RE.search(line)
                    if m:
                        version = m.group(1)
                continue
            if not line.strip():
                continue

            def bad(why: str, line: str = line, lineno: int = lineno) -> WordNetFormatError:
                return WordNetFormatError(f"{path}:{lineno}: {why}: {line[:80]!r}")

            fields = line.split(" ")
            if len(fields) < 6:
                raise bad("too few fields for a synset line")
            offset, lex_filenum, ss_type, w_cnt_hex = fields[:4]
            if not (offset.isdigit() and lex_filenum.isdigit() and ss_type in _SS_TYPES):
                raise bad("expected 'offset lex_filenum ss_type w_cnt'")
            try:
                w_cnt = int(w_cnt_hex, 16)
            except ValueError:
                raise bad(f"w_cnt {w_cnt_hex!r} is not hexadecimal") from None
            head = fields[4 : 5 + 2 * w_cnt]  # the word/lex_id pairs, then p_cnt
            if w_cnt < 1 or len(head) < 2 * w_cnt + 1 or "|" in head or not head[-1].isdigit():
                raise bad(f"w_cnt {w_cnt_hex!r} does not fit the line")
            for i in range(w_cnt):
                word = fields[4 + 2 * i]
                lex_id = fields[5 + 2 * i]
                try:
                    int(lex_id, 16)
                except ValueError:
                    raise bad(f"lex_id {lex_id!r} of word {word!r} is not hexadecimal") from None
                if ss_type in "as":
                    word = _ADJ_MARKER.sub("", word)
                lemma = word.replace("_", " ").strip()
                if not lemma:
                    raise bad(f"empty lemma in word field {i + 1}")
                lemmas.add(lemma)
    return version


def _read_wordnet(wordnet_dir: str) -> tuple[list[str], str | None]:
    d = find_wordnet_dir(wordnet_dir)
    lemmas: set[str] = set()
    versions = {_parse_data_file(os.path.join(d, f), lemmas) for f in WORDNET_DATA_FILES}
    versions.discard(None)
    version = versions.pop() if len(versions) == 1 else None
    return sorted(lemmas), version


def read_wordnet_lemmas(wordnet_dir: str) -> list[str]:
    """All distinct lemma names of all synsets in a WordNet database, sorted by codepoint.

    Reads `data.noun`, `data.verb`, `data.adj` and `data.adv` (Debian `/usr/share/wordnet`, or
    NLTK's `corpora/wordnet`; see `find_wordnet_dir`). Each synset line is parsed by its fields:
    the hexadecimal word count `w_cnt`, then that many `word lex_id` pairs. `_` becomes a space,
    case is kept, adjective markers `(a)`, `(p)`, `(ip)` are removed. Licence header lines (two
    leading spaces) are skipped. Raises `WordNetFormatError` naming the file and line of a
    malformed synset line.
    """
    return _read_wordnet(wordnet_dir)[0]


def keep_unigram(word: str) -> bool:
    """Whether a wordfreq token is usable as a metadata entry.

    Kept: at least one letter; no whitespace; none of `, . ; : ? !` (MetaCLIP's matching puts
    spaces around those, so an entry containing one never matches); no run of two or more digits
    (wordfreq's placeholder for a class of numbers, e.g. `0000` for any 4-digit number); no
    clitic or possessive ending `'s 't 're 'll 've 'm 'd` ("don't", "women's").
    """
    if not any(ch.isalpha() for ch in word):
        return False
    if any(ch.isspace() or ch in _SEPARATORS for ch in word):
        return False
    return _MULTI_DIGIT.search(word) is None and _CLITIC.search(word) is None


def wordfreq_unigrams(min_zipf: float, lang: str = "en") -> list[str]:
    """wordfreq's `best` list for `lang` down to Zipf `min_zipf`, in rank order, filtered.

    Rank order is wordfreq's own: descending frequency band (centibels), alphabetical within a
    band. The cut is exact on wordfreq's integer centibel bands: Zipf = (cB + 900) / 100.
    """
    import wordfreq

    bands = wordfreq.get_frequency_list(lang, wordlist="best")
    min_cb = round(min_zipf * 100) - 900  # keep bands with cB >= min_cb; band i has cB = -i
    out: list[str] = []
    for i, band in enumerate(bands):
        if -i < min_cb:
            break
        out.extend(w for w in band if keep_unigram(w))
    return out


def numbers_part() -> list[str]:
    """The strings "0" .. "99" in numeric order."""
    return [str(i) for i in range(100)]


def merge_parts(parts: list[tuple[str, list[str]]]) -> tuple[list[str], dict[str, int]]:
    """Concatenate parts in order, keeping the first occurrence of each exact (case-sensitive)
    string and dropping empty ones; returns the entries and how many each part contributed."""
    seen: set[str] = set()
    entries: list[str] = []
    counts: dict[str, int] = {}
    for name, items in parts:
        n = 0
        for e in items:
            if e.strip() == "" or e in seen:
                continue
            seen.add(e)
            entries.append(e)
            n += 1
        counts[name] = n
    return entries, counts


def _wordfreq_sources(lang: str) -> dict[str, str]:
    import importlib.metadata

    import wordfreq

    path = wordfreq.available_languages("best").get(lang, "")
    return {
        "name": "wordfreq",
        "version": importlib.metadata.version("wordfreq"),
        "wordlist": "best",
        "file": os.path.basename(path),
        "lang": lang,
        "license": "code Apache-2.0; data CC BY-SA 4.0",
    }


def build_default_metadata(
    wordnet_dir: str | None,
    out_path: str,
    *,
    unigram_min_zipf: float = DEFAULT_UNIGRAM_MIN_ZIPF,
) -> BuildInfo:
    """Build the default English metadata and write it to `out_path` (any fsspec URL).

    Parts, in this fixed order: WordNet lemmas (sorted by codepoint), wordfreq English unigrams
    with Zipf >= `unigram_min_zipf` (rank order), the numbers "0".."99"; each part adds only
    strings not already present (exact, case-sensitive). `wordnet_dir=None` looks for WordNet in
    the usual places (`find_wordnet_dir`). The file is a MetaCLIP-style JSON list written by
    `write_metadata_json`; the same sources give byte-identical output. A local `out_path` that is
    a symbolic link (a checkout's `metadata/metadata_en.json`) is written through, not replaced.
    """
    wn_lemmas, wn_version = _read_wordnet(find_wordnet_dir(wordnet_dir))
    entries, counts = merge_parts(
        [
            ("wordnet", wn_lemmas),
            ("unigrams", wordfreq_unigrams(unigram_min_zipf)),
            ("numbers", numbers_part()),
        ]
    )
    target = os.path.realpath(out_path) if os.path.islink(out_path) else out_path
    write_metadata_json(entries, target)
    sources = [
        {
            "name": "WordNet",
            "version": wn_version or "unknown",
            "files": ", ".join(WORDNET_DATA_FILES),
            "license": "WordNet 3.0 license (Princeton University, BSD-like)",
        },
        _wordfreq_sources("en"),
        {"name": "numbers", "version": "0..99", "license": "n/a"},
    ]
    return BuildInfo(
        out_path=out_path,
        parts=counts,
        total=len(entries),
        checksum=entries_checksum(entries),
        unigram_min_zipf=unigram_min_zipf,
        sources=sources,
    )


# -- worldwide (per-language) metadata -----------------------------------------------------------

#: Per-language cap of the worldwide build: at most this many unigrams per language, by wordfreq
#: rank (keeps the bundled set near 9 MB; MetaCLIP 2 caps Wikipedia unigrams at 10% of the
#: vocabulary, at most 251,465).
DEFAULT_WORLDWIDE_MAX_UNIGRAMS = 10_000

#: wordfreq language codes that differ from the Wikipedia (MetaCLIP 2 metadata) codes.
WORDFREQ_TO_METADATA_LANG = {"fil": "tl", "nb": "no"}


def build_worldwide_metadata(
    en_metadata: str,
    out_dir: str,
    *,
    unigram_min_zipf: float = DEFAULT_UNIGRAM_MIN_ZIPF,
    max_unigrams: int = DEFAULT_WORLDWIDE_MAX_UNIGRAMS,
) -> dict[str, Any]:
    """Build per-language metadata (`<lang>.json` lists, MetaCLIP 2's layout) into `out_dir`.

    `en.json` is the English metadata `en_metadata` (e.g. `bundled:metadata_en`) rewritten as
    it is. Every other language wordfreq 3.1.1 has a `best` list for gets, in this order, the
    numbers "0".."99" (MetaCLIP 2: "every lang has numbers") and its wordfreq unigrams with Zipf
    >= `unigram_min_zipf` that pass `keep_unigram`, in wordfreq rank order, the first
    `max_unigrams` of them. Files are named by Wikipedia code (`WORDFREQ_TO_METADATA_LANG`).
    The same sources give byte-identical files. Returns entries and checksum per language.
    """
    import wordfreq

    from curation.core.fsio import join, makedirs
    from curation.core.metadata import load_metadata

    makedirs(out_dir)
    en = load_metadata(en_metadata)
    write_metadata_json(list(en.entries), join(out_dir, "en.json"))
    langs: dict[str, Any] = {
        "en": {"entries": len(en), "checksum": en.checksum, "source": en_metadata}
    }
    for wf_lang in sorted(wordfreq.available_languages("best")):
        if wf_lang == "en":
            continue
        lang = WORDFREQ_TO_METADATA_LANG.get(wf_lang, wf_lang)
        unigrams = wordfreq_unigrams(unigram_min_zipf, wf_lang)[:max_unigrams]
        entries, counts = merge_parts([("numbers", numbers_part()), ("unigrams", unigrams)])
        write_metadata_json(entries, join(out_dir, f"{lang}.json"))
        langs[lang] = {
            "entries": len(entries),
            "parts": counts,
            "checksum": entries_checksum(entries),
            "source": _wordfreq_sources(wf_lang),
        }
    return {
        "out_dir": out_dir,
        "unigram_min_zipf": unigram_min_zipf,
        "max_unigrams": max_unigrams,
        "languages": dict(sorted(langs.items())),
    }
