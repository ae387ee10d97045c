"""Stage dedupe: every rule of docs/dedupe.md, on tiny synthetic releases."""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import dedupe
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import CLASSES
from tests.fixtures import METADATA_FILE, declare_size, image_pixels, jpeg_bytes, make_metadata, write_params, write_raw


@pytest.fixture
def table() -> pd.DataFrame:
    """7 classes x 2 lesions x 2 images = 28 rows; ISIC_0024306.. in class order."""
    return make_metadata(lesions_per_class=2, images_per_lesion=2)


def run(tmp_path: Path, table: pd.DataFrame, edit=None, workers: int = 1, size: tuple[int, int] = (24, 18),
        **params) -> SimpleNamespace:
    """Write a raw folder for `table`, let `edit(raw)` damage it, run the stage, read its outputs."""
    raw = write_raw(tmp_path / "raw", table, size)
    if edit:
        edit(raw)
    out = tmp_path / "clean"
    dedupe.main(raw, out, write_params(tmp_path / "params.yaml", dedupe=params), workers=workers)
    def read(name: str) -> pd.DataFrame:
        return pd.read_csv(out / name, dtype=str, keep_default_na=False)
    return SimpleNamespace(images=read("images.csv"), excluded=read("excluded.csv"),
                           duplicates=read("duplicates.csv"),
                           report=json.loads((out / "report.json").read_text(encoding="utf-8")))


def image_path(raw: Path, image_id: str) -> Path:
    return raw / "images" / f"{image_id}.jpg"


def copy_image(raw: Path, source: str, target: str, transform=None, quality: int | None = None) -> None:
    """Make `target` a copy of `source`: the same bytes, or re-encoded (and flipped)."""
    if quality is None:
        image_path(raw, target).write_bytes(image_path(raw, source).read_bytes())
        return
    img = Image.open(image_path(raw, source))
    img = img.transpose(transform) if transform is not None else img
    image_path(raw, target).write_bytes(jpeg_bytes(img, quality))


def reasons(out: SimpleNamespace) -> dict[str, str]:
    return dict(zip(out.excluded["image_id"], out.excluded["reason"]))


def clean_files(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}


@pytest.fixture
def previous_clean(tmp_path, table) -> dict[str, bytes]:
    """A complete earlier output that a failed run must leave untouched."""
    run(tmp_path, table)
    return clean_files(tmp_path)


def assert_unharmed(tmp_path: Path, previous: dict[str, bytes]) -> None:
    assert clean_files(tmp_path) == previous
    assert not list(tmp_path.glob(".clean.*")), "temporary output left behind"


# --------------------------------------------------------------------------------------------
# A clean release.
# --------------------------------------------------------------------------------------------
def test_clean_release_keeps_every_image(tmp_path, table):
    out = run(tmp_path, table, workers=2)
    assert list(out.images.columns) == list(dedupe.IMAGE_COLUMNS)
    assert sorted(out.images["image_id"]) == sorted(table["image_id"])
    assert (out.images["lesion_group"] == out.images["lesion_id"]).all()
    assert out.images["label"].astype(int).tolist() == [CLASSES.index(dx) for dx in out.images["dx"]]
    assert out.excluded.empty and out.duplicates.empty
    report = out.report
    assert (report["images"], report["lesions"], report["lesion_groups"]) == (28, 14, 14)
    assert list(report["images_per_class"]) == list(CLASSES)
    assert set(report["images_per_class"].values()) == {4}
    assert set(report["lesions_per_class"].values()) == {2}
    assert report["exact_duplicates"] == {"found": 0, "removed": 0, "across_lesions": 0}
    assert report["near_duplicates"] == {"found": 0, "across_lesions": 0}
    assert report["excluded"] == {}
    assert (report["age_missing"], report["sex_unknown"], report["converted_to_rgb"]) == (0, 0, 0)


