"""Text and URL normalization shared by every stage: alt-text cleaning and the image `uid` rule."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

UID_HEX_DIGITS = 24


def normalize_alt_text(text: str) -> str:
    """MetaCLIP's WAT alt-text cleaning: newlines and CRs become spaces, then strip."""
    return text.replace("\n", " ").replace("\r", " ").strip()


def uid_of_url(url: str) -> str:
    """The stable image id: first 24 hex digits of sha224 of the URL with tabs and spaces removed.

    This is MetaCLIP's rule, so uids computed here match uids of MetaCLIP-curated sets.
    """
    key = url.replace("\t", "").replace(" ", "")
    return hashlib.sha224(key.encode("utf-8", "surrogatepass")).hexdigest()[:UID_HEX_DIGITS]


def uids_of_urls(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Vectorized `uid_of_url` over a string column (nulls stay null).

    Stripping is done on the whole column with Arrow; only the digest itself runs per value
    (hashlib has no batch API), which is a C call per row, not Python string work.
    """
    stripped = pc.replace_substring(pc.replace_substring(urls, "\t", ""), " ", "")
    if isinstance(stripped, pa.ChunkedArray):
        stripped = stripped.combine_chunks()
    values = stripped.to_numpy(zero_copy_only=False)
    sha = hashlib.sha224
    out = np.array(
        [
            None if v is None else sha(v.encode("utf-8")).hexdigest()[:UID_HEX_DIGITS]
            for v in values
        ],
        dtype=object,
    )
    return pa.array(out, type=pa.string())
