"""A local HTTP server for tests: serves files from a dict or a folder, with faults on demand.

    with FileServer({"a.zip": data}) as server:
        server.fail("a.zip", 500, times=2)       # two 500s, then the file
        server.drop("a.zip", after_bytes=1000)   # cut the connection once, mid-body
        server.serve_html("a.zip")               # an error page with status 200
        fetch(server.url + "a.zip")
        assert server.count("a.zip") == 4

Only 127.0.0.1, a free port chosen by the OS, one thread per request. Range requests
(`bytes=N-` and `bytes=N-M`) get a 206 unless `ranges=False`, which imitates
`python -m http.server` (Range ignored, 200 with the whole body). A key may carry a query
(`"api/x?format=original"`): it is matched before the bare path.
"""
from __future__ import annotations

import mimetypes
import re
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HTML_PAGE = b"<!DOCTYPE html><html><body><h1>Please sign in</h1></body></html>"


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it."""

    path: str  # without the leading slash or the query
    query: str
    range: str | None
    user_agent: str | None
    status: int


@dataclass
class Faults:
    """What goes wrong for one path; each fault is used up by the requests it affects."""

    status: int | None = None
    status_times: int | None = 0  # None: forever
    drop_after: int | None = None  # send this many body bytes, then close (once)
    html: bool = False


class FileServer:
    def __init__(self, files: Mapping[str, bytes] | Path, ranges: bool = True):
        self.files = files if isinstance(files, Mapping) else None
        self.root = None if isinstance(files, Mapping) else Path(files).resolve()
        self.ranges = ranges
        self.requests: list[Seen] = []
        self._faults: dict[str, Faults] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        """Base URL, ending in a slash."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # ---- faults ------------------------------------------------------------------------------
    def fail(self, path: str, status: int, times: int | None = 1) -> None:
        """Answer `status` to the next `times` requests of `path` (None: to all of them)."""
        fault = self._fault(path)
        fault.status, fault.status_times = status, times

    def drop(self, path: str, after_bytes: int) -> None:
        """Close the connection after `after_bytes` of the body, once."""
        self._fault(path).drop_after = after_bytes

    def serve_html(self, path: str) -> None:
        """Answer an HTML page with status 200 instead of the file, every time."""
        self._fault(path).html = True

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    def _fault(self, path: str) -> Faults:
        return self._faults.setdefault(path, Faults())

    # ---- used by the handler -----------------------------------------------------------------
    def lookup(self, path: str, query: str) -> bytes | None:
        if self.files is not None:
            with_query = f"{path}?{query}" if query else path
            return self.files.get(with_query, self.files.get(path))
        target = (self.root / path).resolve()
        if self.root not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def take_faults(self, path: str) -> Faults:
        """The faults for this request, using up the one-shot ones."""
        with self._lock:
            f = self._faults.get(path, Faults())
            now = Faults(html=f.html)
            if f.status is not None and (f.status_times is None or f.status_times > 0):
                now.status = f.status
                if f.status_times is not None:
                    f.status_times -= 1
            elif f.drop_after is not None:
                now.drop_after, f.drop_after = f.drop_after, None
            return now

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)


class _Handler(BaseHTTPRequestHandler):
    server_version = "FileServer/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        app: FileServer = self.server.app  # type: ignore[attr-defined]
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path).lstrip("/")
        faults = app.take_faults(path)
        status, headers, payload = self._answer(app, faults, path, app.lookup(path, split.query))
        app.record(Seen(path, split.query, self.headers.get("Range"), self.headers.get("User-Agent"), status))
        self._send(status, headers, payload, faults.drop_after if status in (200, 206) else None)

    def _answer(self, app: FileServer, faults: Faults, path: str,
                body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for this request, faults first."""
        if faults.html:
            return 200, {"Content-Type": "text/html; charset=utf-8"}, HTML_PAGE
        if faults.status is not None:
            return faults.status, {"Content-Type": "text/plain"}, f"error {faults.status}\n".encode()
        if body is None:
            return 404, {"Content-Type": "text/plain"}, b"not found\n"
        headers = {"Content-Type": _content_type(path)}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if not (app.ranges and match):
            return 200, headers, body
        start = int(match.group(1))
        end = min(int(match.group(2) or len(body) - 1), len(body) - 1)
        if start >= len(body):
            return 416, {"Content-Range": f"bytes */{len(body)}"}, b""
        return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{len(body)}"}, body[start:end + 1]

    def _send(self, status: int, headers: dict[str, str], payload: bytes, drop_after: int | None) -> None:
        """Send the answer; with `drop_after`, promise the whole body but cut the connection early."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if drop_after is None:
            self.wfile.write(payload)
            return
        self.wfile.write(payload[:drop_after])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


def _content_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"