# --------------------------------------------------------------------------------------------
# Exact duplicates.
# --------------------------------------------------------------------------------------------
def test_exact_copy_within_a_lesion_keeps_the_first(tmp_path, table):
    out = run(tmp_path, table, edit=lambda raw: copy_image(raw, "ISIC_0024306", "ISIC_0024307"))
    assert "ISIC_0024307" not in set(out.images["image_id"]) and len(out.images) == 27
    duplicate = out.duplicates[out.duplicates["kind"] == "exact"].iloc[0]
    assert (duplicate["image_id"], duplicate["duplicate_of"]) == ("ISIC_0024307", "ISIC_0024306")
    assert duplicate["evidence"].startswith("sha256 ")
    assert out.report["exact_duplicates"] == {"found": 1, "removed": 1, "across_lesions": 0}
    assert out.report["lesion_groups"] == 14


def test_exact_copy_across_lesions_merges_them(tmp_path, table):
    # ISIC_0024308 belongs to HAM_0000001, the other akiec lesion.
    out = run(tmp_path, table, edit=lambda raw: copy_image(raw, "ISIC_0024306", "ISIC_0024308"))
    groups = out.images.set_index("image_id")["lesion_group"]
    assert groups["ISIC_0024306"] == groups["ISIC_0024309"] == "HAM_0000000+HAM_0000001"
    assert out.report["exact_duplicates"]["across_lesions"] == 1
    assert (out.report["lesion_groups"], out.report["merged_lesion_groups"]) == (13, 1)


def test_exact_copy_with_another_dx_excludes_every_copy(tmp_path, table):
    # ISIC_0024310 is a bcc image; make it the same file as an akiec one.
    out = run(tmp_path, table, edit=lambda raw: copy_image(raw, "ISIC_0024306", "ISIC_0024310"))
    why = reasons(out)
    assert {"ISIC_0024306", "ISIC_0024310"} <= set(why) and "same image, different dx" in why["ISIC_0024310"]
    assert "ISIC_0024306 (akiec)" in why["ISIC_0024310"] and "ISIC_0024310 (bcc)" in why["ISIC_0024310"]
    assert len(out.images) == 26
    assert out.report["excluded"]["same image, different dx"]["rows"] == 2


# --------------------------------------------------------------------------------------------
# Near duplicates: pHash proposes, pixels prove. Copies are re-encoded at JPEG quality 75 (the
# originals: 90), on images as big as the mirror's (192x144 ~ 200x150), so that re-encoding
# changes them as little as it changes a photo.
# --------------------------------------------------------------------------------------------
NEAR = {"size": (192, 144)}
EVIDENCE = r"colour-fit residual 0\.\d{3} <= 0\.140, phash distance \d+"


def reencode(source: str, target: str, transform=None):
    return lambda raw: copy_image(raw, source, target, transform, quality=75)


def test_reencoded_copy_is_a_near_duplicate_and_merges_lesions(tmp_path, table):
    out = run(tmp_path, table, edit=reencode("ISIC_0024306", "ISIC_0024308"), **NEAR)
    near = out.duplicates[out.duplicates["kind"] == "near"]
    assert near[["image_id", "duplicate_of"]].values.tolist() == [["ISIC_0024308", "ISIC_0024306"]]
    assert re.fullmatch(EVIDENCE, near["evidence"].iloc[0])
    assert len(out.images) == 28  # a near duplicate never deletes an image
    groups = out.images.set_index("image_id")["lesion_group"]
    assert groups["ISIC_0024306"] == groups["ISIC_0024308"] == "HAM_0000000+HAM_0000001"
    assert out.report["near_duplicates"] == {"found": 1, "across_lesions": 1}


def test_flipped_copy_is_found_with_its_symmetry(tmp_path, table):
    flipped = reencode("ISIC_0024306", "ISIC_0024308", Image.Transpose.FLIP_LEFT_RIGHT)
    out = run(tmp_path, table, edit=flipped, **NEAR)
    evidence = out.duplicates.set_index("image_id").loc["ISIC_0024308", "evidence"]
    assert evidence.endswith("after flipping left-right")


