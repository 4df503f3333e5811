"""Liveness, readiness and the Prometheus endpoint: open to any caller (probes and
scrapers carry no key), except /metrics where `metrics_auth` is set."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import NotReady, QueueUnavailable

from .common import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> dict:
    """200 once the models are loaded and the worker runs and the queue answers; 503
    before, for good if the worker stopped, and while this replica drains."""
    state.require_ready()
    if state.draining:
        raise NotReady("this replica is shutting down; retry on another", retry_after=1)
    await state.queue.depth()  # an unreachable queue raises QueueUnavailable: 503
    return {"status": "ready", "models": sorted(state.specs)}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, state: State) -> Response:
    if state.settings.metrics_auth:
        state.keys.authenticate(request.headers.get("authorization"))
    # queue_depth / queue_lag: the backlog an autoscaler reads (with Redis, of every API
    # and worker sharing the queue); while the queue is unreachable they keep their last
    # value and the other metrics are still served
    with contextlib.suppress(QueueUnavailable):
        state.metrics.set_depth(*await state.queue.depth())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
