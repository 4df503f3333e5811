"""The error values the security layer adds: status, body shape, headers, gRPC code."""

from __future__ import annotations

from service.errors import (
    Forbidden,
    RateLimited,
    TextFrontendUnavailable,
    Unauthorized,
    reset_text,
)


def test_unauthorized_is_openai_shaped_and_asks_for_a_bearer_token():
    err = Unauthorized("missing API key; send Authorization: Bearer KEY")
    assert err.status == 401 and err.grpc_code == "UNAUTHENTICATED"
    assert err.body()["error"]["code"] == "invalid_api_key"
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert err.headers() == {"WWW-Authenticate": "Bearer"}


def test_rate_limited_carries_retry_after_and_openai_ratelimit_headers():
    err = RateLimited("slow down", retry_after=0.2, limit=5, remaining=0, reset=1.5)
    assert err.status == 429 and err.grpc_code == "RESOURCE_EXHAUSTED"
    assert err.headers() == {
        "Retry-After": "1",  # whole seconds, rounded up, at least 1
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
    }
    samples = RateLimited("busy", retry_after=3, resource="samples", limit=8, remaining=-2)
    assert samples.headers()["x-ratelimit-remaining-samples"] == "0"


def test_reset_text_is_openais_duration_format():
    assert [reset_text(s) for s in (0.02, 0.9994, 1.0, 1.2, 59.5, 360.0, 61)] == [
        "20ms",
        "999ms",
        "1s",
        "2s",
        "1m0s",
        "6m0s",
        "1m1s",
    ]


def test_forbidden_and_frontend_unavailable():
    assert (Forbidden("x").status, Forbidden("x").grpc_code) == (403, "PERMISSION_DENIED")
    err = TextFrontendUnavailable("festival restarted", retry_after=1)
    assert err.status == 503 and err.grpc_code == "UNAVAILABLE" and err.headers()
