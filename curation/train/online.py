"""Online balancing: MetaCLIP's head/tail flattening redrawn every pass of training.

Offline balancing (`curation.stages.balance`) draws one curated subset. Online balancing, as in
MetaCLIP 2's training loader (`src/training/data_metaclip_v2.py`,
`IterativeWebDatasetWorldWide.__iter__`), keeps the whole matched pool and redraws the subset
every pass, so that over the passes the model sees every tail image and a fresh sample of the head.

The rule for a sample (an image, identified by its uid) in pass k:

- its texts are the rows of the matched folder with that uid that matched at least one entry
  (a text without matches is never used, and an image without any is never kept: MetaCLIP only
  indexes texts with matches, `metaclip/curation/curate.py` `count_per_shard`, and the loader
  skips uids it has no text for);
- rule "text" (the default, MetaCLIP 2's): one of its texts is chosen uniformly, then the image
  is kept with that text's probability 1 - prod_{e in E_text}(1 - p_e), p_e = min(1, t/count_e).
  Over the passes the image is kept with the mean of its texts' probabilities, and a text on a
  tail entry is the likelier to be trained on;
- rule "union": the image is kept with 1 - prod_{e in E}(1 - p_e) over the union E of its texts'
  entries, and the text is chosen uniformly among its texts (the image-level reading).

For an image with one text both rules give the offline Balancer's probability for that row
(`curation.stages.balance.keep_probabilities`).

The randomness is counter-based, like the offline Balancer's: u_s = uniform_draws(H(uid), s,
K(seed, k)) for stream s = 0 (keep: u_0 < prob) and s = 1 (text: index floor(u_1 · n_texts)),
with H = MurmurHash64A of the uid and K = SplitMix64(SplitMix64(seed) xor (k + 1)·φ). So the
decision depends only on (seed, pass, uid): not on workers, batch boundaries, order or retries,
and the same uid seen twice in a pass gets the same decision. An image's texts are ordered by
their hash, so the choice does not depend on how the matched folder is partitioned.

Memory: sorted uint64 uid hashes + offsets into per-text arrays (probability, head/tail match
counts) and one Arrow string array of the texts, never Python dicts or sets; `keep` looks up a
batch with `np.searchsorted`. Uids are identified by their 64-bit hash: distinct matched uids
that collide are refused at load; a pool sample colliding with a matched uid (chance about
n_pool · n_matched / 2^64) would be taken for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.fingerprint import fingerprint
from curation.core.redact import redact_url
from curation.io.parts import parts_of, read_part
from curation.stages.balance import (
    entry_probabilities,
    keep_probabilities,
    read_counts,
    resolve_t,
    sorted_unique,
    stable_hash64,
    uniform_draws,
)

RULES = ("text", "union")
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_KEEP_STREAM, _TEXT_STREAM = 0, 1
#: the integer counters of `pass_stats` (summed by `combine_pass_stats`)
STAT_COUNTS = ("read", "kept", "unmatched", "not_sampled", "kept_head_matches", "kept_tail_matches")


def _splitmix(x: int) -> int:
    """SplitMix64 (as `curation.stages.balance._splitmix64`) on one Python int."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def pass_key(seed: int, pass_index: int) -> int:
    """The draw seed of one pass: SplitMix64(SplitMix64(seed) xor (pass + 1)·φ)."""
    if int(pass_index) < 0:
        raise ValueError(f"pass_index must be >= 0, got {pass_index}")
    return _splitmix(_splitmix(int(seed) & _M64) ^ (((int(pass_index) + 1) * _GOLDEN) & _M64))


