"""create_app(settings): the FastAPI service; its lifespan starts queue, models and worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from service import bootstrap
from service.api import health, images, jobs, models, speech, v2
from service.api.errors import BodyLimit, install_error_handlers
from service.config import Settings
from service.metrics import Metrics
from service.queue.factory import make_queue
from service.state import ServiceState
from service.worker.loop import Worker, build_worker

log = logging.getLogger("fewstep")


def create_app(settings: Settings | None = None, loaded: dict | None = None) -> FastAPI:
    """The service. `loaded` ({(name, version): LoadedModel}) skips the repository (tests)."""
    settings = settings or Settings()
    metrics = Metrics()
    queue = make_queue(settings)
    state = ServiceState(settings, queue, metrics)

    workers: list[Worker] = []

    async def boot() -> None:
        if loaded is not None:
            served = bootstrap.Models.of(loaded)
        elif settings.worker:
            served = await asyncio.to_thread(bootstrap.load_models, settings, metrics)
        else:
            # API only (distributed mode): validate against the specs, load no weights
            served = await asyncio.to_thread(bootstrap.load_specs, settings)
        state.specs, state.default_versions = served.specs, served.default_versions
        if not settings.worker:
            bootstrap.tune_gc()
            state.ready = True
            log.info("fewstep API ready (no worker): %s", ", ".join(sorted(state.specs)))
            return
        bootstrap.mark_ready(served, metrics)
        state.runtimes = served.runtimes()
        # with a shared queue, other workers may serve other models
        claim = None if settings.queue == "memory" else set(served.loaded)
        worker = build_worker(queue, served.loaded, metrics, settings, claim)
        workers.append(worker)
        bootstrap.tune_gc()
        state.ready = True
        log.info("fewstep ready: %s", ", ".join(f"{n}@{v}" for n, v in served.loaded))
        await worker.run()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Models load in the background: /healthz answers at once, /readyz once warm.
        await queue.start()
        task = asyncio.create_task(boot(), name="fewstep-worker")
        app.state.worker_task = task
        grpc_server = None
        if settings.grpc:
            from service.grpc.server import start as start_grpc

            grpc_server = await start_grpc(
                state, settings.host, settings.grpc_port, settings.max_body_bytes
            )
            app.state.grpc_port = grpc_server.port
        try:
            yield
        finally:
            state.ready = False
            if grpc_server is not None:
                # in-flight calls still need the worker: stop gRPC before it
                await grpc_server.stop(grace=10)
            for worker in workers:
                worker.stop()
            if not workers:
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
            await queue.close()

    app = FastAPI(
        title="fewstep",
        version="0.1.0",
        description="Serving for few-step generative models.",
        lifespan=lifespan,
    )
    app.state.fewstep = state
    for module in (images, jobs, models, health, v2, speech):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
