"""Stage non_lesions: every kind, the same bytes on every run, files that evaluate reads as predict
would, all different."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages import non_lesions
from stages.lib.images import load_image, resize_square


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The stage run once: (its folder, the generator's images and kinds)."""
    folder = tmp_path_factory.mktemp("non_lesions") / "non_lesions"
    non_lesions.main(folder)
    return folder, *non_lesions.non_lesion_images()


def test_every_kind_in_order_one_png_per_image_listed_in_the_index(made):
    folder, images, kinds = made
    table = pd.read_csv(folder / "index.csv")
    assert list(table.columns) == ["file", "kind"] and table["kind"].tolist() == kinds
    assert list(dict.fromkeys(kinds)) == list(non_lesions.KINDS)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*table["file"], "index.csv"])
    assert table["file"].tolist()[:2] == ["photo-00.png", "photo-01.png"] and "photo-crop-00.png" in set(table["file"])


def test_evaluate_reads_the_generators_pixels_at_any_size(made):
    """A PNG is lossless: load_image(file, size) is the generator's image through resize_square,
    the resize every file gets."""
    folder, images, _ = made
    files = pd.read_csv(folder / "index.csv")["file"]
    for size in (32, 48):
        for name, img in zip(files, images):
            np.testing.assert_array_equal(load_image(folder / name, size), resize_square(img, size))


def test_a_second_run_writes_the_same_bytes(made, tmp_path):
    folder, _, _ = made
    non_lesions.main(tmp_path / "again")
    for path in folder.iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


def test_images_differ_and_text_pages_are_mostly_white(made):
    folder, _, kinds = made
    kinds = np.array(kinds)
    images = np.stack([load_image(folder / name, 64) for name in pd.read_csv(folder / "index.csv")["file"]])
    flat = images.reshape(len(images), -1)
    assert len({row.tobytes() for row in flat}) == len(images), "no two images alike"
    documents = images[kinds == "document"].astype(float)
    assert documents.mean() > 200 and documents.std() > 10, "paper with dark text on it"
    blank = images[kinds == "blank"].reshape(int((kinds == "blank").sum()), -1, 3)
    assert (blank.std(axis=1) == 0).all()
