"""Command predict and its library (stages/lib/prediction.py): top-3 ranking, the same
preprocessing as training, any image mode, per-file errors (a folder, other formats), warnings
(small images, out of distribution), odd file names, table and JSON output, exit codes, one-line
usage errors naming what to run, the medical notice, patient metadata from flags or a CSV."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import predict
from stages.lib import archive, prediction
from stages.lib.dataset import CLASS_NAMES, CLASSES
from stages.lib.images import load_image
from stages.lib.inference import PLAIN, Decision, MetadataRule, Predictor, prior_bias, top_k
from stages.lib.metadata import FIELDS, NONE, Metadata, MetadataModel, known_subsets
from stages.lib.ood import FEATURE_LAYER, OodDetector
from stages.lib.shards import read_shards
from tests.conftest import make_shards
from tests.fixtures import help_in_fresh_python, image_pixels, jpeg_bytes
from tests.tiny_model import tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_and_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    images, _, _ = read_shards(make_shards(folder / "augmented"), "train")
    model = tiny_model(images)
    model.save(folder / "model.keras")
    Decision("none", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85).save(folder / "decision.json")
    return model, folder / "model.keras"


def predict_files(model, paths, decision: Decision = PLAIN, batch_size: int = prediction.BATCH_SIZE) -> list[dict]:
    """prediction.describe_batches' answers for `paths`, batch by batch, gathered in one list."""
    predictor = Predictor(model, decision, batch_size)
    return [r for batch in prediction.describe_batches(predictor, paths, batch_size) for r in batch]


