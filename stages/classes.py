"""The seven HAM10000 classes, in the one order every stage, file and the model's output use.

Codes are alphabetical by `dx`, as in the ISIC 2018 task 3 ground truth.
"""
from __future__ import annotations

from typing import Any

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratoses",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesion",
}
LABELS: dict[str, int] = {dx: code for code, dx in enumerate(CLASSES)}
MELANOMA = LABELS["mel"]


def class_mapping() -> list[dict[str, Any]]:
    """The mapping as written out for people and other tools (`classes.json`)."""
    return [{"label": LABELS[dx], "dx": dx, "name": CLASS_NAMES[dx]} for dx in CLASSES]
