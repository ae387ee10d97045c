"""Images: one function from a file to model input, used by augment (training data) and predict,
so the model always sees the same preprocessing; dedupe decodes with the same `open_rgb`.

MAX_IMAGE_PIXELS is the one pixel limit: every decoder in the project refuses larger images.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from stages.errors import StageError

MAX_IMAGE_PIXELS = 50_000_000  # HAM10000 originals are 600x450; far beyond this is a bomb.


class ImageError(StageError):
    """A file that is not a usable image; the message names the file and why."""


def open_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode `path` fully into an RGB PIL image, or raise ImageError saying what is wrong.

    Greyscale, CMYK, palette and RGBA images are converted to RGB (the documented rule); empty,
    truncated, non-image and oversized files are errors.
    """
    from PIL import Image

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror})") from None
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise ImageError(
                        f"{path}: {img.width}x{img.height} pixels is over the limit of "
                        f"{max_pixels:,} (possible decompression bomb)"
                    )
                img.load()  # raises on truncated data
                return img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: corrupt or truncated image ({err})") from None


def resize_square(img, size: int) -> np.ndarray:
    """Resize the whole field of view to `size` x `size` RGB uint8 (no crop: lesions can be wide)."""
    from PIL import Image

    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """File to model input: decoded, RGB, resized. The only path from a file to the model."""
    return resize_square(open_rgb(path), size)
