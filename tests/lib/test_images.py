"""stages/lib/images.py: odd but valid files decode to what the plain 8-bit upright RGB file gives.

Each case writes the same picture (a seeded smooth pattern, 40x30: not square, so a missed
rotation cannot pass) in an odd form, and compares open_rgb's result with the plain image.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.lib.images import ImageError, load_image, open_rgb
from tests.fixtures import image_pixels, jpeg_bytes

SIZE = (40, 30)


@pytest.fixture
def plain() -> Image.Image:
    """The reference: 8-bit RGB, upright."""
    return image_pixels("ISIC_0024306", SIZE)


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.int32)


def write(path: Path, img: Image.Image, fmt: str = "PNG", **options) -> Path:
    img.save(path, fmt, **options)
    return path


def png_16_bit(array: np.ndarray) -> bytes:
    """A PNG with 16 bits per sample (grey, grey+alpha, RGB = 48-bit, RGBA = 64-bit), written
    by hand: Pillow reads these but does not write all of them."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------
# EXIF orientation. The tag says how the stored pixels must be turned to be seen upright
# (EXIF 2.32, tag 0x0112); the file stores the picture turned the other way.
# --------------------------------------------------------------------------------------------
T = Image.Transpose
STORED_AS = {  # orientation -> how the upright picture is stored (the inverse of the tag's turn)
    2: T.FLIP_LEFT_RIGHT,   # mirrored
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,         # mirrored and turned 90
    6: T.ROTATE_90,         # stored turned 90 anticlockwise: shown after turning 90 clockwise
    7: T.TRANSVERSE,
    8: T.ROTATE_270,        # stored turned 90 clockwise: shown after turning 90 anticlockwise
}
ORIENTATION = 0x0112


def with_orientation(plain: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return plain.transpose(STORED_AS[orientation]), exif


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_orientation_is_applied(tmp_path, plain, orientation):
    stored, exif = with_orientation(plain, orientation)
    path = write(tmp_path / "turned.png", stored, exif=exif)
    assert Image.open(path).getexif()[ORIENTATION] == orientation  # the premise
    assert (pixels(open_rgb(path)) == pixels(plain)).all()


def test_rotated_camera_jpeg_is_upright_at_the_model_input(tmp_path, plain):
    stored, exif = with_orientation(plain, 6)  # the usual phone photo held upright
    path = write(tmp_path / "phone.jpg", stored, "JPEG", quality=95, exif=exif)
    reference = Image.open(io.BytesIO(jpeg_bytes(plain, 95))).convert("RGB")
    decoded = open_rgb(path)
    assert decoded.size == plain.size
    assert np.abs(pixels(decoded) - pixels(reference)).mean() < 3  # JPEG blocks differ when turned
    assert load_image(path, 32).shape == (32, 32, 3)


def test_orientation_1_and_no_exif_leave_the_pixels_as_stored(tmp_path, plain):
    exif = Image.Exif()
    exif[ORIENTATION] = 1
    for path in (write(tmp_path / "one.png", plain, exif=exif), write(tmp_path / "none.png", plain)):
        assert (pixels(open_rgb(path)) == pixels(plain)).all()


# --------------------------------------------------------------------------------------------
# 16 bits per channel: scaled by the high byte, so the 16-bit form of an 8-bit picture (each
# level k stored as 257 * k) gives exactly the 8-bit picture.
# --------------------------------------------------------------------------------------------
def sixteen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.uint16) * 257


def test_16_bit_greyscale_png_is_scaled_not_white(tmp_path, plain):
    grey = plain.convert("L")
    path = tmp_path / "grey16.png"
    path.write_bytes(png_16_bit(sixteen(np.asarray(grey))))
    assert Image.open(path).mode == "I;16"  # the premise: Pillow's 16-bit greyscale
    assert (pixels(open_rgb(path)) == pixels(grey.convert("RGB"))).all()


def test_16_bit_greyscale_from_pillow_and_other_formats(tmp_path, plain):
    grey = plain.convert("L")
    expected = pixels(grey.convert("RGB"))
    big_endian = sixteen(np.asarray(grey)).astype(">u2")
    pgm = tmp_path / "grey16.pgm"  # Pillow reads 16-bit PGM as mode I
    pgm.write_bytes(f"P5 {SIZE[0]} {SIZE[1]} 65535\n".encode() + big_endian.tobytes())
    tiff = write(tmp_path / "grey16.tif", Image.fromarray(sixteen(np.asarray(grey))), "TIFF")
    pillow_png = write(tmp_path / "pillow16.png", Image.fromarray(sixteen(np.asarray(grey))))
    assert [Image.open(p).mode for p in (pgm, tiff, pillow_png)] == ["I", "I;16", "I;16"]
    for path in (pgm, tiff, pillow_png):
        assert (pixels(open_rgb(path)) == expected).all(), path.name


def test_16_bit_scaling_takes_the_high_byte(tmp_path):
    levels = np.array([[0, 255, 256, 0x12FF, 0x8000, 65535]], dtype=np.uint16)
    path = tmp_path / "levels.png"
    path.write_bytes(png_16_bit(levels))
    assert pixels(open_rgb(path))[0, :, 0].tolist() == [0, 0, 1, 0x12, 0x80, 255]


@pytest.mark.parametrize("channels", [3, 4], ids=["48-bit-rgb", "64-bit-rgba-opaque"])
def test_48_and_64_bit_png_give_the_8_bit_picture(tmp_path, plain, channels):
    array = sixteen(np.asarray(plain))
    if channels == 4:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 65535, np.uint16)], axis=2)
    path = tmp_path / "deep.png"
    path.write_bytes(png_16_bit(array))
    assert (pixels(open_rgb(path)) == pixels(plain)).all()


