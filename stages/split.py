"""Stage split: data/clean -> data/split/{train,val,test}.csv + classes.json, and metrics/data.json.

Assigns whole lesion groups (dedupe's `lesion_group`) to train / val / test, class by class: each
class's groups in a seeded shuffle, largest first, each to the split furthest below its target
share of that class's images (`split.train`, `split.val`, `split.test`, summing to 1). As most
groups hold one or two images, the shares of lesion groups land close to the targets too.
metrics/data.json: dedupe's counts, and per split its images, lesions and groups per class.
Invariant: no lesion group is in two splits, and every class is in every split (else an error
naming the class and its groups).
Why: images of one lesion look alike; in train and test, test scores would measure memory.
How the groups are made: docs/dedupe.md; bad input: docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.cli import StageError, run_stage
from stages.lib.dataset import CLASSES, LABELS, SPLITS, class_mapping
from stages.lib.files import atomic_dir, atomic_write_json, read_json, read_table, write_table
from stages.lib.params import PARAMS_FILE, in_range, load_params

log = logging.getLogger("stages.split")

OUTPUT_COLUMNS = ("image_id", "lesion_id", "lesion_group", "dx", "label", "age", "sex", "localization",
                  "dx_type")


@dataclasses.dataclass(frozen=True)
class SplitParams:
    seed: int
    train: float
    val: float
    test: float

    def __post_init__(self) -> None:
        in_range("seed", self.seed, 0)
        fractions = self.fractions()
        for name, fraction in fractions.items():
            in_range(name, fraction, 0, lo_open=True)
        total = sum(fractions.values())
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got "
                             f"{' + '.join(str(f) for f in fractions.values())} = {total:g}")

    def fractions(self) -> dict[str, float]:
        return {split: getattr(self, split) for split in SPLITS}


def split_lesions(table: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """The split of every row of `table` (needs lesion_group, dx), whole lesion groups at a time."""
    groups = lesion_group_table(table)
    rng = np.random.default_rng(seed)
    assigned = {}
    for dx in CLASSES:
        of_class = groups[groups["dx"] == dx]
        check_enough_groups(dx, of_class, len(fractions))
        shuffled = of_class.iloc[rng.permutation(len(of_class))]
        largest_first = shuffled.sort_values("images", ascending=False, kind="stable")
        assigned.update(assign_groups(largest_first["images"], fractions))
    return table["lesion_group"].map(assigned).rename("split")


def lesion_group_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per lesion group (sorted, so row order in the input does not matter): dx, images."""
    groups = table.groupby("lesion_group", sort=True).agg(dx=("dx", "first"), classes=("dx", "nunique"),
                                                          images=("dx", "size"))
    mixed = groups.index[groups["classes"] > 1]
    if len(mixed):
        raise StageError(f"lesion group {mixed[0]} holds images of two classes; "
                         f"dedupe never writes that (re-run: dvc repro dedupe)")
    return groups.drop(columns="classes")


def check_enough_groups(dx: str, groups: pd.DataFrame, splits: int) -> None:
    """A class missing from a split makes its scores there undefined: refuse, with the numbers."""
    if len(groups) < splits:
        raise StageError(f"class {dx} has {len(groups)} lesion group(s) ({groups['images'].sum()} images); "
                         f"at least {splits} are needed to put it in every split")


def assign_groups(images: pd.Series, fractions: dict[str, float]) -> dict[str, str]:
    """lesion group -> split, in the given order, each group to the split with the largest
    relative deficit (target images - assigned) / target; ties go to the earlier split."""
    total = images.sum()
    target = {split: fraction * total for split, fraction in fractions.items()}
    have = dict.fromkeys(fractions, 0)
    assigned = {}
    for group, count in images.items():
        split = max(fractions, key=lambda s: (target[s] - have[s]) / target[s])
        assigned[group] = split
        have[split] += count
    return assigned


def split_summary(table: pd.DataFrame, splits: pd.Series) -> dict:
    """Sizes of each split and its class mix, plus the largest gap between a class's share of a
    split and its share of all images (percentage points)."""
    overall = table["dx"].value_counts(normalize=True)
    summary, worst = {}, 0.0
    for split in SPLITS:
        part = table[splits == split]
        per_class = part["dx"].value_counts()
        summary[split] = {"images": len(part), "lesions": part["lesion_id"].nunique(),
                          "lesion_groups": part["lesion_group"].nunique(),
                          "images_per_class": {dx: int(per_class.get(dx, 0)) for dx in CLASSES}}
        share = per_class.reindex(list(CLASSES), fill_value=0) / max(len(part), 1)
        worst = max(worst, float((share - overall.reindex(list(CLASSES), fill_value=0)).abs().max()))
    summary["max_class_share_deviation_pp"] = round(100 * worst, 2)
    return summary


def read_images(path: Path) -> pd.DataFrame:
    """images.csv from dedupe, with every dx known; label is derived again from dx."""
    table = read_table(path, required=OUTPUT_COLUMNS)
    unknown = sorted(set(table["dx"]) - set(CLASSES))
    if unknown:
        raise StageError(f"{path}: unknown dx {unknown[0]!r} (re-run: dvc repro dedupe)")
    return table.assign(label=table["dx"].map(LABELS)).loc[:, list(OUTPUT_COLUMNS)]


def main(clean_dir: Path = Path("data/clean"), out_dir: Path = Path("data/split"),
         metrics_path: Path = Path("metrics/data.json"), params_path: Path = PARAMS_FILE) -> None:
    params = load_params("split", SplitParams, params_path)
    clean = Path(clean_dir)
    table = read_images(clean / "images.csv").sort_values("image_id", kind="stable").reset_index(drop=True)
    report = read_json(clean / "report.json", made_by="dedupe")
    splits = split_lesions(table, params.fractions(), params.seed)
    summary = split_summary(table, splits)
    with atomic_dir(Path(out_dir)) as tmp:
        for split in SPLITS:
            write_table(tmp / f"{split}.csv", table[splits == split])
        atomic_write_json(tmp / "classes.json", class_mapping())
    atomic_write_json(Path(metrics_path), {**report, "splits": summary})
    log.info("split %d images: %s; largest class-share gap %.2f pp", len(table),
             ", ".join(f"{s} {summary[s]['images']} ({summary[s]['lesion_groups']} groups)" for s in SPLITS),
             summary["max_class_share_deviation_pp"])


if __name__ == "__main__":
    run_stage(main)
