"""A load generator's client that costs next to nothing: one keep-alive HTTP/1.1 connection
on a blocking socket. At concurrency 1 what it measures is the server and the loopback; a
Python HTTP library (httpx) adds about a millisecond a request on this machine, as much
as the server's whole added latency."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass


@dataclass
class Outcome:
    """One request as the load generator saw it (forward: the server's timings)."""

    latency: float
    status: int
    samples: int
    forward: float = 0.0
    retry_after: float = 0.0  # seconds, from a refusal's Retry-After header


class RawClient:
    """One keep-alive HTTP/1.1 connection on a blocking socket, no client library: at
    concurrency 1 what it measures is the server and the loopback, not the client (httpx
    alone costs about a millisecond a request on this machine)."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nhost: fewstep\r\n"
        if body:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        status = int(self.reader.readline().split()[1])
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, self.reader.read(length)

    def send(self, body: dict) -> Outcome:
        begin = time.perf_counter()
        status, data = self.request("POST", "/v1/images/generations", json.dumps(body).encode())
        latency = time.perf_counter() - begin
        if status != 200:
            return Outcome(latency, status, 0)
        out = json.loads(data)
        return Outcome(latency, 200, len(out["data"]), out["timings"]["forward_seconds"])

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def raw_sequential(url: str, bodies: list[dict], seconds: float) -> list[Outcome]:
    """Requests one after another on a RawClient for `seconds`."""
    client, outcomes = RawClient(url), []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        outcomes.append(client.send(bodies[len(outcomes) % len(bodies)]))
    client.close()
    return outcomes


def raw_ping(url: str, count: int = 500) -> list[float]:
    """GET /healthz round trips on a RawClient: the floor of any request, in ms."""
    client, out = RawClient(url), []
    for _ in range(count):
        begin = time.perf_counter()
        client.request("GET", "/healthz")
        out.append((time.perf_counter() - begin) * 1000)
    client.close()
    return out


async def raw_closed(
    urls: list[str], bodies: list[dict], concurrency: int, seconds: float
) -> tuple[float, list[Outcome]]:
    """`concurrency` keep-alive connections, spread over `urls`, each sending its next
    request as soon as the last one is answered, for `seconds`: (elapsed, outcomes).

    The asyncio counterpart of RawClient for saturation: the request bytes are made once,
    and a response is read by its status line and content-length without parsing the JSON
    (a 200's sample count is the request's n). On this machine httpx spends about a core
    driving 32 clients, so the server's batches stay small and its CPU per sample is what
    a starved server spends; this client costs a fraction of that."""
    payloads = []
    for body in bodies:
        data = json.dumps(body).encode()
        head = (
            "POST /v1/images/generations HTTP/1.1\r\nhost: fewstep\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        payloads.append((head.encode() + data, int(body.get("n", 1))))
    outcomes: list[Outcome] = []
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def loop(url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop:
                payload, n = payloads[next(counter) % len(payloads)]
                begin = time.perf_counter()
                writer.write(payload)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                outcomes.append(
                    Outcome(time.perf_counter() - begin, status, n if status == 200 else 0)
                )
        finally:
            writer.close()

    begin = time.perf_counter()
    await asyncio.gather(*(loop(urls[i % len(urls)]) for i in range(concurrency)))
    return time.perf_counter() - begin, outcomes
