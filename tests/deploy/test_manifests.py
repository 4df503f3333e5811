"""The offline validation gate: every overlay renders, passes kubernetes-validate --strict,
its custom resources match their vendored schemas, and every pod is restricted, probed
three ways and given time to drain. Lints: hadolint, yamllint, promtool."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
import yaml

from service.metrics import Metrics
from service.queue.keys import GROUP, Keys

from .conftest import BIN, ROOT
from .manifests import (
    CUSTOM,
    OVERLAYS,
    container_env,
    fewstep_containers,
    find,
    pod_specs,
    render,
    write_docs,
)

MONITORING = ROOT / "k8s/components/monitoring"
SCHEMAS = ROOT / "k8s/schemas"
# All eight shipped models load and warm up in 44 s on two CPU cores (the embedded
# container here); a GPU worker also builds engines on first start. Startup probes allow:
SLOWEST_LOAD_S = 300
MARGIN_S = 10


def run(*cmd: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)


def test_overlays_exist():
    assert set(OVERLAYS) >= {"embedded", "distributed", "distributed-keda", "kserve"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_validate_strict(overlay, tmp_path):
    core = [d for d in render(overlay) if d["kind"] not in CUSTOM]
    # an InferenceService's predictor is a pod spec: validate it as a Pod
    for name, meta, spec in pod_specs(render(overlay)):
        if "serviceAccountName" in spec and meta.get("annotations", {}).get(
            "serving.kserve.io/deploymentMode"
        ):
            core.append(
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
            )
    done = run(
        str(BIN / "kubernetes-validate"), "--strict", str(write_docs(core, tmp_path / "m.yaml"))
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    deployment = copy.deepcopy(find(render("embedded"), "Deployment", "fewstep"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    done = run(
        str(BIN / "kubernetes-validate"),
        "--strict",
        str(write_docs([deployment], tmp_path / "m.yaml")),
    )
    assert done.returncode != 0


def check_schema(doc: dict, path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(doc))
    schema = SCHEMAS / f"{doc['kind']}.json"
    return run(str(BIN / "check-jsonschema"), "--schemafile", str(schema), str(path))


def test_custom_resources_match_their_vendored_schemas(tmp_path):
    seen = set()
    for overlay in OVERLAYS:
        for i, doc in enumerate(d for d in render(overlay) if d["kind"] in CUSTOM):
            done = check_schema(doc, tmp_path / f"{overlay}-{i}.json")
            assert done.returncode == 0, f"{overlay} {doc['kind']}: {done.stdout}{done.stderr}"
            seen.add(doc["kind"])
    assert seen == CUSTOM


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("ScaledObject", ("spec", "triggers", 0, "metadta"), {}),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "exprr"), "up"),
        ("InferenceService", ("spec", "predictor", "containers", 0, "ports", 0, "name"), "grpc"),
    ],
)
def test_the_schemas_reject_a_mistake(kind, path, value, tmp_path):
    docs = render("distributed-keda") + render("kserve")
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert check_schema(doc, tmp_path / "bad.json").returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_restricted_and_bounded(overlay):
    docs = render(overlay)
    namespace = find(docs, "Namespace", "fewstep")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, _, spec in pod_specs(docs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("runAsUser", 1) != 0, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{name} {bound}"


def probe_target(probe: dict) -> tuple:
    if "grpc" in probe:
        return ("grpc", probe["grpc"].get("service", ""))
    return ("http", probe["httpGet"]["path"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fewstep_containers_have_three_distinct_probes(overlay):
    for name, _, c in fewstep_containers(render(overlay)):
        startup, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
        assert len({json.dumps(p, sort_keys=True) for p in (startup, live, ready)}) == 3, name
        assert probe_target(live) == ("http", "/healthz"), name  # the process alone
        assert probe_target(ready) in {
            ("http", "/readyz"),
            ("grpc", "inference.GRPCInferenceService"),
        }
        assert probe_target(startup)[0] == probe_target(ready)[0] and probe_target(startup) != (
            "http",
            "/healthz",
        )
        allowed = startup["periodSeconds"] * startup["failureThreshold"]
        assert allowed >= SLOWEST_LOAD_S, f"{name}: startup allows {allowed} s"
        # readiness drops a draining pod quickly; liveness tolerates a slow moment
        assert ready["failureThreshold"] * ready["periodSeconds"] <= 20, name
        assert live["failureThreshold"] * live["periodSeconds"] >= 30, name


def prestop_seconds(container: dict) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    return float(hook["sleep"]["seconds"]) if hook and "sleep" in hook else 0.0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_drain_and_the_longest_job(overlay):
    docs = render(overlay)
    checked = 0
    for name, meta, spec in pod_specs(docs):
        longest = meta.get("annotations", {}).get("fewstep.dev/longest-job-seconds")
        if longest is None or "terminationGracePeriodSeconds" not in spec:
            continue
        for c in spec["containers"]:
            env = container_env(docs, c)
            drain = float(env.get("FEWSTEP_DRAIN_DELAY_S", 0)) if "serve" in c["args"] else 0.0
            need = prestop_seconds(c) + drain + float(longest) + MARGIN_S
            assert spec["terminationGracePeriodSeconds"] >= need, f"{name}: needs {need} s"
            if "serve" in c["args"]:
                # a synchronous request never outlives the grace period either
                assert float(env["FEWSTEP_REQUEST_TIMEOUT_S"]) <= float(longest), name
            checked += 1
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert checked >= len(deployments)


def test_distributed_workers_get_a_gpu_and_a_memory_backed_shm():
    spec = find(render("distributed"), "Deployment", "fewstep-worker")["spec"]["template"]["spec"]
    worker = spec["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in worker["volumeMounts"])
    redis = find(render("distributed"), "StatefulSet", "fewstep-redis")["spec"]
    assert "--appendonly" in redis["template"]["spec"]["containers"][0]["args"]
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pdb = find(render("distributed"), "PodDisruptionBudget", "fewstep-api")["spec"]
    assert pdb["minAvailable"] == 1


@pytest.mark.parametrize(
    ("overlay", "deployment"), [("embedded", "fewstep"), ("distributed", "fewstep-worker")]
)
def test_runtime_threads_follow_the_containers_cpu_limit(overlay, deployment):
    """ONNX Runtime's pool is sized by the container's CPU limit (Downward API), not by the
    node's cores, which the CFS quota would throttle."""
    docs = render(overlay)
    container = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    limit = str(container["resources"]["limits"]["cpu"])
    assert container_env(docs, container)["FEWSTEP_RUNTIME_THREADS"] == limit


