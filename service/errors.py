"""The error tree of the service and its one mapping to HTTP status codes.

Every error carries a message that tells the user what to change. Bodies follow the OpenAI
error shape, {"error": {"message", "type", "param", "code"}}, which the official SDKs parse;
the Open Inference Protocol surfaces send {"error": message} with the same HTTP status, and
over gRPC the status code named by `grpc_code` (the canonical google.rpc mapping).
"""

from __future__ import annotations


class FewstepError(Exception):
    """Base of every error the service reports on purpose."""

    status = 500
    type = "server_error"
    code = "internal_error"
    grpc_code = "INTERNAL"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message, self.param, self.retry_after = message, param, retry_after

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(-(-self.retry_after // 1))))}


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: "1s", "6m0s", "20ms"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(-(-seconds // 1))
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class InvalidRequest(FewstepError):
    status, type, code = 400, "invalid_request_error", "invalid_parameter"
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(FewstepError):
    """No API key, or one the service does not know (the body never says which)."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"
    grpc_code = "UNAUTHENTICATED"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class Forbidden(FewstepError):
    """A known key asked for what its limits do not allow (such as a priority): 403, not
    400, because the same request is fine from a key that has the permission."""

    status, type, code = 403, "permission_error", "permission_denied"
    grpc_code = "PERMISSION_DENIED"


class UnknownModel(FewstepError):
    status, type, code = 404, "invalid_request_error", "model_not_found"
    grpc_code = "NOT_FOUND"


class JobNotFound(FewstepError):
    status, type, code = 404, "invalid_request_error", "job_not_found"
    grpc_code = "NOT_FOUND"


class DeadlineExceeded(FewstepError):
    status, type, code = 408, "timeout_error", "deadline_exceeded"
    grpc_code = "DEADLINE_EXCEEDED"


class Conflict(FewstepError):
    status, type, code = 409, "invalid_request_error", "conflict"
    grpc_code = "ABORTED"


class PayloadTooLarge(FewstepError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"
    grpc_code = "RESOURCE_EXHAUSTED"


class UnsupportedMediaType(FewstepError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"
    grpc_code = "INVALID_ARGUMENT"


class JobFailed(FewstepError):
    """The job ran and failed (for example non-finite values); the service stays healthy."""

    status, type, code = 422, "generation_error", "generation_failed"


class QueueFull(FewstepError):
    """The queue will not take the job now; `reason` labels fewstep_rejected_total."""

    status, type, code = 429, "rate_limit_error", "queue_full"
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "queue_full"  # the queued-samples bound (a memory guard)


class Overloaded(QueueFull):
    """The work queued ahead would keep the job waiting longer than the model's target."""

    code = reason = "predicted_wait"


class DeadlineUnmeetable(QueueFull):
    """The job could not even start before its deadline: refused at once, no compute spent.
    429 rather than 408: the same request fits once the queue is shorter (Retry-After)."""

    code = reason = "deadline_unmeetable"


class RateLimited(FewstepError):
    """A principal's quota (requests per second, samples in flight) is spent for now.

    Carries OpenAI's x-ratelimit-* headers for the spent `resource` ("requests" or
    "samples"): the limit, what remains, and when it is back in full."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        resource: str = "requests",
        limit: int = 0,
        remaining: int = 0,
        reset: float = 0.0,
        param: str | None = None,
    ):
        super().__init__(message, param=param, retry_after=retry_after)
        self.resource, self.limit, self.remaining, self.reset = resource, limit, remaining, reset

    def headers(self) -> dict[str, str]:
        r = self.resource
        return {
            **super().headers(),
            f"x-ratelimit-limit-{r}": str(self.limit),
            f"x-ratelimit-remaining-{r}": str(max(0, self.remaining)),
            f"x-ratelimit-reset-{r}": reset_text(self.reset),
        }


class NotReady(FewstepError):
    status, type, code = 503, "server_error", "not_ready"
    grpc_code = "UNAVAILABLE"


class QueueUnavailable(FewstepError):
    """The shared queue (Redis) does not answer; the request can be retried as it is."""

    status, type, code = 503, "server_error", "queue_unavailable"
    grpc_code = "UNAVAILABLE"


class TextFrontendUnavailable(FewstepError):
    """The speech text front end (Festival) hung or died; it is being restarted, so the
    same request can be retried (engines.speech.frontend.FrontendUnavailable maps here)."""

    status, type, code = 503, "server_error", "text_frontend_unavailable"
    grpc_code = "UNAVAILABLE"
