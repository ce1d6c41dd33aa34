"""User errors reach the user as one `Error:` line, never a traceback; bugs keep theirs.

The mapping (`curation.cli._Group`) is tested on a small group whose commands raise what the
real ones meet; the input-side causes (looping symlinks, unreachable URLs, names with glob
characters, `.tar.gz` shards, duplicate uids) on the functions that meet them. Subprocess runs
here fail before Ray starts.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import click
import fsspec
import pytest
from click.testing import CliRunner
from fsspec.implementations.local import LocalFileSystem

from curation.cli import _Group
from curation.core.fsio import InputError, escape_glob, expand_braces, expand_inputs
from curation.io.images import list_image_shards

REPO = Path(__file__).resolve().parents[2]


def _group(exc: BaseException) -> click.Group:
    @click.group(cls=_Group)
    def grp() -> None:
        pass

    @grp.command()
    def boom() -> None:
        raise exc

    return grp


def _run(exc: BaseException, **env: str):
    return CliRunner().invoke(_group(exc), ["boom"], env=env)


def _one_error_line(result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- _Group.invoke ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/out/part-0.parquet"), "no space"),
        (PermissionError(errno.EACCES, "Permission denied", "/out"), "permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "read-only"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/out"), "not a folder"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "/in/x"), "loops"),
        (InputError("cannot list input 'http://h/x': ClientConnectorError: refused"), "http://h/x"),
    ],
)
def test_storage_errors_are_one_line(exc, words):
    line = _one_error_line(_run(exc))
    assert words in line.lower()
    if exc.filename:
        assert exc.filename in line


def test_network_library_error_is_one_line():
    cls = type("ClientResponseError", (Exception,), {"__module__": "aiohttp.client_exceptions"})
    line = _one_error_line(_run(cls("403, message='Forbidden', url='http://h/x.tar'")))
    assert "http://h/x.tar" in line


def test_missing_fsspec_package_names_what_to_install(monkeypatch):
    def no_s3(proto):
        if proto == "s3":
            raise ImportError("Install s3fs to access S3")
        return LocalFileSystem

    monkeypatch.setattr(fsspec, "get_filesystem_class", no_s3)
    monkeypatch.setattr(sys, "argv", ["curation", "ingest", "s3://bucket/x.wat.gz", "-o", "o"])
    line = _one_error_line(_run(ImportError("Install s3fs to access S3")))
    assert "pip install s3fs" in line and "s3://bucket/x.wat.gz" in line


def _ray_task_error(cause: BaseException):
    from ray.exceptions import RayTaskError

    tb = "\x1b[36mray::_shard_task()\x1b[39m (pid=1, ip=1.2.3.4)\nTraceback ...\nlots of lines"
    return RayTaskError("curation.executor.runner._shard_task", tb, cause).as_instanceof_cause()


def test_user_error_inside_a_ray_task_is_one_line_naming_the_task():
    line = _one_error_line(_run(_ray_task_error(ValueError("shard x.parquet has no text column"))))
    assert line == "Error: in Ray task _shard_task: shard x.parquet has no text column"
    err = OSError(errno.ENOSPC, "No space left on device", "/out/part-x.parquet")
    line = _one_error_line(_run(_ray_task_error(err)))
    assert "_shard_task" in line and "/out/part-x.parquet" in line and "no space" in line


def test_bugs_keep_their_traceback_and_curation_debug_shows_every_one():
    result = _run(_ray_task_error(KeyError("oops")))
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    assert not result.output.startswith("Error:")
    result = _run(ZeroDivisionError("bug"))
    assert isinstance(result.exception, ZeroDivisionError)
    result = _run(OSError(errno.ENOSPC, "No space left on device", "/x"), CURATION_DEBUG="1")
    assert isinstance(result.exception, OSError) and not result.output.startswith("Error:")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", CURATION_DEBUG="0")
    exe = Path(sys.executable).with_name("curation")
    # No timeout: subprocess waits with time.sleep, which unit tests forbid.
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_cli_job_spec_that_is_a_folder_or_needs_a_missing_package_is_one_line(tmp_path):
    """Real runs that fail before Ray starts."""
    (tmp_path / "spec.yaml").mkdir()
    cases = [("spec.yaml", "is a directory")]
    try:
        import s3fs  # noqa: F401
    except ImportError:
        cases.append(("s3://bucket/job.yaml", "pip install s3fs"))
    for spec, words in cases:
        proc = _cli("run", spec, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
        assert words in lines[0].lower() and spec in lines[0]


# -- expand_inputs ---------------------------------------------------------------------------------
def test_self_referencing_symlink_in_a_folder_is_refused_by_name(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("{}\n")
    os.symlink("loop.jsonl", d / "loop.jsonl")
    os.symlink(".", d / "sub")  # a folder loop is not followed
    with pytest.raises(InputError, match=r"loop\.jsonl.*symbolic link"):
        expand_inputs([str(d)], suffixes=(".jsonl",))
    os.remove(d / "loop.jsonl")
    assert expand_inputs([str(d)], suffixes=(".jsonl",)) == [str(d / "a.jsonl")]


class _Unreachable(OSError):
    """Like aiohttp's ClientConnectorError (an OSError from aiohttp)."""

    __module__ = "aiohttp.client_exceptions"


