"""create_app(settings): the FastAPI service; its lifespan starts queue, models and worker.

Who may call (API keys), their quotas (in process, or in Redis when the queue is shared so
that API replicas share them), the accepted Host headers and CORS are set up here too."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from service import bootstrap
from service.api import health, images, jobs, models, openapi, speech, v2
from service.api.errors import BodyLimit, install_error_handlers
from service.api.fastpath import FastPath
from service.config import Settings
from service.metrics import Metrics
from service.queue.factory import make_queue
from service.security import KeyStore, RedisInFlight, RedisRateLimiter
from service.state import ServiceState
from service.worker.loop import Worker, build_worker

log = logging.getLogger("fewstep")


def loopback(host: str) -> bool:
    """Whether a bind address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _shared_quotas(state: ServiceState, queue) -> None:
    """Quotas in the queue's Redis, so that every API replica draws from the same ones."""
    prefix = state.settings.redis_prefix
    state.rate = RedisRateLimiter(queue.redis, prefix)
    state.in_flight = RedisInFlight(queue.redis, prefix, ttl=state.settings.inflight_ttl_s)


def _watch_worker(state: ServiceState, task: asyncio.Task, stopping: list) -> None:
    """If the worker task ends while the service runs, readiness fails (and it is logged):
    a server whose worker died must not look ready behind a load balancer."""

    def ended(task: asyncio.Task) -> None:
        if task.cancelled() or stopping:
            return
        exc = task.exception()
        if exc is None and not state.settings.worker:
            return  # an API-only process: boot ends once the specs are loaded
        state.ready = False
        state.broken = f"the worker stopped ({exc!r}); the server must be restarted"
        log.error("fewstep worker task ended: %s", state.broken, exc_info=exc)

    task.add_done_callback(ended)


def create_app(settings: Settings | None = None, loaded: dict | None = None) -> FastAPI:
    """The service. `loaded` ({(name, version): LoadedModel}) skips the repository (tests)."""
    settings = settings or Settings()
    metrics = Metrics()
    queue = make_queue(settings)
    keys = KeyStore.from_settings(settings.api_keys, settings.api_key_file)
    state = ServiceState(settings, queue, metrics, keys=keys)

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
        state.runtimes, state.loaded = served.runtimes(), served.loaded
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
        if settings.queue != "memory":
            _shared_quotas(state, queue)
        if state.keys.open and not loopback(settings.host):
            log.warning(
                "no API key is configured and the server listens on %s: anyone who can reach "
                "it can use it; set --api-key or FEWSTEP_API_KEY (README, Security)",
                settings.host,
            )
        task = asyncio.create_task(boot(), name="fewstep-worker")
        app.state.worker_task = task
        stopping: list = []
        _watch_worker(state, task, stopping)
        grpc_server = None
        if settings.grpc:
            from service.grpc.server import start as start_grpc

            grpc_server = await start_grpc(
                state,
                settings.host,
                settings.grpc_port,
                settings.max_body_bytes,
                bootstrap.grpc_tls(settings),
            )
            app.state.grpc_port = grpc_server.port
            app.state.grpc_server = grpc_server  # service.drain reports NOT_SERVING on SIGTERM
        try:
            yield
        finally:
            stopping.append(True)
            state.ready = False
            for watcher in list(state.watchers):
                watcher.cancel()
            if grpc_server is not None:
                # in-flight calls still need the worker: stop gRPC before it
                await grpc_server.stop(grace=10)
            for worker in workers:
                worker.stop()
            if not workers:
                task.cancel()
            # a worker that died has been logged (_watch_worker): shut down all the same
            with contextlib.suppress(Exception, asyncio.CancelledError):
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
    openapi.install(app, state)
    # FastPath inside BodyLimit: it gets the body whole and size-checked
    app.add_middleware(FastPath)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:  # off unless configured: no page may read the responses
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        )
    if settings.trusted_hosts:  # outermost: a wrong Host (DNS rebinding) is refused first
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts)
    return app
