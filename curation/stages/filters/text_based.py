"""DataComp's `text_based` baseline: English captions that name an ImageNet-21k class.

mlfoundations/datacomp `baselines/apply_filter.py` (`load_uids_with_text_entity_helper`,
`does_contain_text_entity`) keeps a sample iff

- `get_fasttext_language(text) == "en"` (fastText lid.176, `\\n` -> space), and
- for some `word` in `text.split()` (Python whitespace, case and punctuation kept),
  `nltk.corpus.wordnet.synsets(word)[0].offset()` is in the ImageNet-21k ids
  (`imagenet21k_wordnet_ids.txt`, `int("n02084071"[1:])`; the POS is not compared).

DataComp pins `nltk==3.8.1` (`environment.yml`). `synsets(word)` lower-cases `word`, then takes,
for POS in n, v, a, r (nouns first), the lemmas `_morphy(word, pos)` finds, each with its synset
offsets in `index.<pos>` order; `[0]` is the first of all. 3.8.1's `_morphy` returns
`[word] + exceptions[word]` (filtered to lemmas) for a word of `<pos>.exc`, else `word` and its
one-rule detachments that are lemmas, and if there are none it keeps applying the rules, level
by level, until some level has a lemma (NLTK >= 3.9 stops after one level: 49 strings such as
"assess" or "dosses" then get a different first synset; this module follows 3.8.1).

No WordNet or NLTK at run time. The package data `curation/data/datacomp_text_based/` (`DATA_DIR`,
read with `importlib.resources`, so an installed wheel has it; `metadata/datacomp_text_based` in a
checkout links to it) holds, built by `scripts/build_text_based_table.py` from Princeton's WordNet
3.0 database files, the ones `nltk.download("wordnet")` gives:

- `words.tsv.gz`: every lower-case string whose answer can be found without chained rules
  (a lemma, an exception form, or a lemma with one rule undone) and is "yes" -> the fast path,
  a vectorized `is_in` over all caption tokens;
- `lexicon.tsv.gz` + `exceptions.tsv.gz`: WordNet's lemma -> first offset per POS and the
  exception lists, for the exact `_morphy` in `Morphy`, which runs only on the few distinct
  tokens that are not in the table and whose ending admits a chain of two rules (e.g. "dogss").
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.stages.filters.base import _PY_WS, Filter, LanguageFn, Scores, _texts
from curation.stages.filters.language import LanguageId

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11; importlib.abc before

__all__ = [
    "DATA_DIR",
    "POS_LIST",
    "SUBSTITUTIONS",
    "Morphy",
    "TextBasedFilter",
    "load_imagenet21k_ids",
    "load_word_table",
    "split_words",
]

#: The shipped tables: package data, found in whichever copy of the package this process imported
#: (a `pathlib.Path` for a checkout or an installed wheel).
DATA_DIR: Traversable = resources.files("curation") / "data" / "datacomp_text_based"

POS_LIST = ("n", "v", "a", "r")
# nltk.corpus.reader.wordnet.WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS (3.8.1)
SUBSTITUTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "v": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}

# A token can need a second rule level only if a one-rule detachment of it ends in a rule
# suffix again (noun: "...ss", "...ses", "...mens"; verb: (s|ed|ing) + (s|es|ed|ing); adjective:
# (er|est) + (er|est)); other tokens are decided by the table alone.
_CHAIN_RE = r"(ss|ses|mens|(s|ed|ing)(s|es|ed|ing)|(er|est)(er|est))$"


class Morphy:
    """NLTK 3.8.1 `wordnet.synsets(word)[0]` over lemma -> {pos: first offset} and exceptions."""

    def __init__(
        self,
        first_offset: Mapping[str, Mapping[str, int]],
        exceptions: Mapping[str, Mapping[str, list[str]]],
    ) -> None:
        self.first_offset = first_offset
        self.exceptions = exceptions

    def _has(self, form: str, pos: str) -> bool:
        by_pos = self.first_offset.get(form)
        return by_pos is not None and pos in by_pos

    def _filter(self, forms: Iterable[str], pos: str) -> list[str]:
        out: list[str] = []
        for f in forms:
            if self._has(f, pos) and f not in out:
                out.append(f)
        return out

    def morphy(self, form: str, pos: str) -> list[str]:
        """`WordNetCorpusReader._morphy(form, pos, check_exceptions=True)` of NLTK 3.8.1."""
        exc = self.exceptions.get(pos, {})
        if form in exc:
            return self._filter([form, *exc[form]], pos)
        subs = SUBSTITUTIONS[pos]

        def apply_rules(forms: list[str]) -> list[str]:
            return [f[: -len(old)] + new for f in forms for old, new in subs if f.endswith(old)]

        forms = apply_rules([form])
        results = self._filter([form, *forms], pos)
        if results:
            return results
        while forms:  # 3.8.1 only: keep applying the rules until some level has a lemma
            forms = apply_rules(forms)
            results = self._filter(forms, pos)
            if results:
                return results
        return []

    def first_synset(self, word: str) -> tuple[str, int, str] | None:
        """(pos, offset, lemma) of `wordnet.synsets(word)[0]`, or None when there is none."""
        word = word.lower()
        for pos in POS_LIST:
            for form in self.morphy(word, pos):
                return pos, self.first_offset[form][pos], form
        return None

    def candidates(self) -> set[str]:
        """Strings whose answer needs no chained rules: lemmas, exception forms, and lemmas
        with one rule undone (every other string either has no synset or needs a chain)."""
        out = set(self.first_offset)
        for pos in POS_LIST:
            out.update(self.exceptions.get(pos, {}))
            subs = SUBSTITUTIONS[pos]
            for lemma, by_pos in self.first_offset.items():
                if pos in by_pos:
                    for old, new in subs:
                        if lemma.endswith(new):
                            out.add(lemma[: len(lemma) - len(new)] + old)
        return out

    @classmethod
    def from_files(
        cls, lexicon: Path | Traversable | None = None, exceptions: Path | Traversable | None = None
    ) -> Morphy:
        """From `lexicon.tsv.gz` and `exceptions.tsv.gz` (default: the shipped ones)."""
        lexicon = lexicon or DATA_DIR / "lexicon.tsv.gz"
        exceptions = exceptions or DATA_DIR / "exceptions.tsv.gz"
        first: dict[str, dict[str, int]] = {}
        for line in _read_lines(lexicon)[1:]:
            lemma, pos, offset = line.split("\t")
            first.setdefault(lemma, {})[pos] = int(offset) if offset else -1  # -1: not IN-21k
        exc: dict[str, dict[str, list[str]]] = {p: {} for p in POS_LIST}
        for line in _read_lines(exceptions)[1:]:
            pos, form, lemmas = line.split("\t")
            exc[pos][form] = lemmas.split(" ")
        return cls(first, exc)


def _read_lines(path: Path | Traversable) -> list[str]:
    """Lines of a UTF-8 text file, gunzipped when its name ends in `.gz` (a path or a package
    resource: both have `read_bytes`)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8").splitlines()


