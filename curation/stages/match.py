"""Substring matching of alt-texts against concept metadata, with MetaCLIP's exact semantics.

An entry ``e`` matches a text when ``" " + e + " "`` is a substring of ``spacing(text)``
(case-sensitive); the result per text is the sorted set of matching entry ids (positions in the
metadata). Two engines give that result on whole Arrow columns:

* ``"ahocorasick"``: the reference. One pyahocorasick automaton over the spaced entries, run over
  the whole spaced column at once (rows joined by a character no pattern contains), with match
  end offsets mapped back to rows by ``np.searchsorted``.
* ``"ngram"``: a vectorized token n-gram engine in NumPy, exact by construction (see
  `_NgramIndex` for the proof that token n-gram equality is the same relation as the substring
  test). No per-row Python loop; every key is compared exactly, so no hash collision can produce
  a wrong id.

``"auto"`` is ``"ngram"`` plus Aho-Corasick for the patterns the n-gram engine cannot represent
(only the partial-boundary patterns of ``script_aware`` mode).
"""

from __future__ import annotations

import itertools
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.arrow import string_buffers
from curation.core.metadata import load_metadata
from curation.core.stage import Shard, Stage, StageOutput
from curation.core.worldwide import OTHER, language_index
from curation.io.parts import read_part

__all__ = [
    "ENGINES",
    "LanguageMatcher",
    "Matcher",
    "entry_pattern",
    "is_cjk_or_similar",
    "naive_match",
    "spacing",
]

ENGINES = ("auto", "ngram", "ahocorasick")

PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")


def spacing(text: str) -> str:
    """MetaCLIP's text normalization: pad with spaces, wrap ``, . ; : ? ! ` `` in spaces, and
    turn tabs and line breaks into spaces."""
    spaced = f" {text} "
    for p in PUNCTS_TO_WRAP:
        spaced = spaced.replace(p, f" {p} ")
    for c in CHARS_TO_SPACE:
        spaced = spaced.replace(c, " ")
    return spaced


# MetaCLIP 2 ("worldwide") boundary rule, from facebookresearch/MetaCLIP
# metaclip/curation/substr_matching.py at be6b9f4b74583792f67aec7556e18958497a5ca4
# (`is_cjk_or_similar`, `is_punctuation`, `get_spaced_metadata_ml`): an entry gets the leading (trailing) boundary space only when its
# first (last) character is NOT one of these code-point ranges (CJK unified ideographs and their
# extensions, compatibility ideographs, CJK radicals / Kangxi / ideographic description
# characters, Thai, Lao, Myanmar, Khmer, Tibetan) and NOT punctuation (`string.punctuation` or
# the full-width / CJK punctuation below). Hiragana, Katakana and Hangul are not in the list, so
# they keep their boundary spaces, exactly as in MetaCLIP 2. The text side (`spacing`) is
# unchanged in MetaCLIP 2. (MetaCLIP 2 builds one automaton per language; here that is one
# Matcher per language's metadata.)
# Checked against HEAD f47f7841f6a91cc5676729a3d125519393d87d1e (`get_spaced_metadata`, renamed
# from `get_spaced_metadata_ml`): the same 16 ranges, `string.punctuation` and the same 25
# additional punctuation characters (U+FF0C U+3002 U+3001 U+FF1B U+FF1A U+FF1F U+FF01 U+201C U+201D U+2018 U+2019 U+FF08
# U+FF09 U+3010 U+3011 U+300A U+300B U+3008 U+3009 U+300C U+300D U+300E U+300F U+FF5E U+2014);
# tests/unit/test_worldwide_match.py compares both functions with a literal copy.
_NO_SPACE_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0xF900, 0xFAFF),
    (0x2E80, 0x2EFF),
    (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Myanmar (Burmese)
    (0x1780, 0x17FF),  # Khmer
    (0x0F00, 0x0FFF),  # Tibetan
)
_MC2_PUNCTUATION = frozenset(string.punctuation) | frozenset(
    "\uff0c\u3002\u3001\uff1b\uff1a\uff1f\uff01\u201c\u201d\u2018\u2019\uff08\uff09"
    "\u3010\u3011\u300a\u300b\u3008\u3009\u300c\u300d\u300e\u300f\uff5e\u2014"
)


def is_cjk_or_similar(char: str) -> bool:
    """True for a character that gets no boundary space next to it in MetaCLIP 2 matching: a
    character of a script written without spaces (CJK ideographs, Thai, Lao, Myanmar, Khmer,
    Tibetan) or punctuation."""
    cp = ord(char)
    for lo, hi in _NO_SPACE_RANGES:
        if lo <= cp <= hi:
            return True
    return char in _MC2_PUNCTUATION


