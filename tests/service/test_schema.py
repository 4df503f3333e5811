"""The OpenAPI schema against the live server: schemathesis (a fuzzer no one here wrote)
runs every operation with all its checks; the schema documents what the server answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import serve

KEY = "schema-test-key-0001"
# A request valid by the schema may still not fit the model it names (a sampler it lacks,
# steps past its limit, a label it does not know): the schema cannot say that per model,
# and the answer is a 400 that says what to change. Every other check runs as shipped.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429"]
"""


@pytest.fixture(scope="module")
def server():
    with serve(api_key=[KEY], host="127.0.0.1") as s:
        yield s


def test_schema_documents_errors_keys_and_required_fields(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    images = schema["paths"]["/v1/images/generations"]["post"]
    for code in ("400", "401", "404", "429", "503"):
        ref = images["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/Error"
    assert "422" in images["responses"] and images["security"] == [{"HTTPBearer": []}]
    v2 = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert v2["responses"]["415"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OIPError"
    )
    assert set(v2["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert "model" in schema["components"]["schemas"]["GenerationRequest"]["required"]
    live = schema["paths"]["/v2/health/live"]["get"]
    assert live["responses"] == {"200": {"description": "the server is live (empty body)"}}
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "security" not in schema["paths"]["/metrics"]["get"]
    allow = httpx.request("PATCH", server.url + "/v1/jobs/job_x")
    assert allow.status_code == 405 and allow.headers["allow"] == "DELETE, GET"


def test_schemathesis_finds_no_server_error_and_no_mismatch(server, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        *("--config-file", str(config), "run", server.url + "/openapi.json"),
        *("--checks", "all", "--max-examples", "50", "--header", f"Authorization: Bearer {KEY}"),
        # one worker: CPython 3.11's ast module (hypothesis describes strategies with it) is
        # not safe to use from two threads at once ("AST constructor recursion depth")
        *("--workers", "1", "--no-color"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = run.stdout + run.stderr
    found = re.search(r"(\d+) generated, (\d+) passed", report)
    assert run.returncode == 0 and found, report[-6000:]
    generated, passed = map(int, found.groups())
    assert generated >= 1000 and passed == generated, report[-3000:]
    assert "Selected: 21/21" in report and "Tested: 21" in report
    print(f"\nschemathesis: {generated} cases over 21 operations, all checks, all passed")
