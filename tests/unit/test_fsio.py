"""Filesystem helpers: brace/glob/directory expansion, shard names, atomic writes."""

from __future__ import annotations

import gc
import io
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from curation.core import fsio
from curation.core.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    expand_braces,
    expand_inputs,
    read_json,
    shard_name,
)

SUFFIXES = (".parquet", ".jsonl", ".warc.wat.gz")


# -- expand_braces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("plain.parquet", ["plain.parquet"]),
        ("a{1..3}", ["a1", "a2", "a3"]),
        ("s{00..02}.x", ["s00.x", "s01.x", "s02.x"]),
        ("s{08..11}", ["s08", "s09", "s10", "s11"]),
        ("s{8..11}", ["s8", "s9", "s10", "s11"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{x,y}", ["x", "y"]),
        ("f.{parquet,jsonl}", ["f.parquet", "f.jsonl"]),
        ("{x,y}{1..2}", ["x1", "x2", "y1", "y2"]),
        ("d{0..1}/p{a,b}.gz", ["d0/pa.gz", "d0/pb.gz", "d1/pa.gz", "d1/pb.gz"]),
        ("CC-{2023,2024}-{000..001}", ["CC-2023-000", "CC-2023-001", "CC-2024-000", "CC-2024-001"]),
    ],
)
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


def test_expand_braces_nested_groups_order_and_count():
    # nested groups expand like bash: a{b,c{1..2}}d -> abd ac1d ac2d
    assert expand_braces("a{b,c{1..2}}d") == ["abd", "ac1d", "ac2d"]
    assert expand_braces("{x{1,2},y}") == ["x1", "x2", "y"]


def test_expand_braces_nested_covers_all_alternatives():
    got = expand_braces("a{b,c{1..2}}d")
    assert set(got) == {"abd", "ac1d", "ac2d"}


def test_expand_braces_count_is_product_of_groups():
    got = expand_braces("s{0000..0099}-{a,b,c}")
    assert len(got) == 300 == len(set(got))
    assert got[0] == "s0000-a" and got[-1] == "s0099-c"


# -- expand_inputs -------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    files = [
        "d/a.parquet",
        "d/b.jsonl",
        "d/sub/c.warc.wat.gz",
        "d/notes.txt",
        "d/sub/readme.md",
        "s00.parquet",
        "s01.parquet",
        "s02.parquet",
    ]
    for f in files:
        p = tmp_path / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return tmp_path


def test_expand_inputs_file_glob_braces(tree):
    root = str(tree)
    assert expand_inputs([f"{root}/s01.parquet"]) == [f"{root}/s01.parquet"]
    assert expand_inputs([f"{root}/s*.parquet"]) == [f"{root}/s0{i}.parquet" for i in range(3)]
    assert expand_inputs([f"{root}/s{{00..01}}.parquet"]) == [
        f"{root}/s00.parquet",
        f"{root}/s01.parquet",
    ]
    assert expand_inputs([f"{root}/s0[02].parquet"]) == [
        f"{root}/s00.parquet",
        f"{root}/s02.parquet",
    ]


def test_expand_inputs_directory_filtered_by_suffix(tree):
    root = str(tree)
    got = expand_inputs([f"{root}/d"], suffixes=SUFFIXES)
    assert got == [f"{root}/d/a.parquet", f"{root}/d/b.jsonl", f"{root}/d/sub/c.warc.wat.gz"]
    everything = expand_inputs([f"{root}/d"])
    assert f"{root}/d/notes.txt" in everything and len(everything) == 5


def test_expand_inputs_sorted_and_deduplicated(tree):
    root = str(tree)
    got = expand_inputs(
        [
            f"{root}/s02.parquet",
            f"{root}/s*.parquet",
            f"{root}/s{{00,01}}.parquet",
            f"{root}/s00.parquet",
        ]
    )
    assert got == [f"{root}/s00.parquet", f"{root}/s01.parquet", f"{root}/s02.parquet"]


