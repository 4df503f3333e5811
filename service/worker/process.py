"""`fewstep worker`: a worker process on a shared queue, without the HTTP API.

It loads the models from the repository, claims only their jobs, and runs the same Worker
as the embedded service. SIGTERM or SIGINT: stop claiming, finish the jobs in hand, store
their results (which acknowledges them), and exit 0, so nothing is handed out again.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from service import bootstrap
from service.config import Settings
from service.metrics import Metrics
from service.queue.factory import make_queue
from service.worker.loop import Worker, build_worker

log = logging.getLogger("fewstep.worker")


async def run_worker(settings: Settings, loaded: dict | None = None, metrics_port: int = 0) -> int:
    """Serve jobs until SIGTERM / SIGINT. `loaded` ({(name, version): LoadedModel}) skips the
    repository (test fixtures)."""
    metrics = Metrics()
    health = _health(settings, metrics)  # answers /healthz while the models load
    if loaded is None:
        served = await asyncio.to_thread(bootstrap.load_models, settings, metrics)
    else:
        served = bootstrap.Models.of(loaded)
    bootstrap.mark_ready(served, metrics)
    models = served.loaded
    queue = make_queue(settings)
    await queue.start()
    worker = build_worker(queue, models, metrics, settings, set(models))
    if health is not None:
        health.watch(worker)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopper(worker, sig))
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)
    bootstrap.tune_gc()
    consumer = getattr(queue, "consumer", "in-process")
    log.info("fewstep worker %s ready: %s", consumer, ", ".join(f"{n}@{v}" for n, v in models))
    try:
        await worker.run()
    finally:
        await queue.close()
        if health is not None:
            health.close()
    log.info("fewstep worker %s stopped", consumer)
    return 0


def _health(settings: Settings, metrics: Metrics):
    if not settings.health_port:
        return None
    from service.worker.health import WorkerHealth

    return WorkerHealth("0.0.0.0", settings.health_port, metrics.registry, settings.worker_stale_s)


def _stopper(worker: Worker, sig: signal.Signals):
    def stop() -> None:
        log.info("%s: no new jobs; finishing %d in hand", sig.name, len(worker.actives))
        worker.stop()

    return stop
