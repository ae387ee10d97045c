"""Command serve: the page, the upload API's answers and 4xx errors (Starlette's TestClient on a
tiny model), patient metadata fields, the same JSON as `predict --json`, the command line, and a
real Chromium on a real server whose explanation must be true of what the page shows (skipped only
where no Chromium is installed; .ci/run installs it)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import predict, serve
from stages.lib import prediction, web
from stages.lib.dataset import CLASSES
from stages.lib.inference import Decision
from stages.lib.metadata import SITES, Metadata
from stages.lib.shards import read_shards
from tests.conftest import make_shards
from tests.fixtures import help_in_fresh_python, image_pixels, jpeg_bytes
from tests.stages.test_predict import Recording, neutral_metadata_rule
from tests.tiny_model import tiny_model

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 100_000  # the upload cap in these tests: small, so that going over it is cheap


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A saved tiny model and decision file, and both loaded as `serve` loads them. The rule's
    metadata path adds no evidence but weighs the rare classes up hard (prior strength -3; never
    melanoma): with metadata, the decision is the rarest, df, though it is not the most probable."""
    folder = tmp_path_factory.mktemp("serve")
    images, _, _ = read_shards(make_shards(folder / "augmented"), "train")
    tiny_model(images).save(folder / "model.keras")
    Decision("none", (0.0,) * len(CLASSES), 0.0, 0.3, 0.85,
             with_metadata=neutral_metadata_rule(folder, -3.0, mel_threshold=1.0)).save(folder / "decision.json")
    return folder, prediction.load(folder / "model.keras")


@pytest.fixture(scope="module")
def client(served):
    from starlette.testclient import TestClient

    _, predictor = served
    with TestClient(web.create_app(predictor, max_upload_bytes=LIMIT)) as test_client:
        yield test_client


LESION = jpeg_bytes(image_pixels("lesion", (120, 90)))


def upload(client, data: bytes, name: str = "lesion.jpg", field: str = web.FIELD, fields: dict | None = None):
    return client.post("/api/predict", files={field: (name, data, "application/octet-stream")}, data=fields)


def test_the_page_is_self_contained_and_carries_the_notice(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "not a medical device" in page and "{{" not in page
    assert "http://" not in page and "https://" not in page, "nothing may come from elsewhere (no CDN)"
    assert '<input type="file"' in page and f'name="{web.FIELD}"' in page
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy
    assert policy.count("'sha256-") == 2, "exactly the page's own script and style may run"
    assert '<input type="number" id="age" name="age" min="0" max="120"' in page
    assert '<select id="sex" name="sex"><option value="">not known</option><option value="female">female' \
           '</option><option value="male">male</option></select>' in page
    assert page.count("<option value=") == 3 + 1 + len(SITES) and '<option value="lower extremity">' in page
    assert "most probable class" not in page, "only the server's reason may say why"


@pytest.mark.parametrize("fields, flags", [
    ({}, []),
    ({"age": "60", "sex": "female", "localization": "back"}, ["--age", "60", "--sex", "female", "--site", "back"]),
    ({"age": "", "sex": "unknown", "localization": "face"}, ["--site", "face"]),
], ids=["image-alone", "all-three", "some-blank"])
def test_a_good_upload_answers_what_predict_prints_for_the_same_file(client, served, tmp_path, monkeypatch, capsys,
                                                                    fields, flags):
    folder, _ = served
    response = upload(client, LESION, fields=fields)
    assert response.status_code == 200, response.text
    answer = response.json()
    (tmp_path / "lesion.jpg").write_bytes(LESION)
    monkeypatch.chdir(tmp_path)
    assert predict.main(["--json", "--model", str(folder / "model.keras"), *flags, "lesion.jpg"]) == 0
    [printed] = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in answer.items() if k != "gradcam_png"} == printed
    assert answer["image"] == "lesion.jpg" and answer["decision"] in CLASSES
    assert answer["with_metadata"] == bool(flags) and (answer["decision"] == "df") == bool(flags)


