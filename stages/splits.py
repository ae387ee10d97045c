"""The split contract: the names of the splits and the columns every split CSV holds."""
from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "lesion_group", "dx", "label")
