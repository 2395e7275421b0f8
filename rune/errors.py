"""The one error tree of Rune, shared by every program.

    RuneError                     gRPC status          CLI exit
     ├── InvalidArgument          INVALID_ARGUMENT     255
     ├── Unauthenticated          UNAUTHENTICATED      255
     ├── PermissionDenied         PERMISSION_DENIED    255
     ├── NotFound                 NOT_FOUND            255
     ├── NotRunning               FAILED_PRECONDITION  255
     ├── ResourceExhausted        RESOURCE_EXHAUSTED   255
     ├── DeadlineExceeded         DEADLINE_EXCEEDED    124
     ├── IdleTimeout              ABORTED              254  (no I/O for the server's idle timeout)
     ├── Unavailable              UNAVAILABLE          255  (agent, broker or apiserver lost)
     └── Internal                 INTERNAL             255

Each class carries a short wire `code` (used in NATS error frames) and the name
of its gRPC status; the mapping to grpc objects lives in the apiserver and the
CLI so that the agent never imports grpc.
"""

from __future__ import annotations


class RuneError(Exception):
    code = "internal"
    grpc_status = "INTERNAL"
    exit_code = 255

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))

    @property
    def message(self) -> str:
        return str(self)

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidArgument(RuneError):
    code = "invalid_argument"
    grpc_status = "INVALID_ARGUMENT"


class Unauthenticated(RuneError):
    code = "unauthenticated"
    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(RuneError):
    code = "permission_denied"
    grpc_status = "PERMISSION_DENIED"


class NotFound(RuneError):
    code = "not_found"
    grpc_status = "NOT_FOUND"


class NotRunning(RuneError):
    code = "not_running"
    grpc_status = "FAILED_PRECONDITION"


class ResourceExhausted(RuneError):
    code = "resource_exhausted"
    grpc_status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(RuneError):
    code = "deadline_exceeded"
    grpc_status = "DEADLINE_EXCEEDED"
    exit_code = 124


class IdleTimeout(RuneError):
    code = "idle_timeout"
    grpc_status = "ABORTED"
    exit_code = 254


class Unavailable(RuneError):
    code = "unavailable"
    grpc_status = "UNAVAILABLE"


class Internal(RuneError):
    code = "internal"
    grpc_status = "INTERNAL"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument, Unauthenticated, PermissionDenied, NotFound, NotRunning,
        ResourceExhausted, DeadlineExceeded, IdleTimeout, Unavailable, Internal,
    )
}
_BY_STATUS = {cls.grpc_status: cls for cls in _BY_CODE.values()}


def from_wire(payload: object) -> RuneError:
    """Rebuilds an error from an error frame's payload; unknown shapes become Internal."""
    if isinstance(payload, dict):
        cls = _BY_CODE.get(str(payload.get("code")), Internal)
        return cls(str(payload.get("message") or ""))
    return Internal(f"malformed error payload: {payload!r}")


def from_status(status_name: str, message: str) -> RuneError:
    """Rebuilds an error from a gRPC status name (e.g. 'NOT_FOUND')."""
    return _BY_STATUS.get(status_name, Unavailable if status_name == "CANCELLED" else Internal)(
        message
    )
