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


class InvalidRequest(FewstepError):
    status, type, code = 400, "invalid_request_error", "invalid_parameter"
    grpc_code = "INVALID_ARGUMENT"


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


class JobFailed(FewstepError):
    """The job ran and failed (for example non-finite values); the service stays healthy."""

    status, type, code = 422, "generation_error", "generation_failed"


class QueueFull(FewstepError):
    status, type, code = 429, "rate_limit_error", "queue_full"
    grpc_code = "RESOURCE_EXHAUSTED"


class NotReady(FewstepError):
    status, type, code = 503, "server_error", "not_ready"
    grpc_code = "UNAVAILABLE"


class QueueUnavailable(FewstepError):
    """The shared queue (Redis) does not answer; the request can be retried as it is."""

    status, type, code = 503, "server_error", "queue_unavailable"
    grpc_code = "UNAVAILABLE"