def oversized_png(side: int = 8000) -> bytes:
    """A tiny PNG whose header claims side x side pixels, over images.MAX_IMAGE_PIXELS."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC over type + data
    return bytes(data)


@pytest.fixture
def good_images(tmp_path) -> list[Path]:
    """JPEG and PNG in the modes people send: RGB, greyscale, RGBA, CMYK, palette; odd sizes."""
    rgb = image_pixels("lesion", (120, 90))
    files = {
        "rgb.jpg": lambda p: p.write_bytes(jpeg_bytes(rgb)),
        "rgb.png": lambda p: rgb.save(p),
        "grey.png": lambda p: rgb.convert("L").save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "palette.png": lambda p: image_pixels("other", (33, 700)).convert("P").save(p),
    }
    paths = []
    for name, write in files.items():
        write(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    """Each kind of bad file, and the words its error must contain."""
    whole = jpeg_bytes(image_pixels("cut", (120, 90)))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "huge.png").write_bytes(oversized_png())
    return {"No such file": tmp_path / "missing.jpg", "empty": tmp_path / "empty.jpg",
            "truncated": tmp_path / "truncated.jpg", "not an image": tmp_path / "notes.png",
            "over the limit": tmp_path / "huge.png"}


def test_top_k_ranks_most_probable_first_with_class_names():
    proba = np.array([0.05, 0.02, 0.10, 0.01, 0.61234567, 0.11, 0.10])
    top = top_k(proba, 3)
    assert top == [{"dx": "mel", "name": "melanoma", "probability": 0.6123},
                   {"dx": "nv", "name": "melanocytic nevi", "probability": 0.11},
                   {"dx": "bkl", "name": "benign keratosis", "probability": 0.1}]  # tie with vasc: class order
    assert [c["dx"] for c in top_k(proba, 7)] == ["mel", "nv", "bkl", "vasc", "akiec", "bcc", "df"]


def test_predictions_are_the_models_on_load_image_in_batches(model_and_path, good_images):
    model, _ = model_and_path
    paths = [str(p) for p in good_images]
    results = predict_files(model, paths, batch_size=4)  # two batches, the last one short
    assert [r["image"] for r in results] == paths
    pixels = np.stack([load_image(Path(p), 32) for p in paths]).astype(np.float32)
    for result, expected in zip(results, model.predict(pixels, verbose=0)):
        want = top_k(expected, 3)
        assert [c["dx"] for c in result["top"]] == [c["dx"] for c in want]
        probabilities = [c["probability"] for c in result["top"]]
        assert probabilities == pytest.approx([c["probability"] for c in want], abs=2e-4)  # other batch
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(CLASS_NAMES[c["dx"]] == c["name"] for c in result["top"])
    assert len({r["top"][0]["probability"] for r in results}) > 1, "the tiny model should tell images apart"


def test_each_bad_file_gets_its_own_error_and_the_rest_still_run(model_and_path, good_images, bad_images):
    model, _ = model_and_path
    paths = [str(good_images[0]), *map(str, bad_images.values()), str(good_images[1])]
    results = predict_files(model, paths, batch_size=3)
    assert [r["image"] for r in results] == paths
    assert "top" in results[0] and "top" in results[-1]
    for words, result in zip(bad_images, results[1:-1]):
        assert set(result) == {"image", "error"}
        assert words in result["error"], result["error"]


def test_json_is_one_list_on_stdout_and_the_notice_goes_to_stderr(model_and_path, good_images, bad_images, capsys):
    _, model_path = model_and_path
    status = predict.main(["--json", "--model", str(model_path), str(good_images[0]), str(bad_images["empty"])])
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert status == 1
    assert [r["image"] for r in results] == [str(good_images[0]), str(bad_images["empty"])]
    assert [c["dx"] in CLASSES for c in results[0]["top"]] == [True] * 3
    top = results[0]["top"][0]
    assert results[0]["decision"] == ("mel" if any(c["dx"] == "mel" and c["probability"] >= 0.3
                                                   for c in results[0]["top"]) else top["dx"])
    assert results[1]["error"] == "empty file (0 bytes)"
    assert prediction.NOTICE in err and "not a medical device" in prediction.NOTICE


def test_table_lists_three_classes_per_image_errors_and_the_notice(model_and_path, good_images, bad_images, capsys):
    _, model_path = model_and_path
    status = predict.main(["--model", str(model_path), str(good_images[2]), str(bad_images["not an image"])])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert status == 1
    assert lines[0].split() == ["image", "#", "dx", "name", "probability", "decision"]
    assert lines[1].startswith(str(good_images[2])) and lines[1].split("%", 1)[1].split()[0] in CLASSES
    assert [line.split()[0] for line in lines[2:4]] == ["2", "3"] and lines[4].split()[0] == "why:"
    assert lines[5].startswith(str(bad_images["not an image"])) and "error: not an image" in lines[5]
    assert "2 image(s), 1 failed." in out and out.rstrip().endswith(prediction.NOTICE)


def dvc_project(folder: Path, remote: bool) -> Path:
    """A DVC project's config, with or without a remote, as `dvc remote add -d` writes it."""
    (folder / ".dvc").mkdir(parents=True, exist_ok=True)
    text = "[core]\n    remote = store\n['remote \"store\"']\n    url = /srv/dvc\n" if remote else ""
    (folder / ".dvc" / "config").write_text(text)
    return folder


@pytest.mark.parametrize("remote", [False, True], ids=["no-remote", "remote"])
def test_missing_model_is_a_usage_error_that_says_how_to_get_it(tmp_path, good_images, capsys, monkeypatch,
                                                                remote):
    monkeypatch.chdir(dvc_project(tmp_path, remote))
    status = predict.main(["--model", str(tmp_path / "nope.keras"), str(good_images[0])])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "nope.keras") in err and "dvc repro train" in err
    assert ("dvc pull" in err) == remote, err


def test_a_remote_is_found_in_the_projects_config_from_a_subfolder(tmp_path):
    assert not prediction.dvc_remote_configured(dvc_project(tmp_path / "a", remote=False))
    (dvc_project(tmp_path / "b", remote=True) / "sub").mkdir()
    assert prediction.dvc_remote_configured(tmp_path / "b" / "sub")
    (tmp_path / "c" / ".dvc").mkdir(parents=True)
    (tmp_path / "c" / ".dvc" / "config.local").write_text("[core]\n    remote = mine\n")
    assert prediction.dvc_remote_configured(tmp_path / "c")
    (tmp_path / "d").mkdir()
    assert not prediction.dvc_remote_configured(tmp_path / "d")


