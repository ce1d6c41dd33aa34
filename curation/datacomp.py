"""DataComp pool layout: metadata shards (Parquet + `.npz` embeddings) and uid files.

A DataComp pool shard is `NAME.parquet` (columns `uid`, `url`, `text`, `original_width`,
`original_height`, `clip_b32_similarity_score`, `clip_l14_similarity_score`, ...) with
`NAME.npz` beside it holding row-aligned embeddings (`b32_img`, `b32_txt`, `l14_img`,
`l14_txt`). A filtering baseline's output is a `.npy` file of the kept uids: a sorted NumPy
structured array of dtype `[("f0", "u8"), ("f1", "u8")]`, the upper and lower 64 bits of each
32-hex-digit uid, as written by mlfoundations/datacomp `baselines/apply_filter.py`
(`load_uids_helper` builds `(int(uid[:16], 16), int(uid[16:32], 16))`, `apply_filter` sorts and
`np.save`s). Everything here takes fsspec URLs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from curation import fsio

__all__ = [
    "UID_DTYPE",
    "EMBEDDING_KEYS",
    "embedding_matrix",
    "load_embedding_file",
    "list_shards",
    "load_uids",
    "npz_url",
    "pairs_to_uids",
    "read_shard",
    "save_uids",
    "uids_to_pairs",
    "write_shard",
]

#: dtype of DataComp's uid files (`np.dtype("u8,u8")` names its fields f0, f1).
UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])
#: Embedding arrays in DataComp's `.npz` files.
EMBEDDING_KEYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _string_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a string array and its row offsets (starting at 0)."""
    arr = arr.cast(pa.large_string()) if not pa.types.is_large_string(arr.type) else arr
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    lo, hi = int(off[0]), int(off[-1])
    if hi == lo:
        return np.zeros(0, dtype=np.uint8), off - lo
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[lo:hi]
    return data, off - lo


def uids_to_pairs(
    uids: pa.Array | pa.ChunkedArray | Sequence[str], where: str = "uids"
) -> np.ndarray:
    """Convert 32-hex-digit uids to DataComp's `(hi, lo)` uint64 pairs, vectorized.

    Mirrors `(int(uid[:16], 16), int(uid[16:32], 16))` in DataComp's `apply_filter.py`; the
    order is kept (not sorted). Upper- and lower-case digits are accepted, as `int(.., 16)`
    does. Anything other than exactly 32 hex digits (or a null) raises a ValueError naming
    `where`, since DataComp's conversion would silently differ for such ids.
    """
    arr = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(uids, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise ValueError(f"{where}: uid column must be strings, got {arr.type}")
    n = len(arr)
    if arr.null_count:
        raise ValueError(f"{where}: {arr.null_count} null uid(s); every row needs a uid")
    data, off = _string_bytes(arr)
    if n and not (np.all(np.diff(off) == 32)):
        bad = int(np.flatnonzero(np.diff(off) != 32)[0])
        raise ValueError(f"{where}: uid at row {bad} is not 32 hex digits: {arr[bad].as_py()!r}")
    nib = _HEX_VALUE[data].reshape(n, 32)
    if (nib == 255).any():
        bad = int(np.flatnonzero((nib == 255).any(axis=1))[0])
        raise ValueError(f"{where}: uid at row {bad} is not hexadecimal: {arr[bad].as_py()!r}")
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]  # (n, 16) big-endian bytes of the 128-bit value
    halves = raw.view(">u8").reshape(n, 2)
    out = np.empty(n, dtype=UID_DTYPE)
    out["f0"] = halves[:, 0]
    out["f1"] = halves[:, 1]
    return out


def pairs_to_uids(pairs: np.ndarray) -> np.ndarray:
    """Inverse of `uids_to_pairs`: 32 lower-case hex digits per `(f0, f1)` pair (NumPy `U32`)."""
    pairs = np.asarray(pairs)
    if pairs.dtype.names is None or len(pairs.dtype.names) != 2:
        raise ValueError(f"expected a structured (u8, u8) uid array, got dtype {pairs.dtype}")
    f0, f1 = pairs.dtype.names
    n = len(pairs)
    be = np.empty((n, 2), dtype=">u8")
    be[:, 0] = pairs[f0]
    be[:, 1] = pairs[f1]
    raw = be.view(np.uint8).reshape(n, 16)
    hexb = np.empty((n, 32), dtype=np.uint8)
    hexb[:, 0::2] = _HEX_DIGITS[raw >> 4]
    hexb[:, 1::2] = _HEX_DIGITS[raw & 15]
    return hexb.view("S32").reshape(n).astype("U32")


def save_uids(url: str, uids: np.ndarray | pa.Array | pa.ChunkedArray | Sequence[str]) -> int:
    """Write a DataComp uid file: the uids sorted (by f0, then f1) and `np.save`d, atomically.

    `uids` are hex strings or an array already of `UID_DTYPE`. Sorting a structured array
    orders by its fields in turn, which is numeric 128-bit order (= lower-case hex order),
    exactly what DataComp's `save_uids` / `apply_filter` (`uids.sort(); np.save(...)`) writes.
    Duplicates are kept, as DataComp keeps them. Returns the number of uids written.
    """
    if isinstance(uids, np.ndarray) and uids.dtype.names is not None:
        pairs = uids.astype(UID_DTYPE, copy=True)
    else:
        pairs = uids_to_pairs(uids, where=url)
    pairs.sort()
    buf = io.BytesIO()
    np.save(buf, pairs, allow_pickle=False)
    fsio.atomic_write_bytes(url, buf.getvalue())
    return len(pairs)


