"""Stage `metadata`: data/split/train.csv -> models/metadata.json, what age, sex and site say.

Fits stages/lib/metadata.py's model on the training split's rows (each real image once, as the
class shares the decision rule corrects for): one logistic regression per set of the fields in
`metadata.fields`, each on the rows that know that set, so a user who knows only some fields is
answered from those alone. `dx_type` is never read: it records how the diagnosis was confirmed.
`evaluate` combines it with the image model and chooses the metadata path's rule on validation.
`fields: []` fits nothing: the pipeline then answers from images alone. Why: docs/metadata.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stages.lib import metadata
from stages.lib.cli import StageError, run_stage
from stages.lib.files import read_table
from stages.lib.params import PARAMS_FILE, in_range, load_params

log = logging.getLogger("stages.metadata")


@dataclass(frozen=True)
class MetadataParams:
    fields: list[str]          # of age, sex, localization; [] = no metadata path
    regularization: float      # the logistic regressions' C (inverse L2 strength), > 0

    def __post_init__(self) -> None:
        in_range("regularization", self.regularization, 0, lo_open=True)
        for field in self.fields:
            if field not in metadata.FIELDS:
                raise ValueError(f"fields: {field!r} is not one of {', '.join(metadata.FIELDS)}")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"fields: {self.fields} names a field twice")


def main(params_path: Path = PARAMS_FILE, split_dir: Path = Path("data/split"),
         model_path: Path = Path("models/metadata.json")) -> None:
    params = load_params("metadata", MetadataParams, params_path)
    table = read_table(Path(split_dir) / "train.csv", required=("image_id", "label", *params.fields))
    try:
        rows = metadata.of_table(table[[*params.fields]])
    except ValueError as err:
        raise StageError(f"{Path(split_dir) / 'train.csv'}: {err}") from None
    model = metadata.fit(rows, table["label"].to_numpy(), tuple(params.fields), params.regularization)
    model.save(Path(model_path))
    for known in metadata.known_subsets(tuple(params.fields)):
        rows_known = sum(all(getattr(r, f) is not None for f in known) for r in rows)
        log.info("%s: %d of %d training rows%s", " + ".join(known), rows_known, len(rows),
                 "" if known in model.fits else " (not fitted: a class is missing)")


if __name__ == "__main__":
    run_stage(main)