def test_model_cache_option_puts_the_cache_on_a_claim():
    docs = render("embedded-model-cache")
    spec = find(docs, "Deployment", "fewstep")["spec"]["template"]["spec"]
    cache = next(v for v in spec["volumes"] if v["name"] == "cache")
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "fewstep-model-cache"}}
    find(docs, "PersistentVolumeClaim", "fewstep-model-cache")


def test_keda_reads_the_streams_fewstep_writes_and_scales_from_zero():
    docs = render("distributed-keda")
    scaled = find(docs, "ScaledObject", "fewstep-worker")["spec"]
    worker = find(docs, "Deployment", "fewstep-worker")
    longest = float(
        worker["spec"]["template"]["metadata"]["annotations"]["fewstep.dev/longest-job-seconds"]
    )
    assert scaled["scaleTargetRef"]["name"] == "fewstep-worker"
    assert scaled["minReplicaCount"] == 0 and scaled["fallback"]["replicas"] >= 1
    window = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert window["stabilizationWindowSeconds"] > longest and scaled["cooldownPeriod"] > longest
    from engines.repository import Repository

    versions = {f"{s.name}@{s.version}" for s in Repository(ROOT / "model_repo").specs()}
    modes = set()
    for trigger in scaled["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams" and meta["consumerGroup"] == GROUP
        model_version = meta["stream"].removeprefix("fewstep:jobs:").rsplit(":", 1)[0]
        assert model_version in versions
        assert meta["stream"] == Keys("fewstep:").stream(model_version, 0)
        assert meta["address"].startswith("fewstep-redis.")
        modes.add(
            "lag" if "lagCount" in meta else "pending" if "pendingEntriesCount" in meta else "?"
        )
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
        ref = auth["secretTargetRef"][0]
        assert (
            ref["parameter"] == "password"
            and ref["key"] in find(docs, "Secret", ref["name"])["data"]
        )
    assert modes == {"lag", "pending"}


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", ()))


def test_network_policies_deny_by_default_and_workers_reach_only_redis_and_dns():
    docs = render("distributed")
    deny = find(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    worker = find(docs, "Deployment", "fewstep-worker")["spec"]["template"]["metadata"]["labels"]
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]
    egress = [
        rule
        for p in policies
        if "Egress" in p["policyTypes"] and selects(p["podSelector"], worker)
        for rule in p.get("egress", ())
    ]
    assert all(rule.get("to") and rule.get("ports") for rule in egress)
    assert {port["port"] for rule in egress for port in rule["ports"]} == {53, 6379}
    api = find(docs, "NetworkPolicy", "fewstep-api-ingress")["spec"]["ingress"][0]["ports"]
    assert {p["port"] for p in api} == {8000, 8001}


def test_kserve_serves_oip_over_http_and_over_grpc_on_an_h2c_port():
    docs = [d for d in render("kserve") if d["kind"] == "InferenceService"]
    ports = {d["metadata"]["name"]: d["spec"]["predictor"]["containers"][0]["ports"] for d in docs}
    assert ports["fewstep-grpc"][0]["name"] == "h2c" and ports["fewstep-http"][0]["name"] == "http1"
    grpc = docs[[d["metadata"]["name"] for d in docs].index("fewstep-grpc")]
    container = grpc["spec"]["predictor"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["port"] == ports["fewstep-grpc"][0]["containerPort"]
    assert str(ports["fewstep-grpc"][0]["containerPort"]) in container["args"]


def test_hadolint_passes_the_dockerfile():
    done = run(str(BIN / "hadolint"), "docker/Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_passes_the_deployment_files():
    done = run(
        str(BIN / "yamllint"), "-c", ".yamllint.yaml", "--strict", "k8s", "docker/compose.yaml"
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_and_unit_tests_the_rules():
    done = run("promtool", "check", "rules", "fewstep-rules.yaml", cwd=MONITORING)
    assert done.returncode == 0 and "SUCCESS: 18 rules found" in done.stdout, (
        done.stdout + done.stderr
    )
    done = run("promtool", "test", "rules", "fewstep-rules.test.yaml", cwd=MONITORING)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (MONITORING / "fewstep-rules.test.yaml").read_text())
    )
    alerts = {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    assert tested == alerts and len(alerts) == 8


def rules() -> dict:
    return yaml.safe_load((MONITORING / "fewstep-rules.yaml").read_text())


def test_the_prometheus_rule_is_the_rules_file():
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["spec"] == rules()


def registry_names() -> set[str]:
    """Every sample name fewstep's registry exposes (histograms: _bucket, _count, _sum)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}
        names |= {family.name + s for s in suffixes.get(family.type, ())}
    return names


def dashboard() -> dict:
    return json.loads((MONITORING / "fewstep-dashboard.json").read_text())


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_dashboard_and_alerts_name_only_metrics_fewstep_exports():
    exprs = dashboard_queries() + [r["expr"] for g in rules()["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"(?<![\w:])fewstep_[a-z_]+(?![\w:])", e)}
    known = registry_names()
    assert used - known == set()
    # the dashboard shows every metric family the issue names
    families = {re.sub(r"_(bucket|count|sum|total)$", "", m) for m in used}
    assert {
        "fewstep_requests",
        "fewstep_request_duration_seconds",
        "fewstep_queue_wait_seconds",
        "fewstep_compute_seconds",
        "fewstep_queue_depth",
        "fewstep_queue_lag",
        "fewstep_batch_samples",
        "fewstep_forward_seconds",
        "fewstep_nfe",
        "fewstep_real_time_factor",
        "fewstep_rejected",
        "fewstep_model_ready",
        "fewstep_model_runtime_info",
    } <= families


def test_dashboard_quantiles_are_over_rates_and_it_has_its_variables():
    for expr in dashboard_queries():
        for quantile in re.findall(r"histogram_quantile\(([^,]+),\s*(.+)", expr):
            assert "rate(" in quantile[1], expr  # never cumulative since start
    names = [v["name"] for v in dashboard()["templating"]["list"]]
    assert names == ["datasource", "namespace", "model"]
    assert any(p["type"] == "heatmap" for p in dashboard()["panels"])
