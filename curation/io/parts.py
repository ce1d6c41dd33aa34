"""A stage's output folder: parts, completion markers, the stage fingerprint, resume.

`STAGE_DIR/part-<shard>.parquet` is written first (atomically: one PUT on object stores, temp +
rename on local disks), then `STAGE_DIR/_done/<shard>.json`, the completion marker with the
shard's counters. A shard is done only when its marker exists; one listing of `_done/` tells
what is done. `STAGE_DIR/_stage.json` holds the stage's fingerprint (its parameters, the code
version, the identity of its inputs and assets); a rerun with another fingerprint refuses to
reuse old parts unless told to overwrite.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from curation import __version__
from curation.core import fsio
from curation.core.fingerprint import modified_time
from curation.core.redact import redact, redact_url
from curation.core.stage import Shard

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

MARKER_DIR = "_done"
STAGE_FILE = "_stage.json"
#: Files a standalone command writes next to its parts; `--overwrite` removes them too.
OWNED_FILES = ("manifest.json", "quarantine.jsonl")
#: Final names whose temporaries from older versions (`<name>.tmp-<pid>-<hex>`) are cleaned.
STAGE_TEMP_BASES = ("part-*.parquet", STAGE_FILE, *OWNED_FILES, "*.tar", "*.parquet")
RUN_TEMP_BASES = (
    *OWNED_FILES, "uids.npy", "entry_counts*.parquet", "entry_counts.png", "summary.*",
)  # fmt: skip


class ResumeError(RuntimeError):
    """An output folder holds results of a different job; says how to proceed."""


def shard_names(inputs: Sequence[str]) -> list[Shard]:
    """Stable, unique shard names from input URLs (a short path hash breaks name collisions)."""
    names = [fsio.shard_name(u) for u in inputs]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    out = []
    for url, name in zip(inputs, names, strict=True):
        if seen[name] > 1:
            name = f"{name}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        out.append(Shard(name=name, input=url))
    return out


def part_url(stage_dir: str, shard: str) -> str:
    return fsio.join(stage_dir, f"part-{shard}.parquet")


def marker_url(stage_dir: str, shard: str) -> str:
    return fsio.join(stage_dir, MARKER_DIR, f"{shard}.json")


def write_marker(stage_dir: str, shard: str, stats: dict[str, Any]) -> None:
    """Write the completion marker last, after the part is in place."""
    fsio.atomic_write_json(marker_url(stage_dir, shard), stats)


def read_part(url: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One stage part (any fsspec URL)."""
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def finish_part(
    stage_dir: str,
    shard: Shard,
    table: pa.Table,
    counts: dict[str, int],
    *,
    parquet: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write a shard's part, then its marker (counts + `extra`); returns the marker.

    `parquet` holds extra `pyarrow.parquet` writer options for the part.
    """
    fsio.atomic_write_parquet(part_url(stage_dir, shard.name), table, **(parquet or {}))
    counts = dict(counts)
    counts["rows_written"] = table.num_rows
    from curation.core.redact import redact_url

    stats = {
        "shard": shard.name,
        "input": redact_url(shard.input),
        "counts": dict(sorted(counts.items())),
    }
    stats.update(extra)
    write_marker(stage_dir, shard.name, stats)
    return stats


def parts_of(folder: str) -> list[Shard]:
    """Shards of a stage output folder (`part-<name>.parquet`), or of a single Parquet file."""
    fs, path = fsio.url_to_fs(folder)
    if fs.isfile(path):
        return [Shard(name=fsio.shard_name(folder).removeprefix("part-"), input=folder)]
    files = sorted(
        p
        for p in fs.find(path)
        if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(f"{folder} has no part-*.parquet files")
    return [
        Shard(
            name=p.rsplit("/", 1)[-1][len("part-") : -len(".parquet")], input=fsio.full_url(fs, p)
        )
        for p in files
    ]


def prepare_stage_dir(
    stage_dir: str,
    fp: dict[str, Any],
    overwrite: bool,
    owned: Sequence[str] = (),
    marker_temps: bool = True,
) -> None:
    """Create the stage folder, or check that its fingerprint matches (else refuse / clear).

    The fingerprint always holds the package version: parts written by another version of
    the code are not reused. Clearing (`overwrite`) removes only what this package writes
    there (`_clear_stage`), plus the files and folders matching the `fnmatch` patterns `owned`
    (a stage's other outputs, e.g. fetch's `NAME-00000.tar`). `marker_temps=False` leaves
    leftover temporaries in `_done/` to the caller's own listing of it (`done_and_todo`).
    """
    fp = redact({**fp, "curation": __version__})  # no credentials in _stage.json
    fs, path = fsio.url_to_fs(stage_dir)
    stage_file = fsio.join(stage_dir, STAGE_FILE)
    if fs.exists(path):
        if fs.exists(fsio.url_to_fs(stage_file)[1]):
            old = fsio.read_json(stage_file)
            if old != fp:
                if not overwrite:
                    changed = _changed_keys(old, fp)
                    raise ResumeError(
                        f"{stage_dir} holds results of a different job (changed: "
                        f"{', '.join(changed)}). Rerun with --overwrite to replace them, or "
                        "write to another output folder."
                    )
                _clear_stage(fs, path, owned)
        elif overwrite:
            _clear_stage(fs, path, owned)
    fs.makedirs(path, exist_ok=True)
    fs.makedirs(fsio.url_to_fs(fsio.join(stage_dir, MARKER_DIR))[1], exist_ok=True)
    if not fs.exists(fsio.url_to_fs(stage_file)[1]):
        fsio.atomic_write_json(stage_file, fp)
    _remove_stale_temps(fs, path, markers=marker_temps)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ, one level into nested mappings (`params.t`)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += _changed_keys(a, b, f"{k}.")
        else:
            out.append(prefix + k)
    return out


def _is_owned(name: str) -> bool:
    """A file this package writes at the top of a stage folder (what `--overwrite` may remove)."""
    return (
        (name.startswith("part-") and name.endswith(".parquet"))
        or name in (STAGE_FILE, *OWNED_FILES)
        or fsio.own_temp_base(name, STAGE_TEMP_BASES) is not None
    )


def _clear_stage(fs: Any, path: str, owned: Sequence[str] = ()) -> None:
    """Remove what this package wrote in a stage folder (`--overwrite`), and nothing else.

    Parts, `_done/`, `_stage.json`, a standalone command's `manifest.json` and
    `quarantine.jsonl`, and this package's temporary files go; anything else (a user's files,
    subfolders) stays where it is.
    """
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory" and (
            name == MARKER_DIR or any(fnmatch.fnmatchcase(name, p) for p in owned)
        ):
            fs.rm(entry["name"], recursive=True)
        elif entry["type"] == "file" and (
            _is_owned(name) or any(fnmatch.fnmatchcase(name, p) for p in owned)
        ):
            fs.rm(entry["name"])


def _remove_stale_temps(fs: Any, path: str, markers: bool = True) -> None:
    """This package's leftover temporary files in a stage folder and (`markers`) its `_done/`."""
    _remove_temps_in(fs, path, STAGE_TEMP_BASES)
    if markers:
        _remove_temps_in(fs, f"{path.rstrip('/')}/{MARKER_DIR}", MARKER_TEMP_BASES)


