"""The non-lesion images: every kind, the same on every run, at the requested size, all different."""
from __future__ import annotations

import numpy as np

from stages.lib.non_lesions import KINDS, non_lesion_images


def test_every_kind_at_the_size_asked_and_the_same_on_every_run():
    images, kinds = non_lesion_images(48)
    assert images.dtype == np.uint8 and images.shape[1:] == (48, 48, 3)
    assert list(dict.fromkeys(kinds)) == list(KINDS)
    again, _ = non_lesion_images(48)
    assert np.array_equal(images, again)
    other, _ = non_lesion_images(48, seed=1)
    assert not np.array_equal(images, other)


def test_images_differ_and_text_pages_are_mostly_white():
    images, kinds = non_lesion_images(64)
    flat = images.reshape(len(images), -1)
    assert len({row.tobytes() for row in flat}) == len(images), "no two images alike"
    documents = images[kinds == "document"].astype(float)
    assert documents.mean() > 200 and documents.std() > 10, "paper with dark text on it"
    blank = images[kinds == "blank"].reshape(int((kinds == "blank").sum()), -1, 3)
    assert (blank.std(axis=1) == 0).all()
