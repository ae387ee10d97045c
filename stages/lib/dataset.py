"""The dataset's contract: class order, class names, splits and the columns of every split CSV.

CLASSES: the seven `dx` codes in the one order every stage, file and the model's output use
(alphabetical, as in the ISIC 2018 task 3 ground truth: akiec, bcc, bkl, df, mel, nv, vasc);
CLASS_NAMES: their names; LABELS: dx -> code; MELANOMA: mel's code; SPLITS: train, val, test;
SPLIT_COLUMNS: the columns of data/split/*.csv; `class_mapping()`: data/split/classes.json.
Invariant: a class's code is the same in data/split, the shards, the model's output and metrics/.
Why: one definition, so no stage can disagree about which output is melanoma (list: README.md).
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