def load_imagenet21k_ids(path: Path | Traversable | None = None) -> set[int]:
    """DataComp: `[int(x.strip()[1:]) for x in open("imagenet21k_wordnet_ids.txt")]`."""
    path = path or DATA_DIR / "imagenet21k_wordnet_ids.txt"
    return {int(x.strip()[1:]) for x in _read_lines(path) if x.strip()}


def load_word_table(path: Path | Traversable | None = None) -> pa.Table:
    """The shipped `words.tsv.gz`: word, pos, offset, lemma (sorted by word)."""
    lines = _read_lines(path or DATA_DIR / "words.tsv.gz")
    cols = list(zip(*(line.split("\t") for line in lines[1:]), strict=True))
    names = lines[0].split("\t")
    data = {n: list(c) for n, c in zip(names, cols, strict=True)}
    data["offset"] = [int(x) for x in data["offset"]]
    return pa.table(data)


def split_words(texts: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Lower-cased `text.split()` tokens of every row, flattened, with their row indices."""
    lowered = pc.utf8_lower(_texts(texts))
    if isinstance(lowered, pa.ChunkedArray):
        lowered = lowered.combine_chunks()
    lists = pc.split_pattern_regex(lowered, f"[{_PY_WS}]+")
    tokens = pc.list_flatten(lists)
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False))
    nonempty = pc.greater(pc.utf8_length(tokens), 0)  # leading/trailing whitespace
    return pc.filter(tokens, nonempty), parents[np.asarray(nonempty.to_numpy(False), bool)]


class TextBasedFilter(Filter):
    """DataComp `text_based`: fastText English AND some caption word's first WordNet synset is
    an ImageNet-21k class (mlfoundations/datacomp `baselines/apply_filter.py`:
    `load_uids_with_text_entity_helper` + `does_contain_text_entity`).

    `language` is an injected `texts -> array of language codes` (default `LanguageId()`);
    `data_dir` holds the tables (default: the shipped ones, `DATA_DIR`, looked up in each
    worker's own installed copy of the package when it loads them).
    """

    name = "text_based"
    columns = ("text",)

    def __init__(
        self, language: LanguageFn | None = None, data_dir: str | Path | None = None
    ) -> None:
        self.language = language if language is not None else LanguageId()
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._words: pa.Array | None = None
        self._morphy: Morphy | None = None
        self._ids: set[int] | None = None

    #: The table files a worker opens (from `data_dir` or the package).
    TABLE_FILES = (
        "words.tsv.gz",
        "lexicon.tsv.gz",
        "exceptions.tsv.gz",
        "imagenet21k_wordnet_ids.txt",
    )

    def __getstate__(self) -> dict:
        # Tables stay in their process; a worker loads its own in setup().
        return {**self.__dict__, "_words": None, "_morphy": None, "_ids": None}

    def assets(self) -> dict[str, str]:
        """The language model's file and, with `data_dir`, its four table files (the shipped
        tables are package data, found in each worker's installed copy)."""
        out = super().assets()
        if self.data_dir is not None:
            out.update({f"tables/{n}": str(self.data_dir / n) for n in self.TABLE_FILES})
        return out

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Open the language model and the `data_dir` tables at local copies."""
        super().use_assets(paths)
        local = {n: Path(paths[f"tables/{n}"]) for n in self.TABLE_FILES if f"tables/{n}" in paths}
        if local:
            self._local_tables = {**getattr(self, "_local_tables", {}), **local}

    def _table(self, name: str) -> Path | Traversable:
        """One table file: a local copy given by `use_assets`, else in `data_dir` / the package."""
        local = getattr(self, "_local_tables", {})
        return local[name] if name in local else self._tables() / name

    def setup(self) -> None:
        """Load the word table and the language-id model (once)."""
        self._word_set()
        getattr(self.language, "setup", lambda: None)()

    def _tables(self) -> Path | Traversable:
        return self.data_dir if self.data_dir is not None else DATA_DIR

    def _word_set(self) -> pa.Array:
        if self._words is None:
            words = load_word_table(self._table("words.tsv.gz")).column("word")
            self._words = words.combine_chunks()
        return self._words

    def _chain_answers(self, tokens: pa.Array) -> dict[str, bool]:
        """Exact answers for the distinct tokens that may need chained rules."""
        if self._morphy is None:
            self._morphy = Morphy.from_files(
                self._table("lexicon.tsv.gz"), self._table("exceptions.tsv.gz")
            )
            self._ids = load_imagenet21k_ids(self._table("imagenet21k_wordnet_ids.txt"))
        assert self._ids is not None
        out = {}
        for tok in tokens.to_pylist():
            first = self._morphy.first_synset(tok)
            out[tok] = first is not None and first[1] in self._ids
        return out

    def word_hits(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Per row: does some word's first synset lie in ImageNet-21k (no language test)."""
        n = len(texts)
        tokens, parents = split_words(texts)
        hit = np.asarray(pc.is_in(tokens, value_set=self._word_set()).to_numpy(False), bool)
        maybe = pc.and_(pc.invert(pa.array(hit)), pc.match_substring_regex(tokens, _CHAIN_RE))
        maybe_np = np.asarray(maybe.to_numpy(zero_copy_only=False), bool)
        if maybe_np.any():
            rest = pc.filter(tokens, maybe)
            uniq = pc.unique(rest)
            answers = self._chain_answers(uniq)
            yes = pa.array([t for t, ok in answers.items() if ok], pa.string())
            if len(yes):
                hit[maybe_np] = np.asarray(pc.is_in(rest, value_set=yes).to_numpy(False), bool)
        return np.bincount(parents[hit], minlength=n)[:n] > 0

    def score(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Language code and whether some word names an ImageNet-21k class, per row."""
        self._check_columns(table)
        self.setup()
        text = table.column("text")
        return {"lang": self.language(text), "in_imagenet21k": self.word_hits(text)}

    def conditions(self, scores: Scores) -> dict[str, np.ndarray]:
        """english, imagenet21k_word."""
        return {
            "english": np.asarray(scores["lang"]) == "en",
            "imagenet21k_word": np.asarray(scores["in_imagenet21k"], dtype=bool),
        }
