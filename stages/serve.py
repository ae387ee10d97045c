"""Command `serve`: a local web page where a person drops a lesion image and sees predict's answer.

    python -m stages.serve [--host 127.0.0.1] [--port 8000] [--model models/model.keras] [--decision FILE]

A front end: it loads the model and its decision rule once, before listening
(stages/lib/prediction.py), and runs the app of stages/lib/web.py: GET / is one self-contained
page, POST /api/predict takes one image (multipart field `image`) and answers what `predict
--json` prints for it, plus a Grad-CAM overlay. An upload is decoded once, in memory, and never
written to disk; a bad one gets a 4xx {"error": ...} and the server keeps serving.
Binds to loopback unless --host says otherwise (then with a warning). Why: an answer for people
who do not use a terminal, without sending images anywhere. Cases and tests: docs/faults.md.
Exit status: 0 stopped (Ctrl-C), 2 usage error (bad model or decision file, address in use).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.lib import prediction
from stages.lib.cli import command_parser
from stages.lib.prediction import NOTICE, UsageError
from stages.lib.web import create_app

EXIT_STATUS = "exit status: 0 stopped (Ctrl-C); 2 usage error (bad model or decision file, address in use)"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a UsageError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err} "
                         "(choose another with --port, or --host)") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def parse_args(argv: Sequence[str] | None):
    parser = command_parser(
        main, exit_status=EXIT_STATUS,
        description="Serve a local web page that shows the HAM10000 classes, the decision, the calibrated "
                    "probabilities and a Grad-CAM overlay for an image a person picks. " + NOTICE)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this computer only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--model", type=Path, default=prediction.DEFAULT_MODEL,
                        help=f"Keras model (default: {prediction.DEFAULT_MODEL})")
    parser.add_argument("--decision", type=Path, default=None,
                        help="decision rule chosen on validation by evaluate (default: decision.json beside the model)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        predictor = prediction.load(args.model, args.decision)
        sock = listen(args.host, args.port)
    except UsageError as err:
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
    app = create_app(predictor, allowed_hosts=allowed)
    print(f"serving on http://{shown}:{port}/ (Ctrl-C to stop)\n{NOTICE}", flush=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # log_config=None: uvicorn's own dictConfig would close every handler already there
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
