"""Tests for stages/isic2018.py on a stand-in for the ISIC 2018 Task 3 test set made here: ten tiny
JPEGs in a zip and a one-hot ground truth in the official format (with the real release's row
ISIC_0035068, which has no image). Files come through download's path: a mirror and a Dataverse
served from 127.0.0.1 (tests/http_fixtures.py), or download.local_dir. Where a figure is checked
by hand, the model's outputs are replaced by a known table; one test runs the tiny model itself.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import stages.isic2018 as isic2018
from stages.lib import inference
from stages.lib.cli import ParamError, StageError, run_stage
from stages.lib.dataset import CLASSES
from stages.lib.inference import Decision
from stages.lib.shards import read_shards
from tests.conftest import make_shards
from tests.http_fixtures import FileServer
from tests.tiny_model import tiny_model

ZIP, TRUTH = "ISIC2018_Task3_Test_Images.zip", "ISIC2018_Task3_Test_GroundTruth.csv"
HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
LISTING = "api/datasets/:persistentId/versions/:latest-published/files"
DOWNLOAD = {"dataverse_url": "https://dataverse.harvard.edu", "dataset_doi": "doi:10.7910/DVN/DBW86T",
            "files": ["HAM10000_images_part_1.zip"], "sha256": {}, "local_dir": None, "retries": 0,
            "timeout_s": 5, "max_entry_bytes": 1_000_000, "max_total_bytes": 100_000_000,
            "max_compression_ratio": 100}
ISIC = {"enabled": True, "images": ZIP, "ground_truth": TRUTH, "sha256": {}}
# The stand-in: image i's true class, and the class the known outputs below rank first.
TRUE = ["MEL", "MEL", "MEL", "NV", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
TOP = ["MEL", "MEL", "NV", "NV", "NV", "BCC", "BKL", "BKL", "DF", "MEL"]
IDS = [f"ISIC_00345{24 + i:02d}" for i in range(len(TRUE))]
UNSEEN = "ISIC_0035068"  # as in the real ground truth: a row without an image, weight 0 in the scorer
# Per-class recall of TOP: mel 2/3, nv 2/2, bcc 1/1, akiec 0/1, bkl 1/1, df 1/1, vasc 0/1.
BA_PLAIN = (2 / 3 + 1 + 1 + 0 + 1 + 1 + 0) / 7  # = 2/3
# With class_bias log 2 on vasc, image 9 (mel 0.45, vasc 0.30) becomes vasc (0.6 > 0.45 before
# renormalising); every other image keeps its top class (0.7 against 0.05 * 2): vasc recall 1/1.
BA_VASC_BIAS = (2 / 3 + 1 + 1 + 0 + 1 + 1 + 1) / 7  # = 17/21


def known_proba(i: int) -> np.ndarray:
    """Image i's outputs, in class-code order: TOP[i] 0.7 and 0.05 for the others; image 9 mel 0.45,
    vasc 0.30, 0.05 for the others."""
    p = np.full(len(CLASSES), 0.05)
    if i == 9:
        p[CLASSES.index("mel")], p[CLASSES.index("vasc")] = 0.45, 0.30
    else:
        p[CLASSES.index(TOP[i].lower())] = 0.7
    return p


def jpeg(i: int) -> bytes:
    """Image i: one flat colour whose red channel (20 i + 10) says which image it is."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (20 * i + 10, 100, 50)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def images_zip(ids=IDS) -> bytes:
    """The images in a folder of the zip, and a non-image entry; dated, so every call gives the same bytes."""
    buf = io.BytesIO()
    entries = {**{f"{image}.jpg": jpeg(i) for i, image in enumerate(ids)}, "LICENSE.txt": b"CC BY-NC"}
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(f"ISIC2018_Task3_Test_Images/{name}", date_time=(2018, 7, 1, 0, 0, 0)), data)
    return buf.getvalue()


