"""Settings of the service: one class, read from FEWSTEP_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REPO = Path(__file__).resolve().parents[1] / "model_repo"


class Settings(BaseSettings):
    """Every knob of `fewstep serve`; each is also FEWSTEP_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="FEWSTEP_", extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    grpc: bool = Field(True, description="serve OIP v2 gRPC (and grpc.health.v1) next to HTTP")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: any free port)")
    model_repo: Path = DEFAULT_REPO
    models: list[str] = Field(default_factory=list, description="load only these (default: all)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    batching: Literal["continuous", "static"] = "continuous"
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="static batching: wait to fill a batch"
    )
    max_queued_samples: int = Field(1024, ge=1, description="admission bound; beyond it 429")
    max_active_samples: int = Field(
        0, ge=0, description="rows in flight (0: the model's max_batch_size)"
    )
    inline_compute_ms: float = Field(
        2.0, ge=0, description="passes shorter than this run on the event loop, not a thread"
    )

    request_timeout_s: float = Field(300.0, gt=0, description="synchronous endpoints give up after")
    max_body_bytes: int = Field(65536, ge=1024)
    retained_jobs: int = Field(10000, ge=1, description="finished jobs kept for GET and results")
    warmup: bool = True

    # Distributed mode: a Redis Streams queue shared by API and worker processes.
    queue: str = Field(
        "memory", description="'memory' (in-process) or redis://HOST:PORT/DB (shared)"
    )
    worker: bool = Field(True, description="run a worker in the API process (serve)")
    redis_prefix: str = Field("fewstep:", min_length=1, description="prefix of every Redis key")
    redis_timeout_s: float = Field(
        2.0, gt=0, description="a Redis call slower than this answers 503"
    )
    claim_timeout_s: float = Field(
        30.0, gt=0, description="a job whose worker is silent this long goes to another"
    )
    max_deliveries: int = Field(
        3, ge=1, description="a job handed out this often without a result is dead-lettered"
    )
    result_ttl_s: float = Field(86400.0, ge=1, description="results and job records kept for")

    # Deployment: probes and drain (docker/, k8s/).
    drain_delay_s: float = Field(
        0.0, ge=0, description="on SIGTERM, /readyz fails this long before the API stops accepting"
    )
    health_port: int = Field(
        0, ge=0, le=65535, description="worker: serve /healthz, /readyz and /metrics here (0: off)"
    )
    worker_stale_s: float = Field(
        60.0, gt=0, description="worker /healthz fails when its loop has not turned for this long"
    )

    @field_validator("queue")
    @classmethod
    def _queue_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"queue must be 'memory' or a Redis URL such as redis://127.0.0.1:6379/0, "
                f"got {value!r}"
            )
        return value