def test_colliding_hashes_without_pixel_proof_do_not_merge(tmp_path, table, monkeypatch):
    # Every image gets the same pHash: every pair is a candidate, only the real copy is proven.
    monkeypatch.setattr(dedupe, "phashes", lambda thumbs: np.zeros((8, len(thumbs)), dtype=np.uint64))
    out = run(tmp_path, table, edit=reencode("ISIC_0024306", "ISIC_0024308"), **NEAR)
    assert out.duplicates[["image_id", "duplicate_of"]].values.tolist() == [["ISIC_0024308", "ISIC_0024306"]]
    assert out.report["lesion_groups"] == 13


def test_near_duplicate_with_another_dx_excludes_both(tmp_path, table):
    out = run(tmp_path, table, edit=reencode("ISIC_0024306", "ISIC_0024310"), **NEAR)
    why = reasons(out)
    assert why["ISIC_0024306"] == why["ISIC_0024310"]
    assert re.match(rf"same image, different dx: near duplicates \({EVIDENCE}\): ISIC_0024306 \(akiec\), "
                    r"ISIC_0024310 \(bcc\)$", why["ISIC_0024310"])


def test_near_duplicates_can_be_switched_off(tmp_path, table):
    out = run(tmp_path, table, edit=reencode("ISIC_0024306", "ISIC_0024308"), near_duplicates=False, **NEAR)
    assert out.duplicates.empty and out.report["lesion_groups"] == 14


# Re-processed copies: the same photograph with other colour processing (HAM10000 holds such
# pairs under two lesion ids). The original spans levels 50-200, as photos rarely touch 0 or 255;
# the copy is changed in colour, then re-encoded at JPEG quality 75.
COLOUR_CHANGES = {
    "colour-shifted": lambda x: x + [20, -10, 15],
    "white-balanced": lambda x: x * [1.15, 1.0, 0.85],
    "contrast-stretched": lambda x: (x - 125) * 1.4 + 125,
    "brightened": lambda x: x + 40,
    "brightened-by-gain": lambda x: x * 1.2,
    "darkened": lambda x: x * 0.7,
    "gamma": lambda x: 255 * (x / 255) ** 0.75,
}


def colour_copy(source: str, target: str, change, size=NEAR["size"]):
    def edit(raw):
        pixels = np.asarray(image_pixels(source, size), dtype=np.float64) * 150 / 255 + 50
        image_path(raw, source).write_bytes(jpeg_bytes(Image.fromarray(np.round(pixels).astype(np.uint8)), 90))
        changed = np.clip(np.round(change(pixels)), 0, 255).astype(np.uint8)
        image_path(raw, target).write_bytes(jpeg_bytes(Image.fromarray(changed), 75))
    return edit


@pytest.mark.parametrize("change", list(COLOUR_CHANGES.values()), ids=list(COLOUR_CHANGES))
def test_copy_with_other_colour_processing_is_a_near_duplicate(tmp_path, table, change):
    out = run(tmp_path, table, edit=colour_copy("ISIC_0024306", "ISIC_0024308", change), **NEAR)
    near = out.duplicates[out.duplicates["kind"] == "near"]
    assert near[["image_id", "duplicate_of"]].values.tolist() == [["ISIC_0024308", "ISIC_0024306"]]
    assert re.fullmatch(EVIDENCE, near["evidence"].iloc[0])
    groups = out.images.set_index("image_id")["lesion_group"]
    assert groups["ISIC_0024306"] == groups["ISIC_0024308"] == "HAM_0000000+HAM_0000001"


def lookalike(image_id: str, size=NEAR["size"]) -> Image.Image:
    """One shared layout (the same smooth pattern for every image) + this image's own fine
    detail: different pictures whose pHashes are nearly equal, like two naevi in one vignette."""
    layout = np.asarray(image_pixels("layout", size), dtype=np.float64)
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    detail = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))
    detail = np.asarray(detail.resize(size, Image.Resampling.BICUBIC), dtype=np.float64) - 128
    return Image.fromarray(np.clip(layout * 0.7 + 40 + detail * 20 / 128, 0, 255).astype(np.uint8))


