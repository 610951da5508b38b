"""Errors as values a client can read: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
import math

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from router.failures import NoAcceptedAnswer, RouteFailed, RouteIncapable, RouteUnavailable
from workers.errors import BackendError, FailureKind

log = logging.getLogger("frugal.gateway")


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002  (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers={**self.headers(), **(extra_headers or {})},
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")


def rate_limited(message: str, retry_after_s: float) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded", retry_after_s=retry_after_s)


#: What each capability a request may need is, in an error message.
_NEEDS = {"tools": "tool calls", "images": "image inputs", "audio": "audio inputs", "files": "file inputs"}


def error_for(failure: RouteFailed | RouteUnavailable | RouteIncapable | BackendError) -> APIError:
    """The client-facing error for a routing failure (or a stream's upstream failure)."""
    if isinstance(failure, RouteIncapable):
        missing = ", ".join(_NEEDS.get(n, n) for n in sorted(failure.missing))
        return APIError(400, f"No model of '{failure.trace.route}' can take {missing}; use a route or model that "
                             "declares them (models[].capabilities).",
                        param="tools" if failure.missing == {"tools"} else "messages", code="unsupported_content")
    if isinstance(failure, NoAcceptedAnswer):
        return APIError(503, f"{failure} (the route's on_unaccepted is 'error').", type="api_error",
                        code="no_accepted_answer", retry_after_s=failure.retry_after_s)
    if isinstance(failure, RouteUnavailable):
        return APIError(503, str(failure), type="api_error", code="models_cooling_down",
                        retry_after_s=failure.retry_after_s)
    if isinstance(failure, RouteFailed):
        kind, message, retry_after = failure.kind, failure.last.message, failure.retry_after_s
    else:
        kind, message, retry_after = failure.kind, failure.message, failure.retry_after_s
    if kind == FailureKind.BAD_REQUEST:
        return APIError(400, f"The model provider rejected the request: {message}", code="upstream_bad_request")
    if kind == FailureKind.CONTEXT_WINDOW:
        return APIError(400, f"The prompt is too long for the model: {message}", param="messages",
                        code="context_length_exceeded")
    if kind == FailureKind.TIMEOUT:
        return APIError(504, f"The model provider did not answer in time: {message}", type="api_error",
                        code="upstream_timeout")
    if kind == FailureKind.OVERLOADED:
        return APIError(503, f"The model is overloaded: {message}", type="server_error", code="model_overloaded",
                        retry_after_s=retry_after or 1.0)
    if kind == FailureKind.RATE_LIMITED:
        return APIError(429, f"The model provider is rate limiting: {message}", type="rate_limit_error",
                        code="upstream_rate_limited", retry_after_s=retry_after or 1.0)
    return APIError(502, f"The model provider failed: {message}", type="api_error", code="upstream_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; nothing a client sends yields a traceback."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error = APIError(404, f"Unknown path: {request.method} {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            error = APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed")
        else:
            error = APIError(exc.status_code, str(exc.detail))
        return error.response(dict(exc.headers or {}))  # a 405 keeps its Allow header

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return APIError(400, "Invalid request.", code="invalid_request").response()

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The gateway failed unexpectedly; the error has been logged.",
                        type="server_error", code="internal_error").response()

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