def _strings(values: Any) -> pa.Array:
    """A string Arrow array from a NumPy array, a list, or an Arrow (chunked) array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    if not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values, dtype=object) if len(values) else [], pa.string())
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    return values


def _combined(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    return col


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Start positions of the runs of equal values in a sorted array."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def _list_array(groups: np.ndarray, values: np.ndarray, n: int) -> pa.ListArray:
    """list<uint32> of length n from (group, value) pairs sorted by group."""
    offsets = np.searchsorted(groups, np.arange(n + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.uint32)))


def _read_matched(matched: str, cols: list[str]) -> pa.Table:
    """The columns `cols` of a match stage folder's parts, concatenated (typed empty columns
    when there are no rows)."""
    parts = [read_part(s.input, cols) for s in parts_of(matched)]
    table = pa.concat_tables(parts, promote_options="permissive") if parts else None
    if table is None or not table.num_rows:
        table = pa.table({c: pa.array([], pa.list_(pa.uint32()) if c == "entry_ids"
                          else pa.string()) for c in cols})  # fmt: skip
    return table


class OnlineBalancer:
    """Per-pass keep decisions and text choice of MetaCLIP's online balancing (see the module).

    Build with `OnlineBalancer.load(matched, counts, t=..., seed=...)` (folders on any fsspec
    URL) or directly from a matched table and the counts. `keep(uids, texts, pass_index)` is the
    callable `curation.train.data.TrainBatches` takes.
    """

    def __init__(
        self,
        matched: pa.Table,
        counts: np.ndarray,
        *,
        t: float | None = None,
        tail_proportion: float | None = None,
        seed: int = 0,
        rule: str = "text",
        source: str = "",
        probabilities: np.ndarray | None = None,
        languages: dict[str, Any] | None = None,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        for col in ("uid", "text", "entry_ids"):
            if col not in matched.column_names:
                raise ValueError(
                    f"online balancing needs a {col!r} column (have {matched.column_names}); "
                    "give the output of `curation match`"
                )
        self.counts = np.asarray(counts, dtype=np.uint64)
        #: worldwide (`load` of a lang_counts file): {lang: LanguageThreshold.to_dict()}; the
        #: entry ids are then global (languages concatenated) and `probabilities` is given
        self.languages = languages
        if probabilities is None:
            self.t, self.tail_proportion = resolve_t(self.counts, t, tail_proportion)
            self.probabilities = entry_probabilities(self.counts, self.t)
        else:
            self.t, self.tail_proportion = float(t), float(tail_proportion)
            self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.seed = int(seed)
        self.rule = rule
        self.source = source
        self._build(matched)

    @classmethod
    def load(
        cls,
        matched: str,
        counts: str,
        t: float | None = None,
        tail_proportion: float | None = None,
        seed: int = 0,
        rule: str = "text",
    ) -> OnlineBalancer:
        """From a match stage folder (Parquet parts with uid, text, entry_ids) and an
        `entry_counts.parquet`; exactly one of `t` and `tail_proportion`.

        A worldwide job's `lang_counts.parquet` (lang, entry_id, count) and per-language match
        output (with `lang`) give MetaCLIP 2's per-language probabilities instead (`t` is t_en;
        `load_worldwide`)."""
        import pyarrow.parquet as pq

        from curation.core import fsio

        fs, path = fsio.url_to_fs(counts)
        with fs.open(path, "rb") as f:
            if "lang" in pq.read_schema(f).names:
                return cls.load_worldwide(matched, counts, t, tail_proportion, seed, rule)
        return cls(
            _read_matched(matched, ["uid", "text", "entry_ids"]),
            read_counts(counts),
            t=t,
            tail_proportion=tail_proportion,
            seed=seed,
            rule=rule,
            source=redact_url(matched),
        )

    @classmethod
    def load_worldwide(
        cls,
        matched: str,
        counts: str,
        t: float | None = None,
        tail_proportion: float | None = None,
        seed: int = 0,
        rule: str = "text",
        min_matches: int = 0,
    ) -> OnlineBalancer:
        """MetaCLIP 2 online balancing: per-language t (`core.worldwide.per_language_t`, t is
        t_en) and probabilities over a per-language match output; each row's entry ids are
        made global (its language's offset in the sorted languages added) so that one
        balancer draws for every language, with the same draws as for English."""
        from curation.core.worldwide import (
            OTHER,
            language_index,
            language_probabilities,
            per_language_t,
            read_language_counts,
        )

        by_lang = read_language_counts(counts)
        th = per_language_t(by_lang, t, tail_proportion, min_matches=min_matches)
        probs = language_probabilities(by_lang, th)
        langs = sorted(by_lang)
        offsets = np.zeros(len(langs) + 1, dtype=np.int64)
        np.cumsum([len(by_lang[k]) for k in langs], out=offsets[1:])
        table = _read_matched(matched, ["uid", "text", "lang", "entry_ids"])
        ids = _combined(table.column("entry_ids"))
        li = language_index(table.column("lang"), langs, OTHER)
        parents = pc.list_parent_indices(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(flat) and int(li[parents].min()) < 0:
            raise ValueError(
                f"{matched}: rows with entry ids in a language that {counts} has no counts for"
            )
        glob = flat + offsets[np.maximum(li[parents], 0)]
        rows_ids = pa.ListArray.from_arrays(
            pa.array(np.searchsorted(parents, np.arange(len(ids) + 1)).astype(np.int32)),
            pa.array(glob.astype(np.uint32)),
        )
        table = pa.table({"uid": table.column("uid"), "text": table.column("text"),
                          "entry_ids": rows_ids})  # fmt: skip
        en = th["en"]
        return cls(
            table,
            np.concatenate([by_lang[k] for k in langs]) if langs else np.zeros(0, np.uint64),
            t=en.t,
            tail_proportion=en.tail_proportion,
            seed=seed,
            rule=rule,
            source=redact_url(matched),
            probabilities=np.concatenate([probs[k] for k in langs]) if langs else None,
            languages={k: th[k].to_dict() for k in langs},
        )

    # ---------------------------------------------------------------- building
    def _build(self, matched: pa.Table) -> None:
        n_entries = max(len(self.counts), 1)
        ids = _combined(matched.column("entry_ids"))
        lengths = pc.fill_null(pc.list_value_length(ids), 0).to_numpy(zero_copy_only=False)
        has = lengths > 0
        self.rows_read = matched.num_rows
        self.rows_unmatched = int((~has).sum())
        table = matched.select(["uid", "text", "entry_ids"]).filter(pa.array(has))
        uid = _strings(_combined(table.column("uid")))
        text = _strings(pc.fill_null(_combined(table.column("text")), ""))
        ids = _combined(table.column("entry_ids"))

        uh = stable_hash64(uid)
        th = stable_hash64(text)
        order = np.lexsort((th, uh))  # by uid hash, then text hash
        uh_s, th_s = uh[order], th[order]
        same_uid = uh_s[1:] == uh_s[:-1]
        pairs = np.flatnonzero(same_uid)
        if len(pairs):  # equal hashes of adjacent rows: the same uid, or a collision
            a = uid.take(pa.array(order[pairs]))
            b = uid.take(pa.array(order[pairs + 1]))
            differ = np.flatnonzero(~pc.equal(a, b).to_numpy(zero_copy_only=False))
            if len(differ):
                j = int(pairs[differ[0]])
                raise ValueError(
                    f"uids {uid[int(order[j])]!r} and {uid[int(order[j + 1])]!r} have the same "
                    "64-bit hash; online balancing cannot tell them apart"
                )
        # one text per distinct (uid, text): the same pair seen twice (two pages) is one text
        new_row = np.r_[True, ~(same_uid & (th_s[1:] == th_s[:-1]))] if len(order) else has[:0]
        row_of_sorted = np.cumsum(new_row) - 1
        img_of_sorted = np.cumsum(np.r_[True, ~same_uid] if len(order) else has[:0]) - 1
        first = np.flatnonzero(new_row)
        n_rows = len(first)
        row_img = img_of_sorted[first]
        n_img = int(row_img[-1]) + 1 if n_rows else 0
        self._uid_hash = uh_s[_group_starts(img_of_sorted)] if n_rows else uh[:0]
        self._offsets = np.searchsorted(row_img, np.arange(n_img + 1)).astype(np.int64)
        self._texts = text.take(pa.array(order[first]))

        # (distinct text, entry) pairs, and (image, entry) pairs for the union rule
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(flat) and int(flat.max()) >= len(self.counts):
            raise ValueError(
                f"entry id {int(flat.max())} is out of range for counts of {len(self.counts)} "
                "entries; "
                "the matched data and the counts come from different metadata files"
            )
        parents = pc.list_parent_indices(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        inv = np.empty(len(order), dtype=np.int64)
        inv[order] = np.arange(len(order))
        row_pairs = sorted_unique(row_of_sorted[inv[parents]] * n_entries + flat)
        r_rows, r_ents = np.divmod(row_pairs, n_entries)
        img_pairs = sorted_unique(row_img[r_rows] * n_entries + r_ents)
        i_imgs, i_ents = np.divmod(img_pairs, n_entries)
        # head entries: p_e < 1 (count > t; per language for worldwide)
        head = self.counts > self.t if self.languages is None else self.probabilities < 1

        self._row_prob = keep_probabilities(_list_array(r_rows, r_ents, n_rows), self.probabilities)
        self._row_head = np.bincount(r_rows[head[r_ents]], minlength=n_rows).astype(np.uint32)
        self._row_tail = np.bincount(r_rows[~head[r_ents]], minlength=n_rows).astype(np.uint32)
        union_prob = keep_probabilities(_list_array(i_imgs, i_ents, n_img), self.probabilities)
        n_texts = np.diff(self._offsets)
        text_prob = (
            np.add.reduceat(self._row_prob, self._offsets[:-1]) / n_texts
            if n_img
            else np.zeros(0, dtype=np.float64)
        )
        self._img_prob = text_prob if self.rule == "text" else union_prob
        self._img_head = np.bincount(i_imgs[head[i_ents]], minlength=n_img).astype(np.uint32)
        self._img_tail = np.bincount(i_imgs[~head[i_ents]], minlength=n_img).astype(np.uint32)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        """Matched images (uids with at least one matched text)."""
        return len(self._uid_hash)

    @property
    def num_texts(self) -> int:
        """Distinct matched (uid, text) pairs."""
        return len(self._texts)

    @property
    def expected_kept(self) -> float:
        """Expected kept images per pass if every matched image is read once."""
        return float(self._img_prob.sum())

    def _lookup(self, uids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uid hashes, positions of the matched samples, their image indices)."""
        h = stable_hash64(_strings(uids))
        pos = np.searchsorted(self._uid_hash, h)
        pos_c = np.minimum(pos, max(len(self._uid_hash) - 1, 0))
        found = self._uid_hash[pos_c] == h if len(self._uid_hash) else np.zeros(len(h), dtype=bool)
        idx = np.flatnonzero(found)
        return h, idx, pos_c[idx]

    def _decide(
        self, h: np.ndarray, img: np.ndarray, pass_index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(keep, chosen text row) for matched samples with uid hashes h and image indices img."""
        key = pass_key(self.seed, pass_index)
        u_keep = uniform_draws(h, np.full(len(h), _KEEP_STREAM, dtype=np.uint32), key)
        u_text = uniform_draws(h, np.full(len(h), _TEXT_STREAM, dtype=np.uint32), key)
        start = self._offsets[img]
        n_texts = self._offsets[img + 1] - start
        rows = start + np.minimum((u_text * n_texts).astype(np.int64), n_texts - 1)
        prob = self._row_prob[rows] if self.rule == "text" else self._img_prob[img]
        return u_keep < prob, rows

    def keep(
        self, uids: Any, texts: Any = None, pass_index: int = 0
    ) -> tuple[np.ndarray, list[str]]:
        """(mask, texts) for a batch of samples in pass `pass_index`.

        `uids`: NumPy / list / Arrow strings. `texts`: the samples' own texts (returned as they
        are where a sample is not kept) or None. A kept sample's text is the matched text chosen
        for this pass. Unmatched uids are never kept.
        """
        pass_key(self.seed, pass_index)  # checks pass_index
        h, idx, img = self._lookup(uids)
        n = len(h)
        mask = np.zeros(n, dtype=bool)
        out = np.empty(n, dtype=object)
        if texts is None:
            out[:] = ""
        else:
            own = texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
            if len(own) != n:
                raise ValueError(f"got {n} uids but {len(own)} texts")
            out[:] = list(own)
        if len(idx):
            keep, rows = self._decide(h[idx], img, pass_index)
            kept = idx[keep]
            mask[kept] = True
            chosen = np.empty(len(kept), dtype=object)
            chosen[:] = self._texts.take(pa.array(rows[keep])).to_pylist()
            out[kept] = chosen
        return mask, out.tolist()

    def __call__(self, uids: Any, texts: Any, pass_index: int) -> tuple[np.ndarray, list[str]]:
        """Same as `keep` (so the balancer itself is the loader's `keep` callable)."""
        return self.keep(uids, texts, pass_index)

    def probabilities_of(self, uids: Any) -> np.ndarray:
        """Each sample's keep probability per pass under the rule (0 for unmatched uids)."""
        h, idx, img = self._lookup(uids)
        out = np.zeros(len(h), dtype=np.float64)
        out[idx] = self._img_prob[img]
        return out

    def chosen_texts(self, uids: Any, pass_index: int) -> list[str | None]:
        """The text each sample would train on in pass `pass_index` (None when unmatched),
        whether or not it is kept."""
        h, idx, img = self._lookup(uids)
        out = np.full(len(h), None, dtype=object)
        if len(idx):
            _, rows = self._decide(h[idx], img, pass_index)
            chosen = np.empty(len(idx), dtype=object)
            chosen[:] = self._texts.take(pa.array(rows)).to_pylist()
            out[idx] = chosen
        return out.tolist()

    def pass_stats(
        self, mask: np.ndarray, uids: Any, pass_index: int | None = None
    ) -> dict[str, Any]:
        """Counters for a batch (or a pass) of samples and the mask `keep` gave them.

        read, kept, unmatched (no matched text: never kept), not_sampled (matched, not kept),
        kept_head_matches / kept_tail_matches (the kept samples' matches on head entries,
        count > t, and on tail entries; of the text chosen in `pass_index` when given, else of
        the union of the image's texts), head_share / tail_share of those matches. Sum batches
        and ranks with `combine_pass_stats`.
        """
        mask = np.asarray(mask, dtype=bool)
        h, idx, img = self._lookup(uids)
        if len(mask) != len(h):
            raise ValueError(f"got {len(h)} uids but a mask of {len(mask)}")
        kept_m = mask[idx]
        if pass_index is None:
            head = int(self._img_head[img[kept_m]].sum())
            tail = int(self._img_tail[img[kept_m]].sum())
        else:
            _, rows = self._decide(h[idx], img, pass_index)
            head = int(self._row_head[rows[kept_m]].sum())
            tail = int(self._row_tail[rows[kept_m]].sum())
        stats = {
            "read": len(h),
            "kept": int(mask.sum()),
            "unmatched": len(h) - len(idx),
            "not_sampled": int((~kept_m).sum()),
            "kept_head_matches": head,
            "kept_tail_matches": tail,
        }
        return _with_shares(stats)

    def describe(self) -> dict[str, Any]:
        """Parameters and sizes for the manifest."""
        n_texts = np.diff(self._offsets)
        return {
            "rule": self.rule,
            "t": self.t,
            "tail_proportion": self.tail_proportion,
            "seed": self.seed,
            "counts": fingerprint(self.counts.tolist()),
            "entries": len(self.counts),
            "head_entries": int(
                (self.counts > self.t).sum()
                if self.languages is None
                else (self.probabilities < 1).sum()
            ),
            "matched": self.source,
            "rows_read": self.rows_read,
            "rows_unmatched": self.rows_unmatched,
            "images": len(self),
            "texts": self.num_texts,
            "multi_text_images": int((n_texts > 1).sum()),
            "expected_kept_per_pass": self.expected_kept,
            "draws": "uniform_draws(MurmurHash64A(uid), stream, SplitMix64(SplitMix64(seed) ^ "
            "(pass + 1) * phi)); stream 0 keeps, stream 1 picks the text",
            **({"languages": self.languages} if self.languages is not None else {}),
        }


def _with_shares(stats: dict[str, Any]) -> dict[str, Any]:
    matches = stats["kept_head_matches"] + stats["kept_tail_matches"]
    stats["head_share"] = stats["kept_head_matches"] / matches if matches else 0.0
    stats["tail_share"] = stats["kept_tail_matches"] / matches if matches else 0.0
    return stats


def combine_pass_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum `pass_stats` of batches / ranks and recompute the shares."""
    total = dict.fromkeys(STAT_COUNTS, 0)
    for p in parts:
        for k in STAT_COUNTS:
            total[k] += int(p.get(k, 0))
    return _with_shares(total)


__all__: Sequence[str] = (
    "RULES",
    "OnlineBalancer",
    "combine_pass_stats",
    "pass_key",
)