def test_different_images_with_near_phashes_are_not_merged(tmp_path, table):
    look_alikes = ["ISIC_0024306", "ISIC_0024308", "ISIC_0024310", "ISIC_0024312"]  # 4 lesions

    def edit(raw):
        for image_id in look_alikes:
            image_path(raw, image_id).write_bytes(jpeg_bytes(lookalike(image_id)))
    out = run(tmp_path, table, edit=edit, **NEAR)
    # The premise: pHash proposes every pair of them (within the default 6 bits) ...
    scans = [dedupe.scan_image(image_path(tmp_path / "raw", i), 10**6) for i in look_alikes]
    pairs = dedupe.candidate_pairs(dedupe.phashes(np.stack([scan.thumb for scan in scans])), 6)
    assert len(pairs.drop_duplicates(["i", "j"])) == 6
    residuals = dedupe.colour_fit_residuals(np.stack([scan.colour for scan in scans]), pairs)
    assert residuals.min() > 0.2  # ... and the pixels refuse them all, with a margin
    assert out.duplicates.empty and out.excluded.empty and out.report["lesion_groups"] == 14


def test_colour_fit_residual_ignores_linear_colour_changes_only():
    colours = np.stack([np.asarray(image_pixels(f"ISIC_{i}", (64, 64))) for i in range(3)])
    pixels = colours[0].astype(np.float64)
    changed = {
        "affine per channel": pixels * [0.6, 0.9, 0.7] + [30, 10, 60],
        "inverted": 255 - pixels,
        "flat red channel": np.concatenate([np.full((64, 64, 1), 128.0), pixels[..., 1:]], axis=2),
    }
    stack = np.concatenate([colours, np.stack([np.round(c).astype(np.uint8) for c in changed.values()])])
    pairs = pd.DataFrame({"i": [0, 0, 0, 0, 0], "j": [3, 4, 5, 1, 2], "symmetry": 0})
    same, inverted, flat_red, other, another = dedupe.colour_fit_residuals(stack, pairs)
    assert same < 0.01                        # rounding to 8 bits only
    assert inverted == pytest.approx(1.0)     # a negative gain proves nothing
    assert 0.3 < flat_red < 0.35              # a flat channel counts as unexplained (1/3)
    assert min(other, another) > 0.5          # unrelated patterns
    flipped = np.concatenate([colours[:1], dedupe.transform_pixels(colours[:1], 5)])  # rotated 90
    moved = pd.DataFrame({"i": [0], "j": [1], "symmetry": [6]})  # its inverse: rotating anticlockwise
    assert dedupe.colour_fit_residuals(flipped, moved)[0] < 1e-3  # float32 rounding


def test_phash_of_a_flipped_image_is_the_matching_symmetry_hash():
    thumbs = np.stack([np.asarray(image_pixels(f"ISIC_{i}", (64, 64)).convert("L")) for i in range(5)])
    hashes = dedupe.phashes(thumbs)
    for symmetry in range(len(dedupe.SYMMETRIES)):
        moved = np.ascontiguousarray(dedupe.transform_pixels(thumbs, symmetry))
        assert (dedupe.phashes(moved)[0] == hashes[symmetry]).all()


def test_lesion_groups_join_chains_and_keep_singletons():
    groups = dedupe.lesion_groups(["a", "b", "c", "d"], [("a", "b"), ("c", "b")])
    assert groups == {"a": "a+b+c", "b": "a+b+c", "c": "a+b+c", "d": "d"}


@pytest.mark.parametrize("links, expected", [
    # a is linked twice: after (a,b) a is no longer a root, so the second link must join a's root, not a
    ([("a", "b"), ("a", "c")], [{"a", "b", "c"}, {"d"}, {"e"}, {"f"}]),
    # a star from a: every link after the first starts from a non-root
    ([("a", "b"), ("a", "c"), ("a", "d"), ("a", "e")], [{"a", "b", "c", "d", "e"}, {"f"}]),
    # two pairs joined through members that are not their roots
    ([("a", "b"), ("c", "d"), ("a", "c")], [{"a", "b", "c", "d"}, {"e"}, {"f"}]),
    # a long chain, each link from the newest member, then one back to the start
    ([("b", "a"), ("c", "b"), ("d", "c"), ("e", "d"), ("a", "f")], [{"a", "b", "c", "d", "e", "f"}]),
    # the same lesion pair twice, and a lesion linked to itself (an exact copy within one lesion)
    ([("a", "b"), ("b", "a"), ("c", "c"), ("a", "b")], [{"a", "b"}, {"c"}, {"d"}, {"e"}, {"f"}]),
], ids=["a-twice", "star", "pairs-joined", "long-chain", "repeats"])
def test_lesion_groups_put_every_transitively_linked_lesion_in_one_group(links, expected):
    """By hand: lesions are in one group exactly when a path of links joins them (dedupe's reason to
    exist: a copy of a lesion's image in another split is a leak)."""
    groups = dedupe.lesion_groups(["a", "b", "c", "d", "e", "f"], links)
    assert groups == {lesion: "+".join(sorted(group)) for group in expected for lesion in group}


