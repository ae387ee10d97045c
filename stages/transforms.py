"""What augment's synthetic copies and train's on-line augmentation share: ranges, geometry, colour.

Both draw a rotation, shift, zoom, brightness and contrast change from ranges checked here once,
and move and colour pixels with one formula each, so a copy made by `augment` (numpy, at the source's
resolution) and an image augmented by `train` (TensorFlow, every epoch) differ in their random
draws only. `train` turns images that augment already squashed from 4:3 to a square: with
`aspect` 4/3 it turns the photo inside the square (unsquash, turn, squash again), so a turned lesion
is squashed the way every test image is; with `aspect` 1 it turns the square, and a turn near 90
degrees swaps which axis is squashed. augment turns the photo itself, before its resize.
"""
from __future__ import annotations

from stages.lib.params import in_range


def check_ranges(rotation_degrees: float, shift_fraction: float, zoom_fraction: float, brightness: float,
                 contrast: float) -> None:
    """Raise ValueError naming the first setting outside what the transforms can do."""
    in_range("rotation_degrees", rotation_degrees, 0, 180)  # +-180 covers every angle
    in_range("shift_fraction", shift_fraction, 0, 0.5)       # of the side: the centre stays in view
    in_range("zoom_fraction", zoom_fraction, 0, 0.5, hi_open=True)  # scale 1 +- this stays > 0.5
    in_range("brightness", brightness, 0, 0.9)               # multipliers stay > 0
    in_range("contrast", contrast, 0, 0.9)


def contrast_then_brightness(pixels, mean, contrast, brightness):
    """Contrast about the image's mean grey level `mean` (keeps its colour balance), then brightness.

    Plain arithmetic, so it applies alike to numpy arrays and to tensors (no clipping: the caller
    clips to [0, 255] in its own library).
    """
    return ((pixels - mean) * contrast + mean) * brightness


def affine_about_centre(cos, sin, flip_x, flip_y, centre_x, centre_y, shift_x, shift_y, aspect=1.0):
    """(a0, a1, a2, b0, b1, b2): output pixel (x, y) samples the source at (a0 x + a1 y + a2, b0 x + b1 y + b2).

    A = R(angle) diag(flip_x, flip_y) / zoom about the centre, then the shift; `cos` and `sin` are
    the angle's, already divided by the zoom, and flips are +-1. `aspect` is the width / height of
    the photo the image was resized from: the rotation is S R S^-1, with S = diag(1, aspect) the
    resize up to scale, i.e. the photo's turn seen in the resized image (1: a plain turn of the
    image). Plain arithmetic, like the colour formula: floats in augment (PIL's AFFINE data),
    tensors in train (ImageProjectiveTransformV3 rows).
    """
    a0, a1, b0, b1 = cos * flip_x, -sin * flip_y / aspect, sin * aspect * flip_x, cos * flip_y
    return (a0, a1, centre_x - a0 * centre_x - a1 * centre_y - shift_x,
            b0, b1, centre_y - b0 * centre_x - b1 * centre_y - shift_y)