def test_expand_inputs_missing_raises_naming_pattern(tree):
    root = str(tree)
    with pytest.raises(FileNotFoundError, match="nothere"):
        expand_inputs([f"{root}/nothere*.parquet"])
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        expand_inputs([f"{root}/s00.parquet", f"{root}/gone.parquet"])
    # one missing alternative of a brace group is an error too
    with pytest.raises(FileNotFoundError, match="s03.parquet"):
        expand_inputs([f"{root}/s{{00..05}}.parquet"])
    # an empty directory (after suffix filtering) is an error
    with pytest.raises(FileNotFoundError, match="sub"):
        expand_inputs([f"{root}/d/sub"], suffixes=(".parquet",))


def test_expand_inputs_allow_missing_keeps_literal_path(tree):
    root = str(tree)
    got = expand_inputs([f"{root}/gone.parquet", f"{root}/s00.parquet"], allow_missing=True)
    assert got == [f"{root}/gone.parquet", f"{root}/s00.parquet"]
    with pytest.raises(FileNotFoundError):
        expand_inputs([f"{root}/missing_dir/"], allow_missing=True)
    with pytest.raises(FileNotFoundError):
        expand_inputs([f"{root}/nomatch*.parquet"], allow_missing=True)


def test_expand_inputs_memory_urls():
    base = f"memory://fsio-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for name in ("x/a.parquet", "x/b.parquet", "x/deep/c.jsonl", "x/skip.txt"):
        fs.pipe(fs._strip_protocol(f"{base}/{name}"), b"x")
    got = expand_inputs([f"{base}/x"], suffixes=SUFFIXES)
    assert len(got) == 3
    assert all(u.startswith("memory://") for u in got)
    assert [u.rsplit("/", 1)[-1] for u in got] == ["a.parquet", "b.parquet", "c.jsonl"]
    assert expand_inputs([f"{base}/x/*.parquet"]) == got[:2]
    assert expand_inputs([f"{base}/x/{{a,b}}.parquet"]) == got[:2]
    # every URL it returns opens again
    for u in got:
        with fsspec.open(u, "rb") as f:
            assert f.read() == b"x"
    with pytest.raises(FileNotFoundError, match="zz"):
        expand_inputs([f"{base}/x/zz*.parquet"])


# -- shard_name ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, name",
    [
        ("x.warc.wat.gz", "x"),
        ("s3://bucket/crawl/CC-MAIN-2023-00001.warc.wat.gz", "CC-MAIN-2023-00001"),
        ("a.parquet", "a"),
        ("/data/part-7.jsonl.gz", "part-7"),
        ("memory://r/s.json", "s"),
        ("shards/0001.tar", "0001"),
        ("odd name!.parquet", "odd_name_"),
        (".parquet", ".parquet"),
    ],
)
def test_shard_name(url, name):
    assert shard_name(url) == name


def test_shard_name_distinct_for_distinct_files():
    names = {shard_name(f"s3://b/synth-{i:05d}.warc.wat.gz") for i in range(50)}
    assert len(names) == 50


# -- atomic writes -------------------------------------------------------------------------------


def test_atomic_write_bytes_no_temp_left(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.bin"
    atomic_write_bytes(str(target), b"hello")
    assert target.read_bytes() == b"hello"
    atomic_write_bytes(str(target), b"replaced")
    assert target.read_bytes() == b"replaced"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_write_bytes_memory_url():
    url = f"memory://fsio-{uuid.uuid4().hex[:8]}/out/f.bin"
    atomic_write_bytes(url, b"abc")
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.cat_file(path) == b"abc"
    assert fs.ls(path.rsplit("/", 1)[0], detail=False) == [path]
    assert fsio.exists(url)


def test_atomic_write_json_round_trip(tmp_path):
    url = str(tmp_path / "m.json")
    obj = {"b": [1, 2], "a": {"z": None, "y": "ü"}}
    atomic_write_json(url, obj)
    assert read_json(url) == obj
    first = (tmp_path / "m.json").read_bytes()
    atomic_write_json(url, dict(reversed(list(obj.items()))))
    assert (tmp_path / "m.json").read_bytes() == first  # sorted keys: same bytes


def test_atomic_write_parquet_deterministic(tmp_path):
    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(1000)],
            "n": pa.array(range(1000), pa.int64()),
            "ids": pa.array([[i % 7] for i in range(1000)], pa.list_(pa.uint32())),
        }
    )
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    atomic_write_parquet(str(a), table)
    atomic_write_parquet(str(b), table)
    assert a.read_bytes() == b.read_bytes()
    assert pq.read_table(str(a)).equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]


