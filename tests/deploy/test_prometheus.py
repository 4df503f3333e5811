"""The dashboard and the alerts against a real Prometheus (Debian's) scraping a real
`fewstep serve` under load from loadtest/: every dashboard query and every recording rule
returns data through Prometheus' HTTP API, every alert rule evaluates without error, and
the p99 that PromQL computes from fewstep_request_duration_seconds is within 15% of the p99
the load generator measured itself."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from loadtest.run import open_loop, percentile
from tests.service.redisutil import Process, free_port

from .conftest import ROOT, wait_for

MONITORING = ROOT / "k8s/components/monitoring"
MODELS = '["fashion-edm", "fashion-gaussian", "speech-comospeech"]'
# enough requests that the 1% tail holds several of them: with a few dozen, p99 is one
# extreme request, and linear interpolation inside its bucket cannot place it
LOAD_SECONDS = 45.0
RATE = 10.0  # requests/s: about half of what fashion-edm at 4 steps sustains here


def fashion_bodies(count: int) -> list[dict]:
    labels = ["sneaker", "bag", "dress", "trouser", "coat"]
    return [
        {"model": "fashion-edm", "prompt": labels[i % 5], "n": 1, "sampler": "dpmpp_2m",
         "steps": 4, "seed": i}
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    port, prom_port = free_port(), free_port()
    env = {"FEWSTEP_MODELS": MODELS, "FEWSTEP_MAX_QUEUED_SAMPLES": "48"}
    args = ["-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-grpc"]
    api = Process(args, folder / "api.log", env)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "fewstep-rules.yaml")],
        "scrape_configs": [
            {"job_name": "fewstep-api", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "wb"),  # noqa: SIM115 - lives with the process
    )
    url, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(lambda: _ok(url + "/readyz"), 180, "fewstep /readyz")
        wait_for(lambda: _ok(prom + "/-/ready"), 60, "Prometheus")
        yield url, prom, _load(url, prom)
    finally:
        prometheus.terminate()
        prometheus.wait(20)
        api.kill()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _load(url: str, prom: str) -> dict:
    """A burst that overflows the queue (429s) and some speech, then the measured open loop."""

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            big = {"model": "fashion-edm", "prompt": "bag", "n": 8, "steps": 30}
            codes = await asyncio.gather(
                *(client.post("/v1/images/generations", json=big) for _ in range(16))
            )
            speech = {"model": "speech-comospeech", "input": "Hello there.", "voice": "alloy"}
            for _ in range(3):
                r = await client.post("/v1/audio/speech", json={**speech, "response_format": "wav"})
                assert r.status_code == 200, r.text
        return [c.status_code for c in codes]

    codes = asyncio.run(burst())
    assert 429 in codes and 200 in codes
    time.sleep(3)  # a few scrapes between the burst and the measured window
    start = time.time()
    _, outcomes = asyncio.run(open_loop(url, fashion_bodies(1000), RATE, LOAD_SECONDS, seed=1))
    time.sleep(3)  # the last requests' observations scraped
    end = time.time()
    ok = [o.latency for o in outcomes if o.status == 200]
    assert len(ok) == len(outcomes) and len(ok) > 300, [o.status for o in outcomes]
    return {"start": start, "end": end, "p99": percentile(ok, 99), "count": len(ok)}


def query(prom: str, expr: str, at: float) -> list:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr, "time": at}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads((MONITORING / "fewstep-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def substitute(expr: str) -> str:
    """Grafana's variables as the dashboard's 'All' would set them."""
    return (
        expr.replace("$namespace", ".*").replace("$model", ".*").replace("$__rate_interval", "1m")
    )


def test_every_dashboard_query_returns_data(stack):
    _, prom, load = stack
    empty = [
        title
        for title, expr in dashboard_queries()
        if not query(prom, substitute(expr), load["end"])
    ]
    assert empty == []


def test_every_recording_rule_and_alert_operand_returns_data(stack):
    _, prom, load = stack
    rules = yaml.safe_load((MONITORING / "fewstep-rules.yaml").read_text())
    # the 6-hour forward-time baseline needs as much data; 10 minutes is the same query
    window = {"[6h]": "[1m]", "[10m]": "[1m]", "[5m]": "[1m]"}
    recorded = [r for g in rules["groups"] for r in g["rules"] if "record" in r]
    for rule in recorded:
        expr = rule["expr"]
        for long, short in window.items():
            expr = expr.replace(long, short)
        assert query(prom, expr, load["end"]), rule["record"]
        assert query(prom, rule["record"], load["end"]), f"{rule['record']} not recorded"
    groups = httpx.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError")) for g in groups for r in g["rules"]}
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(health) == len(recorded) + len(alerts) == 18
    assert {name: h for name, h in health.items() if h[0] != "ok"} == {}
    # an alert's expression is empty unless it fires; every series it compares has data
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        operands = re.findall(r"\b(?:namespace\w*:\w+:\w+|up\{[^}]*\})", rule["expr"])
        assert operands, rule["alert"]
        for operand in operands:
            assert query(prom, operand, load["end"]), f"{rule['alert']}: {operand} has no data"
    # under a normal load, none of the alerts fires
    firing = httpx.get(prom + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert [a["labels"]["alertname"] for a in firing if a["state"] == "firing"] == []


def test_promql_p99_is_within_15_percent_of_the_load_generators(stack):
    _, prom, load = stack
    bucket = 'fewstep_request_duration_seconds_bucket{endpoint="images"}'
    expr = (
        f"histogram_quantile(0.99, sum by (le) ({bucket} @ {load['end']:.3f}"
        f" - {bucket} @ {load['start']:.3f}))"
    )
    (sample,) = query(prom, expr, load["end"])
    promql = float(sample["value"][1])
    measured = load["p99"]
    print(
        f"p99 over {load['count']} requests: PromQL {promql * 1000:.1f} ms, "
        f"load generator {measured * 1000:.1f} ms ({promql / measured - 1:+.1%})"
    )
    assert abs(promql / measured - 1) <= 0.15
