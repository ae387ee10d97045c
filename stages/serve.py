"""Command `serve`: a local web page where a person drops a lesion image and sees predict's answer.

    python -m stages.serve [--host 127.0.0.1] [--port 8000] [--model models/model.keras] [--decision FILE]

GET / is one self-contained page (inline CSS and JS, nothing fetched from elsewhere); POST
/api/predict takes one image (multipart field `image`) and answers what `predict --json` prints
for it (`predict.predict_files`, the same code), plus `gradcam_png`: a data URL of the Grad-CAM
overlay (stages/lib/gradcam.py) for the decided class. Invariant: a bad upload (no field, empty,
not JPEG/PNG, over the size cap, counted while reading) gets a 4xx {"error": ...} and the server
keeps serving; the model is loaded once, before listening; uploads are never stored.
Binds to loopback unless --host says otherwise (then with a warning). Why: an answer for people
who do not use a terminal, without sending images anywhere. Cases and tests: docs/faults.md.
Exit status: 0 stopped (Ctrl-C), 2 usage error (bad model or decision file, address in use).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import ipaddress
import json
import logging
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages import predict
from stages.lib.cli import command_parser
from stages.lib.dataset import CLASS_NAMES, LABELS
from stages.lib.images import open_rgb, resize_square
from stages.lib.inference import Predictor

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # one image file; HAM10000's JPEGs are ~0.25 MB
FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries around the file, allowed on top of the cap
FIELD = "image"  # the multipart field holding the upload
OVERLAY_SIDE = 320  # pixels along the Grad-CAM overlay's longer side
EXIT_STATUS = "exit status: 0 stopped (Ctrl-C); 2 usage error (bad model or decision file, address in use)"
PAGE_FILE = Path(__file__).with_name("serve.html")


class TooLarge(Exception):
    """The request body passed the upload cap while it was being read."""


def page(max_upload_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """The one HTML page: serve.html with the notice, class names and upload cap filled in."""
    text = PAGE_FILE.read_text(encoding="utf-8")
    fills = {"NOTICE": html.escape(predict.NOTICE), "CLASS_NAMES_JSON": json.dumps(CLASS_NAMES),
             "MAX_MB": f"{max_upload_bytes / 1024 / 1024:g}", "FORMATS": " or ".join(predict.FORMATS),
             "FIELD": FIELD}
    for key, value in fills.items():
        text = text.replace(f"{{{{{key}}}}}", value)
    return text


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


def gradcam_png(model, path: Path, result: dict[str, Any]) -> str | None:
    """The Grad-CAM overlay of the decided class (the most probable one when the decision is
    "unknown"), in the image's own proportions, OVERLAY_SIDE pixels along its longer side; None if
    the model lacks Grad-CAM's layer."""
    from PIL import Image

    from stages.lib.gradcam import gradcam, heat_overlay

    img = open_rgb(path, formats=predict.FORMATS)
    pixels = resize_square(img, predict.input_size(model))  # as predict_files decoded it
    dx = result["decision"] if result.get("decision") in LABELS else result["top"][0]["dx"]
    try:
        heat = gradcam(model, pixels[None], np.array([LABELS[dx]]))[0]
    except ValueError:  # no layer named gradcam.GRADCAM_LAYER: another architecture
        return None
    scale = OVERLAY_SIDE / max(img.size)
    shown = Image.fromarray(heat_overlay(pixels, heat)).resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    return png_data_url(np.asarray(shown))


def describe_upload(predictor, data: bytes, filename: str) -> dict[str, Any]:
    """predict's result for one uploaded file (its "image" is the upload's name), with "gradcam_png"
    when it could be predicted. The bytes live in a temporary folder only while they are read."""
    with tempfile.TemporaryDirectory(prefix="serve-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        [result] = predict.describe_files(predictor, [str(path)])
        result["image"] = predict.display_name(filename)
        if "error" not in result:
            result["gradcam_png"] = gradcam_png(predictor.model, path, result)
    return result


def create_app(model, decision, max_upload_bytes: int = MAX_UPLOAD_BYTES, allowed_hosts: Sequence[str] = ("*",)):
    """The Starlette app: GET / (the page) and POST /api/predict; every error answers JSON {"error"}.
    `model` and `decision` as predict.load_model and load_decision give them."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    predictor = Predictor(model, decision, predict.BATCH_SIZE)  # once: it builds the feature model
    text = page(max_upload_bytes)
    headers = security_headers(text)
    limit = max_upload_bytes + FORM_OVERHEAD
    model_lock = threading.Lock()  # one prediction at a time: the model is shared

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    too_large = f"upload over the limit of {max_upload_bytes:,} bytes ({max_upload_bytes / 1024 / 1024:g} MB)"

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(text, headers=headers)

    async def predict_upload(request: Request) -> JSONResponse:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return error(413, too_large)
        received = 0

        async def capped_receive():  # counts the body as it arrives: a missing or false length cannot pass
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge
            return message

        try:
            async with Request(request.scope, capped_receive).form(max_files=1, max_fields=8) as form:
                upload = form.get(FIELD)
                if upload is None or isinstance(upload, str):
                    return error(400, f"no file in the multipart field `{FIELD}` (send the image as "
                                      f"multipart/form-data, field `{FIELD}`)")
                if upload.size is not None and upload.size > max_upload_bytes:
                    return error(413, too_large)
                data = await upload.read()
                filename = upload.filename or "upload"
        except TooLarge:
            return error(413, too_large)

        def describe() -> dict[str, Any]:
            with model_lock:
                return describe_upload(predictor, data, filename)

        result = await run_in_threadpool(describe)
        if "error" in result:
            return error(422, f"{result['image']}: {result['error']}")
        return JSONResponse(result)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    return Starlette(routes=[Route("/", index), Route("/api/predict", predict_upload, methods=["POST"])],
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))],
                     exception_handlers={HTTPException: http_error})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a UsageError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        raise predict.UsageError(f"cannot listen on {host}:{port}: {err.strerror or err} "
                                 "(choose another with --port, or --host)") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def parse_args(argv: Sequence[str] | None):
    parser = command_parser(
        main, exit_status=EXIT_STATUS,
        description="Serve a local web page that shows the HAM10000 classes, the decision, the calibrated "
                    "probabilities and a Grad-CAM overlay for an image a person picks. " + predict.NOTICE)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this computer only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--model", type=Path, default=predict.DEFAULT_MODEL,
                        help=f"Keras model (default: {predict.DEFAULT_MODEL})")
    parser.add_argument("--decision", type=Path, default=None,
                        help="decision rule chosen on validation by evaluate (default: decision.json beside the model)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        model = predict.load_model(args.model)
        decision = predict.load_decision(args.decision or args.model.parent / "decision.json")
        sock = listen(args.host, args.port)
    except predict.UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    host, port = sock.getsockname()[:2]
    local = is_loopback(sock)
    if not local:
        print(f"warning: listening on {host}: anyone who can reach this machine can upload images",
              file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    allowed = ["localhost", "127.0.0.1", "[::1]", args.host, shown] if local else ["*"]  # no DNS rebinding
    app = create_app(model, decision, allowed_hosts=allowed)
    print(f"serving on http://{shown}:{port}/ (Ctrl-C to stop)\n{predict.NOTICE}", flush=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # log_config=None: uvicorn's own dictConfig would close every handler already there
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