def truth_csv(rows=None, header: str = HEADER) -> bytes:
    """The official format: one-hot floats, one row per image, plus ISIC_0035068 (no image)."""
    rows = rows if rows is not None else [*zip(IDS, TRUE), (UNSEEN, "NV")]
    codes = header.split(",")[1:]
    return (header + "\n" + "".join(f"{image}," + ",".join("1.0" if c == dx else "0.0" for c in codes) + "\n"
                                    for image, dx in rows)).encode()


def release(**changes: bytes) -> dict[str, bytes]:
    files = {ZIP: images_zip(), TRUTH: truth_csv(), **changes}
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
    return {**files, "SHA256SUMS": sums.encode()}


def write_params(isic: dict | None = None, **download: object) -> None:
    Path("params.yaml").write_text(yaml.safe_dump({"download": {**DOWNLOAD, **download},
                                                   "isic2018": {**ISIC, **(isic or {})}}))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny model, and two rules for it: decision.json (no correction) and vasc_bias.json."""
    folder = tmp_path_factory.mktemp("models")
    images, _, _ = read_shards(make_shards(folder / "augmented"), "train")
    tiny_model(images).save(folder / "model.keras")
    Decision("none", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85).save(folder / "decision.json")
    bias = tuple(math.log(2) if dx == "vasc" else 0.0 for dx in CLASSES)
    Decision("none", bias, 0.0, 0.3, 0.85).save(folder / "vasc_bias.json")
    return folder


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HAM10000_MIRROR", raising=False)
    write_params()
    return tmp_path


@pytest.fixture
def known_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's outputs replaced by known_proba, found from each image's red channel."""
    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        which = np.rint((images[..., 0].reshape(len(images), -1).mean(axis=1) - 10) / 20).astype(int)
        return np.stack([known_proba(i) for i in which]).astype(np.float32), np.zeros((len(images), 4), np.float32)

    monkeypatch.setattr(inference.Predictor, "outputs", outputs)


def run(models: Path, decision: str = "decision.json") -> dict:
    isic2018.main(model_path=models / "model.keras", decision_path=models / decision)
    return json.loads(Path("metrics/isic2018.json").read_text())


def submission() -> tuple[list[str], dict[str, list[float]]]:
    lines = Path("metrics/isic2018_submission.csv").read_text().splitlines()
    return lines[0].split(","), {line.split(",")[0]: [float(v) for v in line.split(",")[1:]] for line in lines[1:]}


def one_line_error(models: Path, capsys) -> str:
    """The stage run as `python -m stages.isic2018` runs it: exit 1 and its one line on stderr."""
    with pytest.raises(SystemExit) as done:
        run_stage(isic2018.main, ["--model-path", str(models / "model.keras"),
                                  "--decision-path", str(models / "decision.json")])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: [^\n]+\n", err), err
    return err


# ---- off by default ---------------------------------------------------------------------------
def test_params_yaml_has_it_off_with_the_release_names():
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())["isic2018"]
    assert params == {"enabled": False, "images": ZIP, "ground_truth": TRUTH, "sha256": {}}


def test_disabled_writes_scored_false_and_makes_no_request(workdir, monkeypatch):
    with FileServer(release()) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        write_params({"enabled": False}, dataverse_url=server.url)
        isic2018.main(model_path=Path("no/model.keras"))  # not read either
        assert server.requests == []
    assert json.loads(Path("metrics/isic2018.json").read_text()) == {"scored": False}
    assert Path("metrics/isic2018_submission.csv").read_text() == HEADER + "\n"
    assert Path("metrics/isic2018_per_class.csv").read_text() == "dx,auc,average_precision\n"
    assert not Path("data").exists(), "nothing downloaded"