def test_join_and_makedirs(tmp_path):
    assert fsio.join("s3://b/", "/x/", "y.parquet") == "s3://b/x/y.parquet"
    assert fsio.join("runs/demo", "ingest") == "runs/demo/ingest"
    d = tmp_path / "m" / "n"
    fsio.makedirs(str(d))
    fsio.makedirs(str(d))
    assert d.is_dir()


# -- atomic_open: local temp + rename, object-store direct upload, fallback ----------------------


class RecordingUpload(AbstractBufferedFile):
    """An object-store file as s3fs/gcsfs have them: parts go up as the buffer fills, and the
    object appears only when the last part completes the upload on close()."""

    def _initiate_upload(self):
        self.fs.log.append(("initiate", self.path))
        self.fs.pending[self.path] = []

    def _upload_chunk(self, final=False):
        self.fs.pending[self.path].append(self.buffer.getvalue())
        self.fs.log.append(("part", self.path, len(self.buffer.getvalue())))
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self):
        self.fs.store[self.path] = b"".join(self.fs.pending.pop(self.path))
        self.fs.log.append(("commit", self.path))

    def discard(self):
        self.fs.pending.pop(self.path, None)
        self.fs.log.append(("discard", self.path))


class UploadFS(AbstractFileSystem):
    """A test object store: records uploads; copying, moving and deleting are refused."""

    protocol = "uploadtest"
    root_marker = ""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.store, self.pending, self.log = {}, {}, []

    def _open(self, path, mode="rb", block_size=None, autocommit=True, **kwargs):
        if "r" in mode:
            return io.BytesIO(self.store[path])
        return RecordingUpload(self, path, mode, block_size=1024, autocommit=autocommit)

    def makedirs(self, path, exist_ok=False):
        pass

    def info(self, path, **kwargs):
        if path in self.store:
            return {"name": path, "size": len(self.store[path]), "type": "file"}
        raise FileNotFoundError(path)

    def _refuse(self, *args, **kwargs):
        self.log.append(("refused", args))
        raise AssertionError(f"object stores must not copy/move/delete here: {args}")

    mv = copy = cp_file = rm = rm_file = _rm = rename = _refuse


@pytest.fixture
def upload_fs():
    """A fresh UploadFS, the instance that `uploadtest://` URLs resolve to."""
    fsspec.register_implementation("uploadtest", UploadFS, clobber=True)
    UploadFS.clear_instance_cache()
    yield fsspec.filesystem("uploadtest")
    UploadFS.clear_instance_cache()


def _uploaded(fs):
    """Paths that had any upload (a part, a commit)."""
    return {e[1] for e in fs.log if e[0] in ("initiate", "part", "commit")}


def test_object_store_writes_the_final_name_once_without_temp_or_copy(upload_fs):
    data = bytes(range(256)) * 20  # 5 KiB: several 1 KiB parts
    fsio.atomic_write_bytes("uploadtest://bucket/out/f.bin", data)
    assert upload_fs.store == {"bucket/out/f.bin": data}
    assert _uploaded(upload_fs) == {"bucket/out/f.bin"}  # nothing under a temporary name
    assert not [e for e in upload_fs.log if e[0] == "refused"]
    assert [e[0] for e in upload_fs.log].count("commit") == 1
    fsio.atomic_write_json("uploadtest://bucket/out/m.json", {"b": 1, "a": 2})
    assert json.loads(upload_fs.store["bucket/out/m.json"]) == {"a": 2, "b": 1}
    assert not any(".tmp-" in k for k in upload_fs.store)