def load_uids(url: str) -> np.ndarray:
    """Read a DataComp uid file (`.npy` of `u8,u8` pairs) without unpickling anything."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if arr.dtype.names is None or len(arr.dtype.names) != 2 or arr.ndim != 1:
        raise ValueError(f"{url}: not a DataComp uid file (dtype {arr.dtype}, shape {arr.shape})")
    return arr.astype(UID_DTYPE, copy=False)


def npz_url(parquet_url: str) -> str:
    """The `.npz` beside a DataComp `.parquet` shard (same name, other suffix)."""
    if not parquet_url.endswith(".parquet"):
        raise ValueError(f"{parquet_url}: a DataComp metadata shard ends in .parquet")
    return parquet_url[: -len(".parquet")] + ".npz"


def list_shards(metadata_dir: str | Iterable[str]) -> list[str]:
    """The `.parquet` shards of a DataComp metadata folder (or of files/globs), sorted."""
    inputs = [metadata_dir] if isinstance(metadata_dir, str) else list(metadata_dir)
    return [u for u in fsio.expand_inputs(inputs, suffixes=(".parquet",)) if u.endswith(".parquet")]


def _embedding_column(arr: np.ndarray, key: str, where: str) -> pa.FixedSizeListArray:
    if arr.ndim != 2:
        raise ValueError(f"{where}: embedding {key!r} must be 2-D, got shape {arr.shape}")
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])


def read_shard(
    parquet_url: str, columns: Sequence[str] | None = None, embeddings: Sequence[str] = ()
) -> pa.Table:
    """Read one DataComp shard as an Arrow table, with embeddings from the `.npz` beside it.

    Each name in `embeddings` (e.g. `"l14_img"`) becomes a fixed-size-list column of the same
    name, row-aligned with the Parquet (its dtype, usually float16, is kept). The `.npz` is read
    with `allow_pickle=False`; a missing key or a row-count mismatch raises a ValueError.
    """
    fs, path = url_to_fs(parquet_url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(columns) if columns is not None else None)
    if embeddings:
        nurl = npz_url(parquet_url)
        nfs, npath = url_to_fs(nurl)
        with nfs.open(npath, "rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as npz:
            for key in embeddings:
                if key not in npz.files:
                    raise ValueError(f"{nurl}: no embedding {key!r} (has {sorted(npz.files)})")
                arr = npz[key]
                if len(arr) != table.num_rows:
                    raise ValueError(
                        f"{nurl}: {key!r} has {len(arr)} rows but the parquet has "
                        f"{table.num_rows}; the .npz must be row-aligned with its shard"
                    )
                table = table.append_column(key, _embedding_column(arr, key, nurl))
    return table


def write_shard(parquet_url: str, table: pa.Table, embeddings: dict[str, np.ndarray]) -> None:
    """Write a DataComp-layout shard: the table as Parquet and `embeddings` as the `.npz` beside.

    Used to build small pools for tests and demos; both files are written atomically.
    """
    n = table.num_rows
    for key, arr in embeddings.items():
        if len(arr) != n:
            raise ValueError(f"{parquet_url}: embedding {key!r} has {len(arr)} rows, table {n}")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in embeddings.items()})
    fsio.atomic_write_bytes(npz_url(parquet_url), buf.getvalue())
    fsio.atomic_write_parquet(parquet_url, table)


def embedding_matrix(table: pa.Table, key: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
    """The `(rows, dim)` matrix of a fixed-size-list embedding column, cast to `dtype`.

    DataComp casts the float16 pool embeddings to float32 before any product
    (`features.float()` in `get_centroid_ids_gpu`), hence the default.
    """
    if key not in table.column_names:
        raise ValueError(
            f"table has no embedding column {key!r}; read the shard with "
            f"read_shard(..., embeddings=[{key!r}])"
        )
    col = table.column(key)
    if not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"column {key!r} must be a fixed-size list, got {col.type}")
    dim = col.type.list_size
    if col.num_chunks == 0:
        return np.zeros((0, dim), dtype=dtype)
    chunks = [c.flatten() for c in col.chunks]  # flatten() honours slice offsets
    flat = pa.concat_arrays(chunks) if len(chunks) > 1 else chunks[0]
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, dim)


def load_embedding_file(url: str, key: str | None = None) -> np.ndarray:
    """A 2-D embedding array from a `.npy`, or from a `.npz` (`key`, or its only array).

    Loaded with `allow_pickle=False`. DataComp's own assets (`in1k_clip_vit_l14_*.pt`,
    `*_centroids_l14.pt`) are torch pickles: convert them to `.npy` once with torch.
    """
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if key is None and len(data.files) != 1:
                raise ValueError(f"{url}: several arrays {sorted(data.files)}; name one with key=")
            name = key if key is not None else data.files[0]
            if name not in data.files:
                raise ValueError(f"{url}: no array {name!r} (has {sorted(data.files)})")
            arr = data[name]
    else:
        arr = data
    if arr.ndim != 2:
        raise ValueError(f"{url}: embeddings must be 2-D (rows, dim), got shape {arr.shape}")
    return arr
