"""DataComp filter parameters as job specs and the CLI give them: names, allowed keys, checks.

No implementation is imported here, so a job spec is validated without loading anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# --------------------------------------------------------------------------------------------
# Parameters as job specs and the CLI give them

#: DataComp's baseline names (`apply_filter.py`'s `--name`).
BASELINES = (
    "no_filter",
    "basic_filter",
    "text_based",
    "clip_score",
    "laion2b",
    "image_based",
    "image_based_intersect_clip_score",
)
_CLIP_PARAMS = ("arch", "score_column", "threshold", "fraction", "threshold_mode")
_IMAGE_PARAMS = ("lid_model", "centroids", "target_embeddings", "embedding_key", "assign_rule")
#: The parameters each baseline takes in a job spec step (and, by the same names, the CLI).
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    "no_filter": (),
    "basic_filter": ("lid_model",),
    "text_based": ("lid_model",),
    "clip_score": _CLIP_PARAMS,
    "laion2b": ("lid_model", "score_column", "threshold"),
    "image_based": _IMAGE_PARAMS,
    "image_based_intersect_clip_score": _IMAGE_PARAMS + _CLIP_PARAMS,
}
_CHOICES = {
    "arch": ("b32", "l14"),
    "threshold_mode": ("datacomp", "exact"),
    "assign_rule": ("ip", "l2"),
}


def validate_params(baseline: str, params: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check one baseline's parameters (job-spec names) without loading anything.

    Raises a ValueError that names `where`, the key and what to give; returns the parameters
    with `target_embeddings` as a list. Files (centroids, targets) are only checked when the
    filter is built (`filter_from_params`).
    """
    at = f"{where}: " if where else ""
    if baseline not in STEP_PARAMS:
        raise ValueError(f"{at}unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if not isinstance(params, Mapping):
        raise ValueError(f"{at}parameters of {baseline} must be a mapping, got {params!r}")
    allowed = STEP_PARAMS[baseline]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(f"'{k}'" for k in allowed) if allowed else "no parameters"
        raise ValueError(f"{at}{baseline} does not take {unknown}; it takes: {takes}")
    out = dict(params)
    for key, value in params.items():
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"{at}'{key}' must be one of {_CHOICES[key]}, got {value!r}")
        elif key in ("threshold", "fraction"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise ValueError(f"{at}'{key}' must be a number, got {value!r}")
            if key == "fraction" and not 0 <= value <= 1:
                raise ValueError(f"{at}'fraction' must be in [0, 1], got {value!r}")
            out[key] = float(value)
        elif key == "target_embeddings":
            files = [value] if isinstance(value, str) else value
            if not isinstance(files, list) or not files:
                raise ValueError(f"{at}'target_embeddings' must be a file or a list of files")
            for v in files:
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(
                        f"{at}'target_embeddings' entries must be file paths, got {v!r}"
                    )
            out[key] = list(files)
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"{at}'{key}' must be a non-empty string, got {value!r}")
    if "arch" in params and "score_column" in params:
        raise ValueError(f"{at}give 'arch' (b32/l14 DataComp column) or 'score_column', not both")
    if "fraction" in allowed and ("threshold" in params) == ("fraction" in params):
        raise ValueError(f"{at}{baseline} needs exactly one of 'threshold' or 'fraction'")
    if "threshold_mode" in params and "fraction" not in params:
        raise ValueError(f"{at}'threshold_mode' applies to 'fraction' only")
    for key in ("centroids", "target_embeddings"):
        if key in allowed and key not in params:
            raise ValueError(f"{at}{baseline} needs '{key}' (a .npy, .npz or .pt file)")
    return out
