"""Planning and the barriers at cluster scale (issue 11), measured in one run.

1. Planning + resume of 100,000 shards (local disk, 100 folders of 1,000 inputs like a
   CommonCrawl snapshot's segments): shard naming, input identities (one listing per folder vs
   one `fs.info` per file), stage-folder preparation, and a resume that finds 100,000 done
   markers (one listing + reads).
2. The same planning steps on an S3-compatible server (moto, started here) for fewer shards:
   identities by listing vs per-object HEAD, markers read concurrently vs one by one.
3. Driver peak RSS of `curation count` and `curation filter --baseline clip_score --fraction`
   (global threshold + DataComp uid file) over pools of 1M and 10M rows: the driver process's
   VmHWM (its own high-water mark; Ray's workers are other processes). With `--before DIR`
   (a checkout of an older commit) the same commands run from that checkout too.

    python bench/bench_scale.py [--shards 100000] [--rows 1000000,10000000] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# -- 1. planning + resume of many shards -----------------------------------------------------
def make_inputs(root: Path, shards: int, per_folder: int = 1000) -> list[str]:
    urls = []
    for i in range(shards):
        d = root / f"segments/{i // per_folder:05d}/wat"
        if i % per_folder == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"CC-MAIN-{i:06d}.warc.wat.gz"
        p.write_bytes(b"\x1f\x8b" + i.to_bytes(4, "little"))
        urls.append(str(p))
    return urls


def bench_planning(shards: int) -> None:
    from curation.core import fingerprint as fpm
    from curation.core import fsio
    from curation.io import parts

    tmp = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        urls, dt = _timed(make_inputs, tmp / "in", shards)
        print(f"planning: {shards:,} input files made in {dt:.1f} s")
        named, t_names = _timed(parts.shard_names, urls)
        idents, t_list = _timed(fpm.inputs_fingerprint, urls)
        one_by_one, t_info = _timed(lambda: [fpm.file_identity(u) for u in urls])
        assert [i for _, i in idents] == one_by_one
        stage = str(tmp / "out" / "ingest")
        fp = {"stage": "bench", "inputs": idents}
        (done, todo), t_plan = _timed(parts.done_and_todo, stage, named, fp, False)
        assert not done and len(todo) == shards
        print(
            f"planning {shards:,} shards: names {t_names:.2f} s, input identities "
            f"{t_list:.2f} s by folder listing vs {t_info:.2f} s by fs.info per file "
            f"({t_info / t_list:.1f}x), fresh stage plan {t_plan:.2f} s"
        )
        t0 = time.perf_counter()
        for s in named:
            marker = {"shard": s.name, "input": s.input, "counts": {"rows_written": 1}}
            fsio.atomic_write_json(parts.marker_url(stage, s.name), marker)
        print(f"resume: {shards:,} markers written in {time.perf_counter() - t0:.1f} s")
        (done, todo), t_resume = _timed(parts.done_and_todo, stage, named, fp, False)
        assert len(done) == shards and not todo
        total = t_names + t_list + t_resume
        print(
            f"resume of {shards:,} done shards: {t_resume:.2f} s (listing + marker reads + "
            f"stale-input check); planning + resume {total:.2f} s in all"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- 2. the same on an S3-compatible server ----------------------------------------------------
class _MotoServer:
    """moto's S3 server in its own process (not a thread of this one, which would share the
    GIL with the client being measured); its request log counts the requests of each phase."""

    def __init__(self, log: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = log
        exe = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def requests(self) -> int:
        return sum(
            1 for line in self.log.read_text(errors="replace").splitlines() if "HTTP/1" in line
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def bench_planning_s3(shards: int) -> None:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():  # pragma: no cover - moto is in the test extra
        print("planning on S3: skipped (moto_server not installed)")
        return
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
    os.environ.update(env)
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = _MotoServer(tmp / "moto.log")
    try:
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{server.port}"
        from curation.core import fingerprint as fpm
        from curation.core import fsio
        from curation.io import parts

        fs = fsio.url_to_fs("s3://bench")[0]  # the instance (and listing cache) curation uses
        fs.mkdir("bench")
        urls = [f"s3://bench/in/seg{i // 500:03d}/f{i:06d}.warc.wat.gz" for i in range(shards)]
        fs.pipe({u: b"\x1f\x8b" + i.to_bytes(4, "little") for i, u in enumerate(urls)})

        def phase(fn):  # noqa: ANN001, ANN202
            fs.invalidate_cache()
            before = server.requests()
            out, dt = _timed(fn)
            time.sleep(0.2)  # the log line of the last request
            return out, dt, server.requests() - before

        idents, t_list, r_list = phase(lambda: fpm.file_identities(urls))
        one_by_one, t_info, r_info = phase(lambda: [fpm.file_identity(u) for u in urls])
        assert idents == one_by_one
        named = parts.shard_names(urls)
        stage = "s3://bench/out/ingest"
        fp = {"stage": "bench"}
        parts.done_and_todo(stage, named, fp, False)
        fs.pipe(
            {parts.marker_url(stage, s.name): json.dumps({"shard": s.name}).encode() for s in named}
        )
        (done, _), t_resume, r_resume = phase(
            lambda: parts.done_and_todo(stage, named, fp, False, False)
        )
        assert len(done) == shards
        _, t_seq, r_seq = phase(
            lambda: [fsio.read_json(parts.marker_url(stage, s.name)) for s in named]
        )
        print(
            f"planning on S3 (moto server process, {shards:,} objects in folders of 500): "
            f"input identities {r_list:,} requests in {t_list:.2f} s by listing vs "
            f"{r_info:,} requests in {t_info:.2f} s by HEAD per object; resume ({r_resume:,} "
            f"requests) {t_resume:.2f} s with concurrent marker reads vs {t_seq:.2f} s "
            f"({r_seq:,} requests) one by one ({t_seq / t_resume:.1f}x)"
        )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- 3. driver peak RSS at 1M vs 10M rows ----------------------------------------------------
def make_pool(root: Path, rows: int, per_shard: int = 100_000, entries: int = 176_047) -> None:
    """A DataComp-like pool (uid, clip score) and matched parts (entry_ids) of `rows` rows."""
    import pyarrow as pa

    from curation.core import fsio
    from curation.io.datacomp import UID_DTYPE, pairs_to_uids

    rng = np.random.default_rng(rows)
    (root / "pool").mkdir(parents=True)
    (root / "match").mkdir(parents=True)
    for s in range(-(-rows // per_shard)):
        n = min(per_shard, rows - s * per_shard)
        pairs = np.empty(n, UID_DTYPE)
        pairs["f0"] = rng.integers(0, 2**63, n, dtype=np.uint64)
        pairs["f1"] = rng.integers(0, 2**63, n, dtype=np.uint64)
        score = rng.normal(0.25, 0.05, n).astype(np.float32)
        pool = pa.table({"uid": pairs_to_uids(pairs), "clip_l14_similarity_score": score})
        fsio.atomic_write_parquet(str(root / "pool" / f"{s:08d}.parquet"), pool)
        lengths = rng.integers(0, 6, n)
        flat = (rng.zipf(1.3, int(lengths.sum())) % entries).astype(np.uint32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        fsio.atomic_write_parquet(
            str(root / "match" / f"part-{s:08d}.parquet"), pa.table({"entry_ids": ids})
        )


def peak_rss(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(driver peak RSS in MiB from its VmHWM, wall seconds) of a command run in `cwd` (not
    the checkout: `python -c` puts the working directory first on sys.path)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hwm = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return hwm / 1024, time.perf_counter() - t0


def bench_driver_rss(rows_list: list[int], before: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    try:
        builds = [("after", str(ROOT))] + ([("before", before)] if before else [])
        for rows in rows_list:
            root = tmp / f"{rows}"
            _, dt = _timed(make_pool, root, rows)
            print(f"driver RSS: pool of {rows:,} rows made in {dt:.1f} s")
            for label, src in builds:
                env = {**os.environ, "PYTHONPATH": src, "RAY_AUTH_MODE": "disabled"}
                cli = [sys.executable, "-c", "from curation.cli import main; main()"]
                for name, args in (
                    (
                        "count",
                        ["count", str(root / "match"), "-m", "bundled:metadata_en", "-o",
                         str(root / f"counts-{label}.parquet")],
                    ),
                    (
                        "filter clip_score top 30% + uids.npy",
                        ["filter", str(root / "pool"), "--baseline", "clip_score",
                         "--fraction", "0.3", "-o", str(root / f"filter-{label}"), "--quiet"],
                    ),
                ):  # fmt: skip
                    mib, wall = peak_rss([*cli, *args, "--num-cpus", "2"], env, root)
                    print(
                        f"driver RSS ({label}): {name} over {rows:,} rows: peak "
                        f"{mib:,.0f} MiB, {wall:.1f} s"
                    )
            if before:
                a = (root / "filter-after" / "uids.npy").read_bytes()
                b = (root / "filter-before" / "uids.npy").read_bytes()
                same = (
                    a == b
                    and (root / "counts-after.parquet").read_bytes()
                    == (root / "counts-before.parquet").read_bytes()
                )
                print(f"driver RSS: before/after outputs byte-identical at {rows:,}: {same}")
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--s3-shards", type=int, default=2_000)
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--before", default=None, help="an older checkout to compare driver RSS")
    ap.add_argument("--only", choices=["planning", "s3", "rss"], default=None)
    a = ap.parse_args(argv)
    if a.only in (None, "planning"):
        bench_planning(a.shards)
    if a.only in (None, "s3"):
        bench_planning_s3(a.s3_shards)
    if a.only in (None, "rss"):
        bench_driver_rss([int(x) for x in a.rows.split(",")], a.before)


if __name__ == "__main__":
    main()
