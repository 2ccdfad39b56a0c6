"""A real HTTP server on a loopback address, in threads, serving images and the hostile answers a remote
image fetch must survive; and the images themselves (real encoders, and a PNG whose header lies)."""

from __future__ import annotations

import base64
import io
import ssl
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

BIG_BYTES = 50 * 1024 * 1024


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    return encoded(Image.new("RGB", (width, height), color))


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def lying_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A real 1 x 1 PNG whose header (IHDR) claims ``width`` x ``height`` pixels, its checksum fixed up."""
    real = png(1, 1)
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    header = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return real[:8] + header + real[8 + len(header) :]


class _Handler(BaseHTTPRequestHandler):
    server: _ImageServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        with self.server.lock:
            self.server.active += 1
        try:
            super().handle()
        finally:
            with self.server.lock:
                self.server.active -= 1

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        self.server.requests.append(parts.path)
        route = parts.path.strip("/")
        if route == "image.png":
            self._send(200, png(), "image/png")
        elif route == "redirect":
            self.send_response(int(query.get("status", "302")))
            self.send_header("Location", query["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "text":
            self._send(200, b"this is not an image", "text/plain")
        elif route == "missing":
            self._send(404, b"not found", "text/plain")
        elif route == "gzip":
            self._send(200, zlib.compress(png()), "image/png", {"Content-Encoding": "deflate"})
        elif route == "big":
            self._stream(BIG_BYTES, declared=query.get("declared") != "no")
        elif route == "drip":
            self._drip()
        else:
            self._send(404, b"", "text/plain")

    def _send(self, status: int, body: bytes, media_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, size: int, *, declared: bool) -> None:
        """``size`` bytes: a PNG signature then zeros, written until the client stops reading."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if declared:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        self.close_connection = True
        piece = bytes(64 * 1024)
        sent = 0
        try:
            self.wfile.write(b"\x89PNG\r\n\x1a\n")
            while sent < size and not self.server.stopping.is_set():
                self.wfile.write(piece)
                sent += len(piece)
                self.server.bytes_sent += len(piece)
        except OSError:
            return  # the client closed: what a byte limit should make it do

    def _drip(self) -> None:
        """A body that never ends: a byte every 50 ms until the client goes away (or the server stops)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.close_connection = True
        try:
            while not self.server.stopping.wait(0.05):
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:
            return


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close joins every handler thread: nothing outlives the test
    block_on_close = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self.bytes_sent = 0
        self.active = 0  # connections being handled now
        self.lock = threading.Lock()


@dataclass
class ImageServer:
    url: str  # http://host:port
    server: _ImageServer

    @property
    def requests(self) -> list[str]:
        return self.server.requests

    @property
    def bytes_sent(self) -> int:
        return self.server.bytes_sent

    @property
    def active(self) -> int:
        return self.server.active


@contextmanager
def image_server(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> Iterator[ImageServer]:
    """The server on ``host`` (port 0; HTTPS with ``ssl_context``) until the block ends; then stopped, its
    threads all joined."""
    server = _ImageServer(host)
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name=f"image-server-{host}", daemon=True)
    thread.start()
    try:
        scheme = "https" if ssl_context is not None else "http"
        yield ImageServer(f"{scheme}://{host}:{server.server_address[1]}", server)
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the image server's thread did not end"
