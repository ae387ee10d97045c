"""Fixtures shared by the model-stage tests: tiny shards in augment's format, tiny params."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stages.lib.dataset import CLASSES  # noqa: E402
from stages.lib.shards import write_shards  # noqa: E402

TINY_TRAIN = {
    "seed": 1, "weights": "none", "alpha": 0.25, "trainable_from": "all", "freeze_batchnorm": False, "dropout": 0.1,
    "optimizer": "adam", "learning_rate": 0.01, "warmup_epochs": 0,
    "min_learning_rate": 0.0001, "epochs": 1, "average_last_epochs": 1, "batch_size": 16, "class_weight": "balanced",
    "distribution": "default",
    "augmentation": {"flip": True, "rotation_degrees": 180, "shift_fraction": 0.05, "zoom_fraction": 0.1,
                     "brightness": 0.1, "contrast": 0.1, "photo_aspect": 1.0},
}


def train_params(**change):
    """TINY_TRAIN with `change`, checked as the stage checks params.yaml's `train` section."""
    from stages.lib.params import from_dict
    from stages.train import TrainParams

    return from_dict(TrainParams, {**TINY_TRAIN, **change}, "train")


def make_shards(folder: Path, size: int = 32, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write learnable tiny shards: each class is a different colour plus noise."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 12, "val": 4, "test": 4}
    folder.mkdir(parents=True, exist_ok=True)
    index = {"image_size": size, "seed": seed, "splits": {}}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), n)
        base = (labels[:, None] * 36 + np.array([0, 80, 160])) % 256
        images = np.clip(base[:, None, None, :] + rng.normal(0, 20, (len(labels), size, size, 3)), 0, 255)
        ids = np.array([f"ISIC_{split}_{i:04d}" for i in range(len(labels))])
        shards, _ = write_shards(folder, split, images.astype(np.uint8), labels, ids, shard_images=50)
        index["splits"][split] = {"images": len(labels), "shards": shards,
                                  "class_counts": {dx: n for dx in CLASSES}}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    return make_shards(tmp_path / "augmented")

