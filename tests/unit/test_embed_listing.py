"""`flows.embed` helpers that need no Ray: the keys of loose files and the file listings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.flows import embed
from curation.io.datacomp import embedding_column


@pytest.mark.parametrize(
    ("urls", "root"),
    [
        (["/d/a/x.jpg", "/d/a/y.jpg"], "/d/a/"),
        (["/d/a/x.jpg", "/d/ab/y.jpg"], "/d/"),
        (["/d/a/x.jpg"], "/d/a/"),
        (["s3://b/in1k/n1/a.JPEG", "s3://b/in1k/n2/b.JPEG"], "s3://b/in1k/"),
        (["/img1.png", "/img2.png"], "/"),
    ],
)
def test_common_folder(urls, root):
    assert embed._common_folder(urls) == root


def test_listing_rewritten_only_when_it_changes(tmp_path):
    files = [str(tmp_path / "in" / f"c{i % 2}" / f"{i}.jpg") for i in range(5)]
    out = str(tmp_path / "out")
    shards = embed.file_shards(sorted(files), out, 2)
    assert [s.name for s in shards] == ["files-000000", "files-000001", "files-000002"]
    body = json.loads((tmp_path / "out" / "_listing" / "files-000000.listing.json").read_text())
    assert body["root"] == str(tmp_path / "in") + "/"
    assert body["files"] == ["c0/0.jpg", "c0/2.jpg"]
    listing = tmp_path / "out" / "_listing" / "files-000001.listing.json"
    mtime = listing.stat().st_mtime_ns
    assert embed.file_shards(sorted(files), out, 2) == shards
    assert listing.stat().st_mtime_ns == mtime
    assert embed.file_shards([], out, 2) == []


def test_missing_input_folder_is_an_error_not_a_quarantine(tmp_path):
    shard = embed.file_shards([str(tmp_path / "gone" / "a.jpg")], str(tmp_path / "out"), 4)[0]
    with pytest.raises(RuntimeError, match="storage every node"):
        list(embed.embed_chunks(shard, embed.ImageLimits(), None, 8))
    (tmp_path / "gone").mkdir()  # the folder is there, the file is not: quarantined
    (chunk,) = embed.embed_chunks(shard, embed.ImageLimits(), None, 8)
    assert chunk["counts"] == {"rows_read": 1, "rows_dropped_missing_file": 1}
    assert chunk["quarantine"][0]["reason"] == "missing_file"


def test_embeddings_npy_streams_parts_in_order(tmp_path):
    parts = []
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 3)).astype(np.float32) for n in (4, 0, 2)]
    for i, b in enumerate(blocks):
        p = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"image_embedding": embedding_column(b, "image_embedding")}), p)
        parts.append(str(p))
    assert embed.write_embeddings_npy(parts, str(tmp_path / "e.npy"), 3, "float16") == 6
    got = np.load(tmp_path / "e.npy")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.concatenate(blocks).astype(np.float16))