#: Final names whose temporaries of older versions are recognised in `_done/`.
MARKER_TEMP_BASES = ("*.json",)


def _remove_temps_in(fs: Any, path: str, legacy_bases: tuple[str, ...]) -> None:
    """Remove this package's temporary files directly in `path` (not in its subfolders)."""
    try:
        listing = _ls(fs, path)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in listing:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "file" and fsio.own_temp_base(name, legacy_bases) is not None:
            fs.rm(entry["name"])


def remove_stale_temps(folder: str, legacy_bases: tuple[str, ...] = RUN_TEMP_BASES) -> None:
    """Remove this package's leftover temporary files directly in `folder` (any fsspec URL).

    Only names `fsio.is_own_temp` recognises go (and temporaries of older versions whose final
    name matches `legacy_bases`); a user's `notes.tmp-1` stays.
    """
    fs, path = fsio.url_to_fs(folder)
    _remove_temps_in(fs, path, legacy_bases)


def _ls(fs: Any, folder: str) -> list[dict[str, Any]]:
    """`fs.ls(folder, detail=True)`; on a local disk one `scandir` (fsspec's local `ls` costs
    ~0.2 ms per entry, 20 s for 10^5 markers). Raises FileNotFoundError for a missing folder."""
    if isinstance(fs, LocalFileSystem):
        out = []
        with os.scandir(folder) as it:
            for e in it:
                st = e.stat()
                kind = "directory" if e.is_dir() else "file"
                out.append({"name": e.path, "size": st.st_size, "mtime": st.st_mtime, "type": kind})
        return out
    return fs.ls(folder, detail=True)


