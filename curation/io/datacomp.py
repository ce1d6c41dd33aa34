"""DataComp pool layout: metadata shards (Parquet + `.npz` embeddings) and uid files.

A DataComp pool shard is `NAME.parquet` (columns `uid`, `url`, `text`, `original_width`,
`original_height`, `clip_b32_similarity_score`, `clip_l14_similarity_score`, ...) with
`NAME.npz` beside it holding row-aligned embeddings (`b32_img`, `b32_txt`, `l14_img`,
`l14_txt`). Our own scored output (`curation score`: `part-<shard>.parquet` with `clip_score`,
`image_embedding`, `text_embedding`) has the same meaning but keeps its embeddings in the
Parquet as `fixed_size_list<float16>[D]` columns and has no `.npz`: `read_shard` takes an
embedding from a Parquet column of that name when there is one, else from the `.npz`.

A filtering baseline's output is a `.npy` file of the kept uids: a sorted NumPy structured array
of dtype `[("f0", "u8"), ("f1", "u8")]`, the upper and lower 64 bits of each 32-hex-digit uid,
as written by mlfoundations/datacomp `baselines/apply_filter.py` (`load_uids_helper` builds
`(int(uid[:16], 16), int(uid[16:32], 16))`, `apply_filter` sorts and `np.save`s). Only 32-hex
uids have such a pair: `uid_file_problem` says why a set of uids (e.g. our 24-hex ones) cannot
be written. Everything here takes fsspec URLs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from curation.core import fsio
from curation.core.arrow import string_buffers

__all__ = [
    "UID_DTYPE",
    "EMBEDDING_KEYS",
    "TORCH_SUFFIXES",
    "check_shard_columns",
    "convert_torch_asset",
    "embedding_column",
    "embedding_matrix",
    "is_datacomp_uid",
    "list_shards",
    "load_embedding_file",
    "load_torch_matrix",
    "load_uids",
    "npz_url",
    "pairs_to_uids",
    "parquet_columns",
    "read_embeddings",
    "read_shard",
    "save_uids",
    "uid_check",
    "uid_file_problem",
    "uid_problem_message",
    "uids_to_pairs",
    "write_shard",
]

#: dtype of DataComp's uid files (`np.dtype("u8,u8")` names its fields f0, f1).
UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])
#: Embedding arrays in DataComp's `.npz` files.
EMBEDDING_KEYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")
#: File suffixes read as torch files (only with `torch.load(..., weights_only=True)`).
TORCH_SUFFIXES = (".pt", ".pth")

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


#: Row index into the pool shard, added by jobs so derived tables can find `.npz` embeddings.
POOL_ROW = "pool_row"


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
    data, off = string_buffers(arr)
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


def is_datacomp_uid(uids: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """Per row: is the uid exactly 32 hex digits (DataComp's form)? Nulls are not."""
    arr = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(uids, pa.string())
    ok = pc.fill_null(pc.match_substring_regex(arr, "^[0-9a-fA-F]{32}$"), False)
    return np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)


def uid_file_problem(uids: pa.Array | pa.ChunkedArray, where: str = "uids") -> str | None:
    """Why `uids` cannot go into a DataComp uid file, or None when every one is 32 hex digits.

    DataComp's resharder recomputes `(int(uid[:16], 16), int(uid[16:32], 16))` from the uid of
    each sample it reads; only a 32-hex uid has a pair that means the same on both sides, so
    other uids (our pools use 24 hex digits of sha224) are not padded or hashed into one.
    """
    return uid_problem_message(*uid_check(uids), where=where)


def uid_check(uids: pa.Array | pa.ChunkedArray | Sequence[str]) -> tuple[int, int, str | None]:
    """`(rows, bad, first)` of a batch of uids: how many, how many are not 32 hex digits (nulls
    included), and the first of those (None when there is none, or when it is a null).

    Checks of consecutive batches (e.g. the parts of a stage, in shard order) add up: sum
    `rows` and `bad`, take `first` of the first batch with `bad > 0`; `uid_problem_message`
    of that gives what `uid_file_problem` says of all the uids at once.
    """
    ok = is_datacomp_uid(uids)
    if ok.all():
        return len(ok), 0, None
    bad = int(np.flatnonzero(~ok)[0])
    first = uids[bad].as_py() if hasattr(uids[bad], "as_py") else uids[bad]
    return len(ok), int((~ok).sum()), first


def uid_problem_message(rows: int, bad: int, first: str | None, where: str = "uids") -> str | None:
    """`uid_file_problem`'s message from a (summed) `uid_check`, or None when `bad` is 0."""
    if not bad:
        return None
    return (
        f"{bad:,} of {rows:,} uids in {where} are not 32 hex digits (the first: "
        f"{first!r}); DataComp's uid file (u8,u8 pairs of 32-hex uids) cannot hold them, so it "
        "was not written; the kept rows and their uids, as given, are in the Parquet parts"
    )


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


