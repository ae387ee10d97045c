"""The web app that `serve` runs: one page, and an upload API answering as `predict --json`.

`create_app(predictor)` is a Starlette app. GET / is stages/serve.html with the notice, class
names and upload cap filled in, under a Content-Security-Policy that lets only its own inline
script and style run. POST /api/predict takes one image (multipart field `image`) and optional
patient metadata (text fields `age`, `sex`, `localization`, checked by metadata.parse), decodes
the image once in memory (stages/lib/prediction.py; nothing is written to disk) and answers
predict's JSON for it plus `gradcam_png`, a data URL of the Grad-CAM overlay of the same image.
Invariant: a bad upload (no field, empty, not JPEG/PNG, over the cap, counted while reading) or a
bad metadata value gets a 4xx {"error": ...} and the app keeps serving; one prediction at a time.
Cases and tests: docs/faults.md ("predict and serve").
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib import metadata, prediction
from stages.lib.dataset import CLASS_NAMES, LABELS
from stages.lib.inference import Predictor
from stages.lib.metadata import Metadata
from stages.lib.prediction import FORMATS, NOTICE, Decoded

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # one image file; HAM10000's JPEGs are ~0.25 MB
FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries around the file, allowed on top of the cap
FIELD = "image"  # the multipart field holding the upload
OVERLAY_SIDE = 320  # pixels along the Grad-CAM overlay's longer side
PAGE_FILE = Path(__file__).resolve().parents[1] / "serve.html"  # beside the command


class TooLarge(Exception):
    """The request body passed the upload cap while it was being read."""


def page(max_upload_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """The one HTML page: serve.html with the notice, class names, upload cap and the metadata
    fields' choices filled in."""
    text = PAGE_FILE.read_text(encoding="utf-8")
    fills = {"NOTICE": html.escape(NOTICE), "CLASS_NAMES_JSON": json.dumps(CLASS_NAMES),
             "MAX_MB": f"{max_upload_bytes / 1024 / 1024:g}", "FORMATS": " or ".join(FORMATS),
             "FIELD": FIELD, "AGE_LIMIT": str(metadata.AGE_LIMIT),
             "SEX_OPTIONS": options(metadata.SEXES), "SITE_OPTIONS": options(metadata.SITES)}
    for key, value in fills.items():
        text = text.replace(f"{{{{{key}}}}}", value)
    return text


def options(values: Sequence[str]) -> str:
    """<option> elements for a select: a blank one (not known), then `values`."""
    return '<option value="">not known</option>' + "".join(
        f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)


def form_metadata(form) -> Metadata:
    """The patient metadata in a parsed form's text fields `age`, `sex`, `localization` (each
    optional; the form holds one file, the image), or a ValueError naming the field and what it
    accepts."""
    return metadata.parse(**{field: form.get(field) for field in metadata.FIELDS})


def inline_hashes(text: str, tag: str) -> str:
    """CSP sources allowing exactly the page's inline <tag> blocks (their SHA-256), nothing else."""
    hashes, start = [], 0
    while (start := text.find(f"<{tag}>", start)) != -1:
        end = text.index(f"</{tag}>", start)
        body = text[start + len(tag) + 2:end]
        hashes.append("'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'")
        start = end
    return " ".join(hashes)


def security_headers(text: str) -> dict[str, str]:
    """The page may run its own script and style, show data:/blob: images and call this server only."""
    policy = (f"default-src 'none'; script-src {inline_hashes(text, 'script')}; "
              f"style-src {inline_hashes(text, 'style')}; img-src 'self' data: blob:; connect-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def png_data_url(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gradcam_png(predictor: Predictor, image: Decoded, answer: dict[str, Any]) -> str | None:
    """The Grad-CAM overlay of the decided class (the most probable one when the decision is
    "unknown") on the image as the model saw it, in the image's own proportions, OVERLAY_SIDE
    pixels along its longer side; None if the model lacks Grad-CAM's layer."""
    from stages.lib.gradcam import overlay  # pandas and TensorFlow: not needed for --help

    dx = answer["decision"] if answer.get("decision") in LABELS else answer["top"][0]["dx"]
    scale = OVERLAY_SIDE / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = overlay(predictor.model, image.pixels, LABELS[dx], size)
    return None if shown is None else png_data_url(shown)


def describe_upload(predictor: Predictor, data: bytes, filename: str, given: Metadata | None = None
                    ) -> dict[str, Any]:
    """predict's answer for one uploaded file (its "image" is the upload's name) with the patient
    metadata `given`, and "gradcam_png" drawn from the same decoded image when it was predicted."""
    answer, image = prediction.describe_bytes(predictor, data, filename, given)
    if image is not None:
        answer["gradcam_png"] = gradcam_png(predictor, image, answer)
    return answer


def create_app(predictor: Predictor, max_upload_bytes: int = MAX_UPLOAD_BYTES, allowed_hosts: Sequence[str] = ("*",)):
    """The Starlette app: GET / (the page) and POST /api/predict; every error answers JSON {"error"}.
    `predictor` as prediction.load gives it."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    text = page(max_upload_bytes)
    headers = security_headers(text)
    limit = max_upload_bytes + FORM_OVERHEAD
    model_lock = threading.Lock()  # one prediction at a time: the model is shared

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    too_large = f"upload over the limit of {max_upload_bytes:,} bytes ({max_upload_bytes / 1024 / 1024:g} MB)"
    no_file = f"no file in the multipart field `{FIELD}` (send the image as multipart/form-data, field `{FIELD}`)"

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(text, headers=headers)

    async def predict_upload(request: Request) -> JSONResponse:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return error(413, too_large)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return error(400, no_file)

        async def capped_body():  # counts the body as it arrives: a missing or false length cannot pass
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise TooLarge
                yield chunk

        parser = MultiPartParser(request.headers, capped_body(), max_files=1, max_fields=8)
        parser.spool_max_size = limit  # the whole upload stays in memory: never a temporary file on disk
        try:
            form = await parser.parse()
        except TooLarge:
            return error(413, too_large)
        except MultiPartException as err:
            return error(400, err.message)
        try:
            upload = form.get(FIELD)
            if upload is None or isinstance(upload, str):
                return error(400, no_file)
            if upload.size is not None and upload.size > max_upload_bytes:
                return error(413, too_large)
            given = form_metadata(form)
            data = await upload.read()
            filename = upload.filename or "upload"
        except ValueError as err:
            return error(400, str(err))
        finally:
            await form.close()

        def describe() -> dict[str, Any]:
            with model_lock:
                return describe_upload(predictor, data, filename, given)

        result = await run_in_threadpool(describe)
        if "error" in result:
            return error(422, f"{result['image']}: {result['error']}")
        return JSONResponse(result)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    return Starlette(routes=[Route("/", index), Route("/api/predict", predict_upload, methods=["POST"])],
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))],
                     exception_handlers={HTTPException: http_error})


