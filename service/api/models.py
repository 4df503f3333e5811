"""GET /v1/models: every model with its versions, samplers, defaults and limits."""

from __future__ import annotations

from fastapi import APIRouter

from .state import State

router = APIRouter(tags=["models"])


def describe(name: str, state) -> dict:
    versions = state.specs[name]
    spec = versions[state.default_versions[name]]
    s = spec.sampling
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "fewstep",
        "kind": spec.kind,
        "description": spec.description,
        "versions": sorted(versions),
        "default_version": spec.version,
        "size": f"{spec.image_shape[-1]}x{spec.image_shape[-2]}" if spec.speech is None else None,
        "labels": list(spec.labels),
        "synonyms": dict(spec.synonyms),
        "samplers": list(s.samplers),
        "defaults": {
            "sampler": s.default_sampler,
            "steps": s.default_steps,
            "guidance_scale": s.default_guidance,
        },
        "limits": {
            "max_steps": s.max_steps,
            "max_n": spec.max_n,
            "max_batch_size": spec.max_batch_size,
            "max_guidance_scale": s.max_guidance,
        },
        "teleport": s.teleport_sigma is not None,
        # the engine running the network here; null where this process loads no weights
        # (an API-only process in distributed mode)
        "runtime": state.runtimes.get(name),
        **speech_fields(spec),
    }


def speech_fields(spec) -> dict:
    """Speech models: voices, sample rate and the input limits."""
    if spec.speech is None:
        return {}
    from engines.speech.audio import available_formats

    return {
        "voices": list(spec.speech.voices),
        "sample_rate": spec.speech.sample_rate,
        "response_formats": available_formats(),
        "max_input_chars": spec.speech.max_chars,
        "max_sentences": spec.speech.max_sentences,
    }


@router.get("/v1/models")
async def list_models(state: State) -> dict:
    return {"object": "list", "data": [describe(name, state) for name in sorted(state.specs)]}


@router.get("/v1/models/{name}")
async def get_model(name: str, state: State) -> dict:
    state.spec(name)
    return describe(name.partition("@")[0], state)
