"""The gateway's OpenAPI document: every public operation with its request and response schemas.

The request schemas are the validation models of `gateway/requests.py` (chat messages as the union of the
role shapes that `_check_message` checks one by one); the response models below describe what
`gateway/responses.py` and the other endpoints write. tests/test_openapi.py runs schemathesis against this
document and against the running gateway, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gateway.openapi_admin import ADMIN_MODELS, admin_paths
from gateway.request_shapes import (
    AssistantMessage,
    ChatCompletionBody,
    CompletionBody,
    FunctionMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)

ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
                        Field(discriminator="role")]


class ChatCompletionRequest(ChatCompletionBody):
    """`POST /v1/chat/completions`: OpenAI's body. `model` names a model or a route of the configuration."""

    messages: list[ChatMessage] = Field(min_length=1)  # type: ignore[assignment]


class CompletionRequest(CompletionBody):
    """`POST /v1/completions`: OpenAI's legacy body. Token-id prompts are read as cl100k_base tokens."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function", "custom"]
    function: FunctionCallOut | None = None
    custom: dict[str, Any] | None = None


class AssistantMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function", "custom"] | None = None
    function: dict[str, Any] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event's data of a streamed chat completion (after the last: `[DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One server-sent event's data of a streamed completion (after the last: `[DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape; every error the gateway answers has it."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    ledger: bool
    models_in_cooldown: list[str]


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: whether an answer was good (docs/gateway.md, "Feedback"). Send `label` or `score`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [{"required": ["label"]},
                                                                          {"required": ["score"]}]})

    #: The answer's `x-request-id` header, or its body's `id`.
    request_id: str = Field(min_length=1, max_length=73)
    label: Literal["good", "bad"] | None = None
    #: 0 to 1; 0.5 or more is good.
    score: float | None = Field(default=None, ge=0, le=1)
    comment: str | None = Field(default=None, max_length=4096)
    #: The right answer (kept only when the gateway stores content).
    correction: str | None = Field(default=None, max_length=65536)


class Feedback(BaseModel):
    object: Literal["feedback"]
    request_id: str
    source: Literal["client"]
    model: str
    label: Literal["good", "bad"]
    score: float
    comment: str | None
    correction_stored: bool
    created_at: int
    updated_at: int


MODELS = (ChatCompletionRequest, CompletionRequest, ChatCompletion, Completion, ChatCompletionChunk, CompletionChunk,
          ModelList, Model, ErrorResponse, Health, Readiness, FeedbackRequest, Feedback)

#: The statuses each kind of operation may answer besides 200, with what they mean (docs/gateway.md).
_ERRORS = {
    "completion": {"400": "The body is invalid, a parameter is unsupported, or no model of the route can take "
                          "the request", "401": "No or an unknown API key", "404": "Unknown model or route",
                   "408": "The request's headers or body did not arrive in time", "413": "The body is too large",
                   "429": "The key's rate limit, or every model's provider, is limiting",
                   "502": "The providers failed", "503": "The models are cooling down or overloaded, or too many "
                   "connections are open", "504": "No answer in time"},
    "model": {"401": "No or an unknown API key", "404": "Unknown model"},
    "feedback": {"400": "The body is invalid (the error names the field)", "401": "No or an unknown API key",
                 "404": "No request with this id was made with this key", "409": "The request got no answer to label",
                 "413": "The body is too large", "503": "The ledger database is unavailable"},
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _errors(kind: str) -> dict[str, Any]:
    return {status: {"description": text, "content": _json("ErrorResponse")} for status, text in _ERRORS[kind].items()}


def _event(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream: its data is a chunk, an error (a provider failing mid-stream), or
    `[DONE]` at the end."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                                         {"$ref": "#/components/schemas/ErrorResponse"}]}},
        ]}}}


def _completion_operation(summary: str, request: str, response: str, chunk: str,
                          operation_id: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {
            "200": {"description": "The answer; with `stream: true` a stream of server-sent events, each a "
                                   "`data:` line with a chunk in OpenAI's shape, then `data: [DONE]`",
                    "content": {**_json(response), "text/event-stream": {"schema": _event(chunk)}}},
            **_errors("completion"),
        },
    }


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The whole document (the app's own title and version)."""
    modes = [(m, "validation" if m.__name__.endswith("Request") else "serialization") for m in MODELS]
    _, definitions = models_json_schema([*modes, *((m, "validation") for m in ADMIN_MODELS)],
                                        ref_template="#/components/schemas/{model}")
    schemas = definitions.get("$defs", {})
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": _completion_operation(
            "Chat completion, from the cheapest model that answers well", "ChatCompletionRequest", "ChatCompletion",
            "ChatCompletionChunk", "createChatCompletion")},
        "/v1/completions": {"post": _completion_operation(
            "Legacy text completion", "CompletionRequest", "Completion", "CompletionChunk", "createCompletion")},
        "/v1/models": {"get": {"summary": "The configured models and routes", "operationId": "listModels",
                               "security": [{"bearer": []}],
                               "responses": {"200": {"description": "The list", "content": _json("ModelList")},
                                             **{k: v for k, v in _errors("model").items() if k == "401"}}}},
        "/v1/models/{model}": {"get": {
            "summary": "One configured model or route", "operationId": "retrieveModel", "security": [{"bearer": []}],
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The model", "content": _json("Model")}, **_errors("model")}}},
        "/v1/feedback": {"post": {
            "summary": "Label an answer good or bad (once per request; sending again replaces the label)",
            "operationId": "createFeedback", "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": _json("FeedbackRequest")},
            "responses": {"200": {"description": "The label as stored", "content": _json("Feedback")},
                          **_errors("feedback")}}},
        "/healthz": {"get": {"summary": "The process is up", "operationId": "health", "responses": {
            "200": {"description": "Up", "content": _json("Health")}}}},
        "/readyz": {"get": {"summary": "The ledger answers; which models are cooling down", "operationId": "ready",
                            "responses": {"200": {"description": "Ready", "content": _json("Readiness")},
                                          "503": {"description": "Not ready", "content": _json("Readiness")}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics", "responses": {
            "200": {"description": "The text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    paths.update(admin_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": app.title, "version": app.version,
                 "description": "Frugal: an OpenAI-compatible, cost-aware LLM gateway (docs/gateway.md)."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "adminKey": {"type": "http", "scheme": "bearer",
                                                        "description": "The admin key ($FRUGAL_ADMIN_KEY)"}}},
    }


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi` at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