# ---- scored: the stand-in's figures by hand -----------------------------------------------------
def test_mirror_stand_in_scored_by_the_challenge_scorer(workdir, models, monkeypatch, known_outputs):
    with FileServer(release()) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        metrics = run(models)
        assert sorted(r.path for r in server.requests) == sorted(["SHA256SUMS", ZIP, TRUTH])
    assert metrics["scored"] is True and metrics["images"] == 10
    assert metrics["balanced_accuracy"] == pytest.approx(BA_PLAIN)
    # one true image each, at 0.7 (0.30 for vasc) against 0.05 for every other image: ranked first
    per_class = pd.read_csv("metrics/isic2018_per_class.csv").set_index("dx")
    assert per_class.loc[["bcc", "df", "vasc"], "auc"].tolist() == pytest.approx([1.0] * 3)
    assert "per_class" not in metrics, "per-class figures are a plain table, not metrics"
    assert metrics["rows_without_image"] == [UNSEEN]
    assert metrics["scorer"] == "isic-challenge-scoring 5.6.0"
    assert metrics["sha256"] == {name: hashlib.sha256(release()[name]).hexdigest() for name in (ZIP, TRUTH)}
    columns, rows = submission()
    assert columns == HEADER.split(",") and sorted(rows) == sorted([*IDS, UNSEEN])
    assert rows[IDS[0]] == pytest.approx([0.7, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])  # MEL first
    assert rows[UNSEEN] == pytest.approx([1 / 7] * 7)
    assert {p.name for p in Path("data/downloads").iterdir()} == {ZIP, TRUTH}, "kept for the next run"


def test_the_submission_holds_the_prior_corrected_probabilities(workdir, models, monkeypatch, known_outputs):
    with FileServer(release()) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        metrics = run(models, "vasc_bias.json")
    assert metrics["balanced_accuracy"] == pytest.approx(BA_VASC_BIAS)
    vasc, mel = submission()[1][IDS[9]][6], submission()[1][IDS[9]][0]
    assert (vasc, mel) == pytest.approx((0.6 / 1.3, 0.45 / 1.3))  # 0.30 * 2 and 0.45, over 1 + 0.30


def test_dataverse_listing_and_original_csv_as_for_ham10000(workdir, models, known_outputs):
    files = release()
    listing = {"status": "OK", "data": [
        {"dataFile": {"id": 21, "filename": ZIP, "md5": hashlib.md5(files[ZIP]).hexdigest()}},
        {"dataFile": {"id": 22, "filename": "ISIC2018_Task3_Test_GroundTruth.tab", "originalFileName": TRUTH,
                      "checksum": {"type": "MD5", "value": hashlib.md5(files[TRUTH]).hexdigest()}}}]}
    with FileServer({LISTING: json.dumps(listing).encode(), "api/access/datafile/21": files[ZIP],
                     "api/access/datafile/22": files[TRUTH].replace(b",", b"\t"),
                     "api/access/datafile/22?format=original": files[TRUTH]}) as server:
        write_params(dataverse_url=server.url)
        metrics = run(models)
        fetched = sorted((r.path, r.query) for r in server.requests if r.path != LISTING)
    assert fetched == [("api/access/datafile/21", ""), ("api/access/datafile/22", "format=original")]
    assert metrics["balanced_accuracy"] == pytest.approx(BA_PLAIN)


def test_local_dir_zip_or_extracted_folder_and_no_request(workdir, models, known_outputs):
    folder = workdir / "release"
    (folder / "ISIC2018_Task3_Test_Images").mkdir(parents=True)  # Kaggle-style: the zip extracted
    for i, image in enumerate(IDS):
        (folder / "ISIC2018_Task3_Test_Images" / f"{image}.jpg").write_bytes(jpeg(i))
    (folder / TRUTH).write_bytes(truth_csv())
    write_params(local_dir=str(folder), dataverse_url="http://127.0.0.1:9/")  # nothing listens there
    assert run(models)["balanced_accuracy"] == pytest.approx(BA_PLAIN)
    (folder / ZIP).write_bytes(images_zip())
    assert run(models)["balanced_accuracy"] == pytest.approx(BA_PLAIN)
    assert not Path("data/downloads").exists()


