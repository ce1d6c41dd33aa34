"""Worldwide matching throughput (one core): langid + per-language match (MetaCLIP 2) against
English-only matching of the same texts, printed as lines. Runnable alone:
`python bench/bench_worldwide.py [ROWS]` (default 50,000 synthetic multilingual captions).

Setup (model load, metadata load; automata are built on a warm-up batch) is not timed: it is
once per worker. The English row matches the same multilingual texts against
`bundled:metadata_en`, as an English-only pipeline would.
"""

from __future__ import annotations

import sys
import time

N_ROWS = 50_000


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_worldwide(n: int = N_ROWS) -> list[str]:
    """Lines: langid, per-language match, both together, English-only match (rows/s, 1 core)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from curation.core.metadata import load_metadata, load_metadata_set
    from curation.stages.langid import LangIdStage
    from curation.stages.match import LanguageMatcher, Matcher

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_langid import captions

    texts = captions(n)
    table = pa.table({"text": texts})
    lid = LangIdStage()
    lid.setup()
    mset = load_metadata_set("bundled:metadata_worldwide")
    lm = LanguageMatcher(mset.entries(), engine="auto", script_aware=True)
    en = Matcher(load_metadata("bundled:metadata_en").entries, engine="auto")
    en.setup()
    warm = lid.process(table.slice(0, 2000)).table
    lm.process(warm)  # builds the matchers of the languages present
    en.match(texts.slice(0, 2000))

    tagged, t_lid = _timed(lambda: lid.process(table).table)
    res, t_match = _timed(lm.process, tagged)
    ids, t_en = _timed(en.match, texts)
    rows = len(texts)
    matched = res.counts["rows_with_match"]
    en_matched = int(pc.sum(pc.greater(pc.list_value_length(ids), 0)).as_py())
    return [
        f"worldwide langid (1 core): {rows / t_lid:,.0f} rows/s",
        f"worldwide per-language match (1 core, {len(mset)} languages, script-aware): "
        f"{rows / t_match:,.0f} rows/s ({matched:,} of {rows:,} rows matched, "
        f"{res.counts['rows_no_metadata']:,} without metadata)",
        f"worldwide langid + match (1 core): {rows / (t_lid + t_match):,.0f} rows/s",
        f"english-only match, same texts (1 core, bundled:metadata_en): {rows / t_en:,.0f} rows/s "
        f"({en_matched:,} rows matched); worldwide/english time ratio "
        f"{(t_lid + t_match) / t_en:.1f}x",
    ]


def main() -> None:
    for line in bench_worldwide(int(sys.argv[1]) if len(sys.argv) > 1 else N_ROWS):
        print(line)


if __name__ == "__main__":
    main()
