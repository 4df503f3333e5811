"""uvicorn from settings, with a header timeout: a real server on loopback, raw sockets."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from service.config import Settings
from service.httpserver import server_config

from .redisutil import free_port


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def url():
    settings = Settings(host="127.0.0.1", port=free_port(), header_timeout_s=0.5)
    server = uvicorn.Server(server_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    for _ in range(200):
        try:
            httpx.get(base)
            break
        except httpx.TransportError:
            time.sleep(0.02)
    yield base
    server.should_exit = True
    thread.join(10)


def held(url: str, send: list[bytes], pause: float = 0.0) -> tuple[bytes, float]:
    """Send the pieces (pausing between them), then read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    begin = time.monotonic()
    data = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            for piece in send:
                sock.sendall(piece)
                time.sleep(pause)
            while chunk := sock.recv(4096):
                data += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what it wrote may be lost
    return data, time.monotonic() - begin


def test_settings_reach_uvicorn():
    config = server_config(app, Settings(limit_concurrency=7, timeout_keep_alive_s=3))
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 3
    assert config.timeout_graceful_shutdown == 30 and config.http.header_timeout == 10.0


def test_whole_requests_are_served_on_a_kept_alive_connection(url):
    with httpx.Client() as client:
        first = client.get(url)
        time.sleep(0.8)  # idle longer than the header timeout: keep-alive rules apply
        second = client.get(url)
    assert first.text == second.text == "ok"


def test_half_sent_headers_get_408_and_the_connection_closes(url):
    data, took = held(url, [b"GET / HTTP/1.1\r\nHost: x\r\n"])
    assert data.startswith(b"HTTP/1.1 408") and 0.4 < took < 3


def test_a_silent_connection_is_closed(url):
    data, took = held(url, [])
    assert data.startswith(b"HTTP/1.1 408") and 0.4 < took < 3


def test_a_trickle_of_header_bytes_does_not_keep_it_open(url):
    pieces = [b"GET / HTTP/1.1\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(20)]
    data, took = held(url, pieces, pause=0.1)
    assert data == b"" or data.startswith(b"HTTP/1.1 408")
    assert took < 1.9  # 21 x 0.1 s: 2 s at least if it stayed open


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str):
        return f"extra {name}"


def test_a_response_written_in_two_pieces_leaves_in_one_write():
    import asyncio

    from service.httpserver import _OneWrite

    async def scenario() -> _Recorder:
        real = _Recorder()
        transport = _OneWrite(real, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"ok")
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        transport.write(b"data: 1\n\n")  # a streamed piece alone waits one loop turn at most
        assert len(real.writes) == 1
        await asyncio.sleep(0)
        assert real.writes[1:] == [b"data: 1\n\n"]
        transport.write(b"last")
        transport.close()  # closing sends what is held first
        assert real.writes[2:] == [b"last"] and real.closed
        assert transport.get_extra_info("peername") == "extra peername"
        return real

    asyncio.run(scenario())
