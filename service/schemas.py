"""Request and response models of the HTTP API: the wire contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.noise import SEED_MAX


class Steering(BaseModel):
    """FK steering: k particles per image, resampled by the verifier every s steps."""

    model_config = ConfigDict(extra="forbid")

    particles: int = Field(ge=1, le=64, description="particles per image (the model's max)")
    resample_every: int = Field(1, ge=1, le=1000, description="steps between resamplings")


class GenerationRequest(BaseModel):
    """Fields shared by POST /v1/images/generations and POST /v1/jobs.

    The OpenAI Images fields (model, prompt, n, size, response_format, user) plus fewstep's
    own: sampler, steps, seed, guidance_scale, teleport, grid, deadline_ms, priority,
    preview, quality, and inference-time scaling with the model's verifier: best_of or
    steering.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name, optionally name@version")
    prompt: str = Field(
        "", max_length=1000, description="a class label of the model (or a synonym)"
    )
    n: int = Field(1, ge=1, le=1024, description="number of images")
    size: str | None = Field(None, description="WIDTHxHEIGHT; must match the model")
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    sampler: str | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    teleport: bool = False
    grid: Literal["auto", "tuned", "karras"] | None = Field(
        None,
        description="'auto' (default: the model's tuned grid for this sampler and steps where "
        "it has one), 'tuned' (400 if none) or 'karras' (the plain grid)",
    )
    deadline_ms: int | None = Field(None, ge=1, le=86_400_000)
    priority: int = Field(0, ge=-10, le=10)
    preview: bool = False
    quality: Literal["fixed", "auto"] = Field(
        "fixed",
        description='"auto": the most steps (up to `steps`, else the model\'s quality_steps) '
        "whose predicted finish meets deadline_ms at the current load",
    )
    best_of: int | None = Field(
        None, ge=1, le=64, description="candidates per image; the verifier returns the best"
    )
    steering: Steering | None = Field(
        None, description="FK steering with the verifier (instead of best_of)"
    )


class SpeechRequest(BaseModel):
    """OpenAI's speech fields (model, input, voice, response_format, speed) plus fewstep's
    sampler, steps, seed, deadline_ms, priority and quality."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a speech model, optionally name@version")
    input: str = Field(description="text to speak")
    voice: str = Field("slt", description="a voice of the model, or an OpenAI voice name")
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus", "aac"] | None = None
    speed: float = Field(1.0, ge=0.25, le=4.0, description="speaking rate (durations / speed)")
    instructions: str | None = Field(None, max_length=4096)
    sampler: str | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    deadline_ms: int | None = Field(None, ge=1, le=86_400_000)
    priority: int = Field(0, ge=-10, le=10)
    quality: Literal["fixed", "auto"] = "fixed"


# the wire request of each modality's OpenAI-style endpoint (OIP checks its values with it)
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "image": GenerationRequest,
    "speech": SpeechRequest,
}


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int  # with best_of, the chosen candidate's own seed (a plain request remakes it)
    verifier_score: float | None = None  # best_of / steering: the verifier's score of it


class Timings(BaseModel):
    """Where the time went: waiting, sampling (first forward pass to result), in total;
    forward_seconds is the part spent inside forward passes."""

    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    forward_seconds: float


class Scaling(BaseModel):
    """How a best_of / steering request searched."""

    method: Literal["best_of", "steering"]
    candidates: int  # per image: best_of's k or the particles
    resample_every: int | None = None
    resamples: int = 0  # resampling rounds done (steering)
    verifier: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    sampler: str
    steps: int  # with quality "auto": the steps admission chose
    grid: str = Field(description="the grid used: 'tuned', 'karras' or 'teleport'")
    quality: Literal["fixed", "auto"] = "fixed"
    nfe: int  # denoiser evaluations per row
    total_nfe: int  # spent on the request: rows (candidates, guidance included) x nfe
    scaling: Scaling | None = None
    timings: Timings
    runtime: str
    fingerprint: str


class Progress(BaseModel):
    step: int
    steps: int


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    model: str
    version: int
    sampler: str
    steps: int
    quality: Literal["fixed", "auto"] = "fixed"
    n: int
    seed: int
    teleport: bool
    priority: int
    created: float
    position: int | None = None
    estimated_start_seconds: float | None = None
    progress: Progress
    error: str | None = None


class JobResultView(BaseModel):
    id: str
    status: Literal["succeeded"]
    data: list[ImageData]
    nfe: int
    grid: str | None = None  # the grid used: "tuned", "karras" or "teleport"
    total_nfe: int
    scaling: Scaling | None = None
    timings: Timings
    runtime: str
    fingerprint: str