def test_integer_and_float_images_without_an_8_bit_scale_are_refused(tmp_path):
    wide = write(tmp_path / "wide.tif", Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "TIFF")
    real = write(tmp_path / "real.tif", Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)), "TIFF")
    with pytest.raises(ImageError, match=r"wide.tif: I pixel values 0..70000 are outside 0-65535"):
        open_rgb(wide)
    with pytest.raises(ImageError, match=r"real.tif: floating-point pixels \(mode F\)"):
        open_rgb(real)


# --------------------------------------------------------------------------------------------
# Transparency: composited onto white.
# --------------------------------------------------------------------------------------------
WHITE = (255, 255, 255)


def alpha_left_opaque_right_clear(size=SIZE) -> np.ndarray:
    alpha = np.zeros((size[1], size[0]), dtype=np.uint8)
    alpha[:, : size[0] // 2] = 255
    return alpha


def test_rgba_transparent_areas_become_white_opaque_areas_unchanged(tmp_path, plain):
    rgba = plain.copy()
    rgba.putalpha(Image.fromarray(alpha_left_opaque_right_clear()))
    decoded = pixels(open_rgb(write(tmp_path / "rgba.png", rgba)))
    half = SIZE[0] // 2
    assert (decoded[:, :half] == pixels(plain)[:, :half]).all()
    assert (decoded[:, half:] == WHITE).all()


def test_half_transparent_pixels_are_blended_with_white(tmp_path, plain):
    rgba = plain.copy()
    rgba.putalpha(128)
    decoded = pixels(open_rgb(write(tmp_path / "half.png", rgba)))
    expected = (pixels(plain) * 128 + 255 * 127) / 255
    assert np.abs(decoded - expected).max() <= 1


def test_fully_opaque_rgba_is_the_plain_picture(tmp_path, plain):
    rgba = plain.copy()
    rgba.putalpha(255)
    assert (pixels(open_rgb(write(tmp_path / "opaque.png", rgba))) == pixels(plain)).all()


def test_grey_with_alpha_becomes_white_where_transparent(tmp_path, plain):
    grey = plain.convert("L")
    la = Image.merge("LA", (grey, Image.fromarray(alpha_left_opaque_right_clear())))
    decoded = pixels(open_rgb(write(tmp_path / "la.png", la)))
    half = SIZE[0] // 2
    assert (decoded[:, :half] == pixels(grey.convert("RGB"))[:, :half]).all()
    assert (decoded[:, half:] == WHITE).all()


def test_16_bit_grey_with_alpha_is_scaled_and_composited(tmp_path, plain):
    grey = np.asarray(plain.convert("L"))
    array = np.stack([sixteen(grey), sixteen(alpha_left_opaque_right_clear())], axis=2)
    path = tmp_path / "la16.png"
    path.write_bytes(png_16_bit(array))
    decoded = pixels(open_rgb(path))
    half = SIZE[0] // 2
    assert (decoded[:, :half, 0] == grey[:, :half]).all() and (decoded[:, half:] == WHITE).all()


def test_palette_with_a_transparent_index_becomes_white_there(tmp_path, plain):
    image = plain.quantize(15)  # indices 0-14; a 16th colour, index 15, is made transparent
    image.putpalette(image.getpalette()[: 15 * 3] + [0, 0, 0])
    indices = np.asarray(image).copy()
    indices[:, SIZE[0] // 2:] = 15                      # the right half
    image.putdata(indices.ravel().tolist())
    path = write(tmp_path / "palette.png", image, transparency=15)
    assert "transparency" in Image.open(path).info       # the premise
    decoded = pixels(open_rgb(path))
    half = SIZE[0] // 2
    assert (decoded[:, half:] == WHITE).all()
    assert (decoded[:, :half] == pixels(image.convert("RGB"))[:, :half]).all()


def test_rgb_with_a_transparent_colour_becomes_white_there(tmp_path, plain):
    array = np.asarray(plain).copy()
    array[:5, :5] = (1, 2, 3)  # the key colour, marked transparent in the PNG's tRNS chunk
    path = write(tmp_path / "key.png", Image.fromarray(array), transparency=(1, 2, 3))
    decoded = pixels(open_rgb(path))
    assert (decoded[:5, :5] == WHITE).all()
    assert (decoded[5:] == array[5:]).all()


def test_bytes_in_memory_decode_as_the_same_file_does(tmp_path, plain):
    """serve decodes an upload from memory: the same rules, the same pixels, errors named by `name`."""
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: the file's pixels must come out upright either way
    plain.transpose(T.ROTATE_90).save(rotated, "JPEG", exif=exif, quality=95)
    for path in (rotated, write(tmp_path / "la.png", plain.convert("LA"))):
        assert (pixels(open_rgb(path.read_bytes())) == pixels(open_rgb(path))).all(), path.name
    with pytest.raises(ImageError, match=r"^upload.jpg: empty file \(0 bytes\)$") as empty:
        open_rgb(b"", name="upload.jpg")
    assert empty.value.reason == "empty file (0 bytes)"
    buffer = io.BytesIO()
    plain.save(buffer, "TIFF")
    with pytest.raises(ImageError, match=r"^image: TIFF images are not accepted \(accepted: JPEG, PNG\)$"):
        open_rgb(buffer.getvalue(), formats=("JPEG", "PNG"))
    with pytest.raises(ImageError, match=r"^image: not an image \(unrecognised format\)$"):
        open_rgb(b"plain text", formats=("JPEG", "PNG"))