def test_the_tiny_model_itself_end_to_end(workdir, models, monkeypatch):
    with FileServer(release()) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        metrics = run(models)
    _, rows = submission()
    proba = np.array([rows[image] for image in IDS])
    assert proba.sum(axis=1) == pytest.approx(np.ones(10), abs=1e-5)
    # balanced accuracy by hand from the submission: each true class's share ranked first, averaged
    top = proba.argmax(axis=1)
    codes = HEADER.split(",")[1:]
    recalls = [np.mean([codes[top[i]] == dx for i in range(10) if TRUE[i] == dx]) for dx in codes]
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))


# ---- faults: one line naming the file -----------------------------------------------------------
@pytest.mark.parametrize(("truth", "message"), [
    (truth_csv(header="image,MEL,NV,BCC,AKIEC,BKL,DF"), r"columns image,MEL,NV,BCC,AKIEC,BKL,DF; an ISIC 2018"),
    (truth_csv(header="image_id,MEL,NV,BCC,AKIEC,BKL,DF,VASC"), r"columns image_id,MEL"),
    (truth_csv(header="image,MEL,NV,BCC,AKIEC,BKL,DF,VASC,SCC"), r"columns image,.*,SCC; an ISIC 2018"),
    (truth_csv().replace(b"ISIC_0034527,0.0,1.0", b"ISIC_0034527,1.0,1.0"), r"row ISIC_0034527 is not one-hot"),
    (truth_csv([*zip(IDS, TRUE), (IDS[3], "NV")]), r"image ISIC_0034527 has two rows"),
    (truth_csv([*zip(IDS[1:], TRUE[1:])]), rf"no row for image ISIC_0034524 of .*{ZIP}"),
    (truth_csv([*zip(IDS, TRUE), ("ISIC_0099999", "DF")]), rf"row ISIC_0099999 has no image in .*{ZIP}"),
])
def test_bad_ground_truth_is_one_line_naming_the_file(workdir, models, monkeypatch, capsys, truth, message):
    with FileServer(release(**{TRUTH: truth})) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        err = one_line_error(models, capsys)
    assert re.match(rf"error: data/downloads/{TRUTH}: {message}", err), err


def test_the_archive_limits_and_pins_of_download_apply(workdir, models, monkeypatch, capsys):
    with FileServer(release()) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        write_params(max_entry_bytes=100)
        assert re.search(rf"{ZIP}: entry 'ISIC2018_Task3_Test_Images/ISIC_0034524.jpg' refused: declares "
                         r"[\d,]+ bytes, over max_entry_bytes 100", one_line_error(models, capsys))
        write_params({"sha256": {TRUTH: "0" * 64}})
        assert re.search(rf"{TRUTH}: sha256 mismatch: expected 0{{64}} \(params.yaml isic2018.sha256",
                         one_line_error(models, capsys))


@pytest.mark.parametrize(("change", "message"), [
    ({"images": "images.tar"}, r"isic2018: images must be a plain file name ending in \.zip"),
    ({"ground_truth": "../truth.csv"}, r"isic2018: ground_truth must be a plain file name ending in \.csv"),
    ({"sha256": {"other.zip": "0" * 64}}, r"isic2018: sha256.other.zip pins a file that is neither"),
    ({"enabled": "yes"}, r"isic2018.enabled must be bool"),
])
def test_bad_params_are_refused_before_any_work(workdir, change, message):
    write_params(change)
    with pytest.raises(ParamError, match=message):
        isic2018.main()


def test_a_model_that_is_missing_is_a_stage_error(workdir, models, monkeypatch):
    with FileServer(release()) as server:
        monkeypatch.setenv("HAM10000_MIRROR", server.url)
        with pytest.raises(StageError, match=r"model not found: nowhere/model.keras"):
            isic2018.main(model_path=Path("nowhere/model.keras"))
