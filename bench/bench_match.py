"""Benchmark of `curation.stages.match` on one core against MetaCLIP's per-text Aho-Corasick loop.

Builds a deterministic >= 500,000-entry metadata (wordfreq English words, bigrams and trigrams of
frequent words, numbers) and ~200,000 synthetic alt-texts (~58 bytes each: wordfreq word
frequencies, phrases from the metadata, punctuation, capitalization, a few tabs and newlines),
then times: the automaton build, the n-gram table build, MetaCLIP's loop, and our engines. It
checks that all of them give identical ids. No downloads; seeded NumPy only.

Run: ``python bench/bench_match.py [n_texts]``; `bench/run.py` imports `main`.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import numpy as np
import pyarrow as pa

# One core: `main` pins the process (and the child processes it starts) to a single CPU and sets
# Arrow's thread pools to one thread; run as a script, the thread-count variables are set too.
# (`curation.stages.match` does not use polars.)
THREAD_VARS = ("POLARS_MAX_THREADS", "RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")

N_TEXTS = 200_000
SEED = 20230928


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start a new peak-RSS measurement (Linux: VmHWM is reset by writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - not Linux
        pass


def _peak_rss_mb() -> float:
    """Peak resident set size since the last `_reset_peak_rss`, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (Arrow's pool and glibc), so RSS shows what is
    kept rather than what the allocators cache."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _word_table(n: int = 60_000) -> tuple[list[str], np.ndarray]:
    import wordfreq

    freqs = wordfreq.get_frequency_dict("en", "large")
    words = wordfreq.top_n_list("en", n, wordlist="large")
    p = np.array([freqs[w] for w in words], dtype=np.float64)
    return words, p / p.sum()


def build_metadata(target: int = 500_000) -> list[str]:
    """Deterministic English metadata of at least `target` distinct entries: every wordfreq
    English word, then frequency-sampled bigrams and trigrams of frequent words, then numbers."""
    import wordfreq

    rng = np.random.default_rng(SEED)
    entries = dict.fromkeys(w for w in wordfreq.top_n_list("en", 10**6, wordlist="large") if w)
    top, p = _word_table(20_000)
    w = np.sqrt(p)
    w /= w.sum()
    for n_gram, quota in ((2, 150_000), (3, 40_000)):
        added = 0
        while added < quota:
            idx = rng.choice(len(top), size=(quota, n_gram), p=w)
            for row in idx.tolist():
                phrase = " ".join(top[i] for i in row)
                if phrase not in entries:
                    entries[phrase] = None
                    added += 1
                    if added == quota:
                        break
    for i in range(20_000):
        entries.setdefault(str(i), None)
    i = 0
    while len(entries) < target:
        entries.setdefault(f"item {i}", None)
        i += 1
    return list(entries)


def make_texts(n: int, metadata: list[str]) -> list[str]:
    """`n` deterministic alt-text-like strings (~58 bytes on average)."""
    rng = np.random.default_rng(SEED + 1)
    words, p = _word_table()
    phrases = [e for e in metadata if e.count(" ") in (1, 2) and not e.startswith("item ")]
    n_words = 1 + rng.poisson(8.3, size=n)
    flat = rng.choice(len(words), size=int(n_words.sum()), p=p)
    u = rng.random(size=(int(n_words.sum()), 4))
    tu = rng.random(size=(n, 6))
    phrase_idx = rng.integers(0, len(phrases), size=n)
    nums = rng.integers(0, 2030, size=n)
    seps = [", ", " - ", " | ", ": ", "; ", "\n", "\t", " ", " ", " "]
    texts = []
    k = 0
    for i in range(n):
        toks = []
        for _ in range(int(n_words[i])):
            tok = words[flat[k]]
            r = u[k]
            k += 1
            if r[0] < 0.04:
                tok = str(int(r[1] * 3000))
            elif r[0] < 0.06:
                tok = tok.upper()
            elif r[0] < 0.20:
                tok = tok.capitalize()
            if r[2] < 0.015:
                tok = f'"{tok}"'
            elif r[2] < 0.025:
                tok = f"({tok})"
            toks.append(tok)
            toks.append(seps[int(r[3] * 40) % len(seps)] if r[3] < 0.18 else " ")
        toks.pop()
        t = tu[i]
        if t[0] < 0.45:  # a phrase from the metadata somewhere in the text
            pos = int(t[1] * (len(toks) + 1)) // 2 * 2
            toks[pos:pos] = [phrases[phrase_idx[i]], " "]
        text = "".join(toks).strip(" ")
        if t[2] < 0.55:
            text = text[:1].upper() + text[1:]
        if t[3] < 0.25:
            text += "."
        elif t[3] < 0.29:
            text += "!"
        elif t[3] < 0.31:
            text += "?"
        if t[4] < 0.05:
            text = f"{text} {int(nums[i])}"
        elif t[4] < 0.07:
            text = f"IMG_{int(nums[i]):04d}.jpg"
        elif t[4] < 0.075:
            text = ""
        texts.append(text)
    return texts


def metaclip_loop(texts: list[str], automaton) -> list[list[int]]:
    """MetaCLIP's `substr_matching_ahocorasick.substr_matching`, one text at a time."""
    from curation.stages.match import spacing

    out = []
    for text in texts:
        matched_entry_ids = set()
        for _end_index, (entry_id, _original_value) in automaton.iter(spacing(text)):
            matched_entry_ids.add(entry_id)
        out.append(list(matched_entry_ids))
    return out


def _best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def build_stats(kind: str) -> dict[str, float]:
    """Build time and memory of one matcher kind, measured in this (fresh) process."""
    import ahocorasick

    from curation.stages.match import Matcher

    metadata = build_metadata()
    _release_free_memory()
    rss0 = rss_mb()
    _reset_peak_rss()
    t0 = time.perf_counter()
    if kind == "metaclip":
        automaton = ahocorasick.Automaton()
        for idx, key in enumerate(f" {e} " for e in metadata):
            automaton.add_word(key, (idx, key))
        automaton.make_automaton()
        keep = automaton
    else:
        keep = Matcher(metadata, engine=kind)
        keep.setup()
    dt = time.perf_counter() - t0
    peak = _peak_rss_mb()
    _release_free_memory()
    return {"build_s": dt, "rss_mb": rss_mb() - rss0, "peak_mb": peak - rss0, "n": len(metadata)}


def _isolated_build_stats(kind: str) -> dict[str, float]:
    """`build_stats` in a child process, so memory freed by earlier work does not hide any."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--build-stats", kind],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(n_texts: int = N_TEXTS) -> None:
    """Print build times, memory and throughput of every engine, on one core."""
    import ahocorasick

    from curation.stages.match import Matcher

    cpus, io_threads = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    env = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))  # for the child processes
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})  # children inherit the single core
    try:
        for kind, label in (
            ("metaclip", "automaton build (MetaCLIP style, values (id, key))"),
            ("ahocorasick", "Matcher('ahocorasick').setup()"),
            ("ngram", "Matcher('ngram').setup() (fast-engine tables)"),
        ):
            s = _isolated_build_stats(kind)
            print(
                f"{label}: {s['build_s']:.2f} s for {s['n']:,} entries, "
                f"RSS +{s['rss_mb']:.0f} MiB kept (peak +{s['peak_mb']:.0f} MiB)"
            )

        t0 = time.perf_counter()
        metadata = build_metadata()
        texts = make_texts(n_texts, metadata)
        col = pa.array(texts, type=pa.string())
        nbytes = col.nbytes - 4 * (len(col) + 1)
        mb = nbytes / 1e6
        print(
            f"data: {len(metadata):,} entries, {len(texts):,} texts, "
            f"{nbytes / len(texts):.1f} bytes/text (built in {time.perf_counter() - t0:.1f} s)"
        )
        automaton = ahocorasick.Automaton()
        for idx, key in enumerate(f" {e} " for e in metadata):
            automaton.add_word(key, (idx, key))
        automaton.make_automaton()
        matchers = {e: Matcher(metadata, engine=e) for e in ("ahocorasick", "ngram", "auto")}
        for m in matchers.values():
            m.setup()

        t_loop, loop_res = _best_of(lambda: metaclip_loop(texts, automaton), 3)
        base = len(texts) / t_loop
        print(
            f"(1) MetaCLIP per-text loop:  {base:>10,.0f} texts/s  {mb / t_loop:6.1f} MB/s  1.00x"
        )
        results = {}
        for label, engine in (
            ("(2) engine 'ahocorasick':", "ahocorasick"),
            ("(3) engine 'ngram':      ", "ngram"),
            ("(3) engine 'auto':       ", "auto"),
        ):
            dt, res = _best_of(lambda e=engine: matchers[e].match(col), 3)
            results[engine] = res
            rate = len(texts) / dt
            print(f"{label}   {rate:>10,.0f} texts/s  {mb / dt:6.1f} MB/s  {rate / base:.2f}x")

        ref = pa.array([sorted(r) for r in loop_res], type=pa.list_(pa.uint32()))
        same = all(results[e].equals(ref) for e in results)
        n_ids = len(ref.values)
        print(
            f"identical results (loop, ahocorasick, ngram, auto): {same} "
            f"({n_ids:,} ids, {n_ids / len(texts):.2f} per text)"
        )
        if not same:
            raise AssertionError("match engines disagree with MetaCLIP's loop on the bench data")
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
        pa.set_cpu_count(cpus)
        pa.set_io_thread_count(io_threads)
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


if __name__ == "__main__":
    for _var in THREAD_VARS:
        os.environ.setdefault(_var, "1")
    if len(sys.argv) == 3 and sys.argv[1] == "--build-stats":
        import json

        print(json.dumps(build_stats(sys.argv[2])))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else N_TEXTS)