def test_the_metadata_fields_reach_the_predictor(served):
    from starlette.testclient import TestClient

    _, predictor = served
    recording = Recording(predictor)
    with TestClient(web.create_app(recording)) as client:
        assert upload(client, LESION).status_code == 200
        answer = upload(client, LESION, fields={"age": " 42.5 ", "sex": "MALE", "localization": "lower_extremity"})
    assert answer.status_code == 200, answer.text
    assert recording.rows == [None, [Metadata(42.5, "male", "lower extremity")]]
    assert answer.json()["metadata"] == {"age": 42.5, "sex": "male", "localization": "lower extremity"}


@pytest.mark.parametrize(("fields", "words"), [
    ({"age": "-3"}, "age '-3': not a number of years from 0 to 120"),
    ({"age": "old"}, "age 'old': not a number of years from 0 to 120"),
    ({"sex": "x"}, "sex 'x': not one of female, male (or leave it out)"),
    ({"localization": "moon"}, "localization 'moon': not one of abdomen, acral, back, chest,"),
], ids=["age-negative", "age-text", "sex", "site"])
def test_a_bad_metadata_field_is_a_400_naming_it_and_the_server_keeps_serving(client, fields, words):
    response = upload(client, LESION, fields={"sex": "female", **fields})
    assert response.status_code == 400 and set(response.json()) == {"error"}
    assert response.json()["error"].startswith(words), response.json()
    assert upload(client, LESION).status_code == 200


def test_a_metadata_field_sent_as_a_file_is_a_400(client):
    response = client.post("/api/predict", files=[(web.FIELD, ("a.jpg", LESION)), ("age", ("age.txt", b"60"))])
    assert response.status_code == 400 and response.json() == {"error": "Too many files. Maximum number of files is 1."}


def test_the_answer_carries_a_gradcam_overlay_as_a_png_data_url(client):
    answer = upload(client, LESION).json()
    prefix = "data:image/png;base64,"
    assert answer["gradcam_png"].startswith(prefix)
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["gradcam_png"][len(prefix):])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert overlay.size == (web.OVERLAY_SIDE, web.OVERLAY_SIDE * 90 // 120), "the image's own proportions"


def test_an_upload_is_decoded_once_in_memory_and_never_written_to_disk(served, monkeypatch):
    """An upload over Starlette's 1 MB spool size (a noise PNG does not compress) under the real
    10 MB cap: no temporary file is made, and the Grad-CAM overlay reuses the decoded image."""
    from starlette.testclient import TestClient

    _, predictor = served
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 600, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    assert 1024 * 1024 < len(data) < web.MAX_UPLOAD_BYTES

    def no_disk(*args, **kwargs):
        raise AssertionError("the upload went to a file on disk")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    decoded, decode = [], prediction.open_rgb
    monkeypatch.setattr(prediction, "open_rgb", lambda source, **kw: decoded.append(source) or decode(source, **kw))
    with TestClient(web.create_app(predictor)) as client:
        response = upload(client, data, "noise.png")
    assert response.status_code == 200, response.text
    assert decoded == [data], "decoded once, from the bytes in memory"
    assert response.json()["gradcam_png"].startswith("data:image/png;base64,")


def tiff_bytes() -> bytes:
    buffer = io.BytesIO()
    image_pixels("lesion", (120, 90)).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"", 422, "lesion.jpg: empty file (0 bytes)"),
    (b"just some text, not an image", 422, "lesion.jpg: not an image (unrecognised format)"),
    (LESION[: len(LESION) // 2], 422, "lesion.jpg: corrupt or truncated image"),
    (tiff_bytes(), 422, "lesion.jpg: TIFF images are not accepted (accepted: JPEG, PNG)"),
    (b"\xff" * (LIMIT + 1), 413, f"upload over the limit of {LIMIT:,} bytes"),
    (b"\xff" * (LIMIT + web.FORM_OVERHEAD + 1), 413, f"upload over the limit of {LIMIT:,} bytes"),
], ids=["empty", "not-an-image", "truncated", "tiff", "just-over-the-cap", "over-the-body-cap"])
def test_a_bad_upload_gets_a_4xx_json_error_and_the_server_keeps_serving(client, data, status, words):
    response = upload(client, data)
    assert response.status_code == status
    assert response.json()["error"].startswith(words), response.json()
    assert set(response.json()) == {"error"}
    assert upload(client, LESION).status_code == 200


def test_the_cap_is_counted_while_reading_when_no_length_is_sent(client):
    """A chunked body has no Content-Length to check first: the bytes are counted as they come."""
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{web.FIELD}"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(2 * (LIMIT + web.FORM_OVERHEAD) // 4096):
            yield b"\xff" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/api/predict", content=body(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    assert upload(client, LESION).status_code == 200


