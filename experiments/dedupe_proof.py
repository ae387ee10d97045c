"""How far same-image pairs and different-lesion pairs lie under dedupe's near-duplicate proof.

    python -m experiments.dedupe_proof [--raw data/raw] [--max-distance 10] [--sample 300]

Reads a data/raw made by `dvc repro download` (read only; about a minute) and prints, for
stages/dedupe.py's colour-fit residual and the old grey-level measure: (1) pHash candidate pairs
within `--max-distance` bits (any flip or rotation) split into byte-identical, same-lesion and
different-lesion pairs, with the closest different-lesion pairs listed; (2) an exhaustive 16x16
search for re-processed copies pHash missed; (3) `--sample` real images changed in colour and
re-encoded at JPEG quality 75, against their originals. Writes nothing.
Why: the threshold `dedupe.max_colour_fit_residual` must sit between the two populations.
Results: docs/dedupe.md (Measurements); index of experiments: docs/experiments.md.
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages import dedupe
from stages.lib.images import MAX_IMAGE_PIXELS, image_file

QUANTILES = (0.001, 0.01, 0.05, 0.5)

# Colour changes of a whole image (float RGB 0-255 -> float RGB; clipped to 0-255 afterwards).
COLOUR_CHANGES = {
    "JPEG q75 only": lambda x: x,
    "white balance x1.10/1/0.90": lambda x: x * [1.10, 1.0, 0.90],
    "white balance x0.90/1/1.10": lambda x: x * [0.90, 1.0, 1.10],
    "brightness -25": lambda x: x - 25,
    "brightness +15": lambda x: x + 15,
    "brightness x1.10": lambda x: x * 1.10,
    "contrast x1.3": lambda x: (x - x.mean((0, 1))) * 1.3 + x.mean((0, 1)),
    "contrast x0.7": lambda x: (x - x.mean((0, 1))) * 0.7 + x.mean((0, 1)),
    "gamma 0.8": lambda x: 255 * (x / 255) ** 0.8,
    "gamma 1.25": lambda x: 255 * (x / 255) ** 1.25,
    "desaturate 30%": lambda x: 0.7 * x + 0.3 * x.mean(2, keepdims=True),
    "white balance+gamma+contrast": lambda x: (255 * ((x * [0.95, 1, 1.05]).clip(0, 255) / 255) ** 1.2
                                               - 128) * 1.2 + 128,
    # Saturating changes: the clipped part of the picture is lost, so these are the measure's limit.
    "brightness +25 (clips)": lambda x: x + 25,
    "white balance x1.15/1/0.85 (clips)": lambda x: x * [1.15, 1.0, 0.85],
}


def distribution(values: np.ndarray) -> str:
    if len(values) == 0:
        return "none"
    q = np.quantile(values, QUANTILES)
    return (f"n {len(values):>6,}  min {values.min():.3f}  0.1% {q[0]:.3f}  1% {q[1]:.3f}  "
            f"5% {q[2]:.3f}  median {q[3]:.3f}  max {values.max():.3f}")


def grey_mean_abs_differences(thumbs: np.ndarray, pairs: pd.DataFrame) -> np.ndarray:
    """The old proof (before issue 11), for comparison: mean |grey i - transformed grey j|."""
    out = np.empty(len(pairs))
    for symmetry, part in pairs.groupby("symmetry").groups.items():
        where = pairs.index.get_indexer(part)
        a = thumbs[pairs["i"].to_numpy()[where]].astype(np.int16)
        b = dedupe.transform_pixels(thumbs[pairs["j"].to_numpy()[where]], symmetry).astype(np.int16)
        out[where] = np.abs(a - b).mean(axis=(1, 2))
    return out


def scan(raw: Path, workers: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    meta = dedupe.read_metadata(raw / dedupe.METADATA_FILE)
    files = dedupe.list_images(raw / "images")
    meta = meta[meta["image_id"].isin(list(files))].sort_values("image_id").reset_index(drop=True)
    started = time.perf_counter()
    scans = dedupe.scan_images([files[i] for i in meta["image_id"]], MAX_IMAGE_PIXELS, workers)
    bad = [i for i, s in zip(meta["image_id"], scans) if isinstance(s, str)]
    if bad:
        raise SystemExit(f"unreadable images: {bad[:5]}")
    print(f"decoded {len(meta):,} images in {time.perf_counter() - started:.1f} s")
    meta["sha256"] = [s.sha256 for s in scans]
    return meta, np.stack([s.thumb for s in scans]), np.stack([s.colour for s in scans])


def candidate_section(meta, thumbs, colours, max_distance: int, threshold: float, stage_distance: int):
    pairs = dedupe.candidate_pairs(dedupe.phashes(thumbs), max_distance)
    pairs["residual"] = dedupe.colour_fit_residuals(colours, pairs)
    pairs["grey_diff"] = grey_mean_abs_differences(thumbs, pairs.reset_index(drop=True)) if len(pairs) else []
    pairs = pairs.sort_values(["residual", "distance"]).drop_duplicates(["i", "j"]).reset_index(drop=True)
    i, j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
    pairs["a"], pairs["b"] = meta["image_id"].to_numpy()[i], meta["image_id"].to_numpy()[j]
    pairs["lesion_a"], pairs["lesion_b"] = meta["lesion_id"].to_numpy()[i], meta["lesion_id"].to_numpy()[j]
    pairs["dx_a"], pairs["dx_b"] = meta["dx"].to_numpy()[i], meta["dx"].to_numpy()[j]
    identical = meta["sha256"].to_numpy()[i] == meta["sha256"].to_numpy()[j]
    same = (pairs["lesion_a"] == pairs["lesion_b"]).to_numpy() & ~identical
    different = ~identical & ~same
    print(f"\n1. pHash candidate pairs within {max_distance} bits (any flip/rotation): {len(pairs):,} "
          f"({(pairs['distance'] <= stage_distance).sum():,} within the stage's {stage_distance})")
    for name, where in (("byte-identical", identical), ("same lesion", same), ("different lesions", different)):
        print(f"   {name:18s} colour-fit residual  {distribution(pairs.loc[where, 'residual'].to_numpy())}")
        print(f"   {'':18s} grey mean abs diff  {distribution(pairs.loc[where, 'grey_diff'].to_numpy())}")
    view = ["a", "b", "lesion_a", "lesion_b", "dx_a", "dx_b", "distance", "symmetry", "residual", "grey_diff"]
    print("\n   closest different-lesion pairs:")
    print(pairs.loc[different, view].head(12).to_string(index=False, float_format="%.3f"))
    proven = pairs["residual"] <= threshold
    print(f"\n   proven at threshold {threshold}: {proven.sum()} pairs ({(proven & same).sum()} same lesion, "
          f"{(proven & identical).sum()} byte-identical, {(proven & different).sum()} across lesions):")
    print(pairs.loc[proven & different, view].to_string(index=False, float_format="%.3f"))
    return pairs


def exhaustive_section(meta, colours, candidates: pd.DataFrame, threshold: float, loose: float = 0.35):
    """Every upright pair at 16x16 (one matrix product per channel); pairs under `loose` are
    re-measured at 64x64 and those under the threshold compared with the pHash candidates."""
    small = np.stack([np.asarray(Image.fromarray(c).resize((16, 16), Image.Resampling.BOX)) for c in colours])
    z = dedupe.standardised(small).reshape(len(small), -1, 3) / np.sqrt(16 * 16)
    found_i, found_j = [], []
    for start in range(0, len(z), 1024):
        r = np.stack([z[start:start + 1024, :, c] @ z[:, :, c].T for c in range(3)])
        residual = np.sqrt(1 - np.clip(r, 0, 1) ** 2).mean(axis=0)
        a, b = np.nonzero(residual <= loose)
        keep = b > a + start
        found_i.append(a[keep] + start)
        found_j.append(b[keep])
    pairs = pd.DataFrame({"i": np.concatenate(found_i), "j": np.concatenate(found_j), "symmetry": 0})
    pairs["residual"] = dedupe.colour_fit_residuals(colours, pairs)
    proven = pairs[pairs["residual"] <= threshold]
    known = set(zip(candidates["i"], candidates["j"]))
    missed = proven[[(i, j) not in known for i, j in zip(proven["i"], proven["j"])]]
    lesions = meta["lesion_id"].to_numpy()
    across = proven[lesions[proven["i"]] != lesions[proven["j"]]]
    print(f"\n2. exhaustive (all {len(colours) * (len(colours) - 1) // 2:,} upright pairs): "
          f"{len(pairs):,} under {loose} at 16x16, {len(proven)} proven at 64x64 "
          f"({len(across)} across lesions); not among the pHash candidates: {len(missed)}")
    for row in missed.itertuples():
        print(f"   missed: {meta['image_id'][row.i]} {meta['image_id'][row.j]} residual {row.residual:.3f}")


def synthetic_section(meta, colours, raw: Path, sample: int, threshold: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(meta), size=min(sample, len(meta)), replace=False))
    originals = [np.asarray(Image.open(image_file(raw / "images", meta["image_id"][k])).convert("RGB"),
                            dtype=np.float64) for k in chosen]
    pairs = pd.DataFrame({"i": np.arange(len(chosen)), "j": np.arange(len(chosen)) + len(chosen), "symmetry": 0})
    print(f"\n3. {len(chosen)} real images vs a colour-changed copy re-encoded at JPEG quality 75 "
          f"(colour-fit residual; share over the threshold {threshold}):")
    for name, change in COLOUR_CHANGES.items():
        copies = []
        for pixels in originals:
            buffer = io.BytesIO()
            Image.fromarray(np.clip(np.round(change(pixels)), 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=75)
            copy = Image.open(buffer).convert("RGB").resize((dedupe.THUMB_SIZE,) * 2, Image.Resampling.BOX)
            copies.append(np.asarray(copy))
        residual = dedupe.colour_fit_residuals(np.concatenate([colours[chosen], np.stack(copies)]), pairs)
        q = np.quantile(residual, (0.5, 0.99))
        print(f"   {name:36s} median {q[0]:.3f}  99% {q[1]:.3f}  max {residual.max():.3f}  "
              f"over {np.mean(residual > threshold):6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--max-distance", type=int, default=10, help="pHash bits for candidates (stage: 6)")
    parser.add_argument("--sample", type=int, default=300, help="images for the synthetic colour changes")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=None, help="default: params.yaml's")
    args = parser.parse_args()
    params = dedupe.load_params("dedupe", dedupe.DedupeParams)
    threshold = args.threshold if args.threshold is not None else params.max_colour_fit_residual
    meta, thumbs, colours = scan(args.raw, args.workers)
    candidates = candidate_section(meta, thumbs, colours, args.max_distance, threshold, params.phash_max_distance)
    exhaustive_section(meta, colours, candidates, threshold)
    synthetic_section(meta, colours, args.raw, args.sample, threshold)


if __name__ == "__main__":
    main()
