"""Job, JobResult and JobEvent: the small records that cross the queue.

They hold plain values, bytes for outputs and the modality's small typed payloads
(engines.modalities: a job's inputs, a result's info), and convert to and from dicts, so a
queue backend can serialise them as JSON, never pickle.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from engines.modalities import (
    Info,
    Inputs,
    Modality,
    info_from_dict,
    inputs_from_dict,
    modality_named,
)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


def _fields(record) -> dict:
    """A dataclass's fields as a dict, one level deep: `asdict` deep-copies every value
    (and turns nested payloads into dicts only for them to be replaced), which cost a job
    crossing the Redis queue more than its Lua script did. Lists are copied."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = tuple(f.name for f in fields(record))
    data = {name: getattr(record, name) for name in names}
    for name, value in data.items():
        if isinstance(value, list):
            data[name] = list(value)
    return data


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)  # 96 random bits, as uuid4's first 24 hex digits


@dataclass
class Job:
    """One generation request: n samples of one model with one sampler and seed."""

    model: str
    version: int
    inputs: Inputs  # the modality's typed inputs (engines.modalities)
    n: int  # samples: images, or sentences of one utterance
    sampler: str
    steps: int
    seed: int
    deadline: float | None = None  # unix time after which the job must not use compute
    priority: int = 0  # higher runs first
    preview: bool = False  # attach a small x0 preview to step events
    # how the worker encodes the outputs (the modality's formats): "png" or "raw" uint8
    # pixels [H, W, C] for images, "wav", "mp3", ... or "f32" samples for speech
    output_format: str = "png"
    idempotency_key: str | None = None  # scoped per owner: two owners' keys never meet
    owner: str = ""  # the principal that submitted it ("" before authentication existed)
    # row-steps (rows x network evaluations) it costs, set at admission; the queue counts the
    # queued ones per model and priority, and their drain rate, to predict waits
    cost: int = 0
    # quality "auto": the step counts admission may choose from, largest first; it sets
    # steps and cost to the one it picks at submission. Empty: steps are the client's.
    step_budgets: list[int] = field(default_factory=list)
    id: str = field(default_factory=new_job_id)
    submit_time: float = field(default_factory=time.time)
    # Set by the queue when it hands the job out. delivery: 2 and more means an earlier
    # holder died with it. alone: its last allowed try; the worker holds nothing else
    # meanwhile, so a poison job takes no other job down with it again.
    delivery: int = 1
    alone: bool = False

    @property
    def rows(self) -> int:
        """Rows this job adds to a forward pass (classifier-free guidance doubles them)."""
        return self.inputs.rows(self.n)

    @property
    def samples(self) -> int:
        """Samples it computes (best_of candidates, steering particles): what quotas and
        the queue's bound count."""
        return self.inputs.samples(self.n)

    @property
    def modality(self) -> Modality:
        return modality_named(self.inputs.kind)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.time() if now is None else now) >= self.deadline

    def to_dict(self) -> dict:
        data = _fields(self)
        data["inputs"] = self.inputs.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(**{**data, "inputs": inputs_from_dict(data["inputs"])})


class EncodedOutputs(Sequence[bytes]):
    """A result's outputs as a record carries them (base64 text), decoded on first read.

    An API process answering an images request in base64 never decodes them (8 PNGs of
    28x28: about 28 us to decode, 10 to encode again); one that needs the bytes (speech,
    the OIP tensors, the jobs API's raw output) reads them like a list."""

    __slots__ = ("_bytes", "text")

    def __init__(self, text: list[str]) -> None:
        self.text = text
        self._bytes: list[bytes] | None = None

    def _decoded(self) -> list[bytes]:
        if self._bytes is None:
            self._bytes = [base64.b64decode(t) for t in self.text]
        return self._bytes

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self.text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedOutputs):
            return self.text == other.text
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # compares like a list

    def __repr__(self) -> str:
        return f"EncodedOutputs({len(self.text)} outputs)"


@dataclass
class JobResult:
    """The one response to a job: its outputs, or why there are none."""

    job_id: str
    state: JobState
    # encoded media, one per sample (EncodedOutputs when read from a record)
    outputs: Sequence[bytes] = field(default_factory=list)
    media_type: str = "image/png"
    seeds: list[int] = field(default_factory=list)
    nfe: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    total_seconds: float = 0.0
    forward_seconds: float = 0.0  # time inside the forward passes this job took part in
    runtime: str = ""
    fingerprint: str = ""
    error: str | None = None
    error_code: str | None = None
    info: Info | None = None  # what the outputs are (the modality's): size, sample rate...

    def base64_outputs(self) -> list[str]:
        """The outputs as base64 text: what a record carries, and what the images route
        answers with. A result read from a record gives back the text it came with."""
        if isinstance(self.outputs, EncodedOutputs):
            return self.outputs.text
        return [base64.b64encode(o).decode() for o in self.outputs]

    def to_dict(self) -> dict:
        data = _fields(self)
        data["state"] = self.state.value
        data["outputs"] = self.base64_outputs()
        data["info"] = None if self.info is None else self.info.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobResult:
        data = dict(data)
        data["state"] = JobState(data["state"])
        data["outputs"] = EncodedOutputs(data["outputs"])
        if data.get("info") is not None:
            data["info"] = info_from_dict(data["info"])
        return cls(**data)


@dataclass
class JobEvent:
    """A progress event: queued, started, step, succeeded, failed or canceled."""

    job_id: str
    type: str
    data: dict = field(default_factory=dict)
    seq: int = 0  # assigned by the queue, 1, 2, ... per job
    time: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.type in ("succeeded", "failed", "canceled")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobEvent:
        return cls(**data)


@dataclass
class JobStatus:
    """What GET /v1/jobs/{id} reports."""

    job: Job
    state: JobState
    position: int | None = None  # 0 = next to run; None once running or done
    estimated_start_seconds: float | None = None
    step: int = 0
    steps: int = 0
    error: str | None = None