# --------------------------------------------------------------------------------------------
# Metadata rules.
# --------------------------------------------------------------------------------------------
def test_missing_column_names_the_file_and_column(tmp_path, table, previous_clean):
    with pytest.raises(StageError, match=rf"{METADATA_FILE}: missing column 'dx' \(required: lesion_id, "):
        run(tmp_path, table.drop(columns="dx"))
    assert_unharmed(tmp_path, previous_clean)


def test_bom_crlf_and_extra_columns_read_fine(tmp_path, table):
    def edit(raw):
        text = table.assign(extra="x").to_csv(index=False, lineterminator="\r\n")
        (raw / METADATA_FILE).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    out = run(tmp_path, table, edit=edit)
    assert len(out.images) == 28 and list(out.images.columns) == list(dedupe.IMAGE_COLUMNS)
    assert out.images["image_id"].iloc[0] == "ISIC_0024306"


def test_duplicate_rows_identical_keep_one_and_conflicting_exclude_the_image(tmp_path, table):
    conflicting = table.iloc[[2]].assign(dx="bcc")
    out = run(tmp_path, pd.concat([table, table.iloc[[0]], conflicting], ignore_index=True))
    why = reasons(out)
    assert why["ISIC_0024306"].startswith("duplicate row") and "ISIC_0024306" in set(out.images["image_id"])
    assert why["ISIC_0024308"] == "conflicting rows: rows differ in dx"
    assert "ISIC_0024308" not in set(out.images["image_id"]) and len(out.images) == 27


def test_unknown_dx_is_excluded_with_its_value(tmp_path, table):
    out = run(tmp_path, table.assign(dx=table["dx"].where(table.index != 0, "melanoma?")))
    assert reasons(out) == {"ISIC_0024306": "unknown dx: 'melanoma?'"}
    assert len(out.images) == 27 and out.report["excluded"]["unknown dx"]["image_ids"] == ["ISIC_0024306"]


def test_lesion_with_two_diagnoses_loses_all_its_images(tmp_path, table):
    out = run(tmp_path, table.assign(dx=table["dx"].where(table.index != 1, "mel")))
    assert reasons(out) == {"ISIC_0024306": "lesion with two diagnoses: akiec, mel",
                            "ISIC_0024307": "lesion with two diagnoses: akiec, mel"}
    assert len(out.images) == 26


def test_empty_or_non_numeric_age_is_kept_as_missing(tmp_path, table):
    ages = table["age"].astype(object)
    ages[0], ages[1] = "", "unknown"
    out = run(tmp_path, table.assign(age=ages, sex=table["sex"].where(table.index != 2, "unknown")))
    assert len(out.images) == 28 and out.excluded.empty
    assert out.images.set_index("image_id").loc[["ISIC_0024306", "ISIC_0024307"], "age"].tolist() == ["", ""]
    assert (out.report["age_missing"], out.report["sex_unknown"]) == (2, 1)


