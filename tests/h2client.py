"""A small HTTP/2 (h2c, prior knowledge) client that can reset a stream and keep the connection open.

httpx/httpcore never send RST_STREAM when a response is abandoned (they only stop reading), so a test of
"the client reset the stream" needs a client that does it for real: the `h2` state machine over a trio socket.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio


@dataclass
class StreamState:
    status: int | None = None
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: bool = False

    def events(self) -> list[str]:
        return [line for line in self.data.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]


class H2Client:
    """One HTTP/2 connection; a background task reads frames and fills in each stream's state."""

    def __init__(self, stream: trio.SocketStream, authority: str, *, read: bool = True) -> None:
        self._socket = stream
        self._authority = authority
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.streams: dict[int, StreamState] = defaultdict(StreamState)
        self._changed = trio.Condition()
        self._send_lock = trio.Lock()
        self.closed = False  # the connection ended (EOF, GOAWAY then close, or our aclose)
        self.reading = read  # False: a slow reader that never acknowledges data (flow control stalls)
        self._unacknowledged: dict[int, int] = defaultdict(int)  # bytes received while not reading

    @classmethod
    async def connect(cls, url: str, nursery: trio.Nursery, *, read: bool = True) -> H2Client:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        socket = await trio.open_tcp_stream(parts.hostname, parts.port)
        client = cls(socket, f"{parts.hostname}:{parts.port}", read=read)
        client._conn.initiate_connection()
        window = (1 << 20) if read else 1024
        client._conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        await client._flush()
        nursery.start_soon(client._read_loop)
        return client

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._conn.data_to_send()
            if data:
                await self._socket.send_all(data)

    async def _read_loop(self) -> None:
        try:
            await self._read_frames()
        finally:
            self.closed = True
            async with self._changed:
                self._changed.notify_all()

    async def _read_frames(self) -> None:
        while True:
            try:
                data = await self._socket.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return  # we closed it (aclose) or the server went away
            if not data:
                return
            for event in self._conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.streams[event.stream_id].status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.streams[event.stream_id].data.extend(event.data)
                    if self.reading:
                        self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    else:
                        self._unacknowledged[event.stream_id] += event.flow_controlled_length
                elif isinstance(event, h2.events.StreamEnded):
                    self.streams[event.stream_id].ended = True
                elif isinstance(event, h2.events.StreamReset):
                    self.streams[event.stream_id].reset = True
            await self._flush()
            async with self._changed:
                self._changed.notify_all()

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        payload = json.dumps(body).encode()
        stream_id = self._conn.get_next_available_stream_id()
        request_headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", self._authority),
            (":path", path),
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            *(headers or {}).items(),
        ]
        self._conn.send_headers(stream_id, request_headers)
        self._conn.send_data(stream_id, payload, end_stream=True)
        self.streams[stream_id]
        await self._flush()
        return stream_id

    async def wait_for(self, stream_id: int, *, events: int | None = None) -> StreamState:
        """Waits until the stream has ``events`` SSE events (or, with None, has ended)."""
        state = self.streams[stream_id]
        async with self._changed:
            while not (
                state.ended or state.reset or self.closed or (events is not None and len(state.events()) >= events)
            ):
                await self._changed.wait()
        return state

    @staticmethod
    def _has(state: StreamState, events: int | None) -> bool:
        return events is not None and len(state.events()) >= events

    async def resume_reading(self) -> None:
        """The slow reader reads again: acknowledges what it left unread, and all that comes from now on."""
        self.reading = True
        unread, self._unacknowledged = self._unacknowledged, defaultdict(int)
        for stream_id, length in unread.items():
            if not self.streams[stream_id].reset:
                self._conn.acknowledge_received_data(length, stream_id)
        await self._flush()

    async def reset(self, stream_id: int) -> None:
        self._conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await self._flush()

    async def aclose(self) -> None:
        self._conn.close_connection()
        await self._flush()
        await self._socket.aclose()