def broken_models(folder: Path) -> dict[str, Path]:
    """Model files that are not a usable 7-class image model, and a folder named like one."""
    import keras

    three = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    three.save(folder / "three.keras")
    foreign = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(name="gap"),
                                keras.layers.Dense(len(CLASSES), activation="softmax")])
    foreign.save(folder / "foreign.keras")
    (folder / "garbage.keras").write_bytes(b"not a zip file\n" * 50)
    (folder / "folder.keras").mkdir()
    return {"garbage": folder / "garbage.keras", "three-classes": folder / "three.keras",
            "no-feature-layer": folder / "foreign.keras", "directory": folder / "folder.keras"}


@pytest.mark.parametrize("remote", [False, True], ids=["no-remote", "remote"])
def test_a_broken_model_is_a_one_line_usage_error_saying_what_to_run(tmp_path, good_images, capsys, monkeypatch,
                                                                    remote):
    monkeypatch.chdir(dvc_project(tmp_path, remote))
    for kind, path in broken_models(tmp_path).items():
        status = predict.main(["--model", str(path), str(good_images[0])])
        err = capsys.readouterr().err
        assert status == 2, kind
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(path) in err, (kind, err)
        if kind != "directory":
            assert "dvc repro train" in err and ("dvc pull" in err) == remote, (kind, err)
    assert "is a directory" in err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"tta": "none"}', None],
                         ids=["malformed", "a-list", "missing-keys", "directory"])
@pytest.mark.parametrize("remote", [False, True], ids=["no-remote", "remote"])
def test_a_broken_decision_file_is_a_one_line_usage_error(model_and_path, good_images, tmp_path, capsys,
                                                          monkeypatch, content, remote):
    _, model_path = model_and_path
    monkeypatch.chdir(dvc_project(tmp_path, remote))
    decision = tmp_path / "decision.json"
    decision.mkdir() if content is None else decision.write_text(content)
    status = predict.main(["--model", str(model_path), "--decision", str(decision), str(good_images[0])])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and str(decision) in err, err
    if content is None:
        assert "is a directory" in err
    else:
        assert "dvc repro evaluate" in err and ("dvc pull" in err) == remote, err


def test_help_answers_without_importing_tensorflow_and_options_are_not_abbreviated():
    printed, imported = help_in_fresh_python("predict", ("tensorflow", "keras"))
    assert imported == []
    assert "usage: python -m stages.predict" in printed and "exit status: 0" in printed
    with pytest.raises(SystemExit) as abbreviated:
        predict.parse_args(["--jso", "x.jpg"])
    assert abbreviated.value.code == 2


def test_a_directory_is_named_as_such(model_and_path, tmp_path):
    model, _ = model_and_path
    (tmp_path / "photos.jpg").mkdir()
    [result] = predict_files(model, [str(tmp_path / "photos.jpg")])
    assert result["error"] == "is a directory, not an image file"


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "WEBP"])
def test_only_jpeg_and_png_are_decoded_and_other_formats_are_named(model_and_path, good_images, tmp_path, fmt):
    model, _ = model_and_path
    path = tmp_path / f"lesion.{fmt.lower()}"
    image_pixels("lesion", (120, 90)).save(path, fmt)
    bad, good = predict_files(model, [str(path), str(good_images[0])])
    assert bad["error"] == f"{fmt} images are not accepted (accepted: JPEG, PNG)"
    assert "top" in good


