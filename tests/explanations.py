"""The check that an answer's explanation is true of the figures shown with it, one row at a time.

Written from the page's promise, not from stages/lib/inference.py: a row (decision, reason,
mel_threshold, p_<dx> shown probabilities, w_<dx> weighted scores, as evaluate's answers*.csv
holds them, rounded to 4 decimals) passes only if every claim its reason makes is true of them.
"""
from __future__ import annotations

import re

from stages.lib.dataset import CLASS_NAMES, CLASSES

MORE_PROBABLE = re.compile(r"although (.+) is more probable \((\d+\.\d)%\)")


def check_answer(row: dict) -> None:
    shown = {dx: float(row[f"p_{dx}"]) for dx in CLASSES}
    weighted = {dx: float(row[f"w_{dx}"]) for dx in CLASSES}
    decision, why, threshold = row["decision"], row["reason"], float(row["mel_threshold"])
    where = f"{row['image_id']}: {why!r}"
    if decision == "unknown":
        assert why.startswith("No diagnosis"), where
        return
    assert why.lower().startswith(CLASS_NAMES[decision] + ":"), where
    if "the most probable class shown" in why:
        assert shown[decision] == max(shown.values()), where
    else:
        found = MORE_PROBABLE.search(why)
        assert found, where
        other = next(dx for dx in CLASSES if CLASS_NAMES[dx] == found.group(1))
        assert other != decision and shown[other] == max(shown.values()) >= shown[decision], where
        assert abs(100 * shown[other] - float(found.group(2))) <= 0.051, where
    if "at or above the melanoma threshold" in why:
        assert decision == "mel" and weighted["mel"] >= threshold, where
    else:
        assert "the highest weighted score" in why and weighted[decision] == max(weighted.values()), where
        assert decision == "mel" or weighted["mel"] <= threshold, where
