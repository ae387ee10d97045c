"""The dataset's contract: the seven classes in the one order every stage, file and the model's
output use (codes alphabetical by `dx`, as in the ISIC 2018 task 3 ground truth), the three splits,
and the columns every split CSV holds.
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

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "lesion_group", "dx", "label")


def class_mapping() -> list[dict[str, Any]]:
    """The mapping as written out for people and other tools (`classes.json`)."""
    return [{"label": LABELS[dx], "dx": dx, "name": CLASS_NAMES[dx]} for dx in CLASSES]
