"""Raw HTTP/1.1 clients for tests that need what httpx hides: a tiny receive buffer, reading on a schedule,
telling a complete chunked body from a cut one."""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

CHAT = "/v1/chat/completions"


async def raw_connection(
    url: str, rcvbuf: int | None = None, tls: ssl.SSLContext | None = None, alpn: str = "http/1.1"
) -> trio.abc.Stream:
    """A raw connection (a tiny receive buffer if asked; TLS with ``alpn`` if given a context)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    await sock.connect((parts.hostname, parts.port))
    if tls is None:
        return trio.SocketStream(sock)
    tls.set_alpn_protocols([alpn])
    stream = trio.SSLStream(trio.SocketStream(sock), tls, server_hostname=parts.hostname)
    await stream.do_handshake()
    return stream


async def raw_stream_request(
    url: str, body: dict[str, Any], rcvbuf: int | None = None, tls: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    """An HTTP/1.1 streaming request on a raw connection; nothing read yet."""
    stream = await raw_connection(url, rcvbuf, tls)
    data = json.dumps(body).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    await stream.send_all(head.encode() + data)
    return stream


class BodyReader:
    """Reads an HTTP/1.1 response through h11: ``complete`` once its terminating chunk has arrived."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = h11.Connection(h11.CLIENT)
        self.parser.send(h11.Request(method="POST", target=CHAT, headers=[("Host", "x"), ("Content-Length", "0")]))
        self.parser.send(h11.EndOfMessage())
        self.body = b""
        self.complete = False
        self.reset = False

    async def read(self, max_bytes: int) -> bool:
        """Reads up to ``max_bytes``; False once the connection has ended (EOF or reset)."""
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self.reset = True
            return False
        try:
            self.parser.receive_data(data)
            while True:
                event = self.parser.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Data):
                    self.body += event.data
                if isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    break
        except h11.RemoteProtocolError:  # closed mid-body: h11 tells it from a complete one
            return False
        return bool(data)

    @property
    def events(self) -> list[bytes]:
        return [event.removeprefix(b"data: ") for event in self.body.split(b"\n\n") if event.startswith(b"data: ")]