def test_row_without_file_and_file_without_row_are_excluded(tmp_path, table):
    def edit(raw):
        image_path(raw, "ISIC_0024306").unlink()
        image_path(raw, "ISIC_0099999").write_bytes(image_path(raw, "ISIC_0024307").read_bytes())
    out = run(tmp_path, table, edit=edit)
    assert reasons(out) == {"ISIC_0024306": "no image file", "ISIC_0099999": "no metadata row"}
    assert len(out.images) == 27 and out.duplicates.empty


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, expected", [
    (lambda path: path.write_bytes(b""), "unreadable image: empty file (0 bytes)"),
    (truncate, "unreadable image: corrupt or truncated image"),
    (lambda path: path.write_text("lesion_id,image_id\n"), "unreadable image: not an image"),
    (lambda path: image_pixels("big", (48, 36)).save(path, "JPEG"),
     "unreadable image: 48x36 pixels is over the limit"),
    (declare_size, "unreadable image: decompression bomb (Image size (400000000 pixels) exceeds limit"),
], ids=["empty", "truncated", "not-an-image", "over-max-image-pixels", "bomb-header"])
def test_unreadable_image_is_excluded_with_why(tmp_path, table, damage, expected, monkeypatch):
    monkeypatch.setattr(dedupe, "MAX_IMAGE_PIXELS", 1000)  # 24x18 images pass, the 48x36 one does not
    out = run(tmp_path, table, edit=lambda raw: damage(image_path(raw, "ISIC_0024306")))
    assert reasons(out)["ISIC_0024306"].startswith(expected)
    assert str(tmp_path) not in reasons(out)["ISIC_0024306"]
    assert len(out.images) == 27


def test_greyscale_and_cmyk_images_are_kept_and_counted(tmp_path, table):
    def edit(raw):
        image_pixels("ISIC_0024306").convert("L").save(image_path(raw, "ISIC_0024306"), "JPEG")
        image_pixels("ISIC_0024307").convert("CMYK").save(image_path(raw, "ISIC_0024307"), "JPEG")
    out = run(tmp_path, table, edit=edit)
    assert len(out.images) == 28 and out.report["converted_to_rgb"] == 2


def test_every_row_excluded_is_an_error(tmp_path, table, previous_clean):
    with pytest.raises(StageError, match=r"no image left.*'unknown dx': 28"):
        run(tmp_path, table.assign(dx="xyz"))
    assert_unharmed(tmp_path, previous_clean)


def test_empty_class_is_an_error(tmp_path, table, previous_clean):
    with pytest.raises(StageError, match=r"class vasc has no image left \(excluded rows by rule: "
                                         r"\{'unknown dx': 4\}\)"):
        run(tmp_path, table.assign(dx=table["dx"].replace("vasc", "xyz")))
    assert_unharmed(tmp_path, previous_clean)


def test_metadata_with_rules_applied_in_memory():
    """The pure row rules, without files: each row is listed under the first rule only."""
    meta = make_metadata(lesions_per_class=1, images_per_lesion=1).astype(str)
    meta.loc[0, "lesion_id"] = ""
    meta.loc[1, "dx"] = "xyz"
    rows, excluded = dedupe.check_rows(meta)
    assert excluded[["image_id", "rule"]].values.tolist() == [["ISIC_0024306", "missing id"],
                                                            ["ISIC_0024307", "unknown dx"]]
    assert len(rows) == 5


# --------------------------------------------------------------------------------------------
# Params.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"near_duplicate": False}, r"unknown key dedupe.near_duplicate \(known keys: near_duplicates, "),
    ({"phash_max_distance": "6"}, r"dedupe.phash_max_distance must be int, got '6'"),
    ({"near_duplicates": "yes"}, r"dedupe.near_duplicates must be bool, got 'yes'"),
    ({"max_colour_fit_residual": None}, r"dedupe.max_colour_fit_residual must be float, got None"),
    ({"phash_max_distance": 65}, r"dedupe: phash_max_distance must be in \[0, 64\], got 65"),
    ({"max_colour_fit_residual": -1}, r"dedupe: max_colour_fit_residual must be in \[0, 1\], got -1.0"),
], ids=["unknown-key", "wrong-type", "string-for-bool", "null", "hash-bits", "negative"])
def test_bad_params_stop_the_stage_before_it_reads_any_image(tmp_path, previous_clean, values, message):
    params = write_params(tmp_path / "params.yaml", dedupe=values)
    with pytest.raises(ParamError, match=message):  # not "raw/...: not found": params come first
        dedupe.main(tmp_path / "missing", tmp_path / "clean", params, workers=1)
    assert_unharmed(tmp_path, previous_clean)
