"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import NotReady, QueueUnavailable

from .state import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> dict:
    if not state.ready:
        raise NotReady("models are still loading", retry_after=2)
    if state.draining:
        raise NotReady("this replica is shutting down; retry on another", retry_after=1)
    await state.queue.depth()  # an unreachable queue raises QueueUnavailable: 503
    return {"status": "ready", "models": sorted(state.specs)}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    # queue_depth / queue_lag: the backlog an autoscaler reads (with Redis, of every API
    # and worker sharing the queue); while the queue is unreachable they keep their last
    # value and the other metrics are still served
    with contextlib.suppress(QueueUnavailable):
        state.metrics.set_depth(*await state.queue.depth())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
