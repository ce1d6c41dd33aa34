"""Arrow column helpers shared by the stages: zero-copy views of string buffers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def string_buffers(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, offsets) of a string or binary column: the rows' concatenated bytes as uint8 and
    int64 row offsets into them starting at 0 (`len(arr) + 1` of them).

    Zero-copy for a single chunk of (large_)string / (large_)binary; a null row is empty.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    if not (large or pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)):
        raise TypeError(f"expected a string or binary column, got {arr.type}")
    n = len(arr)
    bufs = arr.buffers()
    odt = np.int64 if large else np.int32
    if bufs[1] is None:
        return np.zeros(0, dtype=np.uint8), np.zeros(n + 1, dtype=np.int64)
    off = np.frombuffer(bufs[1], dtype=odt)[arr.offset : arr.offset + n + 1].astype(np.int64)
    lo, hi = int(off[0]), int(off[-1])
    if hi == lo or bufs[2] is None:
        return np.zeros(0, dtype=np.uint8), off - lo
    return np.frombuffer(bufs[2], dtype=np.uint8)[lo:hi], off - lo
