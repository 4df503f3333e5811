"""Settings of the service: one class, read from FEWSTEP_* environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REPO = Path(__file__).resolve().parents[1] / "model_repo"
MIN_KEY_CHARS = 8
# a host name or address Starlette's TrustedHostMiddleware matches: "api.example.com",
# "*.example.com" (any subdomain), "127.0.0.1", "[::1]"
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")
_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
)
# a comma-separated list in the environment (FEWSTEP_API_KEY=k1,k2), a list in Python
CommaList = Annotated[list[str], NoDecode]


def _split(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


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

    runtime: str | None = Field(
        None,
        description="run every network on this runtime, not model.yaml's list ('simulated': "
        "measurement only)",
    )
    latency_curve: str | None = Field(
        None, description="the simulated runtime's batch-latency file (default: H200)"
    )
    batching: Literal["continuous", "static"] = "continuous"
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="static batching: wait to fill a batch"
    )
    max_queued_samples: int = Field(1024, ge=1, description="admission bound; beyond it 429")
    max_predicted_wait_s: float = Field(
        2.0, gt=0, description="429 when a request's predicted queue wait is longer"
    )
    max_predicted_wait: dict[str, float] = Field(
        default_factory=dict,
        description='targets per model and priority, JSON: {"MODEL:PRIO": s, "MODEL": s, '
        '":PRIO": s}; the most specific applies, else max_predicted_wait_s',
    )
    auto_quality: Literal["graded", "greedy"] = Field(
        "graded",
        description='quality "auto": "graded" keeps headroom (the i-th of m step budgets, '
        "largest first, must finish within (i+1)/m of the deadline), so requests degrade "
        'before the queue reaches the deadline; "greedy": the most steps that finish in time',
    )
    max_active_samples: int = Field(
        0, ge=0, description="rows in flight (0: the model's max_batch_size)"
    )
    inline_compute_ms: float = Field(
        2.0, ge=0, description="passes shorter than this run on the event loop, not a thread"
    )
    inline_lone_ms: float = Field(
        20.0,
        ge=0,
        description="the same for a job alone in the worker: no other work overlaps its pass",
    )

    torch_threads: int = Field(
        1,
        ge=0,
        description="torch's intra-op threads in a serving process: the samplers' arithmetic "
        "and the torch runtime's network (0: torch's default, one per core). A sampler's "
        "tensors are too small to gain from threads, and a pool waiting at its barriers "
        "takes the core the event loop needs: raise it only for a torch-runtime network on "
        "a machine with cores to spare",
    )
    runtime_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime's intra-op threads per model (0: one per CPU this process "
        "may run on; the Kubernetes manifests set the container's CPU limit)",
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
    inflight_ttl_s: float = Field(
        3600.0,
        ge=1,
        description="Redis mode: a job's samples in flight are freed after this long even if "
        "the API replica that held them died (a job running longer frees them early)",
    )
    retained_result_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="in-process queue: bytes of finished results kept (oldest evicted first)",
    )

    # Security. No key configured: every caller is the anonymous principal (today's
    # behaviour; `serve` warns when it listens on a non-loopback address).
    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys, each its own principal (--api-key, repeatable; env: k1,k2)",
    )
    api_key_file: FilePath | None = Field(
        None, description="YAML or JSON file of named, sha256-hashed keys with limits"
    )
    metrics_auth: bool = Field(False, description="/metrics asks for an API key too")
    trusted_hosts: CommaList = Field(
        default_factory=list, description="accepted Host headers (empty: any)"
    )
    cors_origins: CommaList = Field(
        default_factory=list, description="origins allowed by CORS (empty: CORS off)"
    )

    # HTTP server (uvicorn) limits
    limit_concurrency: int = Field(
        1024, ge=1, description="connections + tasks beyond which new requests get 503"
    )
    timeout_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close")
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a request's headers must arrive within this"
    )
    graceful_shutdown_s: int = Field(30, ge=1, description="in-flight requests finish within")

    # gRPC TLS: both or neither (without them: plaintext, for loopback or a TLS ingress)
    grpc_tls_cert: FilePath | None = Field(None, description="PEM certificate chain")
    grpc_tls_key: FilePath | None = Field(None, description="PEM private key")

    @field_validator("api_key")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(value):
            text = key.get_secret_value()
            if len(text) < MIN_KEY_CHARS or not text.isascii() or not text.isprintable():
                raise ValueError(
                    f"API key #{i + 1} must be at least {MIN_KEY_CHARS} printable ASCII "
                    "characters without spaces or commas (generate one with "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
                )
            if " " in text or "," in text:
                raise ValueError(f"API key #{i + 1} contains a space or a comma; remove it")
        if len({k.get_secret_value() for k in value}) != len(value):
            raise ValueError("an API key is given twice; give each key once")
        return value

    @field_validator("api_key", "trusted_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    @field_validator("trusted_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if host != "*" and not _HOST.match(host):
                raise ValueError(
                    f"trusted host {host!r} is not a host name or address; write it as "
                    "'api.example.com', '*.example.com', '127.0.0.1' or '[::1]' (no scheme, "
                    "port or path)"
                )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"CORS origin {origin!r} must be scheme://host[:port] such as "
                    "'https://app.example.com' (no path, no trailing slash), or '*'"
                )
        return value

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

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, value: str | None) -> str | None:
        from engines.runtimes.select import RUNTIMES

        if value is not None and value not in RUNTIMES:
            raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {value!r}")
        return value

    @field_validator("latency_curve")
    @classmethod
    def _latency_curve(cls, value: str | None) -> str | None:
        from engines.runtimes.simulated import LatencyCurve

        if value is not None:
            try:
                LatencyCurve.load(value)
            except (OSError, ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"latency_curve {value!r} cannot be read: {err}") from None
        return value

    @field_validator("queue")
    @classmethod
    def _queue_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"queue must be 'memory' or a Redis URL such as redis://127.0.0.1:6379/0, "
                f"got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together: give both or neither")
        return self

    @property
    def api_keys(self) -> list[str]:
        """The plain API keys (their secret values)."""
        return [k.get_secret_value() for k in self.api_key]
