"""The error tree of the service and its one mapping to HTTP status codes.

Every error carries a message that tells the user what to change. Bodies follow the OpenAI
error shape, {"error": {"message", "type", "param", "code"}}, which the official SDKs parse.
"""

from __future__ import annotations


class FewstepError(Exception):
    """Base of every error the service reports on purpose."""

    status = 500
    type = "server_error"
    code = "internal_error"

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


class InvalidRequest(FewstepError):
    status, type, code = 400, "invalid_request_error", "invalid_parameter"


class UnknownModel(FewstepError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class JobNotFound(FewstepError):
    status, type, code = 404, "invalid_request_error", "job_not_found"


class DeadlineExceeded(FewstepError):
    status, type, code = 408, "timeout_error", "deadline_exceeded"


class Conflict(FewstepError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(FewstepError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class JobFailed(FewstepError):
    """The job ran and failed (for example non-finite values); the service stays healthy."""

    status, type, code = 422, "generation_error", "generation_failed"


class QueueFull(FewstepError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class NotReady(FewstepError):
    status, type, code = 503, "server_error", "not_ready"
