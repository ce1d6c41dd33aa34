"""Rebuild the tables of DataComp's `text_based` filter in `curation/data/datacomp_text_based/`.

DataComp (mlfoundations/datacomp `baselines/apply_filter.py: does_contain_text_entity`, with
`nltk==3.8.1` from its `environment.yml`) keeps a caption if, for some `word` of `text.split()`,
`wordnet.synsets(word)[0].offset()` is in the ImageNet-21k ids. `curation.stages.filters.text_based.Morphy`
re-implements that lookup exactly (see its module docstring); this script evaluates it on every
string whose answer needs no chained morphology rules and writes, sorted and deterministic:

- `words.tsv.gz`: those strings whose answer is "yes" (word, pos, offset, lemma);
- `lexicon.tsv.gz`: lemma, pos of every WordNet index entry, with its first synset offset
  when that is an ImageNet-21k id (else empty);
- `exceptions.tsv.gz`: pos, form, lemmas of WordNet's `*.exc` exception lists.

Inputs, no network: Princeton's WordNet 3.0 database files, the ones `nltk.download("wordnet")`
installs (`python scripts/fetch_wordnet.py` puts them in `.cache/wordnet/dict`, the default) and
`imagenet21k_wordnet_ids.txt` (timm's `imagenet21k_goog_synsets.txt`, byte-identical to
DataComp's file). Debian's `wordnet-base` (`/usr/share/wordnet`) does not do: Debian regenerates
the database from the lexicographer files, and its verb and adjective synsets lie at other byte
offsets, so a different set of words would collide with ImageNet-21k ids (DataComp compares
offsets without the POS); `build` refuses such a copy. Gzip is written with mtime 0 and no file
name, so the bytes depend only on the content (and zlib).

    python scripts/build_text_based_table.py [--wordnet-dir .cache/wordnet/dict] [--check-nltk]

`--check-nltk` compares every table string with `nltk.corpus.wordnet.synsets(w)[0]` of the
installed NLTK (its own WordNet data, found through NLTK_DATA); use NLTK 3.8.1 to match.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.stages.filters.text_based import Morphy, load_imagenet21k_ids  # noqa: E402

FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
OUT_DIR = REPO / "curation" / "data" / "datacomp_text_based"
WORDNET_DIR = REPO / ".cache" / "wordnet" / "dict"
#: First synset offsets in Princeton's (and NLTK's) WordNet 3.0 that Debian's rebuilt
#: `wordnet-base` has elsewhere (01926329, 01168486, 02641379 there).
PRINCETON_OFFSETS = {("run", "v"): 1926311, ("eat", "v"): 1168468, ("aromatic", "a"): 2641378}


def read_wordnet(root: Path) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, list[str]]]]:
    """lemma -> {pos: first offset} from `index.*`, pos -> {form: lemmas} from `*.exc`,
    parsed as NLTK's `_load_lemma_pos_offset_map` / `_load_exception_map` do."""
    first: dict[str, dict[str, int]] = {}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos, suffix in FILES.items():
        with open(root / f"index.{suffix}", encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):  # licence header
                    continue
                tok = line.split()
                lemma, p, n_synsets, n_pointers = tok[0], tok[1], int(tok[2]), int(tok[3])
                offsets = tok[4 + n_pointers + 2 : 4 + n_pointers + 2 + n_synsets]
                assert p == pos and len(offsets) == n_synsets > 0, line
                first.setdefault(lemma, {})[p] = int(offsets[0])
        with open(root / f"{suffix}.exc", encoding="utf-8") as f:
            exceptions[pos] = {t[0]: t[1:] for t in (line.split() for line in f) if t}
    return first, exceptions


def build(root: Path, ids: set[int]) -> dict[str, str]:
    """File name -> text content of the three tables."""
    first, exceptions = read_wordnet(root)
    for (lemma, pos), offset in PRINCETON_OFFSETS.items():
        if first.get(lemma, {}).get(pos) != offset:
            raise SystemExit(
                f"{root}: {lemma}.{pos} starts at offset {first.get(lemma, {}).get(pos)}, not "
                f"{offset:08d} as in Princeton's WordNet 3.0 (NLTK's); use the files from "
                "`python scripts/fetch_wordnet.py`, not Debian's regenerated wordnet-base"
            )
    m = Morphy(first, exceptions)
    words = ["word\tpos\toffset\tlemma"]
    for w in sorted(m.candidates()):
        hit = m.first_synset(w)
        if hit is not None and hit[1] in ids:
            words.append(f"{w}\t{hit[0]}\t{hit[1]:08d}\t{hit[2]}")
    # The run-time fallback only asks "is the first offset an ImageNet-21k id": other offsets
    # are left out (empty), which keeps the file small.
    lexicon = ["lemma\tpos\toffset"] + [
        f"{lemma}\t{p}\t{first[lemma][p]:08d}" if first[lemma][p] in ids else f"{lemma}\t{p}\t"
        for lemma in sorted(first)
        for p in sorted(first[lemma])
    ]
    exc = ["pos\tform\tlemmas"] + [
        f"{p}\t{form}\t{' '.join(exceptions[p][form])}"
        for p in sorted(exceptions)
        for form in sorted(exceptions[p])
    ]
    return {
        "words.tsv.gz": "\n".join(words) + "\n",
        "lexicon.tsv.gz": "\n".join(lexicon) + "\n",
        "exceptions.tsv.gz": "\n".join(exc) + "\n",
    }


def write(out_dir: Path, files: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
        (out_dir / name).write_bytes(data)
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        print(f"{name}: {text.count(chr(10)) - 1} rows, text sha256 {sha}")


def check_against_nltk(m: Morphy, words: Iterable[str]) -> int:
    """Mismatches between `Morphy.first_synset` and NLTK's `wordnet.synsets(w)[0]`."""
    from nltk.corpus import wordnet as ref

    bad = 0
    for w in words:
        s = ref.synsets(w)
        want = (s[0].offset(), s[0].pos().replace("s", "a")) if s else None
        got = m.first_synset(w)
        if want != ((got[1], got[0]) if got else None):
            bad += 1
            if bad <= 20:
                print(f"mismatch {w!r}: nltk {want} ours {got}", file=sys.stderr)
    return bad


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR)
    ap.add_argument("--ids", type=Path, default=OUT_DIR / "imagenet21k_wordnet_ids.txt")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--check-nltk", action="store_true", help="cross-check against NLTK")
    ap.add_argument("--extra", nargs="*", default=[], help="more words for --check-nltk")
    args = ap.parse_args(argv)

    ids = load_imagenet21k_ids(args.ids)
    files = build(args.wordnet_dir, ids)
    write(args.out_dir, files)
    if args.check_nltk:
        first, exceptions = read_wordnet(args.wordnet_dir)
        m = Morphy(first, exceptions)
        words = sorted(m.candidates()) + list(args.extra)
        bad = check_against_nltk(m, words)
        print(f"NLTK cross-check: {len(words)} words, {bad} mismatches")
        if bad:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
