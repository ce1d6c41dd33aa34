"""Language id throughput (one core): the `langid` stage's rows/s over synthetic multilingual
alt-texts (MetaCLIP 2), printed as one line. Runnable alone: `python bench/bench_langid.py`."""

from __future__ import annotations

import sys
import tempfile
import time

N_ROWS = 100_000
SHARDS = 2
SEED = 0


def captions(n: int = N_ROWS, seed: int = SEED):
    """The `text` column of an ingested synthetic pool in 11 languages (`--worldwide`): alt
    texts, titles and data-image-titles with real-world whitespace and length spread."""
    import pyarrow as pa

    from curation.core.stage import Shard
    from curation.stages.ingest import Ingestor
    from curation.synth.wat import write_synthetic_pool

    with tempfile.TemporaryDirectory() as d:
        pool = write_synthetic_pool(d, SHARDS, n // SHARDS, seed, languages="worldwide")
        ing = Ingestor()
        cols = [ing.read(Shard(name=str(i), input=f)).table.column("text")
                for i, f in enumerate(pool.files)]  # fmt: skip
    return pa.chunked_array([c for col in cols for c in col.chunks])


def bench_langid(n: int = N_ROWS) -> str:
    """One line: langid stage rows/s on one core (labels + scores + mapping), and the
    labels-only batch call for comparison."""
    import pyarrow as pa

    from curation.stages.langid import LangIdStage

    texts = captions(n)
    table = pa.table({"text": texts})
    stage = LangIdStage()
    stage.setup()  # model load is not timed
    t0 = time.perf_counter()
    out = stage.process(table)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    stage._lid(texts)  # labels only (fasttext-predict's multilinePredict)
    dt_labels = time.perf_counter() - t1
    langs = sum(1 for k in out.counts if k.startswith("lang_"))
    return (
        f"langid (1 core, lid.176.ftz): {len(texts) / dt:,.0f} rows/s with scores "
        f"({len(texts):,} captions in 11 synthetic languages → {langs} metadata languages; "
        f"labels-only batch call {len(texts) / dt_labels:,.0f} rows/s)"
    )


def main() -> None:
    print(bench_langid(int(sys.argv[1]) if len(sys.argv) > 1 else N_ROWS))


if __name__ == "__main__":
    main()
