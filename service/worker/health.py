"""The worker's small HTTP port: /healthz, /readyz and /metrics for probes and Prometheus.

A `fewstep worker` serves no API, so without this port a cluster could only ask whether the
process exists. /healthz reports the age of the worker loop's last pass: a loop stuck in a
hung forward pass or a deadlock answers 503 once that age passes `worker_stale_s`, and the
kubelet restarts the pod. It runs in its own thread so that a stuck event loop cannot hide
behind a probe that never gets an answer.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class WorkerHealth:
    """Serves the health of one worker loop (set by watch() once the models are loaded)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, stale_s: float):
        self.registry, self.stale_s = registry, stale_s
        self.worker = None  # the Worker, once its models are loaded
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fewstep-worker-health", daemon=True
        )
        self._thread.start()

    def watch(self, worker) -> None:
        self.worker = worker

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def health(self) -> tuple[int, dict]:
        """Live while the models load, and afterwards while the loop keeps turning."""
        if self.worker is None:
            return 200, {"status": "loading"}
        age = time.monotonic() - self.worker.last_tick
        if age > self.stale_s:
            return 503, {"status": "stale", "last_tick_age_s": round(age, 3)}
        return 200, {"status": "ok", "last_tick_age_s": round(age, 3)}

    def ready(self) -> tuple[int, dict]:
        """Ready once the models are loaded and while the loop is live."""
        if self.worker is None:
            return 503, {"status": "loading"}
        return self.health()


def _handler(health: WorkerHealth) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(health.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                status, body = health.health() if path == "/healthz" else health.ready()
                self._send(status, json.dumps(body).encode(), "application/json")
            else:
                body = b'{"error": "not found: try /healthz, /readyz or /metrics"}'
                self._send(404, body, "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # probes every few seconds
            pass

    return Handler