def test_an_image_far_below_the_input_size_gets_a_warning(model_and_path, tmp_path, capsys):
    model, model_path = model_and_path  # input 32x32: a side under 16 pixels is warned about
    for name, size in {"tiny.png": (20, 15), "fine.png": (16, 16), "big.png": (120, 90)}.items():
        image_pixels("lesion", size).save(tmp_path / name)
    tiny, fine, big = predict_files(model, [str(tmp_path / n) for n in ("tiny.png", "fine.png", "big.png")])
    assert fine["warnings"] == big["warnings"] == []
    [warning] = tiny["warnings"]
    assert warning.startswith("20x15 pixels is far below the model's input size (32x32)")
    assert predict.main(["--model", str(model_path), str(tmp_path / "tiny.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].split()[0] == "why:" and lines[5].split() == ["warning:", *warning.split()]


SHOWN = {"image", "top", "probabilities", "weighted", "decision", "reason", "weighting", "in_distribution",
         "ood_score", "mel_probability", "mel_threshold", "with_metadata", "metadata", "warnings"}


@pytest.mark.parametrize("threshold", [1e9, 0.0], ids=["judged", "out-of-distribution"])
def test_json_carries_the_shown_fields_and_unknown_when_out_of_distribution(model_and_path, good_images, tmp_path,
                                                                           capsys, threshold):
    """A detector that accepts every image, then one that accepts none: "unknown", and the table's
    warning row."""
    model, model_path = model_and_path
    width = int(model.get_layer(FEATURE_LAYER).output.shape[-1])
    detector = OodDetector(threshold=threshold, keep=0.95, means=np.full((1, width), 1e3), precision=np.eye(width))
    rule = Decision("none", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85, ood=detector)
    rule.save(tmp_path / "decision.json")
    args = ["--model", str(model_path), "--decision", str(tmp_path / "decision.json"), str(good_images[0])]
    assert predict.main(["--json", *args]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert set(result) == SHOWN and result["warnings"] == []
    assert result["in_distribution"] == (threshold > 0) and result["ood_score"] > 0
    assert sorted(result["probabilities"]) == sorted(CLASSES) and result["mel_threshold"] == 0.3
    assert (result["decision"] == "unknown") == (threshold == 0)
    assert predict.main(args) == 0
    table = capsys.readouterr().out
    assert ("warning: not a lesion this model can judge" in table) == (threshold == 0)


def test_the_table_warns_when_the_image_is_out_of_distribution():
    top = [{"dx": "nv", "name": "melanocytic nevi", "probability": 0.6},
           {"dx": "mel", "name": "melanoma", "probability": 0.3},
           {"dx": "bkl", "name": "benign keratosis", "probability": 0.05}]
    judged = {"image": "a.jpg", "top": top, "decision": "mel", "in_distribution": True, "ood_score": 1.0,
              "mel_probability": 0.3, "mel_threshold": 0.25, "warnings": [], "reason": "Melanoma: its weighted score"}
    unknown = {**judged, "image": "cat.jpg", "decision": "unknown", "in_distribution": False, "ood_score": 42.0,
               "reason": "No diagnosis: the image is unlike"}
    lines = predict.format_table([judged, unknown]).splitlines()
    assert lines[1].split()[-7:] == ["mel", "(mel", "score", "30.0%", ">=", "threshold", "25.0%)"]
    assert lines[4].split() == ["why:", "Melanoma:", "its", "weighted", "score"], "the answer's own reason"
    assert "unknown" in lines[5] and lines[8].split()[:3] == ["why:", "No", "diagnosis:"]
    assert lines[9].split()[:8] == ["warning:", "not", "a", "lesion", "this", "model", "can", "judge:"]
    assert "42" in lines[9] and sum("warning:" in line for line in lines) == 1


def test_decision_at_the_operating_point_calls_melanoma_above_the_threshold(model_and_path, good_images):
    model, _ = model_and_path
    paths = [str(p) for p in good_images]
    plain = predict_files(model, paths)  # PLAIN: its threshold 1.0 leaves the top class
    always_mel = Decision("none", (0.0,) * len(CLASSES), 0.0, 0.0, 0.85)
    assert {r["decision"] for r in predict_files(model, paths, always_mel)} == {"mel"}
    never_mel = Decision("none", (0.0,) * len(CLASSES), 0.0, 1.01, 0.85)
    assert [r["decision"] for r in predict_files(model, paths, never_mel)] == [r["top"][0]["dx"] for r in plain]


def test_missing_decision_file_is_a_usage_error(model_and_path, good_images, tmp_path, capsys):
    _, model_path = model_and_path
    status = predict.main(["--model", str(model_path), "--decision", str(tmp_path / "none.json"), str(good_images[0])])
    assert status == 2 and "dvc repro evaluate" in capsys.readouterr().err


def test_usage_errors_exit_2_and_help_carries_the_notice(capsys):
    with pytest.raises(SystemExit) as no_images:
        predict.main([])
    assert no_images.value.code == 2
    with pytest.raises(SystemExit) as help_:
        predict.main(["--help"])
    assert help_.value.code == 0
    assert "not a medical device" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def odd_names(tmp_path, good_images) -> list[bytes]:
    """Good images under names a terminal or UTF-8 cannot take as they are: bytes that are not
    UTF-8 (Latin-1 `é`), an escape sequence that would turn the terminal red, a bidi override."""
    names = [b"caf\xe9.jpg", b"red\x1b[31m.jpg", "evil\u202egpj.png".encode()]
    for name in names:
        (tmp_path / os.fsdecode(name)).write_bytes(good_images[0].read_bytes())
    return [os.fsencode(tmp_path) + b"/" + name for name in names]


def run_predict(*args, env=None) -> subprocess.CompletedProcess:
    """The real process, as bytes, stdout strictly UTF-8 (PYTHONIOENCODING=utf-8)."""
    return subprocess.run([sys.executable, "-m", "stages.predict", *args], cwd=ROOT, capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_command_line_keeps_stdout_valid_json_whatever_the_file_names(model_and_path, good_images, bad_images,
                                                                      odd_names):
    """The real process: TensorFlow's start-up messages must not reach stdout, and no file name
    can make the JSON invalid or lose the other images' results."""
    _, model_path = model_and_path
    done = run_predict("--json", "--model", str(model_path), str(good_images[3]), *odd_names,
                       str(bad_images["truncated"]))
    assert done.returncode == 1, done.stderr
    assert b"\x1b" not in done.stdout and "\u202e".encode() not in done.stdout
    results = json.loads(done.stdout.decode("utf-8"))
    assert [r["image"].rsplit("/", 1)[-1] for r in results[1:4]] == ["caf\\xe9.jpg", "red\x1b[31m.jpg",
                                                                     "evil\u202egpj.png"]
    assert all("top" in r for r in results[:4]) and "truncated" in results[4]["error"]
    assert done.stderr.decode().splitlines() == [prediction.NOTICE], "TensorFlow's own logs stay off stderr"


def test_the_real_process_prints_one_line_for_a_broken_model(tmp_path, good_images):
    (tmp_path / "model.keras").write_bytes(b"not a zip file")
    done = run_predict("--model", str(tmp_path / "model.keras"), str(good_images[0]))
    assert done.returncode == 2 and done.stdout == b""
    [line] = done.stderr.decode().splitlines()
    assert line.startswith(f"error: model {tmp_path / 'model.keras'} is not a Keras model file") and "dvc" in line


def test_table_escapes_file_names_and_keeps_every_result(model_and_path, good_images, odd_names):
    _, model_path = model_and_path
    done = run_predict("--model", str(model_path), *odd_names, str(good_images[1]))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8")  # strict: the table is valid UTF-8
    assert "\x1b" not in out and "\u202e" not in out
    names = [line.split()[0].rsplit("/", 1)[-1] for line in out.splitlines() if line.startswith("/")]
    assert names == ["caf\\xe9.jpg", "red\\x1b[31m.jpg", "evil\\u202egpj.png", good_images[1].name]
    assert "4 image(s), 0 failed." in out


# ----------------------------------------------------------------------------------------------
# Archives: folders, list files, JSON lines as batches finish, --output and --resume.
# ----------------------------------------------------------------------------------------------
def lines_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_jsonl_answers_come_batch_by_batch_while_the_paths_are_still_being_read(model_and_path, good_images):
    """A generator of paths, batches of 2: when the 3rd path is asked for, the first batch is out."""
    model, _ = model_and_path
    out, asked = io.StringIO(), []

    def paths():
        for path in good_images:
            asked.append(out.getvalue().count("\n"))
            yield str(path)

    batches = prediction.describe_batches(Predictor(model, PLAIN, 2), paths(), batch_size=2)
    assert archive.write_lines(batches, out) == (6, 0)
    assert asked == [0, 0, 2, 2, 4, 4]
    assert [r["image"] for r in lines_of(out.getvalue())] == [str(p) for p in good_images]


def test_a_folder_and_a_list_file_are_predicted_in_order(model_and_path, good_images, tmp_path, capsys, monkeypatch):
    _, model_path = model_and_path
    folder = tmp_path / "archive"
    (folder / "2019").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (folder / "2019" / "lesion.JPG").write_bytes(good_images[0].read_bytes())
    (folder / "scan.png").write_bytes(good_images[1].read_bytes())
    (folder / "notes.txt").write_text("skipped: not a .jpg, .jpeg or .png name")
    (folder / "fake.jpeg").write_text("named as an image, so tried, and refused")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text(f"{good_images[2]}\n\n{good_images[3].name}\nmissing.jpg\n")
    status = predict.main(["--jsonl", "--model", str(model_path), "archive", "empty", "--list", "list.txt"])
    out, err = capsys.readouterr()
    results = lines_of(out)
    assert [r["image"] for r in results] == ["archive/fake.jpeg", "archive/scan.png", "archive/2019/lesion.JPG",
                                             "empty", str(good_images[2]), good_images[3].name, "missing.jpg"]
    assert results[0]["error"] == "not an image (unrecognised format)"
    assert results[3]["error"] == "no .jpg, .jpeg, .png file in this folder or below it"
    assert results[6]["error"] == "cannot read (No such file or directory)"
    assert all("top" in results[k] for k in (1, 2, 4, 5)), "a relative path is read from the working folder"
    assert status == 1 and err.splitlines() == [prediction.NOTICE]


def test_output_and_resume_give_each_image_once_after_a_kill_mid_line(model_and_path, good_images, tmp_path, capsys):
    _, model_path = model_and_path
    out = tmp_path / "answers.jsonl"
    run = ["--jsonl", "--model", str(model_path), "--output", str(out)]
    assert predict.main([*run, *map(str, good_images[:3])]) == 0
    assert capsys.readouterr().err.splitlines() == [prediction.NOTICE, f"3 image(s) written to {out}, 0 failed"]
    first = out.read_text().splitlines(keepends=True)
    assert [r["image"] for r in lines_of(out.read_text())] == [str(p) for p in good_images[:3]]
    assert predict.main([*run, str(good_images[0])]) == 2
    assert "answers.jsonl exists: add --resume" in capsys.readouterr().err
    out.write_text(first[0] + first[1][:40])  # as a kill mid-write leaves it
    assert predict.main([*run, "--resume", *map(str, good_images)]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"5 image(s) written to {out}, 0 failed; 1 already there"
    results = lines_of(out.read_text())
    assert [r["image"] for r in results] == [str(p) for p in good_images]
    assert results[0] == lines_of(first[0])[0] and results[1] == lines_of(first[1])[0], "the same answers"


def test_an_interrupted_run_leaves_whole_lines_and_says_so(model_and_path, good_images, tmp_path, capsys,
                                                          monkeypatch):
    _, model_path = model_and_path
    real = prediction.describe_batches

    def interrupted(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(prediction, "describe_batches", interrupted)
    out = tmp_path / "answers.jsonl"
    assert predict.main(["--jsonl", "--model", str(model_path), "--output", str(out), *map(str, good_images)]) == 130
    assert "interrupted: the lines written so far are whole; --resume continues" in capsys.readouterr().err
    assert [r["image"] for r in lines_of(out.read_text())] == [str(p) for p in good_images]  # one batch of 32


@pytest.mark.parametrize("args, words", [
    ([], "name at least one IMAGE_OR_FOLDER, or --list FILE"),
    (["--output", "x.jsonl", "a.jpg"], "--output needs --jsonl"),
    (["--json", "--output", "x.jsonl", "a.jpg"], "--output needs --jsonl"),
    (["--jsonl", "--resume", "a.jpg"], "--resume needs --output FILE"),
    (["--json", "--jsonl", "a.jpg"], "not allowed with argument"),
], ids=["nothing", "output-alone", "output-json", "resume-alone", "json-and-jsonl"])
def test_option_mistakes_are_usage_errors(args, words, capsys):
    with pytest.raises(SystemExit) as stopped:
        predict.parse_args(args)
    assert stopped.value.code == 2 and words in capsys.readouterr().err


def test_a_missing_list_file_is_a_one_line_usage_error(model_and_path, tmp_path, capsys):
    _, model_path = model_and_path
    assert predict.main(["--jsonl", "--model", str(model_path), "--list", str(tmp_path / "nope.txt")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"error: list file {tmp_path / 'nope.txt'}: cannot read (No such file or directory)"


# ----------------------------------------------------------------------------------------------
# Patient metadata: --age/--sex/--site for every image, or --metadata FILE.csv by file stem.
# ----------------------------------------------------------------------------------------------
WIDTH = {"age": 18, "sex": 2, "localization": 14}  # one-hot columns: 5-year bands 0..85, female/male, 14 sites


def neutral_metadata_rule(folder: Path, prior_strength: float = 0.0, mel_threshold: float = 0.3) -> MetadataRule:
    """A metadata path whose model adds no evidence (zero weights, equal class shares: a log ratio
    of 0 for every set of fields), its file saved in `folder`; its class bias is `prior_strength`
    times the log class shares of a training set with one dermatofibroma in 1,000 images."""
    counts = {"akiec": 30, "bcc": 50, "bkl": 110, "df": 1, "mel": 110, "nv": 685, "vasc": 14}
    class_bias = prior_bias(np.repeat(np.arange(len(CLASSES)), [counts[dx] for dx in CLASSES]), prior_strength)
    fits = {key: {"coef": np.zeros((len(CLASSES), sum(WIDTH[f] for f in key))), "intercept": np.zeros(len(CLASSES)),
                  "shares": np.full(len(CLASSES), 1 / len(CLASSES))} for key in known_subsets(FIELDS)}
    model = MetadataModel(FIELDS, fits)
    return MetadataRule(weight=1.0, class_bias=tuple(class_bias), prior_strength=prior_strength,
                        mel_threshold=mel_threshold, temperature=1.0, model=model,
                        model_file=model.save(folder / "metadata_model.json"))


class Recording:
    """A Predictor that notes the metadata rows each batch was given (None: none passed)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.rows = predictor, []

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def describe(self, images, rows=None):
        self.rows.append(rows)
        return self.predictor.describe(images, rows)


@pytest.fixture
def recorded(model_and_path, tmp_path, monkeypatch) -> Recording:
    """What predict.main loads: the tiny model under a rule with a neutral metadata path, recording."""
    model, _ = model_and_path
    rule = Decision("none", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85,
                    with_metadata=neutral_metadata_rule(tmp_path))
    recording = Recording(Predictor(model, rule))
    monkeypatch.setattr(prediction, "load", lambda *args: recording)
    return recording


def test_flags_reach_the_predictor_for_every_image_and_the_json_says_what_was_used(recorded, good_images, capsys):
    paths = [str(p) for p in good_images[:2]]
    assert predict.main(["--json", *paths]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert recorded.rows == [None], "no metadata given: none passed"
    assert [(r["metadata"], r["with_metadata"]) for r in alone] == [({}, False)] * 2
    assert predict.main(["--json", "--age", "60", "--sex", "Female", "--site", "lower_extremity", *paths]) == 0
    used = json.loads(capsys.readouterr().out)
    told = Metadata(60.0, "female", "lower extremity")
    assert recorded.rows[1] == [told, told]
    assert [(r["metadata"], r["with_metadata"]) for r in used] == [
        ({"age": 60.0, "sex": "female", "localization": "lower extremity"}, True)] * 2
    for a, b in zip(alone, used):  # the neutral path adds no evidence: the same answer
        assert (a["top"], a["decision"]) == (b["top"], b["decision"])
    assert predict.main(["--sex", "male", paths[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert recorded.rows[2] == [Metadata(None, "male", None)]
    assert lines[4].split()[0] == "why:" and lines[5].split() == ["metadata", "used:", "sex", "male"]


def test_a_csv_is_matched_by_file_stem_and_a_bad_row_is_that_images_error(recorded, good_images, tmp_path, capsys):
    """HAM10000's columns plus others (ignored, dx_type too), missing values, an image without a
    row (the image alone), an age of -3 and an unknown site (that image's error only)."""
    folder = tmp_path / "archive"
    (folder / "sub").mkdir(parents=True)
    names = ["ISIC_0000001.jpg", "ISIC_0000002.png", "sub/ISIC_0000003.jpg", "ISIC_0000004.jpg", "other.jpg"]
    for name, source in zip(names, good_images):
        (folder / name).write_bytes(source.read_bytes())
    (tmp_path / "meta.csv").write_text(
        "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
        "HAM_1,ISIC_0000001,mel,histo,45.0,male,lower extremity,vidir\n"
        "HAM_2,ISIC_0000002,nv,follow_up,,unknown,back,vidir\n"
        "HAM_3,ISIC_0000003,nv,histo,-3,female,face,vidir\n"
        "HAM_4,ISIC_0000004,bkl,histo,50,female,moon,vidir\n"
        "HAM_9,ISIC_0000009,bkl,histo,70,male,back,vidir\n")
    status = predict.main(["--jsonl", "--metadata", str(tmp_path / "meta.csv"), str(folder)])
    results = {Path(r["image"]).name: r for r in lines_of(capsys.readouterr().out)}
    assert status == 1
    assert results["ISIC_0000001.jpg"]["metadata"] == {"age": 45.0, "sex": "male", "localization": "lower extremity"}
    assert results["ISIC_0000002.png"]["metadata"] == {"localization": "back"}
    assert results["ISIC_0000003.jpg"]["error"] == f"{tmp_path / 'meta.csv'}, line 4: age '-3': not a number of " \
        "years from 0 to 120"
    assert results["ISIC_0000004.jpg"]["error"].startswith(f"{tmp_path / 'meta.csv'}, line 5: localization 'moon'")
    assert results["other.jpg"]["metadata"] == {} and not results["other.jpg"]["with_metadata"]
    assert "top" in results["other.jpg"]
    [rows] = recorded.rows  # folder order: ISIC_0000001, ISIC_0000002, ISIC_0000004, other, sub/ISIC_0000003
    assert rows == [Metadata(45.0, "male", "lower extremity"), Metadata(None, None, "back"), NONE]


def test_the_table_says_which_metadata_each_image_used_only_when_some_was_given():
    top = [{"dx": "nv", "name": "melanocytic nevi", "probability": 0.6}]
    used = {"image": "a.jpg", "top": top, "decision": "nv", "warnings": [],
            "metadata": {"age": 45.0, "localization": "upper extremity"}, "with_metadata": True}
    alone = {**used, "image": "b.jpg", "metadata": {}, "with_metadata": False}
    lines = predict.format_table([used, alone], metadata=True).splitlines()
    assert lines[2].split() == ["metadata", "used:", "age", "45,", "localization", "upper", "extremity"]
    assert lines[4].split() == ["metadata:", "none", "used", "(decided", "from", "the", "image", "alone)"]
    assert "metadata" not in predict.format_table([used, alone])


@pytest.mark.parametrize("args, words", [
    (["--age", "-3"], "error: --age: age '-3': not a number of years from 0 to 120"),
    (["--age", "sixty"], "error: --age: age 'sixty': not a number of years from 0 to 120"),
    (["--sex", "other"], "error: --sex: sex 'other': not one of female, male (or leave it out)"),
    (["--site", "moon"], "error: --site: localization 'moon': not one of abdomen, acral, back,"),
    (["--age", "60", "--metadata", "meta.csv"], "error: give the metadata as --metadata FILE.csv or as "
                                                "--age/--sex/--site, not both (got --metadata and --age)"),
    (["--metadata", "no_id.csv"], "error: no_id.csv: no image_id column (HAM10000's columns: image_id, age, sex,"),
    (["--metadata", "missing.csv"], "error: missing.csv: not a readable CSV ("),
], ids=["age-negative", "age-not-a-number", "sex", "site", "both-ways", "csv-without-image-id", "csv-missing"])
def test_bad_metadata_flags_or_file_are_a_one_line_usage_error(model_and_path, good_images, tmp_path, capsys,
                                                                 monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.csv").write_text("image_id,age\nrgb,60\n")
    (tmp_path / "no_id.csv").write_text("lesion_id,age,sex\nHAM_1,60,male\n")
    _, model_path = model_and_path
    assert predict.main(["--model", str(model_path), *args, str(good_images[0])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(words), err


def test_the_command_line_stays_within_its_line_budget():
    """predict and serve are front ends: their logic lives in stages/lib."""
    assert len((ROOT / "stages" / "predict.py").read_text().splitlines()) <= 200
    assert len((ROOT / "stages" / "serve.py").read_text().splitlines()) <= 180
