"""The manifests' own commands, run: every fewstep container of every overlay is started
from the built image with exactly its command, args and environment (ConfigMaps, Secrets
and $(VAR) references resolved as the kubelet would), next to a Redis started from the
distributed overlay's own Redis command. Its startup, liveness and readiness probes must
then answer. A wrong flag or setting name fails here instead of in a cluster.

One addition: FEWSTEP_MODELS limits the models to one small model, so that each container
is ready in seconds rather than after loading all eight."""

from __future__ import annotations

import json
import subprocess

import pytest

from service.config import Settings

from .conftest import DOCKER, REDIS_IMAGE, Stack, docker, wait_for
from .manifests import OVERLAYS, container_env, expand, fewstep_containers, find, render

pytestmark = pytest.mark.docker

ONE_MODEL = {"FEWSTEP_MODELS": '["fashion-gaussian"]'}


# FEWSTEP_* variables that engines/ reads itself rather than service.config.Settings
ENGINE_VARIABLES = {"FEWSTEP_ENGINE_CACHE", "FEWSTEP_FASHION_MNIST"}


def containers() -> dict[str, tuple]:
    """Distinct (command, environment) pairs over all overlays, with where they come from."""
    found = {}
    for overlay in OVERLAYS:
        docs = render(overlay)
        for pod, _, c in fewstep_containers(docs):
            env = container_env(docs, c)
            argv = expand(c.get("command", []) + c.get("args", []), env)
            key = json.dumps([c.get("command"), argv, sorted(env.items())])
            found.setdefault(key, (f"{overlay}/{pod}/{c['name']}", c, env, argv))
    return found


def probe_ok(name: str, c: dict, probe: dict) -> bool:
    """Ask the probe from inside the container, as the kubelet would ask the pod."""
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", ())}
    if "grpc" in probe:
        code = (
            "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
            f"s = g.HealthStub(grpc.insecure_channel('127.0.0.1:{probe['grpc']['port']}')); "
            f"r = s.Check(h.HealthCheckRequest(service={probe['grpc'].get('service', '')!r}), "
            "timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"
        )
    else:
        port = ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"])
        url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
        code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"
    return exec_status(name, ["python3", "-c", code]) == 0


def exec_status(name: str, argv: list[str], env: dict | None = None) -> int:
    env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
    return subprocess.run(
        [DOCKER, "exec", *env_args, name, *argv], capture_output=True, timeout=30, check=False
    ).returncode


@pytest.fixture(scope="module")
def redis_from_manifest(image):
    """The distributed overlay's Redis command and environment, in a test Redis image."""
    stack = Stack()
    try:
        docs = render("distributed")
        redis = find(docs, "StatefulSet", "fewstep-redis")["spec"]["template"]["spec"][
            "containers"
        ][0]
        env = container_env(docs, redis)
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        name = stack.run(
            "redis",
            "--network-alias",
            "fewstep-redis",
            "--read-only",
            "--volume",
            "/data",  # an anonymous volume: owned by the image's redis user like its /data
            *env_args,
            image=REDIS_IMAGE,
            cmd=tuple(expand(redis["command"] + redis["args"], env)),
        )
        ready = redis["readinessProbe"]["exec"]["command"]
        wait_for(
            lambda: exec_status(name, ready, env) == 0, 30, "the manifest's Redis readiness probe"
        )
        yield stack
    finally:
        stack.close()


@pytest.mark.parametrize("key", sorted(containers()), ids=lambda k: containers()[k][0])
def test_manifest_container_runs_and_answers_its_probes(key, redis_from_manifest, image):
    where, c, env, argv = containers()[key]
    # Settings ignores FEWSTEP_* names it does not know: a misspelt one would pass silently
    unknown = {
        k
        for k in env
        if k.startswith("FEWSTEP_")
        and k not in ENGINE_VARIABLES
        and k.removeprefix("FEWSTEP_").lower() not in Settings.model_fields
    }
    assert not unknown, f"{where}: no such setting {sorted(unknown)}"
    stack = redis_from_manifest
    env = {**env, **ONE_MODEL}
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    options = ["--read-only", "--user", "10001:0", *env_args]
    if c.get("command"):
        options += ["--entrypoint", argv[0]]
        argv = argv[1:]
    name = stack.run(where.replace("/", "-"), *options, cmd=tuple(argv), image=image)
    try:
        wait_for(
            lambda: probe_ok(name, c, c["startupProbe"]) or not _running(name),
            120,
            f"{where}: startup probe",
            0.5,
        )
        assert _running(name), stack.logs(name)
        assert probe_ok(name, c, c["livenessProbe"]), stack.logs(name)
        assert probe_ok(name, c, c["readinessProbe"]), stack.logs(name)
    finally:
        docker("rm", "-f", "-v", name, check=False)


def _running(name: str) -> bool:
    return docker("inspect", name, "--format", "{{.State.Running}}", check=False) == "true"
