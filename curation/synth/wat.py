"""Synthetic CommonCrawl-style WAT pools with a known ground truth.

`write_synthetic_pool` writes shards that look like real CommonCrawl WAT files (one gzip member
per WARC record; a `warcinfo` record, then request / response / metadata WAT records per page)
and a `synth_truth.json` giving, per shard, the exact number of (image URL, alt-text) pairs an
extractor following these rules must produce:

- take records with WARC header `WARC-Type: metadata` whose JSON payload has
  `Envelope.WARC-Header-Metadata.WARC-Type == "response"`; records whose payload is not valid
  UTF-8 or not valid JSON yield nothing;
- for each link of `Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata.Links` whose
  `path` starts with `IMG@/src` and whose `url` is a non-empty string, for each key of
  `("alt", "title", "data-image-title")` whose value is a string that is non-empty after
  replacing `\\n` and `\\r` with spaces and stripping: one pair (texts over 1,000 characters are
  truncated, still one pair).

Content is reproducible: shard `i` depends only on `(seed, i)` (NumPy `PCG64` seeded with
`SeedSequence(seed, spawn_key=(i,))`), gzip headers carry no time or name, WARC dates and record
ids come from the seed. Popular images shared across shards come from a pool that depends on the
seed only. Host names use reserved names (`*.example`, `*.test`, `example.com`...) so nothing
here points at a real site.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from fsspec.core import url_to_fs

from curation.core import fsio

__all__ = [
    "KIND_LANGUAGES",
    "MALFORMED_REASONS",
    "ShardTruth",
    "SynthSummary",
    "TEXT_KEYS",
    "default_concepts",
    "generate_shard",
    "shard_file_name",
    "write_synthetic_pool",
]

SYNTH_VERSION = 1
TEXT_KEYS = ("alt", "title", "data-image-title")
MALFORMED_REASONS = ("bad_json", "bad_utf8", "huge_text", "null_url", "missing_links")
HUGE_TEXT_CHARS = 10_000_000
TRUTH_FILE = "synth_truth.json"

# One gzip member per record, as in CommonCrawl. Records are a few KB, so per-member deflate setup
# dominates; a small window and hash table keep it cheap, and higher levels gain < 2% in size.
_GZ_LEVEL = 3
_GZ_WBITS = 13
_GZ_MEMLEVEL = 6
_GZ_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no mtime, no name, OS unknown

_ENC = json.encoder.encode_basestring  # C escaper, keeps non-ASCII as UTF-8
_SEP = "\x1e"  # group separator used to split joined token streams; never in a token

# Per-image text states.
_ABSENT, _EMPTY, _BLANK, _TEXT, _SAME_AS_ALT = 0, 1, 2, 3, 4
_ALT_P = (0.14, 0.08, 0.03, 0.75, 0.0)
_TITLE_P = (0.72, 0.04, 0.0, 0.15, 0.09)
_DIT_P = (0.96, 0.0, 0.0, 0.04, 0.0)
_BLANKS = (" ", "  ", "\n", "\r\n", " \n ", "\t", " \t\r\n", "\n\n")

# Caption kinds.
_EN, _BOILER, _DE, _FR, _ES, _ZH, _JA = range(7)
_KIND_P_LANG = (0.74, 0.08, 0.05, 0.04, 0.04, 0.03, 0.02)
_KIND_P_EN = (0.92, 0.08, 0.0, 0.0, 0.0, 0.0, 0.0)
# languages="worldwide" adds these kinds (MetaCLIP 2): Thai (no spaces between words), Russian,
# Portuguese, Korean and Arabic, with English at about half of the captions.
_TH, _RU, _PT, _KO, _AR = range(7, 12)
_KIND_P_WORLD = (0.46, 0.08, 0.06, 0.05, 0.05, 0.05, 0.04, 0.05, 0.05, 0.05, 0.03, 0.03)
#: The language of each caption kind, as `synth_truth.json` reports it (`boilerplate`: file
#: names and page furniture like "image", "logo", "IMG_0001.JPG", of no real language).
KIND_LANGUAGES = ("en", "boilerplate", "de", "fr", "es", "zh", "ja", "th", "ru", "pt", "ko", "ar")
#: The values of `languages` that write captions in several languages.
LANGUAGE_MODES = (True, "worldwide")
# wordfreq has no Thai: common Thai words (nouns of image captions, then function words), taken
# as a Zipf list in this order. Thai is written without spaces between words.
_THAI_WORDS = (
    "ที่", "และ", "ของ", "ใน", "การ", "เป็น", "มี", "ไม่", "ได้", "จะ", "ให้", "กับ", "ความ",
    "ไป", "มา", "คน", "วัน", "ปี", "ราคา", "ขาย", "ซื้อ", "ดี", "มาก", "สินค้า", "แมว", "หมา",
    "บ้าน", "รถ", "ต้นไม้", "ดอกไม้", "ทะเล", "ภูเขา", "อาหาร", "น้ำ", "กาแฟ", "ชา", "ข้าว",
    "ไก่", "ปลา", "หมู", "ผลไม้", "สวย", "ใหม่", "เก่า", "ใหญ่", "เล็ก", "สีแดง", "สีฟ้า",
    "สีเขียว", "สีดำ", "สีขาว", "ผู้หญิง", "ผู้ชาย", "เด็ก", "ครอบครัว", "เพื่อน", "โรงเรียน",
    "มหาวิทยาลัย", "โรงแรม", "ร้านอาหาร", "ตลาด", "ถนน", "เมือง", "ประเทศไทย", "กรุงเทพ",
    "เชียงใหม่", "ภูเก็ต", "วัด", "พระ", "ท่องเที่ยว", "การเดินทาง", "รูปภาพ", "ภาพถ่าย",
    "ของขวัญ", "เสื้อผ้า", "รองเท้า", "กระเป๋า", "โทรศัพท์", "คอมพิวเตอร์", "หนังสือ", "เพลง",
    "ภาพยนตร์", "ข่าว", "กีฬา", "ฟุตบอล", "สุขภาพ", "ความรัก", "ความสุข", "วันเกิด",
    "งานแต่งงาน", "ห้องนอน", "ห้องครัว", "สวน", "ชายหาด", "ฤดูร้อน", "ฝน", "ท้องฟ้า",
    "พระอาทิตย์", "ดวงจันทร์", "กลางคืน", "ตอนเช้า", "โปรโมชั่น", "ลดราคา", "ออนไลน์",
    "ตกแต่ง", "แบบ", "สไตล์",
)  # fmt: skip
_LONG_CAPTION_RATE = 0.0005

_PUNCT = (",", ".", ";", ":", "?", "!", ",", ".", "...")
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("``", "''"), ("`", "`"), ("(", ")"))
_CJK_PUNCT = ("\uff0c", "\u3002", "\u3001", "\uff01", "\uff1f", "\u300c", " ")
_EXTRA_TOKENS = (
    "-", "|", "&", "/", "+", "\u2013", "\u2014", "\u00b7", "x", "#1", "&amp;", "\u2764",
    "\u2605", "\u00ae", "\u2122", "2018", "2019", "2020", "2021", "2022", "2023", "1", "2",
    "3", "4", "5", "10", "12", "20", "24", "50", "100", "4k", "hd", "1920x1080", "3d", "10%",
    "$19.99", "vol.", "no.", "pt.", "(1)", "(2)",
)  # fmt: skip
_EXTRA_TOKEN_MASS = 0.04
_BOILERPLATE = (
    "image", "Image", "logo", "Logo", "click here", "Click here", "thumbnail", "Thumbnail",
    "photo", "picture", "img", "banner", "icon", "placeholder", "Click to enlarge", "Read more",
    "avatar", "untitled", "Untitled", "screenshot", "product image", "Loading...", "default",
    "spacer", "Home", "Facebook", "Twitter", "Instagram", "Pinterest", "YouTube", "RSS",
    "Search", "Menu", "Close", "Cart", "Next", "Previous", "alt", "Image may contain: 1 person",
    "No image available", "Featured image", "blank", "pic", "Gallery", "Zoom", "Print",
)  # fmt: skip
_FILE_NAMES = ("IMG_{:04d}.JPG", "DSC{:05d}.jpg", "DSC_{:04d}.JPG", "image{}.png", "photo-{}.jpg",
               "P{:07d}.JPG", "Screenshot_{}.png", "{}.jpg", "GOPR{:04d}.JPG")  # fmt: skip
_NAV_TEXT = (
    "Home", "About", "About us", "Contact", "Contact us", "Blog", "News", "Shop", "Login",
    "Sign in", "Register", "Privacy Policy", "Terms of Use", "FAQ", "Help", "Careers", "More",
    "Read more", "Continue reading", "Next page", "Previous", "Back to top", "Subscribe",
    "Share", "Tweet", "Pin it", "Comments", "Categories", "Archives", "Tags", "Search",
)  # fmt: skip
_HAND_BIGRAMS = (
    "new york", "york city", "new york city", "hot dog", "ice cream", "united states",
    "los angeles", "san francisco", "real estate", "high school", "living room",
    "wedding dress", "t shirt", "coffee table", "christmas tree", "credit card", "social media",
    "solar panel", "golden retriever", "teddy bear", "fire truck", "traffic light",
    "stop sign", "parking meter", "baseball bat", "tennis racket", "wine glass", "hair drier",
    "cell phone", "potted plant", "dining table", "sports ball", "hong kong", "new zealand",
    "south africa", "united kingdom", "san diego", "las vegas", "star wars", "harry potter",
    "black friday", "mother's day", "valentine's day", "world cup", "super bowl",
    "swimming pool", "bedroom ideas", "kitchen design", "wall art", "road trip", "sea turtle",
    "polar bear", "fried chicken", "french fries", "apple pie", "birthday cake", "cup cake",
    "sushi roll", "pizza hut", "eiffel tower", "grand canyon", "mount everest", "the beatles",
    "pop art", "oil painting", "water color", "black and white", "rock and roll",
)  # fmt: skip
_GRID_ADJ = ("red", "blue", "green", "black", "white", "old", "new", "big", "small", "vintage",
             "modern", "wooden", "cute", "happy", "golden", "pink", "dark", "little", "beautiful",
             "yellow")  # fmt: skip
_GRID_NOUN = ("car", "house", "dog", "cat", "table", "chair", "dress", "shoes", "flower", "bird",
              "tree", "bag", "door", "boat", "cake", "wall", "hat", "sky", "girl", "man")  # fmt: skip
_IMG_DIRS = (
    "/wp-content/uploads/2019/05/", "/wp-content/uploads/2021/11/", "/wp-content/uploads/2023/02/",
    "/images/", "/img/", "/media/catalog/product/", "/assets/", "/static/img/", "/uploads/",
    "/files/", "/photos/", "/content/dam/", "/sites/default/files/", "/pics/", "/gallery/thumbs/",
)  # fmt: skip
_IMG_EXTS = (".jpg", ".jpg", ".jpg", ".jpeg", ".png", ".png", ".gif", ".webp", ".JPG", ".svg")
_QUERIES = ("?w=300", "?resize=640%2C480", "?v=2", "?width=800&height=600", "?ssl=1", "?itok=x")
_CDN_HOSTS = ("cdn.example.com", "img.example.net", "static.example.org", "i0.example.com",
              "media.example.net", "images.example.org", "assets.example.com",
              "photos.test")  # fmt: skip
_SITE_PREFIX = ("www.", "www.", "", "blog.", "shop.", "m.")
_SITE_TLDS = (".example", ".test", ".example", ".example.com", ".example.org", ".example.net")
_PAGE_SUFFIX = ("", "/", ".html", ".htm", ".php", "/index.html", "?page=2", "?id=")
_SERVERS = ("nginx", "Apache", "cloudflare", "Microsoft-IIS/10.0", "LiteSpeed", "openresty")
_WEEKDAYS = ("Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed")  # 1970-01-01 was a Thursday
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CASES = (str, str.capitalize, str.title, str.upper, str.swapcase)
_DIGITS2 = re.compile(r"\d\d")
_B32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@dataclass
class SynthSummary:
    """What `write_synthetic_pool` wrote, with the ground truth per shard."""

    files: list[str]
    pairs_per_file: dict[str, int]
    malformed_per_file: dict[str, dict[str, int]]
    seconds: float
    records_per_file: dict[str, int] = field(default_factory=dict)

    @property
    def total_pairs(self) -> int:
        return sum(self.pairs_per_file.values())


@dataclass
class ShardTruth:
    """Ground truth of one generated shard."""

    pairs: int
    malformed: dict[str, int]
    records: int
    pages: int
    images: int
    #: Valid pairs per caption language (`KIND_LANGUAGES`; only languages with pairs).
    languages: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Vocabulary and concepts
# --------------------------------------------------------------------------------------------


def _ok_token(w: str) -> bool:
    return bool(w) and w.isprintable() and w.strip() == w and _SEP not in w


@lru_cache(maxsize=16)
def _vocab(lang: str, n: int) -> tuple[tuple[str, ...], np.ndarray]:
    """The `n` most frequent words of `lang` (no digit runs) and their wordfreq frequencies."""
    from wordfreq import get_frequency_list

    words: list[str] = []
    freqs: list[float] = []
    for centibels, band in enumerate(get_frequency_list(lang)):
        f = 10.0 ** (-centibels / 100.0)
        for w in band:
            if _ok_token(w) and not _DIGITS2.search(w):
                words.append(w)
                freqs.append(f)
                if len(words) >= n:
                    return tuple(words), np.asarray(freqs)
    return tuple(words), np.asarray(freqs)


@lru_cache(maxsize=4)
def _default_concepts_cached() -> tuple[str, ...]:
    words, _ = _vocab("en", 40_000)
    unigrams = [w for w in words if len(w) >= 2 and w.isalpha() and w.isascii()][:20_000]
    grid = [f"{a} {n}" for a in _GRID_ADJ for n in _GRID_NOUN]
    ranked: list[tuple[float, int, str]] = [(float(r), 0, w) for r, w in enumerate(unigrams)]
    ranked += [(40.0 + 25.0 * k + 0.5, 1, b) for k, b in enumerate(_HAND_BIGRAMS)]
    ranked += [(600.0 + 37.0 * k + 0.5, 2, b) for k, b in enumerate(grid)]
    ranked.sort()
    seen: set[str] = set()
    return tuple(c for _, _, c in ranked if not (c in seen or seen.add(c)))


def default_concepts() -> list[str]:
    """The default concept list, most popular first.

    The 20,000 most frequent English words of wordfreq (alphabetic, two letters or more), with
    about 470 bigrams / trigrams mixed in ("new york", "york city", "new york city", "hot dog",
    "ice cream", ..., and adjective-noun pairs like "red car"). Deterministic.
    """
    return list(_default_concepts_cached())


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(np.asarray(weights, dtype=np.float64))
    return c / c[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    idx = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(idx, len(cdf) - 1)


@dataclass(frozen=True)
class _Lexicon:
    en: np.ndarray  # object array of tokens: English words, then extra tokens
    en_cdf: np.ndarray
    other: dict[int, tuple[np.ndarray, np.ndarray]]  # caption kind -> (tokens, cdf)
    host_words: np.ndarray  # short alphabetic English words for host names and slugs
    concepts: np.ndarray
    concept_cdf: np.ndarray
    languages: bool | str


def _check_languages(languages: bool | str) -> None:
    if languages not in (False, *LANGUAGE_MODES):
        raise ValueError(f"languages must be True, False or 'worldwide', got {languages!r}")


def _kind_p(languages: bool | str) -> tuple[float, ...]:
    if languages == "worldwide":
        return _KIND_P_WORLD
    return _KIND_P_LANG if languages else _KIND_P_EN


@lru_cache(maxsize=8)
def _lexicon(languages: bool | str, concepts: tuple[str, ...] | None) -> _Lexicon:
    words, freqs = _vocab("en", 30_000)
    p = freqs / freqs.sum() * (1.0 - _EXTRA_TOKEN_MASS)
    extra_p = np.full(len(_EXTRA_TOKENS), _EXTRA_TOKEN_MASS / len(_EXTRA_TOKENS))
    en = np.array(list(words) + list(_EXTRA_TOKENS), dtype=object)
    other: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if languages:
        for kind, lang, n in ((_DE, "de", 8000), (_FR, "fr", 8000), (_ES, "es", 8000),
                              (_ZH, "zh", 5000), (_JA, "ja", 5000)):  # fmt: skip
            w, f = _vocab(lang, n)
            other[kind] = (np.array(w, dtype=object), _cdf(f))
    if languages == "worldwide":
        for kind, lang, n in ((_RU, "ru", 8000), (_PT, "pt", 8000), (_KO, "ko", 5000),
                              (_AR, "ar", 5000)):  # fmt: skip
            w, f = _vocab(lang, n)
            other[kind] = (np.array(w, dtype=object), _cdf(f))
        ranks = np.arange(len(_THAI_WORDS), dtype=np.float64)
        other[_TH] = (np.array(_THAI_WORDS, dtype=object), _cdf(1.0 / (ranks + 2.0)))
    host_words = np.array(
        [w for w in words[:6000] if w.isalpha() and w.isascii() and 3 <= len(w) <= 9], object
    )
    if concepts is None:
        concepts = _default_concepts_cached()
    concepts = tuple(c for c in concepts if c and c.strip())
    if not concepts:
        raise ValueError("concepts must contain at least one non-blank entry")
    ranks = np.arange(len(concepts), dtype=np.float64)
    concept_cdf = _cdf(1.0 / (ranks + 2.0) ** 1.05)
    return _Lexicon(
        en=en,
        en_cdf=_cdf(np.concatenate([p, extra_p])),
        other=other,
        host_words=host_words,
        concepts=np.array(concepts, dtype=object),
        concept_cdf=concept_cdf,
        languages=languages,
    )


# --------------------------------------------------------------------------------------------
# Vectorized text assembly
# --------------------------------------------------------------------------------------------


def _join_groups(tokens: np.ndarray, lengths: np.ndarray, sep: str) -> list[str]:
    """Join consecutive runs of `tokens` (run sizes `lengths`, all >= 1) with `sep`."""
    n = len(lengths)
    if n == 0:
        return []
    total = len(tokens) + n - 1
    out = np.empty(total, dtype=object)
    marks = np.cumsum(lengths[:-1]) + np.arange(n - 1)
    is_mark = np.zeros(total, dtype=bool)
    is_mark[marks] = True
    out[is_mark] = _SEP
    out[~is_mark] = tokens
    return sep.join(out.tolist()).split(sep + _SEP + sep)


def _word_groups(
    rng: np.random.Generator, vocab: np.ndarray, cdf: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    return vocab[_draw(rng, cdf, int(lengths.sum()))]


def _english(rng: np.random.Generator, lex: _Lexicon, n: int) -> list[str]:
    lengths = np.clip(np.rint(rng.lognormal(1.55, 0.65, n)), 1, 40).astype(np.int64)
    long = rng.random(n) < _LONG_CAPTION_RATE
    lengths[long] = rng.integers(180, 700, int(long.sum()))
    toks = _word_groups(rng, lex.en, lex.en_cdf, lengths)
    starts = np.cumsum(lengths) - lengths
    # Concepts replace 0-3 random positions of each caption.
    n_conc = np.searchsorted(np.array([0.28, 0.73, 0.92, 1.0]), rng.random(n), side="right")
    rep = np.repeat(np.arange(n), n_conc)
    if len(rep):
        pos = starts[rep] + (rng.random(len(rep)) * lengths[rep]).astype(np.int64)
        toks[pos] = lex.concepts[_draw(rng, lex.concept_cdf, len(rep))]
    _decorate_tokens(rng, toks, _PUNCT)
    return _join_groups(toks, lengths, " ")


def _decorate_tokens(rng: np.random.Generator, toks: np.ndarray, punct: Sequence[str]) -> None:
    """Attach punctuation to ~7% of tokens and wrap ~1% in quotes, in place."""
    t = len(toks)
    if t == 0:
        return
    u = rng.random(t)
    sel = np.flatnonzero(u < 0.07)
    toks[sel] = toks[sel] + np.array(punct, dtype=object)[rng.integers(0, len(punct), len(sel))]
    sel = np.flatnonzero(u > 0.99)
    q = rng.integers(0, len(_QUOTES), len(sel))
    left = np.array([a for a, _ in _QUOTES], dtype=object)[q]
    right = np.array([b for _, b in _QUOTES], dtype=object)[q]
    toks[sel] = left + toks[sel] + right


def _other_language(rng: np.random.Generator, lex: _Lexicon, kind: int, n: int) -> list[str]:
    vocab, cdf = lex.other[kind]
    if kind in (_ZH, _JA):
        lengths = rng.integers(1, 10, n)
        toks = _word_groups(rng, vocab, cdf, lengths)
        _decorate_tokens(rng, toks, _CJK_PUNCT)
        return _join_groups(toks, lengths, "")
    if kind == _TH:  # words run together; a space now and then between phrases
        lengths = rng.integers(1, 8, n)
        toks = _word_groups(rng, vocab, cdf, lengths)
        _decorate_tokens(rng, toks, (" ", " ", " ", "!"))
        return [c.strip() or c for c in _join_groups(toks, lengths, "")]
    lengths = np.clip(np.rint(rng.lognormal(1.5, 0.6, n)), 1, 30).astype(np.int64)
    toks = _word_groups(rng, vocab, cdf, lengths)
    _decorate_tokens(rng, toks, _PUNCT)
    return _join_groups(toks, lengths, " ")


def _boilerplate(rng: np.random.Generator, n: int) -> list[str]:
    out = np.array(_BOILERPLATE, dtype=object)[rng.integers(0, len(_BOILERPLATE), n)]
    files = np.flatnonzero(rng.random(n) < 0.35)
    fmt = rng.integers(0, len(_FILE_NAMES), len(files)).tolist()
    num = rng.integers(1, 99999, len(files)).tolist()
    for j, f, k in zip(files.tolist(), fmt, num, strict=True):
        out[j] = _FILE_NAMES[f].format(k)
    return out.tolist()


def _captions(rng: np.random.Generator, lex: _Lexicon, n: int) -> list[str]:
    """`n` alt-text-like captions, each non-empty after newline replacement and stripping."""
    return _captions_kinds(rng, lex, n)[0]


def _captions_kinds(
    rng: np.random.Generator, lex: _Lexicon, n: int
) -> tuple[list[str], np.ndarray]:
    """`_captions` and the kind of each caption (an index into `KIND_LANGUAGES`)."""
    if n == 0:
        return [], np.zeros(0, dtype=np.int64)
    p = _kind_p(lex.languages)
    kind = _draw(rng, _cdf(p), n)
    out = np.empty(n, dtype=object)
    for k in range(len(p)):
        idx = np.flatnonzero(kind == k)
        if len(idx) == 0:
            continue
        if k == _EN:
            caps = _english(rng, lex, len(idx))
        elif k == _BOILER:
            caps = _boilerplate(rng, len(idx))
        else:
            caps = _other_language(rng, lex, k, len(idx))
        out[idx] = np.array(caps, dtype=object)
    # Case variants (not for file names and boilerplate).
    case = _draw(rng, _cdf((0.50, 0.30, 0.12, 0.05, 0.03)), n)
    case[kind == _BOILER] = 0
    for j, c in zip(np.flatnonzero(case > 0).tolist(), case[case > 0].tolist(), strict=True):
        out[j] = _CASES[c](out[j])
    # Whitespace inside (tab, newline, CR) and around some captions.
    u = rng.random(n)
    ws = ("\n", "\t", "\r\n", " \n ", "  ", "\r")
    sel = np.flatnonzero(u < 0.03)
    for j, w in zip(sel.tolist(), rng.integers(0, len(ws), len(sel)).tolist(), strict=True):
        out[j] = out[j].replace(" ", ws[w], 1)
    for j in np.flatnonzero(u > 0.975).tolist():
        out[j] = (" " if u[j] > 0.99 else "") + out[j] + (" \n" if u[j] > 0.985 else " ")
    return out.tolist(), kind


# --------------------------------------------------------------------------------------------
# Ids, dates, digests
# --------------------------------------------------------------------------------------------


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def _uuids(rng: np.random.Generator, n: int) -> list[str]:
    """`n` version-4-shaped UUID strings from the generator (reproducible, unlike uuid4)."""
    if n == 0:
        return []
    hexed = np.frombuffer(rng.bytes(16 * n).hex().encode(), dtype="S1").reshape(n, 32)
    out = np.empty((n, 36), dtype="S1")
    out[:, [8, 13, 18, 23]] = b"-"
    out[:, 0:8] = hexed[:, 0:8]
    out[:, 9:13] = hexed[:, 8:12]
    out[:, 14:18] = hexed[:, 12:16]
    out[:, 14] = b"4"
    out[:, 19:23] = hexed[:, 16:20]
    out[:, 19] = np.array(list(b"89ab"), dtype=np.uint8).view("S1")[rng.integers(0, 4, n)]
    out[:, 24:36] = hexed[:, 20:32]
    return out.view("S36").ravel().astype(str).tolist()


def _digests(rng: np.random.Generator, n: int) -> list[str]:
    """`n` sha1-shaped base32 digests (32 characters)."""
    if n == 0:
        return []
    bits = np.unpackbits(np.frombuffer(rng.bytes(20 * n), dtype=np.uint8)).reshape(-1, 5)
    codes = bits @ np.array([16, 8, 4, 2, 1], dtype=np.uint8)
    chars = np.frombuffer(_B32, dtype=np.uint8)[codes]
    return chars.view("S32").astype(str).tolist()


def _dates(seed: int, index: int, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    """ISO WARC dates and RFC 1123 HTTP dates, increasing through the shard."""
    base = np.datetime64("2020-01-01T00:00:00", "s")
    base = base + np.timedelta64(int(seed % 1461) * 86400 + (index % 2000) * 1800, "s")
    stamps = base + np.cumsum(rng.integers(0, 3, max(n, 1)))[:n].astype("timedelta64[s]")
    iso = np.datetime_as_string(stamps, unit="s").tolist()
    days = (stamps.astype("datetime64[D]").astype(np.int64) % 7).tolist()
    http = [
        f"{_WEEKDAYS[d]}, {s[8:10]} {_MONTHS[int(s[5:7])]} {s[0:4]} {s[11:19]} GMT"
        for s, d in zip(iso, days, strict=True)
    ]
    return [s + "Z" for s in iso], http


def _ips(rng: np.random.Generator, n: int) -> list[str]:
    o = rng.integers(1, 255, (n, 4)).tolist()
    return [f"{a}.{b}.{c}.{d}" for a, b, c, d in o]


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str], n: int) -> np.ndarray:
    return np.array(options, dtype=object)[rng.integers(0, len(options), n)]


def _slugs(rng: np.random.Generator, lex: _Lexicon, n: int) -> np.ndarray:
    """File-name stems: dashed words, camera names, hex hashes, numeric ids."""
    out = np.empty(n, dtype=object)
    kind = _draw(rng, _cdf((0.5, 0.15, 0.25, 0.10)), n)
    idx = np.flatnonzero(kind == 0)
    lengths = rng.integers(1, 5, len(idx))
    words = lex.host_words[rng.integers(0, len(lex.host_words), int(lengths.sum()))]
    out[idx] = np.array(_join_groups(words, lengths, "-"), dtype=object)
    idx = np.flatnonzero(kind == 1)
    nums = rng.integers(0, 100_000, len(idx)).tolist()
    cam = rng.integers(0, 3, len(idx)).tolist()
    out[idx] = np.array(
        [
            ("IMG_%04d" if c == 0 else "DSC%05d" if c == 1 else "P%07d") % k
            for c, k in zip(cam, nums, strict=True)
        ],
        dtype=object,
    )
    idx = np.flatnonzero(kind == 2)
    if len(idx):
        hexed = np.frombuffer(rng.bytes(8 * len(idx)).hex().encode(), dtype="S16")
        out[idx] = hexed.astype(str).astype(object)
    idx = np.flatnonzero(kind == 3)
    out[idx] = rng.integers(1000, 10_000_000, len(idx)).astype(str).astype(object)
    return out


def _hosts(rng: np.random.Generator, lex: _Lexicon, n: int) -> np.ndarray:
    w = lex.host_words
    a = w[rng.integers(0, len(w), n)]
    b = w[rng.integers(0, len(w), n)]
    dash = np.where(rng.random(n) < 0.3, "-", "").astype(object)
    return _pick(rng, _SITE_PREFIX, n) + a + dash + b + _pick(rng, _SITE_TLDS, n)


def _image_urls(
    rng: np.random.Generator, lex: _Lexicon, n: int, page_hosts: np.ndarray
) -> np.ndarray:
    """Image URLs of all kinds: absolute, CDN, root-relative, `../x`, `x/y`, `//cdn/x`."""
    kind = _draw(rng, _cdf((0.30, 0.20, 0.25, 0.07, 0.08, 0.10)), n)
    dirs = _pick(rng, _IMG_DIRS, n)
    cdn = _pick(rng, _CDN_HOSTS, n)
    scheme = np.where(rng.random(n) < 0.85, "https://", "http://").astype(object)
    prefix = np.empty(n, dtype=object)
    for k, mk in enumerate(
        (
            lambda m: scheme[m] + page_hosts[m] + dirs[m],
            lambda m: scheme[m] + cdn[m] + dirs[m],
            lambda m: dirs[m],
            lambda m: "../" + np.array([d[1:] for d in dirs[m]], dtype=object),
            lambda m: np.array([d[1:] for d in dirs[m]], dtype=object),
            lambda m: "//" + cdn[m] + dirs[m],
        )
    ):
        m = kind == k
        if m.any():
            prefix[m] = mk(m)
    query = np.where(rng.random(n) < 0.1, _pick(rng, _QUERIES, n), "").astype(object)
    return prefix + _slugs(rng, lex, n) + _pick(rng, _IMG_EXTS, n) + query


@dataclass(frozen=True)
class _Popular:
    urls: np.ndarray
    alts: np.ndarray
    cdf: np.ndarray
    kinds: np.ndarray  # caption kind of each alt


@lru_cache(maxsize=8)
def _popular(seed: int, languages: bool | str, concepts: tuple[str, ...] | None) -> _Popular:
    """Images that recur across pages and shards (logos, icons, stock photos): seed only."""
    lex = _lexicon(languages, concepts)
    rng = _rng(seed, 2**31 - 1)
    n = 3000
    hosts = _pick(rng, _CDN_HOSTS, n)
    urls = _image_urls(rng, lex, n, hosts)
    absolute = np.where(rng.random(n) < 0.5, "https://", "//").astype(object)
    urls = np.array(
        [u if u.startswith(("http", "//")) else a + h + "/" + u.lstrip("./") for u, a, h in
         zip(urls.tolist(), absolute.tolist(), hosts.tolist(), strict=True)],
        dtype=object,
    )  # fmt: skip
    caps, kinds = _captions_kinds(rng, lex, n)
    alts = np.array(caps, dtype=object)
    boiler = np.flatnonzero(rng.random(n) < 0.5)
    alts[boiler] = np.array(_boilerplate(rng, len(boiler)), dtype=object)
    kinds[boiler] = _BOILER
    ranks = np.arange(n, dtype=np.float64)
    return _Popular(urls=urls, alts=alts, cdf=_cdf(1.0 / (ranks + 1.0) ** 1.2), kinds=kinds)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _gzip_member(out: list[bytes], data: bytes) -> None:
    """Append one gzip member holding `data` to `out` (as header, deflate body, trailer)."""
    c = zlib.compressobj(_GZ_LEVEL, zlib.DEFLATED, -_GZ_WBITS, _GZ_MEMLEVEL)
    out.append(_GZ_HEADER)
    out.append(c.compress(data))
    out.append(c.flush())
    out.append(struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF))


def _wat_record(
    out: list[bytes], target: str, date: str, rec_id: str, refers: str, payload: bytes
) -> None:
    head = (
        "WARC/1.0\r\nWARC-Type: metadata\r\n"
        f"WARC-Target-URI: {target}\r\nWARC-Date: {date}\r\n"
        f"WARC-Record-ID: <urn:uuid:{rec_id}>\r\nWARC-Refers-To: <urn:uuid:{refers}>\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    _gzip_member(out, head.encode() + payload + b"\r\n\r\n")


def _warcinfo(
    out: list[bytes], seed: int, index: int, date: str, rec_id: str, filename: str
) -> None:
    body = (
        "Software-Info: curation.synth.wat/" + str(SYNTH_VERSION) + "\r\n"
        f"Extracted-Date: {date}\r\n"
        "isPartOf: CC-MAIN-SYNTHETIC\r\n"
        "operator: curation synthetic generator\r\n"
        f"description: Synthetic CommonCrawl-style WAT (seed={seed}, shard={index})\r\n"
        "publisher: curation\r\n"
        "format: WARC File Format 1.0\r\n"
        "conformsTo: https://iipc.github.io/warc-specifications/specifications/warc-format/"
        "warc-1.0/\r\n"
    ).encode()
    head = (
        "WARC/1.0\r\nWARC-Type: warcinfo\r\n"
        f"WARC-Date: {date}\r\nWARC-Filename: {filename}\r\n"
        f"WARC-Record-ID: <urn:uuid:{rec_id}>\r\n"
        f"Content-Type: application/warc-fields\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    _gzip_member(out, head.encode() + body + b"\r\n\r\n")


def _container(fname: str, offset: int, inflated: int) -> str:
    return (
        '{"IsGzipped":true,"Compressed":true,"Gzip-Metadata":{"Deflate-Length":"'
        f'{inflated // 4 + 97}","Header-Length":"10","Footer-Length":"8","Inflated-CRC":"'
        f'{(offset * 2654435761) % 4294967296 - 2147483648}","Inflated-Length":"{inflated}"}},'
        f'"Filename":"{fname}","Offset":"{offset}"}}'
    )


def shard_file_name(index: int) -> str:
    """File name of shard `index`: `synth-00000.warc.wat.gz`."""
    return f"synth-{index:05d}.warc.wat.gz"


def _draw_states(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    alt = _draw(rng, _cdf(_ALT_P), n)
    title = _draw(rng, _cdf(_TITLE_P), n)
    dit = _draw(rng, _cdf(_DIT_P), n)
    title[(title == _SAME_AS_ALT) & (alt != _TEXT)] = _ABSENT
    return alt, title, dit


def _pair_counts(alt: np.ndarray, title: np.ndarray, dit: np.ndarray) -> np.ndarray:
    return (
        (alt == _TEXT).astype(np.int64)
        + ((title == _TEXT) | (title == _SAME_AS_ALT))
        + (dit == _TEXT)
    )


def generate_shard(
    seed: int,
    index: int,
    pairs: int,
    *,
    malformed_rate: float = 0.0,
    languages: bool | str = True,
    concepts: Sequence[str] | None = None,
) -> tuple[bytes, ShardTruth]:
    """Generate shard `index` of the pool `seed` in memory: the gzipped WAT bytes and its truth.

    The result depends only on the arguments, so shards can be generated in any order or in
    parallel. `pairs` valid pairs exactly (see the module docstring for the rules). `languages`:
    False for English only, True for en/de/fr/es/zh/ja, `"worldwide"` for those plus th, ru,
    pt, ko and ar; the truth counts the pairs of each caption language either way.
    """
    _check_languages(languages)
    if pairs < 0:
        raise ValueError("pairs must be >= 0")
    if not 0.0 <= malformed_rate <= 1.0:
        raise ValueError("malformed_rate must be in [0, 1]")
    ctuple = None if concepts is None else tuple(concepts)
    lex = _lexicon(languages, ctuple)
    popular = _popular(seed, languages, ctuple)
    rng = _rng(seed, index)
    fname = shard_file_name(index)
    src_name = f"CC-MAIN-SYNTH-{seed % 100000:05d}-{index:05d}.warc.gz"

    # ---- images with exactly `pairs` valid texts ------------------------------------------
    parts: list[tuple[np.ndarray, ...]] = []
    got = 0
    while got < pairs:
        n_draw = max(64, int((pairs - got) * 1.03) + 64)
        st = _draw_states(rng, n_draw)
        parts.append(st)
        got += int(_pair_counts(*st).sum())
    if parts:
        alt_s, title_s, dit_s = (np.concatenate([p[k] for p in parts]) for k in range(3))
        cum = np.cumsum(_pair_counts(alt_s, title_s, dit_s))
        last = int(np.searchsorted(cum, pairs))  # first image reaching `pairs`
        alt_s, title_s, dit_s = alt_s[: last + 1], title_s[: last + 1], dit_s[: last + 1]
        extra = int(cum[last]) - pairs
        for arr in (dit_s, title_s, alt_s):  # drop surplus texts from the last image
            if extra > 0 and arr[last] in (_TEXT, _SAME_AS_ALT):
                if arr is alt_s and title_s[last] == _SAME_AS_ALT:
                    title_s[last] = _TEXT
                arr[last] = _ABSENT
                extra -= 1
    else:
        alt_s = title_s = dit_s = np.zeros(0, dtype=np.int64)
    n_img = len(alt_s)

    # ---- pages --------------------------------------------------------------------------
    sizes_l: list[np.ndarray] = []
    total = 0
    while total < n_img:
        s = np.where(rng.random(4096) < 0.10, 0, 1 + rng.negative_binomial(1.5, 1.5 / 10.5, 4096))
        sizes_l.append(s)
        total += int(s.sum())
    sizes = np.concatenate(sizes_l) if sizes_l else np.zeros(0, dtype=np.int64)
    if n_img:
        cs = np.cumsum(sizes)
        n_valid = int(np.searchsorted(cs, n_img)) + 1
        sizes = sizes[:n_valid].copy()
        sizes[-1] -= int(cs[n_valid - 1]) - n_img
    else:
        n_valid = 0
        sizes = sizes[:0]
    img_page = np.repeat(np.arange(n_valid), sizes)

    # ---- malformed injection ------------------------------------------------------------
    malformed = dict.fromkeys(MALFORMED_REASONS, 0)
    n_bad = int(rng.binomial(n_valid, malformed_rate)) if malformed_rate > 0 and n_valid else 0
    reason = _draw(rng, _cdf((0.25, 0.2, 0.0, 0.3, 0.25)), n_bad)
    n_null = int((reason == 3).sum())
    ghost_kind = reason[reason != 3]  # 0 bad_json, 1 bad_utf8, 4 missing_links
    n_ghost = len(ghost_kind)
    for r, name in ((0, "bad_json"), (1, "bad_utf8"), (3, "null_url"), (4, "missing_links")):
        malformed[name] = int((reason == r).sum())
    n_pages = n_valid + n_ghost

    # ---- page-level fields (valid pages first, ghosts after; shuffled into order below) --
    n_sites = max(1, n_pages // 8)
    site_hosts = _hosts(rng, lex, n_sites)
    page_site = np.minimum((rng.pareto(1.2, n_pages) * n_sites / 20).astype(np.int64), n_sites - 1)
    page_hosts = site_hosts[page_site]
    plen = rng.integers(1, 5, n_pages)
    pwords = lex.host_words[rng.integers(0, len(lex.host_words), int(plen.sum()))]
    paths = np.array(_join_groups(pwords, plen, "-"), dtype=object)
    psuf = _pick(rng, _PAGE_SUFFIX, n_pages)
    psuf = np.where(psuf == "?id=", psuf + rng.integers(1, 99999, n_pages).astype(str), psuf)
    pscheme = np.where(rng.random(n_pages) < 0.8, "https://", "http://").astype(object)
    page_urls = (pscheme + page_hosts + "/" + paths + psuf.astype(object)).tolist()
    titles = _captions(rng, lex, n_pages)
    brand = np.flatnonzero(rng.random(n_pages) < 0.3)
    for j in brand.tolist():
        titles[j] = titles[j] + " | " + max(page_hosts[j].split("."), key=len).capitalize()

    # ---- image links ----------------------------------------------------------------------
    pop = rng.random(n_img) < 0.10
    pop_idx = _draw(rng, popular.cdf, int(pop.sum()))
    urls = _image_urls(rng, lex, n_img, page_hosts[img_page])
    urls[pop] = popular.urls[pop_idx]
    text_need = [
        np.flatnonzero((alt_s == _TEXT) & ~pop),
        np.flatnonzero(title_s == _TEXT),
        np.flatnonzero(dit_s == _TEXT),
    ]
    caps, cap_kinds = _captions_kinds(rng, lex, sum(len(t) for t in text_need))
    alt_text = np.empty(n_img, dtype=object)
    title_text = np.empty(n_img, dtype=object)
    dit_text = np.empty(n_img, dtype=object)
    text_kinds = [np.full(n_img, -1, dtype=np.int64) for _ in range(3)]  # alt, title, dit
    o = 0
    for arr, tk, idx in zip((alt_text, title_text, dit_text), text_kinds, text_need, strict=True):
        arr[idx] = np.array(caps[o : o + len(idx)], dtype=object)
        tk[idx] = cap_kinds[o : o + len(idx)]
        o += len(idx)
    alt_text[pop] = popular.alts[pop_idx]
    text_kinds[0][pop] = popular.kinds[pop_idx]
    same = title_s == _SAME_AS_ALT
    title_text[same] = alt_text[same]
    text_kinds[1][same] = text_kinds[0][same]
    pair_kinds = np.concatenate(
        [
            text_kinds[0][alt_s == _TEXT],
            text_kinds[1][(title_s == _TEXT) | same],
            text_kinds[2][dit_s == _TEXT],
        ]
    )
    if len(pair_kinds) != pairs or (pair_kinds < 0).any():  # pragma: no cover - invariant
        raise AssertionError("synth: a pair has no caption kind")
    per_kind = np.bincount(pair_kinds, minlength=len(KIND_LANGUAGES))
    pair_langs = {KIND_LANGUAGES[k]: int(c) for k, c in enumerate(per_kind.tolist()) if c}
    huge = -1
    if malformed_rate > 0:
        cand = np.flatnonzero((alt_s == _TEXT) & ~pop & ~same)
        if len(cand):
            huge = h = int(cand[rng.integers(0, len(cand))])
            unit = alt_text[h].replace("\n", " ").replace("\r", " ").strip() + " "
            alt_text[h] = (unit * (HUGE_TEXT_CHARS // len(unit) + 1))[:HUGE_TEXT_CHARS]
            malformed["huge_text"] = 1

    blanks = np.array(_BLANKS, dtype=object)
    link_json = np.full(n_img, '{"path":"IMG@/src","url":', dtype=object) + np.array(
        [_ENC(u) for u in urls.tolist()], dtype=object
    )
    for key, st, txt in (("alt", alt_s, alt_text), ("title", title_s, title_text),
                         ("data-image-title", dit_s, dit_text)):  # fmt: skip
        part = np.full(n_img, "", dtype=object)
        m = (st == _TEXT) | (st == _SAME_AS_ALT)
        part[m] = np.array([f',"{key}":{_ENC(t)}' for t in txt[m].tolist()], dtype=object)
        part[st == _EMPTY] = f',"{key}":""'
        mb = np.flatnonzero(st == _BLANK)
        part[mb] = np.array(
            [f',"{key}":{_ENC(b)}' for b in blanks[rng.integers(0, len(blanks), len(mb))]],
            dtype=object,
        )
        link_json = link_json + part
    link_json = link_json + "}"

    # Extra links that yield no pairs: lazy-load data-src, anchors, scripts, null urls.
    lazy = np.flatnonzero((rng.random(n_img) < 0.05) & (np.arange(n_img) != huge))
    lazy_json = np.array(
        [
            f'{{"path":"IMG@/data-src","url":{_ENC(u)},"alt":{_ENC(t or "lazy image")}}}'
            for u, t in zip(urls[lazy].tolist(), alt_text[lazy].tolist(), strict=True)
        ],
        dtype=object,
    )
    anchor_pool = _anchor_pool(rng, lex)
    n_anchor = rng.poisson(6.0, n_valid)
    anchors = anchor_pool[rng.integers(0, len(anchor_pool), int(n_anchor.sum()))]
    null_pages = rng.integers(0, max(n_valid, 1), n_null)
    null_caps = _captions(rng, lex, n_null)
    null_json = np.array(
        [
            ('{"path":"IMG@/src","url":null,"alt":%s}', '{"path":"IMG@/src","alt":%s}',
             '{"path":"IMG@/src","url":"","alt":%s}', '{"path":"IMG@/src","title":%s}')[v]
            % _ENC(c)
            for v, c in zip(rng.integers(0, 4, n_null).tolist(), null_caps, strict=True)
        ],
        dtype=object,
    )  # fmt: skip
    all_links = np.concatenate([link_json, lazy_json, anchors, null_json])
    all_page = np.concatenate(
        [img_page, img_page[lazy], np.repeat(np.arange(n_valid), n_anchor), null_pages]
    ).astype(np.int64)
    order = np.lexsort((rng.random(len(all_links)), all_page))
    all_links = all_links[order].tolist()
    bounds = np.searchsorted(all_page[order], np.arange(n_valid + 1)).tolist()
    page_links = [",".join(all_links[bounds[p] : bounds[p + 1]]) for p in range(n_valid)]
    if n_ghost:
        donors = rng.integers(0, max(n_valid, 1), n_ghost).tolist()
        page_links += [page_links[d] if n_valid else "" for d in donors]
    del all_links, link_json, alt_text, title_text, dit_text

    # ---- shuffle ghosts in, then write records -------------------------------------------
    kind = np.concatenate([np.full(n_valid, -1), ghost_kind]).astype(np.int64)
    perm = np.arange(n_pages)
    if n_ghost:
        perm = rng.permutation(n_pages)
    variant = rng.integers(0, 3, n_pages).tolist()
    cut = rng.uniform(0.2, 0.95, n_pages).tolist()
    iso, http = _dates(seed, index, rng, n_pages + 1)
    ids = _uuids(rng, 6 * n_pages + 2)
    digs = _digests(rng, 4 * n_pages)
    ips = _ips(rng, n_pages)
    servers = _pick(rng, _SERVERS, n_pages).tolist()
    sizes_i = rng.integers(2_000, 400_000, n_pages).tolist()
    hdr_len = rng.integers(250, 700, n_pages).tolist()
    fetch_ms = rng.integers(20, 5000, n_pages).tolist()
    warcinfo_src = ids[-1]
    out: list[bytes] = []
    _warcinfo(out, seed, index, iso[0], ids[-2], fname)
    offset = 0
    for q in range(n_pages):
        p = int(perm[q])
        url = page_urls[p]
        eurl = _ENC(url)
        date = iso[q + 1]
        i6 = 6 * q
        wid_req, wid_resp, wid_meta, sid_req, sid_resp, sid_meta = ids[i6 : i6 + 6]
        d4 = 4 * q
        size = sizes_i[q]
        path = url.split("/", 3)[3] if url.count("/") >= 3 else ""
        host = url.split("/", 3)[2]

        req = (
            f'{{"Container":{_container(src_name, offset, 600)},"Envelope":{{"Format":"WARC",'
            f'"WARC-Header-Length":"{hdr_len[q] + 80}","Block-Digest":"sha1:{digs[d4]}",'
            f'"Actual-Content-Length":"{hdr_len[q] - 40}","WARC-Header-Metadata":{{'
            f'"WARC-Type":"request","WARC-Date":"{date}","WARC-Record-ID":"<urn:uuid:{sid_req}>",'
            f'"Content-Length":"{hdr_len[q] - 40}","Content-Type":"application/http; msgtype=request",'
            f'"WARC-Warcinfo-ID":"<urn:uuid:{warcinfo_src}>","WARC-IP-Address":"{ips[q]}",'
            f'"WARC-Target-URI":{eurl},"WARC-Block-Digest":"sha1:{digs[d4]}"}},'
            f'"Payload-Metadata":{{"Actual-Content-Type":"application/http; msgtype=request",'
            f'"HTTP-Request-Metadata":{{"Request-Message":{{"Method":"GET","Path":{_ENC("/" + path)},'
            f'"Version":"HTTP/1.1"}},"Headers-Length":"{hdr_len[q] - 40}","Headers":{{'
            f'"Host":"{host}","Accept":"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",'
            f'"Accept-Language":"en-US,en;q=0.5","User-Agent":"CCBot/2.0 (https://commoncrawl.org/faq/)",'
            f'"Accept-Encoding":"br,gzip","Connection":"Keep-Alive"}},"Entity-Length":"0",'
            f'"Entity-Digest":"sha1:3I42H3S6NNFQ2MSVX7XZKYAYSCX5QBYJ","Entity-Trailing-Slop-Length":"0"}}}}}}}}'
        )
        offset += 600
        k = int(kind[p])
        status = '{"Version":"HTTP/1.1","Status":"200","Reason":"OK"}'
        html = (
            f',"HTML-Metadata":{{"Head":{{"Title":{_ENC(titles[p])},"Metas":[{{"name":"viewport",'
            f'"content":"width=device-width, initial-scale=1"}},{{"name":"generator",'
            f'"content":"WordPress 6.2"}}]}},"Links":[{page_links[p]}]}}'
        )
        ptype = "text/html"
        if k == 4:  # missing_links: a redirect, a non-HTML body, or HTML with no Links
            if variant[q] == 0:
                status = '{"Version":"HTTP/1.1","Status":"301","Reason":"Moved Permanently"}'
                html = ""
            elif variant[q] == 1:
                ptype = "image/jpeg"
                html = ""
            else:
                html = f',"HTML-Metadata":{{"Head":{{"Title":{_ENC(titles[p])}}}}}'
        resp = (
            f'{{"Container":{_container(src_name, offset, size)},"Envelope":{{"Format":"WARC",'
            f'"WARC-Header-Length":"{hdr_len[q] + 120}","Block-Digest":"sha1:{digs[d4 + 1]}",'
            f'"Actual-Content-Length":"{size}","WARC-Header-Metadata":{{"WARC-Type":"response",'
            f'"WARC-Date":"{date}","WARC-Record-ID":"<urn:uuid:{sid_resp}>",'
            f'"Content-Length":"{size}","Content-Type":"application/http; msgtype=response",'
            f'"WARC-Warcinfo-ID":"<urn:uuid:{warcinfo_src}>",'
            f'"WARC-Concurrent-To":"<urn:uuid:{sid_req}>","WARC-IP-Address":"{ips[q]}",'
            f'"WARC-Target-URI":{eurl},"WARC-Payload-Digest":"sha1:{digs[d4 + 2]}",'
            f'"WARC-Block-Digest":"sha1:{digs[d4 + 1]}","WARC-Identified-Payload-Type":"{ptype}"}},'
            f'"Payload-Metadata":{{"Actual-Content-Type":"application/http; msgtype=response",'
            f'"HTTP-Response-Metadata":{{"Response-Message":{status},"Headers":{{"Date":"{http[q]}",'
            f'"Server":"{servers[q]}","Content-Type":"{ptype}; charset=UTF-8","Connection":"close",'
            f'"Vary":"Accept-Encoding"}},"Headers-Length":"{hdr_len[q]}",'
            f'"Entity-Length":"{size - hdr_len[q]}","Entity-Trailing-Slop-Length":"0",'
            f'"Entity-Digest":"sha1:{digs[d4 + 2]}"{html}}}}}}}}}'
        )
        offset += size // 4
        if k == 0:  # bad_json: truncated, or an unescaped quote in a text
            if variant[q] < 2:
                resp = resp[: max(1, int(len(resp) * cut[q]))]
            else:
                resp = resp.replace(
                    '"Links":[',
                    '"Links":[{"path":"IMG@/src","url":"/a.jpg","alt":"say "cheese""},',
                    1,
                )
                if '"Links":[' not in resp:
                    resp = resp[:-1]
            resp_b = resp.encode()
        elif k == 1:  # bad_utf8: Latin-1 bytes or a broken multi-byte sequence in the title
            bad = (b"\xe9t\xe9 ", b"\xc3\x28 ", b"\xe4\xb8 ", b"\xff\xfe ")[
                variant[q] + (cut[q] > 0.6)
            ]
            resp_b = resp.encode().replace(b'"Title":"', b'"Title":"' + bad, 1)
        else:
            resp_b = resp.encode()
        meta = (
            f'{{"Container":{_container(src_name, offset, 400)},"Envelope":{{"Format":"WARC",'
            f'"WARC-Header-Length":"{hdr_len[q] + 60}","Block-Digest":"sha1:{digs[d4 + 3]}",'
            f'"Actual-Content-Length":"120","WARC-Header-Metadata":{{"WARC-Type":"metadata",'
            f'"WARC-Date":"{date}","WARC-Record-ID":"<urn:uuid:{sid_meta}>","Content-Length":"120",'
            f'"Content-Type":"application/warc-fields","WARC-Warcinfo-ID":"<urn:uuid:{warcinfo_src}>",'
            f'"WARC-Concurrent-To":"<urn:uuid:{sid_resp}>","WARC-Target-URI":{eurl}}},'
            f'"Payload-Metadata":{{"Actual-Content-Type":"application/metadata-fields",'
            f'"WARC-Metadata-Metadata":{{"Metadata-Records":[{{"Name":"fetchTimeMs",'
            f'"Value":"{fetch_ms[q]}"}},{{"Name":"charset-detected","Value":"UTF-8"}}]}}}}}}}}'
        )
        offset += 400
        _wat_record(out, url, date, wid_req, sid_req, req.encode())
        _wat_record(out, url, date, wid_resp, sid_resp, resp_b)
        _wat_record(out, url, date, wid_meta, sid_meta, meta.encode())

    truth = ShardTruth(
        pairs=pairs, malformed=malformed, records=1 + 3 * n_pages, pages=n_pages, images=n_img,
        languages=pair_langs,
    )  # fmt: skip
    return b"".join(out), truth


def _anchor_pool(rng: np.random.Generator, lex: _Lexicon, n: int = 2000) -> np.ndarray:
    """Pre-rendered `A@/href` (and a few `LINK@/href` / `SCRIPT@/src`) link objects."""
    lengths = rng.integers(1, 4, n)
    texts = _join_groups(_word_groups(rng, lex.en, lex.en_cdf, lengths), lengths, " ")
    nav = np.flatnonzero(rng.random(n) < 0.4)
    for j, t in zip(nav.tolist(), _pick(rng, _NAV_TEXT, len(nav)).tolist(), strict=True):
        texts[j] = t
    slugs = _slugs(rng, lex, n).tolist()
    hosts = _hosts(rng, lex, n).tolist()
    kinds = rng.integers(0, 10, n).tolist()
    out = []
    for t, s, h, k in zip(texts, slugs, hosts, kinds, strict=True):
        if k < 5:
            out.append(f'{{"path":"A@/href","url":"/{s}","text":{_ENC(t)}}}')
        elif k < 8:
            out.append(f'{{"path":"A@/href","url":"https://{h}/{s}","text":{_ENC(t)}}}')
        elif k == 8:
            out.append(f'{{"path":"A@/href","url":"#","title":{_ENC(t)}}}')
        else:
            out.append(
                f'{{"path":"LINK@/href","rel":"stylesheet","url":"/static/{s}.css"}}'
                if len(s) % 2
                else f'{{"path":"SCRIPT@/src","url":"/static/{s}.js"}}'
            )
    return np.array(out, dtype=object)


# --------------------------------------------------------------------------------------------
# Pool
# --------------------------------------------------------------------------------------------


def write_synthetic_pool(
    out_dir: str,
    shards: int,
    pairs_per_shard: int,
    seed: int,
    *,
    malformed_rate: float = 0.0,
    languages: bool | str = True,
    concepts: Sequence[str] | None = None,
) -> SynthSummary:
    """Write `shards` synthetic WAT shards and `synth_truth.json` under `out_dir` (any fsspec URL).

    Each shard holds exactly `pairs_per_shard` valid (image URL, text) pairs under the extraction
    rules of this module's docstring, plus, when `malformed_rate` > 0, bad records on roughly that
    fraction of pages (reasons in `MALFORMED_REASONS`; `huge_text`, one 10 MB alt-text per shard,
    is a valid pair and counts in `pairs_per_file`). Same arguments give byte-identical files.
    File URLs are spelled as `curation.core.fsio.expand_inputs` spells them. With
    `languages="worldwide"`, `synth_truth.json` also has `pairs_per_language` (over the pool)
    and `pairs_per_language_per_file`; the other modes write the same bytes as before.
    """
    _check_languages(languages)
    if shards < 0:
        raise ValueError("shards must be >= 0")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if pairs_per_shard < 0:
        raise ValueError("pairs_per_shard must be >= 0")
    if not 0.0 <= malformed_rate <= 1.0:
        raise ValueError("malformed_rate must be in [0, 1]")
    t0 = time.perf_counter()
    concepts = None if concepts is None else tuple(concepts)
    fs, root = url_to_fs(out_dir)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    files: list[str] = []
    pairs: dict[str, int] = {}
    malformed: dict[str, dict[str, int]] = {}
    records: dict[str, int] = {}
    langs: dict[str, dict[str, int]] = {}
    for i in range(shards):
        data, truth = generate_shard(
            seed,
            i,
            pairs_per_shard,
            malformed_rate=malformed_rate,
            languages=languages,
            concepts=concepts,
        )
        url = fsio.full_url(fs, f"{root}/{shard_file_name(i)}")
        fsio.atomic_write_bytes(url, data)
        files.append(url)
        pairs[url] = truth.pairs
        malformed[url] = truth.malformed
        records[url] = truth.records
        langs[url] = truth.languages
    files.sort()
    params: dict[str, Any] = {
        "shards": shards,
        "pairs_per_shard": pairs_per_shard,
        "malformed_rate": malformed_rate,
        "languages": languages,
        "concepts": None if concepts is None else len(concepts),
        "synth_version": SYNTH_VERSION,
    }
    truth_json: dict[str, Any] = {
        "files": files,
        "pairs_per_file": pairs,
        "malformed_per_file": malformed,
        "records_per_file": records,
        "total_pairs": sum(pairs.values()),
        "seed": seed,
        "params": params,
    }
    if languages == "worldwide":
        total: dict[str, int] = {}
        for per in langs.values():
            for lang, k in per.items():
                total[lang] = total.get(lang, 0) + k
        truth_json["pairs_per_language"] = total
        truth_json["pairs_per_language_per_file"] = langs
    fsio.atomic_write_json(fsio.full_url(fs, f"{root}/{TRUTH_FILE}"), truth_json)
    return SynthSummary(
        files=files,
        pairs_per_file=pairs,
        malformed_per_file=malformed,
        seconds=time.perf_counter() - t0,
        records_per_file=records,
    )
