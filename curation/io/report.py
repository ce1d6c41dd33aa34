"""Report: entry-count plots before/after balancing, the head/tail table and top entries."""

from __future__ import annotations

import io
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


def save_png(fig: Any, url: str) -> None:
    """Write a matplotlib figure as a PNG to `url` (atomically), without the Software tag that
    names the matplotlib version, so the bytes depend only on the figure; closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    fsio.atomic_write_bytes(url, buf.getvalue())


def plot_counts(before: np.ndarray, after: np.ndarray, t: float, path: str) -> None:
    """Log-log rank/count plot of entry counts before and after balancing, with t marked."""

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
    save_png(fig, path)


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


#: The heading of the training section `write_job_report` adds to summary.md (and replaces).
TRAIN_HEADING = "## Recipe, training and evaluation"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def job_report_lines(
    recipe: dict[str, Any],
    train: dict[str, Any],
    evaluation: dict[str, Any] | None,
    curve: str | None,
) -> list[str]:
    """The markdown of a job's recipe, subset, training run and zero-shot scores."""
    h, r, d = train["hyperparameters"], train["result"], train["data"]
    bal = recipe.get("balance")
    subset = d.get("subset") or {}
    if recipe.get("online"):
        data = "online MetaCLIP balancing each pass over the rows balancing started from"
    elif recipe.get("subset_rows") is not None:
        data = f"the curated subset, {recipe['subset_rows']:,} rows"
    else:
        data = "the whole pool (no filtering)"
    lines = [
        TRAIN_HEADING,
        "",
        "| recipe | |",
        "|---|---|",
        f"| job | {recipe['name']} |",
    ]
    if recipe.get("paper"):
        lines.append(f"| paper | {recipe['paper']} |")
    lines += [
        f"| filters | {recipe.get('filters') or 'none'} |",
        "| balance | "
        + (
            f"t = {bal['t']:,.0f}, p = {bal['tail_proportion']:.4f}"
            + (f", {bal['when']} the filters" if bal.get("when") else "")
            if bal
            else "none"
        )
        + " |",
        f"| flow | {' → '.join(recipe.get('flow') or []) or 'none'} |",
        f"| pool rows | {_fmt(recipe.get('pool_rows')) or 'not counted'} |",
        f"| trained on | {data} |",
        f"| samples per pass | {_fmt(d.get('samples_per_pass'))} images in the training shards"
        + (f" (subset of {_fmt(subset.get('uids'))} uids)" if subset else "")
        + " |",
        "",
        "| training | |",
        "|---|---|",
        f"| model | {h['model']}" + (f" (scale {h['scale']})" if h.get("scale") else "") + " |",
        f"| batch size | {_fmt(h['batch_size'])} |",
        f"| learning rate | {h['lr']:g} (warmup {_fmt(h['warmup'])} steps) |",
        f"| samples seen | {_fmt(r['samples_seen'])} of {_fmt(h['samples_seen'])} |",
        f"| steps | {_fmt(r['steps'])} / {_fmt(r['total_steps'])} |",
        f"| final loss | {_fmt(r['final_loss'])} |",
        f"| device | {r['device']} x {r['world_size']}, {r['precision']} |",
        f"| model file | {r['model']} |",
        "",
    ]
    if curve:
        lines += [f"![training loss]({curve})", ""]
    if evaluation:
        lines += [
            "| task | kind | images | acc1 | acc5 | mean recall |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for t in evaluation["tasks"]:
            m = t["metrics"]
            lines.append(
                f"| {t['task']} | {t['kind']} | {_fmt(t.get('images'))} | "
                f"{_fmt(m.get('acc1'))} | {_fmt(m.get('acc5'))} | {_fmt(m.get('mean_recall'))} |"
            )
        a = evaluation["average"]
        lines.append(
            f"| **average** | {a['classification_tasks']} classification, "
            f"{a['retrieval_tasks']} retrieval | | {_fmt(a['classification_acc1'])} | | "
            f"{_fmt(a['retrieval_mean_recall'])} |"
        )
        lines.append("")
    return lines


def write_job_report(
    out: str,
    recipe: dict[str, Any],
    train: dict[str, Any],
    evaluation: dict[str, Any] | None,
    curve: str | None = None,
) -> str:
    """Add (or replace) the training section of OUT/report/summary.md, creating the file for a
    job that does not balance; returns its URL. `curve`: a PNG beside it (`loss_curve.png`)."""
    url = fsio.join(out, "report", "summary.md")
    head = "# Curation report\n"
    if fsio.exists(url):
        fs, path = fsio.url_to_fs(url)
        with fs.open(path, "rb") as f:
            head = f.read().decode().split(TRAIN_HEADING, 1)[0]
    body = "\n".join(job_report_lines(recipe, train, evaluation, curve))
    fsio.atomic_write_bytes(url, (head.rstrip("\n") + "\n\n" + body).encode())
    return url


def plot_languages(rows: list[dict[str, Any]], path: str, top: int = 30) -> None:
    """Bar chart of rows per language before and after balancing (MetaCLIP 2's language mix),
    the `top` languages by rows, log scale; deterministic PNG bytes."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["rows"]][:top]
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(shown) + 2), 4.5), dpi=120)
    before = [r["rows"] for r in shown]
    after = [r["rows_kept"] for r in shown]
    total_b, total_a = sum(r["rows"] for r in rows), sum(r["rows_kept"] for r in rows)
    ax.bar(x - 0.2, before, 0.4, label=f"before balancing ({total_b:,} rows)")
    ax.bar(x + 0.2, after, 0.4, label=f"after balancing ({total_a:,} rows)")
    ax.set_xticks(x, [r["lang"] for r in shown], rotation=90)
    if any(before):
        ax.set_yscale("log")
    ax.set_ylabel("rows")
    ax.set_title(f"Language mix (rows per language, top {len(shown)} of {len(rows)})")
    ax.legend()
    ax.grid(True, axis="y", which="major", alpha=0.3)
    save_png(fig, path)


def write_language_report(
    out: str, rows: list[dict[str, Any]], balance: dict[str, Any]
) -> dict[str, Any]:
    """A worldwide job's OUT/report/{languages.png, summary.json, summary.md}: the per-language
    table (rows, matched rows, matches, t, tail proportion, rule, kept rows) and the plot."""
    rdir = fsio.join(out, "report")
    plot_languages(rows, fsio.join(rdir, "languages.png"))
    summary = {"balance": balance, "languages": rows}
    fsio.atomic_write_json(fsio.join(rdir, "summary.json"), summary)
    lines = [
        "# Curation report (worldwide, MetaCLIP 2)",
        "",
        f"t_en = {balance['t']:,.0f}, tail proportion p = {balance['tail_proportion']:.4f}, "
        f"min_matches = {balance.get('min_matches', 0):,}",
        "",
        "| language | rows | matched rows | matches | t | tail proportion | rule | kept rows |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if not (r["rows"] or r["matches"]):
            continue
        t = "" if r["t"] is None else f"{r['t']:,.0f}"
        p = "" if r["tail_proportion"] is None else f"{r['tail_proportion']:.4f}"
        lines.append(
            f"| {r['lang']} | {r['rows']:,} | {r['rows_with_match']:,} | {r['matches']:,} | "
            f"{t} | {p} | {r['rule']} | {r['rows_kept']:,} |"
        )
    lines += ["", "![language mix](languages.png)", ""]
    fsio.atomic_write_bytes(fsio.join(rdir, "summary.md"), "\n".join(lines).encode())
    return summary
