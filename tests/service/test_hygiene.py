"""Protocol hygiene on a real server: trusted Host headers, CORS off unless configured,
gRPC over TLS with tritonclient."""

from __future__ import annotations

import subprocess

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import serve


def test_trusted_hosts_refuse_other_host_headers():
    with serve(trusted_hosts=["127.0.0.1", "api.example.com"]) as s:
        assert httpx.get(s.url + "/healthz").status_code == 200
        good = httpx.get(s.url + "/v1/models", headers={"Host": "api.example.com"})
        assert good.status_code == 200
        rebound = httpx.get(s.url + "/v1/models", headers={"Host": "evil.example"})
        assert rebound.status_code == 400


def test_cors_is_off_unless_origins_are_configured(server):
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    off = httpx.options(server.url + "/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    with serve(cors_origins=["https://app.example.com"]) as s:
        on = httpx.options(s.url + "/v1/images/generations", headers=preflight)
        assert on.status_code == 200
        assert on.headers["access-control-allow-origin"] == "https://app.example.com"
        other = httpx.options(
            s.url + "/v1/images/generations", headers={**preflight, "Origin": "https://x.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_grpc_serves_tls_with_the_configured_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    settings = {"grpc_tls_cert": cert, "grpc_tls_key": key}
    with serve(grpc=True, grpc_port=0, host="127.0.0.1", **settings) as s:
        url = f"localhost:{s.app.state.grpc_port}"
        secure = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert))
        try:
            inputs = [grpcclient.InferInput("label", [1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([b"dark"], dtype=object))
            assert secure.infer("toy", inputs).as_numpy("image").shape == (1, 4, 4, 1)
        finally:
            secure.close()
        plain = grpcclient.InferenceServerClient(url)
        try:
            with pytest.raises(InferenceServerException):
                plain.is_server_live()
        finally:
            plain.close()
