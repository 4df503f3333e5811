"""Work per model and how fast its workers drain it: what predicted-wait admission reads
(service/capacity.py). Both queue backends keep these books the same way.

The work a new job waits for is every row-step admitted and not yet run: queued jobs'
whole cost, and the steps running jobs have left (their step events say how far they
are). Running jobs count because a worker that holds many shares each forward pass among
them: on a device whose batch cost grows with its rows (a CPU) a job claimed into a full
batch waits inside the worker, not in the queue. On a GPU that work drains in a few fast
passes and adds little."""

from __future__ import annotations

import time
from dataclasses import dataclass


class WorkAhead(Exception):
    """JobQueue.submit's refusal of a job with more work ahead of it than its `max_ahead`:
    nothing was queued; `ahead` is the row-steps at its priority and above."""

    def __init__(self, ahead: int) -> None:
        super().__init__(f"{ahead} row-steps ahead")
        self.ahead = ahead


@dataclass(frozen=True)
class Backlog:
    """One model version's unfinished work in row-steps by priority, and its drain rate."""

    work: dict[int, int]  # priority -> row-steps queued or still to run (rows x evaluations)
    rate: float | None  # row-steps per second drained while work waited; None: not measured

    def ahead(self, priority: int) -> int:
        """Row-steps to finish before a new job of this priority: its level and above."""
        return sum(w for p, w in self.work.items() if p >= priority)


class WorkRate:
    """Row-steps per second a model's workers complete while work waits for them.

    Only intervals that end in a completion made while work was still queued count: then
    the workers were full, so the rate is their capacity. A completion with nothing queued
    ends the busy period, and the idle time after it counts for nothing (a completion rate
    measured at light load is the arrival rate, not the capacity). Work and busy time are
    summed with exponential forgetting (a half-life in seconds of busy time), so a batch of
    completions landing at once counts as the work of one interval, not as a spike."""

    def __init__(self, half_life: float = 5.0, min_busy_s: float = 0.05) -> None:
        self.half_life, self.min_busy_s = half_life, min_busy_s
        self._work = self._busy = 0.0
        self._last: float | None = None  # the last completion, if work waited then

    def add(self, work: int, busy: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None:
            dt = max(now - self._last, 0.0)
            keep = 0.5 ** (dt / self.half_life)
            self._work = keep * self._work + work
            self._busy = keep * self._busy + dt
        self._last = now if busy else None

    @property
    def rate(self) -> float | None:
        """Row-steps per second, or None until enough busy time was seen."""
        if self._busy < self.min_busy_s or self._work <= 0:
            return None
        return self._work / self._busy
