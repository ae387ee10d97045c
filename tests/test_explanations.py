"""Every committed validation answer's explanation is true of what it shows (both paths).

metrics/plots/val/answers.csv (image alone) and answers_with_metadata.csv hold, for every
validation image, the answer evaluate gave with the committed model: what the page and predict
show for that image. Each row's reason is checked against its own figures (tests/explanations.py).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.explanations import check_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["answers.csv", "answers_with_metadata.csv"])
def test_every_validation_answer_explains_itself_truthfully(name):
    table = pd.read_csv(ROOT / "metrics" / "plots" / "val" / name, dtype={"image_id": str})
    val = pd.read_csv(ROOT / "metrics" / "plots" / "val" / "predictions.csv")
    assert len(table) == len(val) > 1000, "one row per validation image"
    for row in table.to_dict("records"):
        check_answer(row)
    assert (table["reason"].str.contains("although")).any(), "some decisions are not the most probable class"
