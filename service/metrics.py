"""Every Prometheus metric of fewstep, in one place, on an injected registry.

The hot loop fills plain stats records (BatchStats, the JobResult); only this module turns
them into metric calls. Buckets are explicit: forward passes of the analytic and small
models take from tens of microseconds to a second, whole requests up to minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from service.jobs import Job, JobResult

FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SLOW = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    180.0,
)
# End-to-end latency, fine between 10 ms and 10 s (bounds at most 1.2x apart: 1, 1.2, 1.4,
# ... 4.5, 5, 6, 7, 8, 9 per decade), so that histogram_quantile's linear interpolation
# inside a bucket keeps the p99 within a few percent of the measured one
# (tests/deploy/test_prometheus.py; at 1.5x apart a p99 of 225 ms came out at 263).
_DECADE = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0)
LATENCY = (
    *(0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.0075),
    *(round(m * scale, 6) for scale in (0.01, 0.1, 1.0) for m in _DECADE),
    *(10.0, 12.0, 15.0, 20.0, 30.0, 60.0, 120.0, 180.0),
)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


CHILDREN_REMEMBERED = 4096  # label sets per metric; the rest go through labels() each time


def _remember_children(metric: MetricWrapperBase) -> None:
    """Give `metric` a labels() that remembers its children by their label values.

    prometheus_client's labels() checks and converts the values and takes a lock on every
    call, about ten times per request on the hot path; the children it returns never
    change (fewstep never removes a label set), so one dict lookup serves all later calls.
    Keyword calls and label sets past CHILDREN_REMEMBERED take the library's path.
    """
    children: dict[tuple, object] = {}
    labels = metric.labels

    def remembered(*values, **named):
        if named:
            return labels(*values, **named)
        child = children.get(values)
        if child is None:
            child = labels(*values)
            if len(children) < CHILDREN_REMEMBERED:
                children[values] = child
        return child

    metric.labels = remembered


@dataclass
class BatchStats:
    """One forward pass: which model, how many rows and requests, how long."""

    model: str
    runtime: str
    rows: int
    requests: int
    seconds: float


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        ns = "fewstep"
        self.requests = Counter(
            "requests_total",
            "Requests answered",
            ["model", "sampler", "status", "endpoint", "principal"],
            namespace=ns,
            registry=r,
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "End-to-end time of requests that got a result",
            ["model", "endpoint"],
            buckets=LATENCY,
            namespace=ns,
            registry=r,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time from submission to the first forward pass",
            ["model"],
            buckets=SLOW,
            namespace=ns,
            registry=r,
        )
        self.compute = Histogram(
            "compute_seconds",
            "Time from the first forward pass to the result",
            ["model", "sampler"],
            buckets=SLOW,
            namespace=ns,
            registry=r,
        )
        self.batch_samples = Histogram(
            "batch_samples",
            "Rows per forward pass",
            ["model"],
            buckets=ROWS,
            namespace=ns,
            registry=r,
        )
        self.batch_requests = Histogram(
            "batch_requests",
            "Requests sharing a forward pass",
            ["model"],
            buckets=ROWS,
            namespace=ns,
            registry=r,
        )
        self.forward = Histogram(
            "forward_seconds",
            "Duration of one forward pass",
            ["model", "runtime"],
            buckets=FAST,
            namespace=ns,
            registry=r,
        )
        self.nfe = Counter(
            "nfe_total", "Denoiser evaluations", ["model", "sampler"], namespace=ns, registry=r
        )
        self.verifier_candidates = Counter(
            "verifier_candidates_total",
            "Candidates and particles a verifier scored (best_of, steering)",
            ["model", "method"],
            namespace=ns,
            registry=r,
        )
        self.active_jobs = Gauge(
            "active_jobs", "Jobs being sampled", ["model"], namespace=ns, registry=r
        )
        self.queue_depth = Gauge(
            "queue_depth", "Jobs waiting in the queue", namespace=ns, registry=r
        )
        self.queue_lag = Gauge(
            "queue_lag", "Samples waiting in the queue", namespace=ns, registry=r
        )
        self.rejected = Counter(
            "rejected_total",
            "Requests refused",
            ["reason", "principal"],
            namespace=ns,
            registry=r,
        )
        self.model_load = Gauge(
            "model_load_seconds",
            "Time to load and warm up a model",
            ["model"],
            namespace=ns,
            registry=r,
        )
        self.model_ready = Gauge(
            "model_ready", "1 once a model is loaded and warm", ["model"], namespace=ns, registry=r
        )
        runtime_help = "1 for the runtime that runs a model's network (from model.yaml's runtimes)"
        self.model_runtime = Gauge(
            "model_runtime_info", runtime_help, ["model", "runtime"], namespace=ns, registry=r
        )
        self.auto_steps = Histogram(
            "auto_steps",
            'Quality "auto": the steps admission chose for a request (the largest whose '
            "predicted finish meets its deadline)",
            ["model"],
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 50, 100),
            namespace=ns,
            registry=r,
        )
        self.real_time_factor = Histogram(
            "real_time_factor",
            "Speech: seconds from submission to result per second of audio made",
            ["model", "sampler"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 10.0),
            namespace=ns,
            registry=r,
        )
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                _remember_children(metric)

    def set_runtime(self, model: str, runtime: str) -> None:
        self.model_runtime.labels(model, runtime).set(1)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_samples.labels(stats.model).observe(stats.rows)
        self.batch_requests.labels(stats.model).observe(stats.requests)
        self.forward.labels(stats.model, stats.runtime).observe(stats.seconds)

    def observe_result(self, job: Job, result: JobResult) -> None:
        """Worker side: where the time of a finished job went."""
        if result.nfe:
            self.nfe.labels(job.model, job.sampler).inc(result.nfe)
        if result.compute_seconds:
            self.queue_wait.labels(job.model).observe(result.queue_seconds)
            self.compute.labels(job.model, job.sampler).observe(result.compute_seconds)
        searched = result.info.searched() if result.info is not None else None
        if searched is not None:
            self.verifier_candidates.labels(job.model, searched[0]).inc(searched[1])
        if result.info is not None and result.info.duration:
            rtf = result.total_seconds / result.info.duration
            self.real_time_factor.labels(job.model, job.sampler).observe(rtf)

    def observe_request(
        self,
        model: str,
        sampler: str,
        endpoint: str,
        status: str,
        seconds: float | None,
        principal: str = "anonymous",
    ) -> None:
        """API side: one answered request, by the API key (principal) that made it; key
        names come from the service's configuration, so the label stays bounded."""
        self.requests.labels(model, sampler, status, endpoint, principal).inc()
        if seconds is not None:
            self.request_duration.labels(model, endpoint).observe(seconds)

    def set_depth(self, jobs: int, samples: int) -> None:
        self.queue_depth.set(jobs)
        self.queue_lag.set(samples)