def _marker_listing(stage_dir: str, remove_temps: bool = False) -> dict[str, dict[str, Any]]:
    """{shard name: listing entry} of the completion markers (one listing of `_done/`);
    `remove_temps` also removes this package's leftover temporaries found in that listing
    (only while preparing a run that holds the output lease)."""
    fs, path = fsio.url_to_fs(fsio.join(stage_dir, MARKER_DIR))
    try:
        listing = _ls(fs, path)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in listing:
        name = entry["name"].rsplit("/", 1)[-1]
        own_temp = fsio.own_temp_base(name, MARKER_TEMP_BASES) is not None
        if remove_temps and own_temp and entry.get("type") == "file":
            fs.rm(entry["name"])
            continue
        if name.endswith(".json") and not fsio.is_own_temp(name):
            out[name[: -len(".json")]] = entry
    return out


def done_markers(stage_dir: str) -> dict[str, dict[str, Any]]:
    """Every completion marker of a stage folder, by shard name (one listing of `_done/`)."""
    fs, _ = fsio.url_to_fs(stage_dir)
    listing = dict(sorted(_marker_listing(stage_dir).items()))
    return _read_markers(fs, {name: entry["name"] for name, entry in listing.items()})


#: Concurrent marker reads on a remote store (one request each; local files are read in turn).
MARKER_READ_THREADS = 32


