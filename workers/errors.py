"""Backend failures, described so the router can act on them without knowing the provider."""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    SERVER = "server_error"
    CONNECTION = "connection_error"
    BAD_REQUEST = "bad_request"
    AUTH = "auth_error"
    NOT_FOUND = "not_found"
    CONTEXT_WINDOW = "context_window_exceeded"
    #: The model is healthy but busy (a full queue): try another model, or this one after Retry-After.
    OVERLOADED = "overloaded"
    UNKNOWN = "unknown"


#: Failures worth retrying on the same deployment (after a backoff).
RETRYABLE = frozenset(
    {FailureKind.TIMEOUT, FailureKind.RATE_LIMITED, FailureKind.SERVER, FailureKind.CONNECTION}
)
#: Failures that say the request itself is wrong: another model would reject it too.
CLIENT_FAULT = frozenset({FailureKind.BAD_REQUEST})
#: Failures that say nothing against the model's health: they never count towards a cooldown.
NOT_UNHEALTHY = CLIENT_FAULT | {FailureKind.OVERLOADED, FailureKind.CONTEXT_WINDOW}


class BackendError(Exception):
    """A backend could not answer."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def __repr__(self) -> str:
        return f"BackendError({self.kind.value}, status={self.status}, {self.message!r})"


def retry_after_seconds(headers: object) -> float | None:
    """A provider's Retry-After header (seconds), when there is one and it is a number."""
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def kind_for_status(status: int) -> FailureKind:
    """Classify an upstream HTTP status the way OpenAI-compatible providers use them."""
    if status == 408:
        return FailureKind.TIMEOUT
    if status == 429:
        return FailureKind.RATE_LIMITED
    if status in (401, 403):
        return FailureKind.AUTH
    if status == 404:
        return FailureKind.NOT_FOUND
    if status in (400, 413, 422):
        return FailureKind.BAD_REQUEST
    if status >= 500:
        return FailureKind.SERVER
    return FailureKind.UNKNOWN
