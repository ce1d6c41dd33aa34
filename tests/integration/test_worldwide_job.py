"""The MetaCLIP 2 worldwide job end to end on a tiny multilingual synth pool (in-process on the
session cluster): accounting per reason, per-language t, rows without metadata, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from curation.config.job import parse_job
from curation.core.worldwide import per_language_t, read_language_counts
from curation.flows.job import run_job

from .conftest import tree_digest

T, SEED = 5, 1


def job(**balance) -> dict:
    return {
        "name": "worldwide_tiny",
        "seed": SEED,
        "input": {
            "synth": {
                "shards": 2, "pairs_per_shard": 300, "seed": 0, "malformed_rate": 0.01,
                "languages": "worldwide",
            }
        },
        "metadata": "bundled:metadata_worldwide",
        "langid": {},
        "balance": {"t": T, **balance},
    }  # fmt: skip


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("ww") / "out"
    manifest = run_job(parse_job(job()), str(out), progress=False)
    return out, manifest


def test_accounting_reconciles_per_reason(done):
    out, m = done
    st = m["stages"]
    assert m["flow"] == ["ingest", "langid", "match", "count", "balance"]
    n = st["ingest"]["rows_written"]
    assert n > 0
    assert st["langid"]["rows_read"] == st["langid"]["rows_written"] == n
    assert st["match"]["rows_read"] == st["match"]["rows_written"] == n
    b = st["balance"]
    assert b["rows_read"] == n
    assert set(b["rows_dropped"]) <= {"no_metadata", "no_match", "not_sampled"}
    assert b["rows_written"] + sum(b["rows_dropped"].values()) == n
    assert b["rows_written"] == sum(len(_rows(p)) for p in (out / "balance").glob("part-*"))
    langs = m["languages"]
    assert sum(r["rows"] for r in langs) == n
    assert sum(r["rows_kept"] for r in langs) == b["rows_written"]
    assert sum(r["rows_with_match"] for r in langs) == st["match"]["counters"]["rows_with_match"]
    assert sum(r["matches"] for r in langs) == st["count"]["matches"]
    assert (out / "report" / "languages.png").read_bytes()[:4] == b"\x89PNG"
    assert "| en |" in (out / "report" / "summary.md").read_text()


def test_unknown_languages_accounted(done):
    _, m = done
    no_md = [r for r in m["languages"] if r["rule"] == "no_metadata"]
    assert any(r["lang"] == "th" for r in no_md)  # Thai captions, no Thai metadata bundled
    rows = sum(r["rows"] for r in no_md)
    assert rows == m["stages"]["match"]["counters"]["rows_no_metadata"] > 0
    assert m["stages"]["balance"]["rows_dropped"]["no_metadata"] == rows
    assert all(r["rows_kept"] == 0 and r["t"] is None for r in no_md)


def test_per_language_t_matches_counts_file(done):
    out, m = done
    counts = read_language_counts(str(out / "counts" / "lang_counts.parquet"))
    expect = per_language_t(counts, T)
    got = {r["lang"]: r for r in m["languages"] if r["rule"] != "no_metadata"}
    assert set(got) == set(expect)
    for lang, th in expect.items():
        assert got[lang]["t"] == th.t and got[lang]["rule"] == th.rule, lang
        assert got[lang]["tail_proportion"] == th.tail_proportion
    assert m["balance"]["t"] == T and got["en"]["rule"] == "given"
    assert sum(int(c.sum()) for c in counts.values()) == m["stages"]["count"]["matches"]
    after = read_language_counts(str(out / "counts" / "lang_counts_balanced.parquet"))
    assert all(np.all(after[k] <= counts[k]) for k in counts)


def test_rerun_is_byte_identical(done, tmp_path):
    out, m = done
    before = tree_digest(out)
    again = run_job(parse_job(job()), str(out), progress=False)
    assert again == m
    assert tree_digest(out) == before
    # a fresh run elsewhere writes the same parts and counts
    other = tmp_path / "out2"
    m2 = run_job(parse_job(job()), str(other), progress=False)
    assert m2["languages"] == m["languages"]
    for rel in ("counts/lang_counts.parquet", "counts/lang_counts_balanced.parquet"):
        assert (other / rel).read_bytes() == (out / rel).read_bytes()
    for p in sorted((out / "balance").glob("part-*.parquet")):
        assert (other / "balance" / p.name).read_bytes() == p.read_bytes()
    assert (other / "report" / "languages.png").read_bytes() == (
        out / "report" / "languages.png"
    ).read_bytes()
    assert json.loads((out / "manifest.json").read_text())["languages"] == m["languages"]


def _rows(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path).column("uid")


def test_online_balancer_uses_per_language_probabilities(done):
    from collections import Counter

    import pyarrow as pa
    import pyarrow.compute as pc

    from curation.core.worldwide import language_probabilities
    from curation.io.parts import read_part
    from curation.stages.balance import keep_probabilities
    from curation.train.online import OnlineBalancer

    out, m = done
    counts = read_language_counts(str(out / "counts" / "lang_counts.parquet"))
    bal = OnlineBalancer.load(str(out / "match"), str(out / "counts" / "lang_counts.parquet"), t=T)
    assert bal.t == T and set(bal.describe()["languages"]) == set(counts)
    probs = language_probabilities(counts, per_language_t(counts, T))
    t = pa.concat_tables(read_part(str(p)) for p in sorted((out / "match").glob("part-*.parquet")))
    matched = t.filter(pc.greater(pc.list_value_length(t.column("entry_ids")), 0))
    per_uid = Counter(matched.column("uid").to_pylist())
    checked = 0
    for lang in ("en", "de", "zh"):
        sub = matched.filter(pc.equal(matched.column("lang"), lang))
        uids = sub.column("uid").to_pylist()
        one = [i for i, u in enumerate(uids) if per_uid[u] == 1]
        sub = sub.take(pa.array(one, pa.int64()))
        want = keep_probabilities(sub.column("entry_ids"), probs[lang])
        got = bal.probabilities_of(sub.column("uid"))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        checked += len(one)
    assert checked > 50
    # an image whose only texts have no metadata (Thai) is never kept; one with a matched text
    # in another language is kept by that text (online balancing is per image)
    th = t.filter(pc.equal(t.column("lang"), "th")).column("uid").to_pylist()
    no_md = [u for u in th if per_uid[u] == 0]
    assert no_md and not bal.probabilities_of(no_md).any()
