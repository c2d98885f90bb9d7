"""One exception type for every refusal the coordinator sends back.

Validation, authentication and round-state checks live in different modules but must all end as a gRPC
status with a message a device operator can act on, and as a `reason` label on the rejects metric. Raising
`SyncError` anywhere and converting it once, at the RPC boundary, keeps both consistent.
"""

from __future__ import annotations

import grpc


class SyncError(Exception):
    """A request the coordinator refuses: a gRPC status code, a human message and a metric reason.

    `reason` is a short, bounded label (e.g. "bad_token", "stale_base") used as a Prometheus label and
    in logs; `message` is what the caller reads and may name tensors, rounds and sizes.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    def __repr__(self) -> str:
        return f"SyncError({self.code.name}, {self.message!r}, reason={self.reason!r})"


def invalid(message: str, reason: str = "invalid_argument") -> SyncError:
    return SyncError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def precondition(message: str, reason: str = "failed_precondition") -> SyncError:
    return SyncError(grpc.StatusCode.FAILED_PRECONDITION, message, reason)


def unauthenticated(message: str, reason: str = "unauthenticated") -> SyncError:
    return SyncError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


def permission_denied(message: str, reason: str = "permission_denied") -> SyncError:
    return SyncError(grpc.StatusCode.PERMISSION_DENIED, message, reason)
