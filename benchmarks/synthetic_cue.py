"""Does the model use "looks synthetic" as a cue? Score validation images real and made synthetic.

    python benchmarks/synthetic_cue.py --model models/model.keras [--out benchmarks/synthetic_cue.json]

Why: with `augment.copies: synthetic`, augment gives synthetic copies (rotation, zoom, shift with
mirrored margins, colour jitter, two resamplings) to the minority classes only; `nv` never gets
any. If the model had learned "synthetic -> not nv", turning *real validation* images into
synthetic ones with augment's own transform would move predictions away from `nv`: nv recall
would fall and p(nv) would drop for every class. This script measures exactly that, per class, on
validation (never test): each image is scored as it is (augment's plain resize) and as augment's
synthetic copy of it (seeded, with augment's transform params whatever `copies` is set to). A model
trained with `copies: repeat` and on-line augmentation of every class should show no such shift.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402

from stages.augment import AugmentParams, augment, draw_transform, working_copy  # noqa: E402
from stages.lib.dataset import CLASSES, LABELS  # noqa: E402
from stages.lib.files import atomic_write_json, read_table  # noqa: E402
from stages.lib.images import image_file, open_rgb, resize_square  # noqa: E402
from stages.lib.params import load_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--split-csv", type=Path, default=Path("data/split/val.csv"))
    parser.add_argument("--images-dir", type=Path, default=Path("data/raw/images"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/synthetic_cue.json"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import keras

    params = load_params("augment", AugmentParams, args.params)
    table = read_table(args.split_csv, required=("image_id", "dx"))
    rng = np.random.default_rng(args.seed)
    real, synthetic = [], []
    for image_id in table["image_id"]:
        img = open_rgb(image_file(args.images_dir, image_id))
        real.append(resize_square(img, params.image_size))
        synthetic.append(augment(working_copy(img, params.image_size), draw_transform(rng, params), params.image_size))
    labels = table["dx"].map(LABELS).to_numpy()
    model = keras.saving.load_model(args.model)
    scores = {}
    for name, images in (("real", real), ("synthetic", synthetic)):
        proba = model.predict(np.stack(images).astype(np.float32), batch_size=64, verbose=0)
        predicted = proba.argmax(axis=1)
        per_class = {dx: {"recall": float(np.mean(predicted[labels == k] == k)),
                          "mean_p_nv": float(proba[labels == k, LABELS["nv"]].mean()),
                          "share_predicted_nv": float(np.mean(predicted[labels == k] == LABELS["nv"]))}
                     for k, dx in enumerate(CLASSES) if np.any(labels == k)}
        scores[name] = {"balanced_accuracy": float(np.mean([c["recall"] for c in per_class.values()])),
                        "per_class": per_class}
    result = {"model": str(args.model), "images": int(len(labels)), "seed": args.seed, **scores}
    atomic_write_json(args.out, result)
    print(f"{'dx':6} {'recall real':>12} {'synthetic':>10} {'p(nv) real':>11} {'synthetic':>10}")
    for dx in scores["real"]["per_class"]:
        r, s = scores["real"]["per_class"][dx], scores["synthetic"]["per_class"][dx]
        print(f"{dx:6} {r['recall']:12.3f} {s['recall']:10.3f} {r['mean_p_nv']:11.3f} {s['mean_p_nv']:10.3f}")
    print(f"balanced accuracy: real {scores['real']['balanced_accuracy']:.3f}, "
          f"synthetic {scores['synthetic']['balanced_accuracy']:.3f}")


if __name__ == "__main__":
    main()
