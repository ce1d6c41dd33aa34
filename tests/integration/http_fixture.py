"""A loopback HTTP server for download tests: images, errors, a slow endpoint, a bomb.

`ImageServer` serves what `routes` maps a path to, on 127.0.0.1 and a free port, from a thread;
nothing leaves the machine. Route kinds:

- `bytes` (body, content type): a 200 response;
- `status` (code): an empty error response (404, 500, ...);
- `slow` (seconds): waits up to that long before answering (bounded, and cut short at shutdown),
  for client timeouts.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_SLOW_SECONDS = 5.0


def jpeg_bytes(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    """A small JPEG made with Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(width: int, height: int, color: tuple[int, int, int, int]) -> bytes:
    """A small RGBA PNG made with Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit grayscale PNG of `width` x `height` zero pixels (a few tens of KB).

    Decoded by OpenCV it is `width * height` bytes (400 MB at the default size).
    """
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A PNG whose header is fine but whose pixel data is garbage."""
    ihdr = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"garbage" * 20)
        + _chunk(b"IEND", b"")
    )


@dataclass
class ImageServer:
    """Serves `routes` on http://127.0.0.1:<port>; use as a context manager."""

    routes: dict[str, tuple[str, Any]]
    hits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with server._lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                kind, arg = server.routes.get(self.path, ("status", 404))
                try:
                    if kind == "slow":
                        server._stop.wait(min(float(arg), MAX_SLOW_SECONDS))
                        kind, arg = "bytes", (b"late", "text/plain")
                    if kind == "status":
                        self.send_response(int(arg))
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body, ctype = arg
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@dataclass
class FileServer:
    """Serves the files under `root` on http://127.0.0.1:<port> like a static file host.

    GET and HEAD, with `Content-Length`, `ETag` and `Accept-Ranges: bytes`; a `Range:
    bytes=START-[END]` request gets a 206 (or 416 past the end). The first GET of each path in
    `cut_first` (URL paths, `/crawl-data/...`) sends the full `Content-Length` header, then
    half of the body, and closes the connection: a transfer cut mid-body. Later GETs are whole.
    The first GET of a path in `fail_first` gets that error status instead (503: overloaded).
    `gets` counts the GETs per path; `cuts` the transfers cut or failed.
    """

    root: str
    cut_first: set[str] = field(default_factory=set)
    fail_first: dict[str, int] = field(default_factory=dict)
    gets: dict[str, int] = field(default_factory=dict)
    cuts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import hashlib
        import os
        import socket
        from urllib.parse import unquote, urlsplit

        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _file(self) -> tuple[str, bytes | None]:
                path = unquote(urlsplit(self.path).path)
                local = os.path.realpath(os.path.join(server.root, path.lstrip("/")))
                inside = local.startswith(os.path.realpath(server.root) + os.sep)
                if not inside or not os.path.isfile(local):
                    return path, None
                with open(local, "rb") as f:
                    return path, f.read()

            def _head(self, status: int, length: int, body: bytes, extra: dict) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()

            def _not_found(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                _, body = self._file()
                if body is None:
                    return self._not_found()
                self._head(200, len(body), body, {})

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path, body = self._file()
                if body is None:
                    return self._not_found()
                with server._lock:
                    server.gets[path] = server.gets.get(path, 0) + 1
                    first = path not in server.cuts
                    cut = path in server.cut_first and first
                    fail = server.fail_first.get(path) if first else None
                    if cut or fail:
                        server.cuts[path] = 1
                if fail:
                    self.send_response(fail)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rng = self.headers.get("Range")
                try:
                    if rng and rng.startswith("bytes=") and not cut:
                        lo_s, _, hi_s = rng[6:].partition("-")
                        lo = int(lo_s)
                        hi = min(int(hi_s), len(body) - 1) if hi_s else len(body) - 1
                        if lo >= len(body):
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{len(body)}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        part = body[lo : hi + 1]
                        extra = {"Content-Range": f"bytes {lo}-{hi}/{len(body)}"}
                        self._head(206, len(part), body, extra)
                        self.wfile.write(part)
                        return
                    self._head(200, len(body), body, {})
                    if cut:
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
