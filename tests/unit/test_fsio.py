"""Filesystem helpers: brace/glob/directory expansion, shard names, atomic writes."""

from __future__ import annotations

import uuid

import fsspec
import pyarrow as pa
import pytest

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
    import pyarrow.parquet as pq

    assert pq.read_table(str(a)).equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]


def test_join_and_makedirs(tmp_path):
    assert fsio.join("s3://b/", "/x/", "y.parquet") == "s3://b/x/y.parquet"
    assert fsio.join("runs/demo", "ingest") == "runs/demo/ingest"
    d = tmp_path / "m" / "n"
    fsio.makedirs(str(d))
    fsio.makedirs(str(d))
    assert d.is_dir()