def embedding_column(
    arr: np.ndarray, key: str = "embedding", where: str = "embeddings"
) -> pa.FixedSizeListArray:
    """A `(rows, dim)` array as a fixed-size-list column (its dtype kept, e.g. float16)."""
    if arr.ndim != 2:
        raise ValueError(f"{where}: embedding {key!r} must be 2-D, got shape {arr.shape}")
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])


def parquet_columns(parquet_url: str) -> list[str]:
    """The column names of a Parquet file (reads the footer only)."""
    fs, path = url_to_fs(parquet_url)
    with fs.open(path, "rb") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def _npz_keys(parquet_url: str) -> list[str]:
    nurl = npz_url(parquet_url)
    fs, path = url_to_fs(nurl)
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # reads the directory
        return list(npz.files)


def read_embeddings(
    parquet_url: str,
    keys: Sequence[str],
    rows: np.ndarray | pa.Array | pa.ChunkedArray | None = None,
) -> dict[str, pa.Array]:
    """Embedding columns of one pool shard: Parquet columns of those names, else the `.npz`.

    Each result is a fixed-size-list array (its dtype, usually float16, is kept). With `rows`
    (row indices into the shard, e.g. a derived table's `pool_row` column) only those rows are
    returned, in that order. The `.npz` is read with `allow_pickle=False` and must be
    row-aligned with the shard.
    """
    if not keys:
        return {}
    idx = None
    if rows is not None:
        idx = np.asarray(
            rows.to_numpy(zero_copy_only=False) if hasattr(rows, "to_numpy") else rows, np.int64
        )
    fs, path = url_to_fs(parquet_url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        num_rows = pf.metadata.num_rows
        in_parquet = [k for k in keys if k in names]
        t = pf.read(columns=in_parquet) if in_parquet else None
    out: dict[str, pa.Array] = {}
    for k in in_parquet:
        col = t.column(k).combine_chunks()
        out[k] = col.take(pa.array(idx)) if idx is not None else col
    from_npz = [k for k in keys if k not in names]
    out.update(_npz_embeddings(parquet_url, from_npz, num_rows, names, idx))
    return {k: out[k] for k in keys}


def _npz_embeddings(
    parquet_url: str,
    keys: Sequence[str],
    num_rows: int,
    names: Sequence[str],
    idx: np.ndarray | None = None,
) -> dict[str, pa.Array]:
    if not keys:
        return {}
    nurl = npz_url(parquet_url)
    nfs, npath = url_to_fs(nurl)
    if not nfs.exists(npath):
        raise ValueError(
            f"{parquet_url}: no column {keys[0]!r} and no {nurl} beside it; name an "
            f"embedding column of the shard (it has {list(names)})"
        )
    out = {}
    # np.load reads a zip member only when asked: the other arrays of the .npz are not read
    with nfs.open(npath, "rb") as f, np.load(f, allow_pickle=False) as npz:
        for key in keys:
            if key not in npz.files:
                raise ValueError(
                    f"{nurl}: no embedding {key!r} (has {sorted(npz.files)}; the shard's "
                    f"columns: {list(names)})"
                )
            arr = npz[key]
            if len(arr) != num_rows:
                raise ValueError(
                    f"{nurl}: {key!r} has {len(arr)} rows but the parquet has "
                    f"{num_rows}; the .npz must be row-aligned with its shard"
                )
            out[key] = embedding_column(arr[idx] if idx is not None else arr, key, nurl)
    return out


def read_shard(
    parquet_url: str, columns: Sequence[str] | None = None, embeddings: Sequence[str] = ()
) -> pa.Table:
    """Read one pool shard as an Arrow table, with the embeddings a filter needs.

    `columns` are Parquet columns (None: all). Each name in `embeddings` (e.g. `"l14_img"` or
    `"image_embedding"`) is a fixed-size-list column of the same name: the Parquet's own column
    when it has one (our scored output), else the array of that name in the `.npz` beside the
    shard (DataComp), appended row-aligned. A missing column or key raises a ValueError naming
    the shard and what it has.
    """
    fs, path = url_to_fs(parquet_url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        in_parquet = [e for e in embeddings if e in names]
        cols = None if columns is None else list(dict.fromkeys([*columns, *in_parquet]))
        missing = [c for c in cols or () if c not in names]
        if missing:
            raise ValueError(f"{parquet_url}: no column(s) {missing} (has {names})")
        table = pf.read(columns=cols)
    from_npz = [e for e in embeddings if e not in names]
    for key, col in _npz_embeddings(parquet_url, from_npz, table.num_rows, names).items():
        table = table.append_column(key, col)
    return table


def check_shard_columns(
    parquet_url: str, columns: Sequence[str], embeddings: Sequence[str] = (), who: str = ""
) -> None:
    """Fail early, naming what is missing, when a shard lacks columns or embeddings.

    Reads only the Parquet footer and the `.npz` directory, so a bad column name in a job spec
    or on the command line is reported before any work starts.
    """
    names = parquet_columns(parquet_url)
    missing = [c for c in columns if c not in names and c not in embeddings]
    need_npz = [e for e in embeddings if e not in names]
    keys = _npz_keys(parquet_url) if need_npz else []
    missing += [e for e in need_npz if e not in keys]
    if missing:
        where = f"{who}: " if who else ""
        raise ValueError(
            f"{where}{parquet_url} lacks {missing}: its Parquet columns are {names}"
            + (f" and its .npz holds {keys}" if keys else " (no .npz embeddings beside it)")
            + "; pick existing ones (score_column / embedding_key, --score-column / "
            "--embedding-key)"
        )


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
    if col.null_count:
        bad = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"column {key!r}: {col.null_count} null embedding(s), first at row {bad}")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"column {key!r}: embeddings of different lengths {set(lengths)}")
        dim = int(lengths[0]) if len(lengths) else 0
        flat = pc.list_flatten(col)
        return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, dim)
    if not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"column {key!r} must be a (fixed-size) list, got {col.type}")
    dim = col.type.list_size
    if col.num_chunks == 0:
        return np.zeros((0, dim), dtype=dtype)
    chunks = [c.flatten() for c in col.chunks]  # flatten() honours slice offsets
    flat = pa.concat_arrays(chunks) if len(chunks) > 1 else chunks[0]
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, dim)