def test_a_request_without_the_image_field_is_a_400(client):
    for response in (upload(client, LESION, field="file"),
                     client.post("/api/predict", data={web.FIELD: "lesion.jpg"}),
                     client.post("/api/predict", content=b"raw bytes", headers={"content-type": "image/jpeg"}),
                     client.post("/api/predict")):
        assert response.status_code == 400
        assert f"no file in the multipart field `{web.FIELD}`" in response.json()["error"]
    two = client.post("/api/predict", files=[(web.FIELD, ("a.jpg", LESION)), (web.FIELD, ("b.jpg", LESION))])
    assert two.status_code == 400 and "files" in two.json()["error"].lower()
    wrong_method = client.get("/api/predict")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_a_server_on_loopback_answers_only_to_loopback_host_names(served):
    """A web page elsewhere cannot reach it through a name it resolves to 127.0.0.1 (DNS rebinding)."""
    from starlette.testclient import TestClient

    _, predictor = served
    app = web.create_app(predictor, allowed_hosts=["localhost", "127.0.0.1"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/").status_code == 200
    assert TestClient(app, base_url="http://attacker.example:8000").get("/").status_code == 400


def test_the_default_cap_is_10_mb():
    assert web.MAX_UPLOAD_BYTES == 10 * 1024 * 1024


def test_help_answers_without_importing_tensorflow_or_the_server():
    printed, imported = help_in_fresh_python("serve", ("tensorflow", "keras", "uvicorn", "starlette"))
    assert imported == []
    assert "usage: python -m stages.serve" in printed and "127.0.0.1" in printed
    assert "not a medical device" in " ".join(printed.split())


def test_a_broken_model_or_a_taken_port_is_a_one_line_usage_error(served, tmp_path, capsys):
    folder, _ = served
    (tmp_path / "model.keras").write_bytes(b"not a model")
    assert serve.main(["--model", str(tmp_path / "model.keras")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a Keras model file" in err and "dvc repro train" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--model", str(folder / "model.keras"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_host_port_and_decision_options_reach_the_server(served, tmp_path, monkeypatch, capsys):
    """main() up to the point where uvicorn would serve: the address it listens on, the warning
    off loopback, and --decision read (a broken one refused before listening)."""
    import uvicorn

    folder, _ = served
    listened = []

    def fake_run(server, sockets):
        listened.append(sockets[0].getsockname()[:2])
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    model = ["--model", str(folder / "model.keras"), "--port", "0"]
    assert serve.main(model) == 0
    out, err = capsys.readouterr()
    assert listened[-1][0] == "127.0.0.1" and out.startswith(f"serving on http://127.0.0.1:{listened[-1][1]}/")
    assert "warning" not in err
    assert serve.main([*model, "--host", "0.0.0.0", "--decision", str(folder / "decision.json")]) == 0
    assert listened[-1][0] == "0.0.0.0"
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine" in capsys.readouterr().err
    (tmp_path / "decision.json").write_text("[]")
    assert serve.main([*model, "--decision", str(tmp_path / "decision.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "decision must be a mapping" in err and len(listened) == 2


# ----------------------------------------------------------------------------------------------
# A real browser on the real command.
# ----------------------------------------------------------------------------------------------
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1100,1000")


def chromium() -> tuple[str, str] | None:
    """(browser, driver) from $CHROMIUM and $CHROMEDRIVER, else the first on PATH (as .ci/run looks)."""
    browser = os.environ.get("CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or shutil.which(
        "chromedriver", path=os.environ.get("CHROMEWEBDRIVER", os.defpath))
    return (browser, driver) if browser and driver else None


NO_CHROMIUM = ("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
               ".ci/run installs them)")


@pytest.fixture
def server(served):
    """`python -m stages.serve --port 0` as a user starts it; its URL from its first line."""
    folder, _ = served
    process = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", "0", "--model",
                                str(folder / "model.keras")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith("serving on http://127.0.0.1:"), first + process.stderr.read()
        yield first.split()[2]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def browser_paths() -> tuple[str, str]:
    """Chromium's paths; skips without it, except under CI (CI set), where .ci/run installs it."""
    found = chromium()
    if found is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(NO_CHROMIUM)
    return found


def read_answer(driver) -> dict:
    """What the page shows of its answer, checked: the explanation says "most probable" only when
    the decision is the first class listed; the decided class is listed; each listed class shows a
    probability and a weighted score, and the decided class's weighted score or the melanoma
    threshold is the figure the explanation names."""
    from selenium.webdriver.common.by import By

    decision = driver.find_element(By.ID, "decision").text
    decided = decision.rsplit("(", 1)[-1].rstrip(")")
    assert decided in CLASSES, decision
    why = driver.find_element(By.ID, "decision-why").text
    rows = [tuple(row.find_element(By.CSS_SELECTOR, css).text for css in (".code", ".pct", ".weighted"))
            + (row.get_attribute("class"),) for row in driver.find_elements(By.CSS_SELECTOR, "#top li")]
    rows = [(code.strip("()"), *rest) for code, *rest in rows]
    assert len(rows) in (3, 4) and all(p.endswith("%") and w.endswith("%") for _, p, w, _ in rows), rows
    assert [dx for dx, *_, kind in rows if kind == "decided"] == [decided], rows
    assert why.lower().startswith(decision.rsplit(" (", 1)[0].lower()), (why, decision)
    assert ("most probable" in why) == (decided == rows[0][0]), (why, rows)
    weighted = next(w for dx, _, w, _ in rows if dx == decided)
    assert f"weighted score ({weighted})" in why or f"weighted score {weighted} is at or above" in why, (why, rows)
    assert driver.find_element(By.ID, "weighting").text.startswith("Weighted score: ")
    return {"decided": decided, "first": rows[0][0], "why": why, "listed": len(rows),
            "metadata": driver.find_element(By.ID, "metadata-used").text}


def test_a_person_picks_an_image_in_chromium_and_reads_the_answer(browser_paths, server, tmp_path):
    """With the patient's details (the served rule's metadata path decides dermatofibroma), then
    without them (the image alone), then a bad age: each explanation true of the page's figures."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser, driver_path = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    lesion = tmp_path / "<img src=x onerror=alert(1)>lesion.jpg"  # a name is shown as text, never as HTML
    lesion.write_bytes(LESION)
    (tmp_path / "notes.png").write_text("not an image")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))

    def pick(path):
        driver.execute_script("document.getElementById('result').hidden = true;")
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                         or d.find_elements(By.CSS_SELECTOR, "#status .error"))

    try:
        driver.get(server)
        assert "not a medical device" in driver.find_element(By.ID, "notice").text
        pick(tmp_path / "notes.png")
        assert "notes.png: not an image" in driver.find_element(By.ID, "status").text

        driver.find_element(By.ID, "age").send_keys("60")
        Select(driver.find_element(By.ID, "sex")).select_by_visible_text("female")
        Select(driver.find_element(By.ID, "localization")).select_by_visible_text("lower extremity")
        pick(lesion)
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(
            "return document.getElementById('gradcam').complete && document.getElementById('gradcam').naturalWidth"))
        told = read_answer(driver)
        assert told["metadata"] == "Patient details used: age 60, sex female, body site lower extremity."
        assert told["decided"] == "df" and told["first"] != "df", "the case where the page once said otherwise"
        caption = driver.find_element(By.ID, "original-caption")
        assert caption.text == lesion.name and not caption.find_elements(By.CSS_SELECTOR, "*")
        assert driver.find_element(By.ID, "gradcam").get_attribute("src").startswith("data:image/png;base64,")
        driver.save_screenshot(str(tmp_path / "result.png"))

        driver.find_element(By.ID, "age").clear()
        for field in ("sex", "localization"):
            Select(driver.find_element(By.ID, field)).select_by_value("")
        pick(lesion)
        alone = read_answer(driver)
        assert alone["metadata"] == "Decided from the image alone (no patient details used)."
        assert alone["decided"] == (alone["first"] if "threshold" not in alone["why"] else "mel"), alone

        driver.find_element(By.ID, "age").send_keys("-3")
        pick(lesion)
        assert "age '-3': not a number of years" in driver.find_element(By.ID, "status").text
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
                  and "api/predict" not in entry["message"]]  # the refused uploads' 4xx are expected
        assert not errors, errors
    finally:
        driver.quit()
