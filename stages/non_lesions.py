"""Stage `non_lesions`: images that are not dermoscopy, made in code: what "unknown" must catch.

Writes data/non_lesions/: one PNG per image at its natural size, and index.csv (file, kind) in
the order they are made. Seeded, the same on every run: photos and crops of photos
(scikit-learn's sample photos china.jpg and flower.jpg), screenshots with windows, buttons and
text, icons, text pages, blank images, noise, gradients and plain skin without a lesion.
`evaluate` reads each file as predict would (images.load_image: decoded, resized to the model's
input) and reports the share its out-of-distribution detector rejects, per kind; nothing is
chosen on them, so the figure says how well it does on images it was not tuned for.
Measurements: docs/experiments.md, "Calibration and out-of-distribution".
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stages.lib.cli import run_stage
from stages.lib.files import atomic_dir, atomic_write_text

log = logging.getLogger("stages.non_lesions")

SEED = 0  # each kind k draws from numpy's default_rng([SEED, k])
KINDS = ("photo", "photo crop", "screenshot", "icon", "document", "blank", "noise", "gradient", "skin")
WORDS = ("the", "model", "settings", "account", "report", "invoice", "total", "open", "save", "cancel", "file",
         "page", "search", "results", "profile", "help", "date", "name", "amount", "next", "back", "images")


def _sample_photos() -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(photo) for photo in load_sample_images().images]


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words))


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def photos(rng: np.random.Generator) -> list:
    """The sample photos whole, and mirrored."""
    from PIL import ImageOps

    whole = _sample_photos()
    return whole + [ImageOps.mirror(p) for p in whole]


def photo_crops(rng: np.random.Generator, per_photo: int = 12) -> list:
    """Random crops of the sample photos, from a tenth to half of their width, any aspect."""
    crops = []
    for photo in _sample_photos():
        w, h = photo.size
        for _ in range(per_photo):
            cw = int(rng.uniform(0.1, 0.5) * w)
            ch = int(np.clip(cw * rng.uniform(0.6, 1.6), 16, h))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crops.append(photo.crop((x, y, x + cw, y + ch)))
    return crops


def screenshots(rng: np.random.Generator, n: int = 12) -> list:
    """Windows with a title bar, a menu, text lines and buttons, as in a screenshot of an app."""
    from PIL import Image, ImageDraw, ImageFont

    shots = []
    for _ in range(n):
        w, h = int(rng.integers(480, 1280)), int(rng.integers(360, 800))
        img = Image.new("RGB", (w, h), _colour(rng, 200))
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=int(rng.integers(12, 24)))
        draw.rectangle((0, 0, w, 36), fill=_colour(rng, 0, 120))
        draw.text((12, 8), _sentence(rng, 3).title(), fill=(255, 255, 255), font=font)
        y = 56
        while y < h - 60:
            draw.text((24, y), _sentence(rng, int(rng.integers(3, 10))), fill=_colour(rng, 0, 80), font=font)
            y += int(rng.integers(24, 44))
        for k in range(int(rng.integers(1, 4))):
            x = w - 130 * (k + 1)
            draw.rounded_rectangle((x, h - 50, x + 110, h - 14), radius=6, fill=_colour(rng, 0, 200))
            draw.text((x + 14, h - 44), str(rng.choice(WORDS)).upper(), fill=(255, 255, 255), font=font)
        shots.append(img)
    return shots


def icons(rng: np.random.Generator, n: int = 12) -> list:
    """Flat shapes (circle, square, triangle, bars) in bright colours on a plain background."""
    from PIL import Image, ImageDraw

    made = []
    for k in range(n):
        side = int(rng.integers(64, 256))
        img = Image.new("RGB", (side, side), _colour(rng, 180) if k % 2 else (255, 255, 255))
        draw = ImageDraw.Draw(img)
        colour, m = _colour(rng, 0, 256), side // 6
        shape = k % 4
        if shape == 0:
            draw.ellipse((m, m, side - m, side - m), fill=colour)
        elif shape == 1:
            draw.rounded_rectangle((m, m, side - m, side - m), radius=side // 10, fill=colour)
        elif shape == 2:
            draw.polygon([(side // 2, m), (side - m, side - m), (m, side - m)], fill=colour)
        else:
            for b in range(3):
                draw.rectangle((m, m + b * side // 4, side - m, m + b * side // 4 + side // 8), fill=colour)
        made.append(img)
    return made


def documents(rng: np.random.Generator, n: int = 8) -> list:
    """Pages of text: a heading, paragraphs of dark lines on white or cream paper."""
    from PIL import Image, ImageDraw, ImageFont

    pages = []
    for _ in range(n):
        w = int(rng.integers(400, 700))
        h = int(w * 1.414)
        img = Image.new("RGB", (w, h), (255, 255, 255) if rng.random() < 0.5 else (250, 246, 232))
        draw = ImageDraw.Draw(img)
        size = int(rng.integers(10, 18))
        draw.text((40, 30), _sentence(rng, 4).title(), fill=(0, 0, 0), font=ImageFont.load_default(size=size * 2))
        font, y = ImageFont.load_default(size=size), 40 + size * 3
        while y < h - 40:
            draw.text((40, y), _sentence(rng, int(rng.integers(4, 12))), fill=(20, 20, 20), font=font)
            y += int(size * (2.6 if rng.random() < 0.1 else 1.5))
        pages.append(img)
    return pages


def blanks(rng: np.random.Generator) -> list:
    from PIL import Image

    return [Image.new("RGB", (64, 64), colour) for colour in
            ((255, 255, 255), (0, 0, 0), (128, 128, 128), (200, 30, 30), (30, 160, 40), (40, 60, 200))]


def noise(rng: np.random.Generator, size: int = 160) -> list:
    """Uniform RGB, grey Gaussian and salt-and-pepper noise, and coarse (blocky) colour noise."""
    from PIL import Image

    grey = np.clip(rng.normal(128, 50, (size, size)), 0, 255)
    salt = np.where(rng.random((size, size)) < 0.5, 0, 255)
    images = [rng.integers(0, 256, (size, size, 3)), np.stack([grey] * 3, -1), np.stack([salt] * 3, -1),
              np.kron(rng.integers(0, 256, (size // 16, size // 16, 3)), np.ones((16, 16, 1))),
              rng.integers(0, 256, (size, size, 3)) // 2 + 64, np.stack([np.clip(grey + 60, 0, 255)] * 3, -1)]
    return [Image.fromarray(np.asarray(a, np.uint8)) for a in images]


def gradients(rng: np.random.Generator, n: int = 8, size: int = 160) -> list:
    """Linear gradients (horizontal, vertical, diagonal) and radial ones between two colours."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    ramps = [x, y, (x + y) / 2, np.hypot(x - 0.5, y - 0.5) / np.hypot(0.5, 0.5)]
    made = []
    for k in range(n):
        a, b = np.array(_colour(rng)), np.array(_colour(rng))
        t = ramps[k % len(ramps)][..., None]
        made.append(Image.fromarray(((1 - t) * a + t * b).astype(np.uint8)))
    return made