class _DownFS(LocalFileSystem):
    protocol = "downtest"

    def _fail(self, *args, **kwargs):
        raise _Unreachable("Cannot connect to host h:80 ssl:default [Connection refused]")

    exists = isdir = info = glob = find = _fail


def test_unreachable_url_names_the_input():
    fsspec.register_implementation("downtest", _DownFS, clobber=True)
    with pytest.raises(InputError, match=r"downtest://h/x\.tar.*Connection refused"):
        expand_inputs(["downtest://h/x.tar"])


def test_missing_filesystem_package_says_what_to_install(monkeypatch):
    import fsspec.core

    def no_s3(url, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr("curation.core.fsio.url_to_fs", no_s3)
    with pytest.raises(ImportError, match=r"'s3://b/x\.tar'.*pip install s3fs"):
        expand_inputs(["s3://b/x.tar"])
    assert fsspec.core  # the real one is untouched


@pytest.fixture
def odd_names(tmp_path):
    for n in ("a[1].tar", "a1.tar", "b{x,y}.tar", "bx.tar", "c*.tar", "cc.tar"):
        (tmp_path / n).write_bytes(b"x")
    return tmp_path


def test_names_with_glob_characters_can_be_addressed(odd_names):
    r = str(odd_names)
    # backslash escapes
    assert expand_inputs([rf"{r}/a\[1\].tar"]) == [f"{r}/a[1].tar"]
    assert expand_inputs([rf"{r}/b\{{x\,y\}}.tar"]) == [f"{r}/b{{x,y}}.tar"]
    assert expand_inputs([rf"{r}/a\[*"]) == [f"{r}/a[1].tar"]  # escaped and real glob together
    # --no-glob
    got = expand_inputs([f"{r}/a[1].tar", f"{r}/b{{x,y}}.tar", f"{r}/c*.tar"], literal=True)
    assert got == [f"{r}/a[1].tar", f"{r}/b{{x,y}}.tar", f"{r}/c*.tar"]
    # a name that exists as written is taken as written (an expanded list expands to itself)
    assert expand_inputs([f"{r}/a[1].tar"]) == [f"{r}/a[1].tar"]
    # patterns still expand
    assert expand_inputs([f"{r}/a[12].tar"]) == [f"{r}/a1.tar"]
    assert expand_inputs([f"{r}/b{{x,q}}.tar"], allow_missing=True) == [
        f"{r}/bq.tar",
        f"{r}/bx.tar",
    ]


def test_escape_glob_round_trips_through_expand_braces():
    name = "s3://b/a[1]{x,y}*?.tar"
    assert expand_braces(escape_glob(name)) == [escape_glob(name)]
    assert expand_braces(r"p\{0..1\}{0..1}") == [r"p\{0..1\}0", r"p\{0..1\}1"]


# -- list_image_shards -----------------------------------------------------------------------------
def test_gzip_tar_shards_are_listed_from_a_folder(tmp_path):
    for n in ("a.tar", "b.tar.gz", "c.tgz", "b.parquet", "d.parquet", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    got = [u.rsplit("/", 1)[-1] for u in list_image_shards([str(tmp_path)])]
    assert got == ["a.tar", "b.tar.gz", "c.tgz", "d.parquet"]  # b.parquet: b.tar.gz's metadata


# -- duplicate uids --------------------------------------------------------------------------------
def test_duplicate_uids_across_parts_are_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.flows.score import duplicate_uids

    parts = []
    for i, uids in enumerate((["a", "b", "b", None], ["b", "c", "a"], [], ["d"])):
        p = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"uid": pa.array(uids, pa.string())}), p)
        parts.append(str(p))
    assert duplicate_uids(parts) == 2  # a and b; b twice within one part counts once there
    assert duplicate_uids(parts[:1]) == 0


def test_error_lines_never_show_credentials():
    exc = InputError("cannot list input 'http://alice:s3cr3t@h/x.jsonl': refused")
    line = _one_error_line(_run(exc))
    assert "s3cr3t" not in line and "alice:***@h/x.jsonl" in line
