"""Image decoding: the one path from an image file to model input.

`load_image(path, size)` -> uint8 array (size, size, 3): `open_rgb` decodes the whole file (or
bytes in memory: an upload) into upright 8-bit RGB (EXIF orientation applied, 16-bit scaled to 8
bits, transparency composited on white, greyscale, CMYK and palette converted), then
`resize_square` resizes the whole field of view to a square (no crop). augment calls it; dedupe,
predict and serve decode with the same `open_rgb`. A file that is not a usable image raises
ImageError naming the file and why (empty, truncated, not an image, over MAX_IMAGE_PIXELS: the
one pixel limit, against decompression bombs).
Invariant: a file gives the same pixels in training and in prediction.
Why: a second decoder would drift (orientation, bit depth) and the model would see other pixels.
Every rule and the test that proves it: docs/faults.md ("Data").
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np

from stages.lib.cli import StageError

MAX_IMAGE_PIXELS = 50_000_000  # HAM10000 originals are 600x450; far beyond this is a bomb.


def image_file(images_dir: Path, image_id: str) -> Path:
    """The file of image `image_id` in download's flat layout (data/raw/images/<image_id>.jpg).

    The one place that spells the layout out; dedupe's `list_images` reads it the other way.
    """
    return Path(images_dir) / f"{image_id}.jpg"


class ImageError(StageError):
    """A file that is not a usable image: the message is `<file>: <reason>`, `reason` the why alone."""

    reason: str = ""


def _refused(name: object, reason: str) -> ImageError:
    err = ImageError(f"{name}: {reason}")
    err.reason = reason
    return err


def open_rgb(source: Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS, formats: tuple[str, ...] | None = None,
             name: str = "image"):
    """Decode `source` (a file, or an image file's bytes, then called `name` in errors) fully into
    an upright 8-bit RGB PIL image, or raise ImageError saying what is wrong. Empty, truncated,
    non-image, oversized files and folders are errors, and so is an image in a format outside
    `formats` (Pillow's names, e.g. ("JPEG", "PNG"); None: any Pillow reads).
    Valid files become what a plain upright 8-bit RGB file of the same picture would give, by
    these rules (docs/faults.md):

    - EXIF orientation: applied (a photo stored sideways with an Orientation tag comes out upright,
      as viewers show it). An unreadable EXIF block is ignored: the pixels are used as stored.
    - 16 bits per channel: scaled to 8 bits by the high byte (v >> 8, so 257 * k -> k): 16-bit
      greyscale (Pillow modes I;16, I;16B, I;16L, and I, which holds 0-65535 for 16-bit PNG, PGM,
      TIFF) here, 48/64-bit RGB(A) PNGs by Pillow itself the same way. Mode I values outside
      0-65535 and floating-point pixels (mode F) have no defined 8-bit scale: ImageError.
    - Transparency (RGBA, LA, PA, a palette or a single colour marked transparent): composited
      onto white, as a viewer on a white page shows it; fully transparent pixels become white
      (255, 255, 255), half transparent ones are blended.
    - Greyscale, CMYK, palette: converted to RGB (greyscale as three equal channels).
    """
    from PIL import Image

    if isinstance(source, bytes):
        path, size = name, len(source)
    else:
        path = source = Path(source)
        try:
            size = path.stat().st_size
        except OSError as err:
            raise _refused(path, f"cannot read ({err.strerror})") from None
        if path.is_dir():
            raise _refused(path, "is a directory, not an image file")
    if size == 0:
        raise _refused(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_readable(source), formats=formats) as img:
                if img.width * img.height > max_pixels:
                    raise _refused(path, f"{img.width}x{img.height} pixels is over the limit of "
                                         f"{max_pixels:,} (possible decompression bomb)")
                img.load()  # raises on truncated data
                return _upright_rgb(img, path)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _refused(path, f"decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise _refused(path, _unaccepted(source, formats)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise _refused(path, f"corrupt or truncated image ({err})") from None


def _readable(source: Path | bytes):
    """What Pillow opens: the file, or a new stream over the bytes."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _unaccepted(source: Path | bytes, formats: tuple[str, ...] | None) -> str:
    """Why Pillow refused `source`: not an image at all, or (read from its header only, nothing
    is decoded) an image in a format that `formats` leaves out."""
    from PIL import Image

    found = None
    if formats is not None:
        try:
            with Image.open(_readable(source)) as img:
                found = img.format
        except Exception:  # any failure here means the same: no format Pillow knows
            pass
    if found is None:
        return "not an image (unrecognised format)"
    return f"{found} images are not accepted (accepted: {', '.join(formats)})"


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _upright_rgb(img, path: Path | str):
    """open_rgb's rules (see there) on a loaded image: orientation, 16 bits, transparency, RGB."""
    from PIL import Image, ImageOps

    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        pass  # unreadable EXIF: no orientation to apply, the pixels are still good
    if img.mode == "F":
        raise _refused(path, "floating-point pixels (mode F) have no defined 8-bit scale")
    if img.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(img).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise _refused(path, f"{img.mode} pixel values {pixels.min()}..{pixels.max()} are outside "
                                 "0-65535 (no defined 8-bit scale)")
        img = Image.fromarray((pixels >> 8).astype(np.uint8))  # 2-D uint8: mode L
    if img.mode in TRANSPARENT_MODES or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resize_square(img, size: int) -> np.ndarray:
    """Resize the whole field of view to `size` x `size` RGB uint8 (no crop: lesions can be wide)."""
    from PIL import Image

    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """File to model input: decoded, RGB, resized. The only path from a file to the model."""
    return resize_square(open_rgb(path), size)
