"""Report: entry-count plots before/after balancing, the head/tail table and top entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from curation.core import fsio

TOP_N = 20


def head_tail(counts: np.ndarray, t: float) -> dict[str, int]:
    """Entries and matches at or above t (head) and below t (tail, matched at least once)."""
    c = np.asarray(counts, dtype=np.uint64)
    head = c >= t
    tail = (c < t) & (c > 0)
    return {
        "head_entries": int(head.sum()),
        "head_matches": int(c[head].sum()),
        "tail_entries": int(tail.sum()),
        "tail_matches": int(c[tail].sum()),
        "unmatched_entries": int((c == 0).sum()),
    }


def top_entries(counts: np.ndarray, entries: Sequence[str], n: int = TOP_N) -> list[dict[str, Any]]:
    c = np.asarray(counts, dtype=np.uint64)
    order = np.lexsort((np.arange(len(c)), -c.astype(np.int64)))[:n]  # ties by entry id
    return [{"entry_id": int(i), "entry": entries[i], "count": int(c[i])} for i in order if c[i]]


def plot_counts(before: np.ndarray, after: np.ndarray, t: float, path: str) -> None:
    """Log-log rank/count plot of entry counts before and after balancing, with t marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for counts, label in ((before, "before balancing"), (after, "after balancing")):
        c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
        c = c[c > 0]
        if len(c):
            ax.loglog(np.arange(1, len(c) + 1), c, label=f"{label} ({int(c.sum()):,} matches)")
    ax.axhline(t, color="red", linestyle="--", linewidth=1, label=f"t = {t:,.0f}")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("matches per entry")
    ax.set_title("Concept distribution (metadata entry counts)")
    ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    fsio.atomic_write_bytes(path, buf.getvalue())


def write_report(
    out: str, before: np.ndarray, after: np.ndarray, entries: Sequence[str], t: float, p: float
) -> dict[str, Any]:
    """Write OUT/report/{entry_counts.png, summary.json, summary.md}; returns the summary."""
    rdir = fsio.join(out, "report")
    plot_counts(before, after, t, fsio.join(rdir, "entry_counts.png"))
    summary = {
        "t": t,
        "tail_proportion": p,
        "before": head_tail(before, t),
        "after": head_tail(after, t),
        "top_before": top_entries(before, entries),
        "top_after": top_entries(after, entries),
    }
    fsio.atomic_write_json(fsio.join(rdir, "summary.json"), summary)
    lines = [
        "# Curation report",
        "",
        f"t = {t:,.0f}, tail proportion p = {p:.4f}",
        "",
        "| | head entries (count >= t) | head matches | tail entries | tail matches | unmatched |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in ("before", "after"):
        h = summary[k]
        lines.append(
            f"| {k} | {h['head_entries']:,} | {h['head_matches']:,} | {h['tail_entries']:,} | "
            f"{h['tail_matches']:,} | {h['unmatched_entries']:,} |"
        )
    lines += ["", "| rank | top before | count | top after | count |", "|---:|---|---:|---|---:|"]
    tb, ta = summary["top_before"], summary["top_after"]
    for i in range(max(len(tb), len(ta))):
        b = tb[i] if i < len(tb) else {"entry": "", "count": ""}
        a = ta[i] if i < len(ta) else {"entry": "", "count": ""}
        lines.append(f"| {i + 1} | {b['entry']} | {b['count']} | {a['entry']} | {a['count']} |")
    lines += ["", "![entry counts](entry_counts.png)", ""]
    fsio.atomic_write_bytes(fsio.join(rdir, "summary.md"), "\n".join(lines).encode())
    return summary