def _read_markers(fs: Any, paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The JSON markers at `paths` (shard name -> path). On an object store they are fetched
    concurrently, so resuming 10^5 shards is not 10^5 sequential requests."""

    def read(path: str) -> dict[str, Any]:
        return json.loads(fs.cat_file(path))

    if isinstance(fs, LocalFileSystem):
        out = {}
        for name, path in paths.items():
            with open(path, "rb") as f:
                out[name] = json.loads(f.read())
        return out
    if len(paths) < 2:
        return {name: read(path) for name, path in paths.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
        return dict(zip(paths, pool.map(read, paths.values()), strict=True))


def done_and_todo(
    stage_dir: str,
    shards: Sequence[Shard],
    fp: dict[str, Any],
    overwrite: bool,
    check_inputs: bool = True,
) -> tuple[dict[str, dict[str, Any]], list[Shard]]:
    """Prepare the stage folder; split shards into done (their markers) and still to do.

    A shard whose input was modified after its marker was written is stale (like `make`): its
    old part is not reused, the shard is done again (outputs are deterministic, so an input
    rewritten with the same bytes gives the same part). `check_inputs=False` skips that for
    steps whose "inputs" are their own working files.
    """
    prepare_stage_dir(stage_dir, fp, overwrite, marker_temps=False)
    listing = _marker_listing(stage_dir, remove_temps=True)  # the one listing of `_done/`
    fs, _ = fsio.url_to_fs(stage_dir)
    stale = []
    if check_inputs:
        finished = [s for s in shards if s.name in listing]
        input_mtimes = _mtimes([s.input for s in finished])
        for s in finished:
            written, changed = modified_time(listing[s.name]), input_mtimes.get(s.input)
            if written is not None and changed is not None and changed > written:
                stale.append(s)
    if stale:
        names = ", ".join(redact_url(s.input) for s in stale[:3])
        log.warning(
            "%s: %d input(s) changed after their results were written (%s%s); redoing them",
            stage_dir, len(stale), names, ", ..." if len(stale) > 3 else "",
        )  # fmt: skip
    stale_names = {s.name for s in stale}
    done = _read_markers(
        fs,
        {
            s.name: listing[s.name]["name"]
            for s in shards
            if s.name in listing and s.name not in stale_names
        },
    )
    todo = [s for s in shards if s.name not in done]
    return done, todo


def _mtimes(urls: Sequence[str]) -> dict[str, float]:
    """Modification time of each existing file in `urls`, from one listing per folder (not one
    storage call per file). http(s):// inputs cannot be listed: they have none here (their
    size and ETag in the stage fingerprint tell a changed file)."""
    by_url_folder: dict[str, list[str]] = {}
    for url in urls:
        folder, sep, _ = url.rpartition("/")
        by_url_folder.setdefault(folder if sep else ".", []).append(url)
    by_folder: dict[tuple[Any, str], dict[str, str]] = {}
    for folder_url, members in by_url_folder.items():
        if folder_url.split("://", 1)[0] in ("http", "https"):
            continue
        fs, folder = fsio.url_to_fs(folder_url)
        wanted = by_folder.setdefault((fs, folder.rstrip("/")), {})
        for url in members:
            wanted[folder.rstrip("/") + "/" + url.rpartition("/")[2]] = url
    out: dict[str, float] = {}
    for (fs, folder), wanted in by_folder.items():
        try:
            listing = _ls(fs, folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in listing:
            url = wanted.get(entry["name"].rstrip("/"))
            mtime = modified_time(entry) if url is not None else None
            if mtime is not None:
                out[url] = mtime
    return out


# -- where a command may write ------------------------------------------------------------------
def _input_roots(pattern: str) -> tuple[str, bool]:
    """(the folder an input pattern reads from, whether it reads everything under it)."""
    fs, path = fsio.url_to_fs(pattern)
    if any(ch in path for ch in "*?["):
        static = []
        for seg in path.split("/"):
            if any(ch in seg for ch in "*?["):
                break
            static.append(seg)
        root = "/".join(static) or "/"
        return fsio.full_url(fs, root), "**" in path
    try:
        is_dir = fs.isdir(path)
    except Exception as exc:
        if not fsio.is_storage_error(exc):
            raise
        raise fsio.InputError(
            f"cannot reach input {pattern!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if is_dir:
        return fsio.full_url(fs, path), True
    return fsio.full_url(fs, path.rsplit("/", 1)[0] if "/" in path else "."), False


def check_output_not_in_inputs(
    out: str, inputs: Sequence[str], *, inputs_inside_out: bool = False
) -> None:
    """Refuse an output folder that is, or is inside, an input folder (and an input inside it).

    A rerun would read its own parts as inputs (and `--overwrite` would remove inputs). An
    input folder is a folder input, the static part of a `**` glob, or the folder of any glob
    (writing into the very folder a glob reads). Inputs inside `out` are refused too, unless
    `inputs_inside_out` (a job's run folder, whose `OUT/input/` shards are its own). URLs are
    compared normalized (protocol + absolute path).
    """
    for raw in inputs:
        for pattern in fsio.expand_braces(str(raw)):
            root, recursive = _input_roots(pattern)
            is_dir_or_glob = recursive or any(ch in pattern for ch in "*?[")
            if is_dir_or_glob and (
                fsio.is_within(out, root) if recursive else fsio.url_key(out) == fsio.url_key(root)
            ):
                raise ValueError(
                    f"output folder {out} is inside input folder {root} (input {pattern}); a "
                    "rerun would read its own output as input: write elsewhere"
                )
            if not inputs_inside_out and fsio.is_within(pattern, out):
                raise ValueError(
                    f"input {pattern} is inside output folder {out}; writing there could "
                    "replace or remove it: write elsewhere"
                )


# -- one driver per output folder -----------------------------------------------------------------
LEASE_FILE = "_lease.json"
#: A lease whose heartbeat is older than this is taken over (its driver is presumed dead).
LEASE_TIMEOUT_S = float(os.environ.get("CURATION_LEASE_TIMEOUT_S", "600"))
#: How often a running driver refreshes its lease's heartbeat.
LEASE_REFRESH_S = float(os.environ.get("CURATION_LEASE_REFRESH_S", "30"))
_HELD: dict[tuple[str, str], int] = {}  # leases this process holds: url key -> depth
#: Protocols whose `pipe_file(..., mode="create")` is a conditional write done by the store
#: (s3fs: `If-None-Match: *`; gcsfs: `ifGenerationMatch=0`), not a check then a write.
_CONDITIONAL_CREATE = frozenset({"s3", "s3a", "gcs", "gs"})
_HELD_LOCK = threading.Lock()


class LeaseError(ResumeError):
    """Another driver is writing the same output folder (the CLI prints it as one line)."""


def _pid_alive(pid: int) -> bool:
    """True when process `pid` of this host runs (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class OutputLease:
    """An exclusive lease on an output folder: `OUT/_lease.json` (host, pid, token, heartbeat).

    Created atomically: on local disks with `O_CREAT | O_EXCL`, on S3 and GCS with one
    conditional PUT (`If-None-Match: *` / `ifGenerationMatch=0`: the store lets one of two
    racing drivers create it); on other filesystems it is best effort (check, PUT, read back
    the token: two drivers starting within the same second may both proceed). A lease whose
    heartbeat is older than `timeout_s`, or whose pid is not alive on this host, is stale and
    taken over. A thread refreshes the heartbeat every `refresh_s`; the
    file is removed when the block ends, so it is never part of a finished run's outputs.
    Entering also removes this package's stale temporary files in `OUT`, `OUT/counts` and
    `OUT/report` (the lease holder is the only writer). Re-entrant within one process.
    """

    def __init__(
        self, out: str, *, timeout_s: float | None = None, refresh_s: float | None = None
    ) -> None:
        self.out = out
        self.url = fsio.join(out, LEASE_FILE)
        self.timeout_s = LEASE_TIMEOUT_S if timeout_s is None else timeout_s
        self.refresh_s = LEASE_REFRESH_S if refresh_s is None else refresh_s
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._key = fsio.url_key(out)
        self._nested = False
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "started": self.started,
            "heartbeat": time.time(),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            data = fsio.read_json(self.url)
        except FileNotFoundError:
            return None
        except ValueError:  # being written right now, or garbage
            fs, path = fsio.url_to_fs(self.url)
            try:
                mtime = modified_time(fs.info(path))
            except FileNotFoundError:
                return None
            return {"heartbeat": mtime or 0.0, "host": "?", "pid": -1, "token": "", "started": 0}
        return data if isinstance(data, dict) else {}

    def _stale(self, lease: dict[str, Any]) -> bool:
        if time.time() - float(lease.get("heartbeat") or 0) > self.timeout_s:
            return True
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            pid = lease["pid"]
            if pid == os.getpid():
                return self._key not in _HELD  # an earlier run of this process that died
            return not _pid_alive(pid)
        return False

    def _refuse(self, lease: dict[str, Any]) -> LeaseError:
        since = time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(lease.get("started") or 0))
        )
        return LeaseError(
            f"{self.out} is being written by pid {lease.get('pid')} on host "
            f"{lease.get('host')} since {since}; if that run is dead, remove {self.url}"
        )

    def _create(self) -> bool:
        """Create the lease file if there is none; True when this call created it."""
        fs, path = fsio.url_to_fs(self.url)
        data = (json.dumps(self._body(), indent=2, sort_keys=True) + "\n").encode()
        if isinstance(fs, LocalFileSystem):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if protocols & _CONDITIONAL_CREATE:
            # One conditional PUT (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`): the store
            # lets exactly one of two racing drivers create the object.
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                # taken, or our own PUT whose answer was lost and was sent again by the client
                return (self._read() or {}).get("token") == self.token
            return True
        if fs.exists(path):
            return False
        fsio.atomic_write_bytes(self.url, data)
        return (self._read() or {}).get("token") == self.token

    def acquire(self) -> None:
        with _HELD_LOCK:
            if self._key in _HELD:
                _HELD[self._key] += 1
                self._nested = True
                return
        fs, path = fsio.url_to_fs(self.out)
        self._created_dir = not fs.exists(path)
        fs.makedirs(path, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            lease = self._read()
            if lease is None:
                continue  # removed meanwhile: try again
            if not self._stale(lease):
                raise self._refuse(lease)
            log.warning(
                "%s: taking over a stale lease (pid %s on %s)",
                self.out, lease.get("pid"), lease.get("host"),
            )  # fmt: skip
            again = self._read()
            if again is not None and again.get("token") == lease.get("token"):
                with contextlib.suppress(FileNotFoundError):
                    fsio.url_to_fs(self.url)[0].rm(fsio.url_to_fs(self.url)[1])
        else:
            raise self._refuse(self._read() or {})
        with _HELD_LOCK:
            _HELD[self._key] = 1
        for sub in ("", "counts", "report"):
            remove_stale_temps(fsio.join(self.out, sub) if sub else self.out)
        if self.refresh_s > 0:
            self._thread = threading.Thread(
                target=self._heartbeat, name=f"lease:{self.out}", daemon=True
            )
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                lease = self._read()
                if lease is None or lease.get("token") != self.token:
                    log.error("%s: the lease %s was taken by another driver", self.out, self.url)
                    return
                fsio.atomic_write_json(self.url, {**lease, "heartbeat": time.time()})
            except Exception:  # a failed refresh is retried at the next beat
                log.warning("%s: could not refresh the lease", self.out, exc_info=True)

    def release(self) -> None:
        with _HELD_LOCK:
            if self._nested:
                _HELD[self._key] -= 1
                return
            _HELD.pop(self._key, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lease = self._read()
        fs, path = fsio.url_to_fs(self.url)
        if lease is not None and lease.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
        out_path = fsio.url_to_fs(self.out)[1]
        if self._created_dir and isinstance(fs, LocalFileSystem):
            with contextlib.suppress(OSError):
                os.rmdir(out_path)  # only when the run wrote nothing at all

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def output_lease(out: str, **kwargs: Any) -> OutputLease:
    """`with output_lease(OUT): ...`: hold `OutputLease(OUT)` while the block runs."""
    return OutputLease(out, **kwargs)


def leased(param: str = "out") -> Callable[[F], F]:
    """Decorate a flow so that it runs holding the lease of its argument `param`."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            out = sig.bind(*args, **kwargs).arguments[param]
            with OutputLease(out):
                return fn(*args, **kwargs)

        return cast(F, run)

    return wrap
