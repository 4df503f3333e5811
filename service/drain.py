"""Graceful drain of the API process: readiness fails first, the listener closes later.

On SIGTERM a load balancer or a Kubernetes Service still routes to this replica until it
notices that readiness failed. uvicorn on its own stops accepting at once, so requests
sent in that window would be refused. DrainingServer instead marks the replica draining
(/readyz and gRPC health answer 503 / NOT_SERVING), keeps serving for `drain_delay_s`,
then lets uvicorn close the listener, finish the requests in flight and run the shutdown
(which stops the worker after the jobs in hand). A second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("fewstep")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, delay_s: float) -> None:
        super().__init__(config)
        self.app, self.delay_s = app, delay_s
        self.exit_at: float | None = None
        self._grpc_told = False

    def handle_exit(self, sig: int, frame) -> None:
        # The signal is not recorded for re-raising (uvicorn re-raises it after shutdown):
        # a drained process exits 0.
        if sig == signal.SIGTERM and self.exit_at is None and self.delay_s > 0:
            self.exit_at = time.monotonic() + self.delay_s
            self.app.state.fewstep.draining = True
            log.info("SIGTERM: draining; /readyz fails, closing in %.1f s", self.delay_s)
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.exit_at is not None:
            grpc_server = getattr(self.app.state, "grpc_server", None)
            if grpc_server is not None and not self._grpc_told:
                # gRPC health's Check reads `draining` itself; this tells Watch streams
                self._grpc_told = True
                await grpc_server.drain()
            if time.monotonic() >= self.exit_at:
                return True
        return await super().on_tick(counter)