def entry_pattern(entry: str, script_aware: bool = False) -> str:
    """The substring an entry must occur as in ``spacing(text)``.

    MetaCLIP 1 (``script_aware=False``): ``" " + entry + " "``. MetaCLIP 2 (``script_aware=True``):
    the space on each side only when that end character is not `is_cjk_or_similar`. An empty
    entry (which MetaCLIP 2 cannot handle) keeps both spaces.
    """
    if not script_aware or not entry:
        return f" {entry} "
    left = "" if is_cjk_or_similar(entry[0]) else " "
    right = "" if is_cjk_or_similar(entry[-1]) else " "
    return f"{left}{entry}{right}"


def naive_match(text: str, entries: Sequence[str], script_aware: bool = False) -> list[int]:
    """Reference loop (MetaCLIP's ``substr_matching``): sorted ids of the entries whose pattern is
    a substring of ``spacing(text)``. For tests; quadratic in practice."""
    spaced = spacing(text)
    return [i for i, e in enumerate(entries) if entry_pattern(e, script_aware) in spaced]


# --------------------------------------------------------------------------------------------
# NumPy building blocks

_U64 = np.uint64
_M1 = _U64(0x9E3779B97F4A7C15)
_M2 = _U64(0xC2B2AE3D27D4EB4F)
_M3 = _U64(0x94D049BB133111EB)
# _BYTE_MASK[k] keeps the low k bytes of a little-endian word.
_BYTE_MASK = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)
_SHORT_MAX = 15  # tokens up to this many bytes get an exact two-word key
_PAD = 16  # zero bytes after the text bytes, so 8-byte loads never leave the buffer

# Byte classes of the UTF-8 text: 1 = becomes a separator (space, tab, LF, CR); 2 = one of the
# wrapped punctuation marks (its own token). All are ASCII, and UTF-8 continuation and lead bytes
# are >= 0x80, so classifying bytes is the same as classifying characters.
_CLS = np.zeros(256, dtype=np.uint8)
for _c in " \t\n\r":
    _CLS[ord(_c)] = 1
for _c in PUNCTS_TO_WRAP:
    _CLS[ord(_c)] = 2
del _c
_NEVER_IN_TOKEN = frozenset(PUNCTS_TO_WRAP) | frozenset(CHARS_TO_SPACE)


def _mix(k0: np.ndarray, k1: np.ndarray | None) -> np.ndarray:
    h = k0 * _M1
    if k1 is not None:
        h ^= k1 * _M2
    h ^= h >> _U64(31)
    h *= _M3
    h ^= h >> _U64(29)
    return h


class _Table:
    """Open-addressing (linear probing) hash table from exact keys of one or two uint64 words to
    non-negative int32 values, built and queried with vectorized NumPy. Keys are compared in full,
    so lookups are exact; the hash only picks the home slot."""

    def __init__(self, k0: np.ndarray, k1: np.ndarray | None, values: np.ndarray) -> None:
        n = len(values)
        bits = max(4, int(np.ceil(np.log2(max(n, 1) * 2))))
        size = 1 << bits
        self._shift = _U64(64 - bits)
        self._mask = size - 1
        self.t0 = np.zeros(size, dtype=np.uint64)
        self.t1 = None if k1 is None else np.zeros(size, dtype=np.uint64)
        self.tv = np.full(size, -1, dtype=np.int32)
        pos = self._home(k0, k1)
        pending = np.arange(n)
        while pending.size:
            slot = pos[pending]
            free = self.tv[slot] < 0
            cand, cslot = pending[free], slot[free]
            order = np.argsort(cslot, kind="stable")
            sorted_slots = cslot[order]
            first = np.ones(sorted_slots.size, dtype=bool)
            first[1:] = sorted_slots[1:] != sorted_slots[:-1]
            win, wslot = cand[order[first]], sorted_slots[first]
            self.t0[wslot] = k0[win]
            if self.t1 is not None:
                self.t1[wslot] = k1[win]
            self.tv[wslot] = values[win]
            placed = np.zeros(n, dtype=bool)
            placed[win] = True
            pending = pending[~placed[pending]]
            pos[pending] = (pos[pending] + 1) & self._mask

    def _home(self, k0: np.ndarray, k1: np.ndarray | None) -> np.ndarray:
        return (_mix(k0, k1) >> self._shift).astype(np.int64)

    def get(self, k0: np.ndarray, k1: np.ndarray | None = None) -> np.ndarray:
        """Values for the keys, -1 where a key is absent."""
        slot = self._home(k0, k1)
        v = self.tv[slot]
        eq = self.t0[slot] == k0
        if self.t1 is not None:
            eq &= self.t1[slot] == k1
        # An empty slot has value -1, so where an empty slot "equals" the key the answer is -1 too.
        out = np.where(eq, v, np.int32(-1))
        eq |= v < 0  # settled: found, or an empty slot ends the probe sequence
        idx = np.flatnonzero(~eq)
        slot = slot[idx]
        while idx.size:
            slot = (slot + 1) & self._mask
            v = self.tv[slot]
            eq = self.t0[slot] == k0[idx]
            if self.t1 is not None:
                eq &= self.t1[slot] == k1[idx]
            out[idx[eq]] = v[eq]
            eq |= v < 0
            keep = np.flatnonzero(~eq)
            idx, slot = idx[keep], slot[keep]
        return out


