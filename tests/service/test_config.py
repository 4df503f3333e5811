"""The security and server-limit settings: read from FEWSTEP_*, validated strictly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_defaults_keep_todays_behaviour():
    s = Settings()
    assert s.host == "0.0.0.0" and s.api_keys == [] and s.api_key_file is None
    assert not s.metrics_auth and s.trusted_hosts == [] and s.cors_origins == []
    assert s.limit_concurrency >= 1 and s.timeout_keep_alive_s >= 1
    assert s.retained_result_bytes >= 2**20 and s.grpc_tls_cert is None


def test_api_keys_from_the_environment_stay_secret(monkeypatch):
    monkeypatch.setenv("FEWSTEP_API_KEY", "sk-first-key, sk-second-key")
    s = Settings()
    assert s.api_keys == ["sk-first-key", "sk-second-key"]
    assert "sk-first-key" not in repr(s) and "sk-first-key" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        (["short"], "at least 8"),
        (["sk-dup-key1", "sk-dup-key1"], "twice"),
        (["sk-has space"], "space"),
    ],
)
def test_bad_api_keys_say_what_to_do(keys, needle):
    with pytest.raises(ValidationError, match=needle):
        Settings(api_key=keys)


def test_lists_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEWSTEP_TRUSTED_HOSTS", "api.example.com,*.example.com,127.0.0.1,[::1]")
    monkeypatch.setenv("FEWSTEP_CORS_ORIGINS", "https://app.example.com")
    s = Settings()
    assert s.trusted_hosts == ["api.example.com", "*.example.com", "127.0.0.1", "[::1]"]
    assert s.cors_origins == ["https://app.example.com"]


@pytest.mark.parametrize(
    "changes",
    [
        {"trusted_hosts": ["https://api.example.com"]},
        {"trusted_hosts": ["api.example.com:8000"]},
        {"cors_origins": ["https://app.example.com/"]},
        {"cors_origins": ["app.example.com"]},
        {"limit_concurrency": 0},
        {"header_timeout_s": 0},
        {"retained_result_bytes": 1000},
        {"api_key_file": "/nonexistent/keys.yaml"},
    ],
)
def test_bad_values_are_refused(changes):
    with pytest.raises(ValidationError):
        Settings(**changes)


def test_grpc_tls_needs_both_files(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    assert Settings(grpc_tls_cert=cert, grpc_tls_key=key).grpc_tls_key == key
    with pytest.raises(ValidationError, match="give both or neither"):
        Settings(grpc_tls_cert=cert)
