"""GET /v1/models: every model with its versions, samplers, defaults and limits."""

from __future__ import annotations

from fastapi import APIRouter

from engines.modalities import modality_of

from .common import Caller, State

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
        "modality": modality_of(spec).name,
        "description": spec.description,
        "versions": sorted(versions),
        "default_version": spec.version,
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
        # quality "auto": the step counts admission picks from under load, largest first
        # (those a sampler can run: at least its minimum steps)
        "quality_steps": list(s.quality_steps or (s.default_steps,)),
        # the engine running the network here; null where this process loads no weights
        # (an API-only process in distributed mode)
        "runtime": state.runtimes.get(name),
        **modality_of(spec).describe(spec),
    }


@router.get("/v1/models")
async def list_models(state: State, _: Caller) -> dict:
    return {"object": "list", "data": [describe(name, state) for name in sorted(state.specs)]}


@router.get("/v1/models/{name}")
async def get_model(name: str, state: State, _: Caller) -> dict:
    state.spec(name)
    return describe(name.partition("@")[0], state)