def skin(rng: np.random.Generator, n: int = 6, size: int = 160) -> list:
    """Plain skin without a lesion, as a phone would take it: a skin tone, soft shading, fine grain."""
    from PIL import Image, ImageFilter

    tones = ((224, 172, 140), (198, 134, 100), (241, 194, 167), (141, 85, 60), (255, 219, 190), (172, 110, 80))
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    made = []
    for k in range(n):
        tone = np.array(tones[k % len(tones)], np.float64)
        shade = 1 + 0.15 * (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1))
        grain = rng.normal(0, 6, (size, size, 1))
        pixels = np.clip(tone * shade[..., None] + grain, 0, 255).astype(np.uint8)
        made.append(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1)))
    return made


MAKERS: dict[str, Callable[[np.random.Generator], list]] = {
    "photo": photos, "photo crop": photo_crops, "screenshot": screenshots, "icon": icons,
    "document": documents, "blank": blanks, "noise": noise, "gradient": gradients, "skin": skin}


def non_lesion_images() -> tuple[list, list[str]]:
    """(RGB PIL images at their natural size, kind of each), the same on every run."""
    made, kinds = [], []
    for k, kind in enumerate(KINDS):
        for img in MAKERS[kind](np.random.default_rng([SEED, k])):
            made.append(img.convert("RGB"))
            kinds.append(kind)
    return made, kinds


def file_name(kind: str, number: int) -> str:
    return f"{kind.replace(' ', '-')}-{number:02d}.png"


def main(out_dir: Path = Path("data/non_lesions")) -> None:
    images, kinds = non_lesion_images()
    rows, numbers = ["file,kind"], dict.fromkeys(KINDS, 0)
    with atomic_dir(out_dir) as tmp:
        for img, kind in zip(images, kinds):
            name = file_name(kind, numbers[kind])
            numbers[kind] += 1
            img.save(tmp / name, format="PNG")
            rows.append(f"{name},{kind}")
        atomic_write_text(tmp / "index.csv", "\n".join(rows) + "\n")
    log.info("%s: %d images, %s", out_dir, len(images), ", ".join(f"{n} {kind}" for kind, n in numbers.items()))


if __name__ == "__main__":
    run_stage(main)
