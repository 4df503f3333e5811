"""uvicorn, configured from Settings, with the one limit uvicorn lacks: a header timeout.

uvicorn 0.54 closes idle keep-alive connections (`timeout_keep_alive`) and answers 503
beyond `limit_concurrency`, but a connection that sends its request headers slowly, or
never finishes them, is held as long as the client likes (slowloris). The protocol below
is uvicorn's httptools protocol plus a timer from the first byte of each request (and from
the connection's opening) to the end of its headers; past it the connection gets 408 and
is closed. Between requests the connection is idle and `timeout_keep_alive` applies.

It also writes each response in one piece. uvicorn writes the status line and headers,
then the body, as two writes: two segments, and two wake-ups of the client, which on a
busy machine each cost the server its core for a while. Here a write is held until the
next write joins it or the event loop's next turn, whichever comes first: a response sent
in one go (every JSON response) leaves in one write, and a streamed one (SSE) is no later
than one loop turn.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

_LATE = b"the request headers did not arrive in time; send them at once\n"
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_LATE), _LATE)
)


class _OneWrite:
    """A transport whose writes wait for the next write or the loop's next turn, and then
    go out together (see the module docstring); everything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)
        if len(self._held) > 1:  # the second piece: nothing is gained by waiting longer
            self._flush()

    def _flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers are late."""

    header_timeout = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(REQUEST_TIMEOUT)  # nothing else is being written
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _OneWrite(transport, self.loop)  # every response cycle writes here
        self._arm()  # a connection that never sends a byte is late too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class with this header timeout (uvicorn takes a class, not options)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def server_config(app, settings: Settings, **options) -> uvicorn.Config:
    """uvicorn.Config for `fewstep serve`: bind address and every limit from settings;
    `options` (log_level, ...) pass through to uvicorn."""
    options.setdefault("access_log", False)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=header_timeout_protocol(settings.header_timeout_s),
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        **options,
    )