def test_object_store_streams_parquet_in_parts(upload_fs):
    table = _numbers(5000)
    fsio.atomic_write_parquet("uploadtest://bucket/p.parquet", table, row_group_size=500)
    body = upload_fs.store["bucket/p.parquet"]
    assert body == _reference_parquet(table, row_group_size=500)
    parts = [e[2] for e in upload_fs.log if e[0] == "part"]
    # Uploaded as it was written, not as one whole-file buffer.
    assert len(parts) > 5 and max(parts) < len(body) / 4
    assert _uploaded(upload_fs) == {"bucket/p.parquet"}
    assert not [e for e in upload_fs.log if e[0] == "refused"]


def test_object_store_failure_inside_the_block_commits_nothing(upload_fs):
    with pytest.raises(RuntimeError, match="boom"), fsio.atomic_open("uploadtest://b/x.bin") as f:
        f.write(b"x" * 3000)  # two parts already uploaded (an unfinished multipart upload)
        raise RuntimeError("boom")
    del f
    gc.collect()  # IOBase.__del__ closes the file: that must not complete the upload either
    assert upload_fs.store == {} and upload_fs.pending == {}
    assert ("discard", "b/x.bin") in upload_fs.log
    assert not [e for e in upload_fs.log if e[0] in ("commit", "refused")]


def test_local_atomic_open_writes_a_temp_sibling_then_renames(tmp_path):
    target = tmp_path / "d" / "f.bin"
    with fsio.atomic_open(str(target)) as f:
        f.write(b"new")
        [tmp] = list(target.parent.iterdir())
        assert tmp.name.startswith("f.bin.tmp-") and not target.exists()
    assert target.read_bytes() == b"new" and list(target.parent.iterdir()) == [target]
    with pytest.raises(RuntimeError), fsio.atomic_open(str(target)) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"new" and list(target.parent.iterdir()) == [target]


def test_memory_fs_falls_back_to_temp_and_mv_and_cleans_up_on_failure():
    base = f"memory://fsio-{uuid.uuid4().hex[:8]}"
    fs, root = fsspec.core.url_to_fs(base)
    fsio.atomic_write_bytes(f"{base}/f.bin", b"old")
    with pytest.raises(RuntimeError), fsio.atomic_open(f"{base}/f.bin") as f:
        f.write(b"partial")
        [tmp] = [p for p in fs.ls(root, detail=False) if ".tmp-" in p]
        raise RuntimeError("boom")
    assert fs.ls(root, detail=False) == [f"{root}/f.bin"] and not fs.exists(tmp)
    assert fs.cat_file(f"{root}/f.bin") == b"old"


def _numbers(n):
    return pa.table(
        {
            "uid": [f"u{i}" for i in range(n)],
            "n": pa.array(range(n), pa.int64()),
            "ids": pa.array([[i % 7, i % 11] for i in range(n)], pa.list_(pa.uint32())),
            "x": pa.array([i / 3 for i in range(n)], pa.float32()),
        }
    )


def _reference_parquet(table, **kwargs):
    """What atomic_write_parquet wrote when it built the whole file in memory first."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **{"compression": "zstd", **kwargs})
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"row_group_size": 300},
        {"compression": "snappy"},
        {"use_dictionary": False, "write_statistics": False},
        {"compression_level": 9, "data_page_size": 4096},
        {"chunk_size": 700},
    ],
)
def test_atomic_write_parquet_bytes_equal_write_table(tmp_path, kwargs):
    table = _numbers(2000)
    target = tmp_path / "t.parquet"
    atomic_write_parquet(str(target), table, **dict(kwargs))
    assert target.read_bytes() == _reference_parquet(table, **kwargs)
    assert pq.read_table(str(target)).equals(table)