def _token_keys(
    data: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-word keys of byte strings ``data[start:start+length]`` of at most `_SHORT_MAX`
    bytes: the first 8 bytes, then the next 7 with the length in the top byte. (Longer strings get
    keys too, but they are not unique; callers treat them separately.) ``data`` must have 16 bytes
    of padding after the last string."""
    words = np.ndarray((data.size - 8,), dtype="<u8", buffer=data.data, strides=(1,))
    # words[i] = the 8 bytes at i as a little-endian integer (an unaligned view, no copy)
    k0 = words[start] & _BYTE_MASK[np.minimum(length, 8)]
    k1 = length.astype(np.uint64) << _U64(56)
    hi = np.flatnonzero(length > 8)
    if hi.size:
        k1[hi] |= words[start[hi] + 8] & _BYTE_MASK[np.minimum(length[hi] - 8, 7)]
    return k0, k1


def _sorted_groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group ids 0..g-1 for the values of ``key`` in ascending key order, and the first index of
    each group (np.unique with return_inverse, without its cost)."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    new = np.empty(sk.size, dtype=bool)
    new[:1] = True
    np.not_equal(sk[1:], sk[:-1], out=new[1:])
    gid = np.empty(key.size, dtype=np.int64)
    gid[order] = np.cumsum(new) - 1
    return gid, order[new]


def _arrow_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The rows' bytes followed by `_PAD` zero bytes, and row byte offsets starting at 0."""
    raw, off = string_buffers(arr)
    data = np.zeros(raw.size + _PAD, dtype=np.uint8)
    data[: raw.size] = raw
    return data, off


# --------------------------------------------------------------------------------------------
# The n-gram engine


class _NgramIndex:
    """Token n-gram engine.

    Why token n-grams give exactly the substring relation. Let ``S = spacing(text)``. ``S`` starts
    and ends with a space (the padding), so ``S.split(" ") = ["", t_1, ..., t_m, ""]`` where
    ``t_1..t_m = core.split(" ")`` and ``core = S[1:-1]`` (m >= 1; the t_i may be empty strings,
    one per extra space). Let ``E = e.split(" ") = [E_1..E_k]`` (k >= 1) and ``P = " " + e + " "``,
    so ``P = " " E_1 " " E_2 ... " " E_k " "``: P has spaces exactly at its k+1 separators.

    Claim: P is a substring of S iff ``E == [t_j, ..., t_{j+k-1}]`` for some 1 <= j and
    j+k-1 <= m, i.e. E is a contiguous run of the core tokens.

    (<=) ``S = "" " " t_1 " " ... " " t_m " " ""``; the run t_j..t_{j+k-1} is preceded by the
    separator before t_j (it exists because j >= 1) and followed by the one after t_{j+k-1} (it
    exists because j+k-1 <= m, the last separator being the right padding), so P occurs there.

    (=>) Suppose P occurs at offset o. ``S[o] == " "`` is a separator of S, the one in front of
    some token t_j with j >= 1 (it cannot be the right padding, after which nothing follows,
    while P has at least two characters). Inductively, if P's i-th separator sits on the
    separator in front of t_{j+i-1}, the next |E_i| characters of P contain no space and are
    followed by a space; in S, the characters after that separator are t_{j+i-1} followed by a
    separator (the padding guarantees one), and t_{j+i-1} contains no space, so both strings
    agree only if ``E_i == t_{j+i-1}`` and P's (i+1)-th separator is the one after t_{j+i-1}.
    After k steps, P's last space is the separator after t_{j+k-1}, so j+k-1 <= m.  QED.

    The core tokens come straight from the UTF-8 bytes: a space, tab, LF or CR is a separator; a
    wrapped punctuation mark p becomes separator, token "p", separator; every other byte is token
    content. So a token never contains a tab/LF/CR, and a token containing a wrapped punctuation
    mark is exactly that mark: an entry with such a token (e.g. "st. louis") can never match and
    is left out. An entry "." matches every text containing a ".".

    Matching is then: map each text token to its id in the vocabulary of entry tokens (an exact
    two-word key for tokens up to 15 bytes, a dict for longer ones), and walk a trie of entry
    token-id sequences level by level from every token position at once (exact int64 keys
    ``node * V + token_id``), extending a position only while it is a proper prefix of some entry.
    Row boundaries are barrier tokens that match nothing. No hash decides a match: the hashes
    only choose where an exact key is looked for.
    """

    def __init__(self, entries: Sequence[str], ids: Sequence[int]) -> None:
        arr = pa.array(entries, type=pa.large_string())
        ids_np = np.asarray(ids, dtype=np.int64)
        # Entries with a token that no text token can equal never match: leave them out.
        suspect = np.flatnonzero(
            pc.match_substring_regex(arr, "[,.;:?!`\t\n\r]").to_numpy(zero_copy_only=False)
        )
        if suspect.size:
            bad = [
                i
                for i in suspect.tolist()
                if any(
                    (len(t) > 1 and not _NEVER_IN_TOKEN.isdisjoint(t)) or t in CHARS_TO_SPACE
                    for t in entries[i].split(" ")
                )
            ]
            if bad:
                keep = np.ones(len(arr), dtype=bool)
                keep[bad] = False
                arr = arr.filter(pa.array(keep))
                ids_np = ids_np[keep]
        lists = pc.split_pattern(arr, " ")  # same as str.split(" ")
        n_tok = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        lo = np.frombuffer(lists.buffers()[1], dtype=np.int32)[: len(lists) + 1].astype(np.int64)
        lo = lo[:-1] - lo[0]
        enc = pc.dictionary_encode(lists.flatten())  # exact string equality
        tok_id = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        vocab = enc.dictionary
        self.n_vocab = v = len(vocab)
        self._build_vocab(vocab)

        # Trie, level by level: a node is a distinct token-id prefix; node 0 is the root.
        node_entry = [np.array([-1], dtype=np.int64)]
        parents, labels = [np.array([-1], dtype=np.int64)], [np.array([-1], dtype=np.int64)]
        n_nodes = 1
        alive = np.arange(len(arr))
        node = np.zeros(len(arr), dtype=np.int64)
        level = 0
        while alive.size:
            t = tok_id[lo[alive] + level]
            key = node[alive] * v + t
            gid, first = _sorted_groups(key)
            new_nodes = n_nodes + gid
            parents.append(node[alive][first])
            labels.append(t[first])
            ent = np.full(first.size, -1, dtype=np.int64)
            ends = n_tok[alive] == level + 1
            ent[gid[ends]] = ids_np[alive[ends]]
            node_entry.append(ent)
            node[alive] = new_nodes
            n_nodes += first.size
            level += 1
            alive = alive[n_tok[alive] > level]
        self.max_len = level
        self.node_entry = np.concatenate(node_entry)
        parent = np.concatenate(parents)
        label = np.concatenate(labels)
        self.has_child = np.zeros(n_nodes, dtype=bool)
        self.has_child[parent[1:]] = True
        self.first_child = np.full(max(v, 1), -1, dtype=np.int32)
        top = np.flatnonzero(parent == 0)
        self.first_child[label[top]] = top
        deep = np.flatnonzero(parent > 0)
        self.edge_table = _Table(
            (parent[deep] * v + label[deep]).view(np.uint64), None, deep.astype(np.int32)
        )

    def _build_vocab(self, vocab: pa.Array) -> None:
        """Short tokens go into an exact hash table keyed like the text tokens, long ones into a
        dict of their bytes."""
        data, off = _arrow_bytes(vocab)
        start, length = off[:-1], np.diff(off)
        short = np.flatnonzero(length <= _SHORT_MAX)
        k0, k1 = _token_keys(data, start[short], length[short])
        self.vocab_table = _Table(k0, k1, short.astype(np.int32))
        buf = data.tobytes()
        self.long_vocab = {
            buf[s : s + n]: i
            for i, s, n in zip(
                np.flatnonzero(length > _SHORT_MAX).tolist(),
                start[length > _SHORT_MAX].tolist(),
                length[length > _SHORT_MAX].tolist(),
                strict=True,
            )
        }
        self.long_max = max((len(b) for b in self.long_vocab), default=0)

    def _tokens(self, data: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary ids of the core tokens of all rows in order, with a barrier token (-1) after
        each row, and the index of each row's first token. ``data`` holds the rows' bytes from
        ``off[0] == 0`` to ``off[-1]``, then `_PAD` zero bytes."""
        n = len(off) - 1
        cls = _CLS[data[: int(off[-1])]]
        q = np.flatnonzero(cls.astype(bool))
        cq = cls[q]
        # Separator events: a separator byte at q is one event (the token before it ends at q, the
        # next starts at q+1); a punctuation byte at q is two, (q, q) and (q+1, q+1), with the
        # one-byte token [q, q+1) between them.
        rep = np.repeat(q, cq)
        second = np.zeros(rep.size, dtype=bool)
        second[np.cumsum(cq) - 1] = cq == 2
        before = rep + second
        after = before + np.repeat(cq == 1, cq)
        # Merge in each row's padding events: row r's events are ps[r], its byte events, pe[r].
        gb = np.searchsorted(rep, off)  # byte events of row r: gb[r]..gb[r+1]
        rows2 = 2 * np.arange(n, dtype=np.int64)
        ps = gb[:-1] + rows2
        pe = gb[1:] + rows2 + 1
        m = rep.size + 2 * n
        is_byte_event = np.ones(m, dtype=bool)
        is_byte_event[ps] = False
        is_byte_event[pe] = False
        ev_before = np.empty(m, dtype=np.int64)
        ev_after = np.empty(m, dtype=np.int64)
        ev_before[is_byte_event] = before
        ev_after[is_byte_event] = after
        ev_before[ps] = ev_after[ps] = off[:-1]
        ev_before[pe] = ev_after[pe] = off[1:]
        # Token k lies between events k and k+1, so token pe[r] is the barrier after row r (the
        # last one, after the last event, is appended).
        start = ev_after[:-1]
        length = ev_before[1:] - start
        tid = self._token_ids(data, start, length)
        tid = np.append(tid, np.int32(-1))
        tid[pe] = -1
        return tid, ps

    def _token_ids(self, data: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        k0, k1 = _token_keys(data, start, length)
        tid = self.vocab_table.get(k0, k1)
        long_idx = np.flatnonzero(length > _SHORT_MAX)
        if long_idx.size:
            tid[long_idx] = -1
            if self.long_vocab:
                cand = long_idx[length[long_idx] <= self.long_max]
                if cand.size:
                    buf = data.tobytes()
                    lv = self.long_vocab
                    tid[cand] = [
                        lv.get(buf[s : s + n], -1)
                        for s, n in zip(start[cand].tolist(), length[cand].tolist(), strict=True)
                    ]
        return tid

    def match(self, data: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, entry id) of every match, in no particular order, duplicates included."""
        if self.max_len == 0 or len(off) < 2:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        tid, ps = self._tokens(data, off)
        pos = np.flatnonzero(tid >= 0)
        node = self.first_child[tid[pos]]
        keep = np.flatnonzero(node >= 0)
        pos, node = pos[keep], node[keep]
        hit_pos, hit_eid = [], []
        v = self.n_vocab
        for level in range(1, self.max_len + 1):
            eid = self.node_entry[node]
            h = np.flatnonzero(eid >= 0)
            hit_pos.append(pos[h])
            hit_eid.append(eid[h])
            if level == self.max_len:
                break
            ext = np.flatnonzero(self.has_child[node])
            pos, node = pos[ext], node[ext]
            t = tid[pos + level]
            ok = np.flatnonzero(t >= 0)
            pos, node, t = pos[ok], node[ok], t[ok]
            if not pos.size:
                break
            node = self.edge_table.get((node.astype(np.int64) * v + t).view(np.uint64))
            ok = np.flatnonzero(node >= 0)
            pos, node = pos[ok], node[ok]
            if not pos.size:
                break
        tok_row = np.repeat(np.arange(len(ps), dtype=np.int32), np.diff(ps, append=tid.size))
        return tok_row[np.concatenate(hit_pos)], np.concatenate(hit_eid)


# --------------------------------------------------------------------------------------------
# The Aho-Corasick engine

# Candidates for the character joining rows: it must be left alone by `spacing` and occur in no
# pattern; then no pattern match can span two rows, and texts containing it are still correct.
_JOIN_CANDIDATES = ("\x00", "\x01", "\x02", "\x03", "\ufdd0", "\ufdd1", "\U0010fffe")


class _AhoIndex:
    """pyahocorasick over the entry patterns, run over a whole column joined into one string."""

    def __init__(self, patterns: Sequence[str], ids: Sequence[int]) -> None:
        import ahocorasick

        # A pattern with a tab, LF or CR can never occur in a spaced text.
        kept = [(p, i) for p, i in zip(patterns, ids, strict=True) if _usable_pattern(p)]
        blob = "".join(p for p, _ in kept)
        joiner = next((c for c in _JOIN_CANDIDATES if c not in blob), None)
        if joiner is None:  # pragma: no cover - needs patterns containing all candidates
            raise ValueError("cannot find a row separator absent from every metadata entry")
        self.joiner = joiner
        self.automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for p, i in kept:
            self.automaton.add_word(p, i)
        self.size = len(kept)
        if kept:
            self.automaton.make_automaton()

    def match(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(row, entry id) of every match, duplicates included. ``texts`` has no nulls."""
        if not self.size or not len(texts):
            return np.empty(0, np.int64), np.empty(0, np.int64)
        # spacing() maps each character independently, so spacing(" t1 " + J + " t2 " + J ...)
        # is the concatenation of the rows' spaced texts, each followed by J.
        ty = texts.type
        joined = pc.binary_join_element_wise(
            pa.scalar(" ", ty), texts, pa.scalar(" " + self.joiner, ty), pa.scalar("", ty)
        )
        big = spacing("".join(_buffer_str(joined)))[1:-1]
        # Each row contributes len(text) + 3 characters plus 2 per wrapped punctuation mark.
        nchar = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64) + 3
        nchar += 2 * pc.count_substring_regex(texts, "[,.;:?!`]").to_numpy(zero_copy_only=False)
        ends = np.cumsum(nchar)
        flat = np.fromiter(itertools.chain.from_iterable(self.automaton.iter(big)), dtype=np.int64)
        end_idx, eid = flat[0::2], flat[1::2]
        rows = np.searchsorted(ends, end_idx, side="right")
        return rows, eid


def _usable_pattern(p: str) -> bool:
    return "\t" not in p and "\n" not in p and "\r" not in p


def _buffer_str(arr: pa.Array) -> list[str]:
    """The concatenated UTF-8 bytes of a string array (no nulls) decoded, as a one-item list."""
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    data = arr.buffers()[2]
    if data is None:
        return [""]
    return [data.to_pybytes()[offsets[0] : offsets[-1]].decode("utf-8")]


# --------------------------------------------------------------------------------------------
# Column plumbing


def _string_chunks(texts: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    out = []
    for c in chunks:
        if pa.types.is_null(c.type):
            c = pa.nulls(len(c), type=pa.large_string())
        elif pa.types.is_string_view(c.type):
            c = c.cast(pa.large_string())
        elif not (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)):
            raise TypeError(f"the text column must hold strings, got {c.type}")
        out.append(c)
    return out


_BATCH_BYTES = 1 << 21  # small batches stay in cache and reuse freed memory
_BATCH_ROWS = 1 << 16


def _batches(arr: pa.Array) -> list[pa.Array]:
    """Slices of at most `_BATCH_ROWS` rows and about `_BATCH_BYTES` text bytes."""
    n = len(arr)
    if n == 0:
        return []
    lens = pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    csum = np.cumsum(lens, dtype=np.int64)
    out, start = [], 0
    while start < n:
        base = csum[start - 1] if start else 0
        stop = int(np.searchsorted(csum, base + _BATCH_BYTES, side="right"))
        stop = min(max(stop, start + 1), start + _BATCH_ROWS, n)
        out.append(arr.slice(start, stop - start))
        start = stop
    return out


def _to_list_array(rows: np.ndarray, eids: np.ndarray, n: int) -> pa.ListArray:
    """Sorted, de-duplicated ids per row as list<uint32>."""
    key = (rows.astype(np.int64) << 32) | eids.astype(np.int64)
    key.sort()
    if key.size:
        keep = np.empty(key.size, dtype=bool)
        keep[0] = True
        np.not_equal(key[1:], key[:-1], out=keep[1:])
        key = key[keep]
    counts = np.bincount(key >> 32, minlength=n) if key.size else np.zeros(n, np.int64)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    values = pa.array((key & 0xFFFFFFFF).astype(np.uint32), type=pa.uint32())
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


class Matcher:
    """Matches text columns against metadata entries with MetaCLIP's substring semantics.

    Built once per worker (``setup()`` builds the tables), reused across shards. ``engine`` is
    ``"auto"`` (default: the n-gram engine, plus Aho-Corasick for what it cannot represent),
    ``"ngram"`` or ``"ahocorasick"`` (the reference). All give the same result. With
    ``script_aware=True`` entries follow the MetaCLIP 2 boundary rule (see `entry_pattern`).
    """

    def __init__(
        self, entries: Sequence[str], engine: str = "auto", script_aware: bool = False
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown match engine {engine!r}; use one of {ENGINES}")
        self.entries = list(entries)
        if len(self.entries) >= 1 << 32:
            raise ValueError("entry ids must fit in uint32: use fewer than 2**32 entries")
        self.engine = engine
        self.script_aware = script_aware
        self._ready = False
        self._ngram: _NgramIndex | None = None
        self._aho: _AhoIndex | None = None
        self._dup_canon: np.ndarray | None = None  # entries with later copies, sorted
        self._dup_start = self._dup_count = self._dup_others = None

    def __getstate__(self) -> dict:
        # Ship entries, not built tables: each worker builds its own in setup().
        state = self.__dict__.copy()
        state.update(
            _ready=False,
            _ngram=None,
            _aho=None,
            _dup_canon=None,
            _dup_start=None,
            _dup_count=None,
            _dup_others=None,
        )
        return state

    def setup(self) -> None:
        """Build the automaton and/or n-gram tables (once; later calls do nothing)."""
        if self._ready:
            return
        entries = self.entries
        for i, e in enumerate(entries):
            if not isinstance(e, str):
                raise TypeError(f"metadata entry {i} is {type(e).__name__}, expected a string")
        if len(set(entries)) == len(entries):
            ids = list(range(len(entries)))
        else:  # duplicates: match the first copy, report every id
            first: dict[str, int] = {}
            for i, e in enumerate(entries):
                first.setdefault(e, i)
            ids = sorted(first.values())
            entries = [entries[i] for i in ids]
            canon = np.array([first[e] for e in self.entries], dtype=np.int64)
            later = np.flatnonzero(canon != np.arange(len(canon)))  # ids of the later copies
            later = later[np.argsort(canon[later], kind="stable")]
            by = canon[later]
            starts = np.flatnonzero(np.r_[True, by[1:] != by[:-1]])
            self._dup_canon = by[starts]
            self._dup_start = starts
            self._dup_count = np.diff(np.r_[starts, by.size])
            self._dup_others = later
        full_e: list[str] = []  # entries for the n-gram engine
        full_i: list[int] = []
        part_p: list[str] = []  # patterns for Aho-Corasick
        part_i: list[int] = []
        if self.engine == "ahocorasick":
            part_p = [entry_pattern(e, self.script_aware) for e in entries]
            part_i = ids
        elif not self.script_aware:
            full_e, full_i = entries, ids
        else:
            for e, i in zip(entries, ids, strict=True):
                pat = entry_pattern(e, True)
                if pat == f" {e} ":
                    full_e.append(e)
                    full_i.append(i)
                else:
                    part_p.append(pat)
                    part_i.append(i)
        if part_p and self.engine == "ngram":
            raise ValueError(
                f"engine 'ngram' cannot match {len(part_p)} script-aware entries without "
                f"boundary spaces (e.g. {part_p[0]!r}); use engine='auto'"
            )
        if full_e:
            self._ngram = _NgramIndex(full_e, full_i)
        if part_p:
            self._aho = _AhoIndex(part_p, part_i)
        self._ready = True

    def match(self, texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """Entry ids matched by each text, as list<uint32> (sorted, unique); a null text gives an
        empty list."""
        self.setup()
        pieces = []
        for chunk in _string_chunks(texts):
            for batch in _batches(chunk):
                pieces.append(self._match_batch(batch))
        if not pieces:
            return pa.array([], type=pa.list_(pa.uint32()))
        if len(pieces) == 1:
            return pieces[0]
        return pa.concat_arrays(pieces)

    def _match_batch(self, arr: pa.Array) -> pa.ListArray:
        n = len(arr)
        rows, eids = [], []
        if self._ngram is not None:
            data, off = _arrow_bytes(arr)
            r, e = self._ngram.match(data, off)
            rows.append(r)
            eids.append(e)
        if self._aho is not None:
            r, e = self._aho.match(arr.fill_null("") if arr.null_count else arr)
            rows.append(r)
            eids.append(e)
        r = np.concatenate(rows) if rows else np.empty(0, np.int64)
        e = np.concatenate(eids) if eids else np.empty(0, np.int64)
        if arr.null_count:
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            keep = valid[r]
            r, e = r[keep], e[keep]
        if self._dup_canon is not None:
            r, e = self._expand_duplicates(r, e)
        return _to_list_array(r, e, n)

    def _expand_duplicates(self, r: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add a hit for every later copy of a duplicated entry that matched."""
        k = np.searchsorted(self._dup_canon, e)
        k = np.minimum(k, self._dup_canon.size - 1)
        has = np.flatnonzero(self._dup_canon[k] == e)
        if not has.size:
            return r, e
        counts = self._dup_count[k[has]]
        total = int(counts.sum())
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        others = self._dup_others[np.repeat(self._dup_start[k[has]], counts) + within]
        return np.concatenate([r, np.repeat(r[has], counts)]), np.concatenate([e, others])

    def process(self, table: pa.Table) -> pa.Table:
        """``table`` plus an ``entry_ids`` column (list<uint32>) matched from its ``text`` column;
        an existing ``entry_ids`` column is replaced."""
        if "text" not in table.column_names:
            raise KeyError(
                f"match needs a 'text' column; the table has {table.column_names}. "
                "Rename the alt-text column to 'text' before matching."
            )
        ids = self.match(table.column("text"))
        if "entry_ids" in table.column_names:
            return table.set_column(table.column_names.index("entry_ids"), "entry_ids", ids)
        return table.append_column("entry_ids", ids)


class MatchStage(Stage):
    """The match stage: adds `entry_ids` to every row of a shard (see `Matcher`).

    Ships the metadata's path and checksum, not its entries: each worker loads the metadata
    and builds the matcher once in `setup()`, and refuses metadata that changed since the job
    was planned. With `row_index`, a pool shard read as it is gets its row index in that
    column (so tables derived from it find the pool's `.npz` embeddings). Its one asset is the
    metadata (`metadata`); `use_assets` makes setup read a local copy, `metadata` (the job's
    path, in messages and fingerprints) stays as given.
    """

    name = "match"

    def __init__(
        self,
        metadata: str,
        checksum: str,
        engine: str = "auto",
        script_aware: bool = False,
        row_index: str | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown match engine {engine!r}; use one of {ENGINES}")
        self.metadata = metadata
        self.checksum = checksum
        self.engine = engine
        self.script_aware = script_aware
        self.row_index = row_index
        self._metadata_file = metadata  # what setup() opens: `metadata` or a local copy
        self._matcher: Matcher | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_matcher": None}

    def assets(self) -> dict[str, str]:
        """The metadata file (a path, URL or `bundled:` name; its local copy after
        `use_assets`)."""
        return {"metadata": self._metadata_file}

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Read the metadata from `paths["metadata"]` (a copy of the same bytes)."""
        if "metadata" in paths:
            self._metadata_file = paths["metadata"]
            self._matcher = None

    def setup(self) -> None:
        """Load the metadata (checking its checksum) and build the matcher."""
        if self._matcher is not None:
            return
        md = load_metadata(self._metadata_file)
        if md.checksum != self.checksum:
            raise RuntimeError(
                f"metadata {self.metadata} changed while the job ran "
                f"({md.checksum} != {self.checksum})"
            )
        m = Matcher(md.entries, engine=self.engine, script_aware=self.script_aware)
        m.setup()
        self._matcher = m

    def load(self, shard: Shard) -> pa.Table:
        """The shard's table; with `row_index`, plus its row numbers."""
        table = read_part(shard.input)
        if self.row_index and self.row_index not in table.column_names:
            rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
            table = table.append_column(self.row_index, rows)
        return table

    def process(self, table: pa.Table) -> StageOutput:
        """Matched table; counters rows_read, rows_with_match, matches."""
        self.setup()
        out = self._matcher.process(table)
        lengths = pc.list_value_length(out.column("entry_ids"))
        counts = Counter(rows_read=table.num_rows)
        counts["rows_with_match"] = int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        counts["matches"] = int(pc.sum(lengths).as_py() or 0)
        return StageOutput(out, counts)


class LanguageMatcher:
    """Matches each text against its own language's metadata only (MetaCLIP 2: one automaton
    per metadata language).

    `entries` maps a metadata language to its entry list (`MetadataSet.entries()`); one
    `Matcher` per language is built lazily, the first time a batch holds that language, and kept
    (so once per worker). A row's language is its `lang` when the set has it, else `fallback`
    (`other`) when the set has that, else none: such a row matches nothing and is counted
    (`rows_no_metadata`). Entry ids are ids within the row's metadata language. With
    `script_aware=True` (the default, MetaCLIP 2) entries follow `entry_pattern`'s boundary
    rule, which equals the reference's `get_spaced_metadata`.
    """

    def __init__(
        self,
        entries: Mapping[str, Sequence[str]],
        engine: str = "auto",
        script_aware: bool = True,
        fallback: str | None = OTHER,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown match engine {engine!r}; use one of {ENGINES}")
        if not entries:
            raise ValueError("a LanguageMatcher needs metadata for at least one language")
        self.languages = sorted(entries)
        self.entries = {k: list(entries[k]) for k in self.languages}
        self.engine = engine
        self.script_aware = script_aware
        self.fallback = fallback
        self._matchers: dict[str, Matcher] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_matchers": {}}  # each worker builds its own

    def matcher(self, lang: str) -> Matcher:
        """The built `Matcher` of one language (built on first use)."""
        m = self._matchers.get(lang)
        if m is None:
            m = Matcher(self.entries[lang], engine=self.engine, script_aware=self.script_aware)
            m.setup()
            self._matchers[lang] = m
        return m

    def resolve(self, langs: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Index into `languages` of each row's metadata language, -1 for none."""
        return language_index(langs, self.languages, self.fallback)

    def match(
        self, texts: pa.Array | pa.ChunkedArray, langs: pa.Array | pa.ChunkedArray
    ) -> pa.ListArray:
        """Entry ids (list<uint32>, sorted, unique; ids within the row's metadata language) of
        each text, matched against its language's metadata. Rows are grouped by language with
        one stable sort and `take`, never a loop per row."""
        n = len(texts)
        if len(langs) != n:
            raise ValueError(f"texts has {n} rows but langs has {len(langs)}")
        if n == 0:
            return pa.array([], type=pa.list_(pa.uint32()))
        idx = self.resolve(langs)
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        starts = np.flatnonzero(np.r_[True, sidx[1:] != sidx[:-1]])
        ends = np.r_[starts[1:], n].astype(np.int64)
        rows, eids = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            li = int(sidx[s])
            if li < 0:
                continue
            members = order[s:e]
            got = self.matcher(self.languages[li]).match(texts.take(pa.array(members)))
            parents = pc.list_parent_indices(got).to_numpy(zero_copy_only=False)
            rows.append(members[parents])
            eids.append(pc.list_flatten(got).to_numpy(zero_copy_only=False).astype(np.int64))
        return _to_list_array(np.concatenate(rows), np.concatenate(eids), n)

    def process(self, table: pa.Table) -> StageOutput:
        """`table` plus `entry_ids` matched from `text` by `lang`; counters rows_read,
        rows_with_match, matches, rows_no_metadata (language without metadata and no
        fallback) and rows_fallback (matched against `fallback`)."""
        for col in ("text", "lang"):
            if col not in table.column_names:
                raise KeyError(
                    f"per-language matching needs a {col!r} column; the table has "
                    f"{table.column_names} (run language id first)"
                )
        langs = table.column("lang")
        ids = self.match(table.column("text"), langs)
        if "entry_ids" in table.column_names:
            out = table.set_column(table.column_names.index("entry_ids"), "entry_ids", ids)
        else:
            out = table.append_column("entry_ids", ids)
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
        idx = self.resolve(langs)
        counts = Counter(rows_read=table.num_rows)
        counts["rows_with_match"] = int(np.count_nonzero(lengths))
        counts["matches"] = int(lengths.sum())
        counts["rows_no_metadata"] = int(np.count_nonzero(idx < 0))
        if self.fallback is not None and self.fallback in self.entries:
            own = language_index(langs, self.languages, None)
            counts["rows_fallback"] = int(np.count_nonzero(own < 0))
        return StageOutput(out, counts)