def load_embedding_file(url: str, key: str | None = None) -> np.ndarray:
    """A 2-D embedding array from a `.npy`, a `.npz` (`key`, or its only array) or a torch file.

    NumPy files are loaded with `allow_pickle=False`. DataComp's own assets
    (`in1k_clip_vit_l14_*.pt`, `*_centroids_l14.pt`) are torch files: `.pt` / `.pth` go through
    `load_torch_matrix` (`weights_only=True`, needs torch); `curation filter convert-assets`
    turns them into `.npy` once so torch is not needed afterwards.
    """
    if url.lower().endswith(TORCH_SUFFIXES):
        return load_torch_matrix(url, key)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"embedding file {url!r} does not exist")
    with fs.open(path, "rb") as f:
        try:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{url}: not a .npy/.npz array file without pickles ({e})") from e
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


def load_torch_matrix(url: str, key: str | None = None) -> np.ndarray:
    """A 2-D float array from a torch file, never unpickling anything but tensors.

    The file is read with `torch.load(f, map_location="cpu", weights_only=True)`: torch's
    restricted unpickler, which refuses any pickled class or function other than tensors and
    plain containers (a file holding other objects raises a ValueError and nothing of it runs).
    The content must be a 2-D tensor, or a dict (e.g. a state dict) holding one 2-D tensor, or
    several of which `key` names one. bfloat16 becomes float32 (NumPy has no bfloat16).
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(
            f"{url} is a torch file; reading it needs torch (pip install torch), or convert it "
            "once with `curation filter convert-assets` on a machine that has torch"
        ) from e
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"torch file {url!r} does not exist")
    with fs.open(path, "rb") as f:
        buf = io.BytesIO(f.read())
    try:
        obj = torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle.UnpicklingError (or RuntimeError) here
        raise ValueError(
            f"{url}: refused: not a plain tensor file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); only tensors and dicts of tensors "
            "are loaded (weights_only=True), never other pickled objects"
        ) from e
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor) and v.ndim == 2}
        if key is not None:
            if key not in tensors:
                raise ValueError(f"{url}: no 2-D tensor {key!r} (2-D tensors: {sorted(tensors)})")
            obj = tensors[key]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise ValueError(
                f"{url}: a dict with {len(tensors)} 2-D tensors {sorted(tensors)}; name one "
                "with key= (--key)"
            )
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{url}: expected a 2-D tensor (or a dict with one), got {type(obj)}")
    if obj.ndim != 2:
        raise ValueError(f"{url}: expected a 2-D tensor (rows, dim), got shape {tuple(obj.shape)}")
    if not obj.is_floating_point():
        raise ValueError(f"{url}: expected a float tensor, got {obj.dtype}")
    t = obj.detach().to("cpu")
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.contiguous().numpy()


def convert_torch_asset(
    in_url: str, out_url: str, dtype: str | None = None, key: str | None = None
) -> dict[str, object]:
    """Convert a DataComp torch asset (centroids, target features) to a `.npy`, atomically.

    Loaded with `load_torch_matrix` (tensors only); written as float16 or float32 (`dtype`; by
    default float16 stays float16 and anything else becomes float32). Returns shape, dtype and
    the output URL.
    """
    if dtype not in (None, "float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if not out_url.endswith(".npy"):
        raise ValueError(f"{out_url}: the output is a .npy file")
    arr = load_torch_matrix(in_url, key)
    target = dtype or ("float16" if arr.dtype == np.float16 else "float32")
    arr = np.ascontiguousarray(arr, dtype=target)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    fsio.atomic_write_bytes(out_url, buf.getvalue())
    return {"input": in_url, "output": out_url, "shape": list(arr.shape), "dtype": target}
