"""Reading and validating client requests: 400 with the offending `param` for anything wrong,
and a 400 that says so for OpenAI parameters this gateway does not support (never a silent ignore)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import ClientDisconnect, Request

from gateway.errors import APIError, bad_request, too_large
from workers.backend import SAMPLING_PARAMS, GenerationRequest, RequestKind

#: OpenAI parameters that exist but that this gateway does not implement yet, with the reason.
UNSUPPORTED: dict[str, str] = {
    "tools": "tool calling is not supported by this gateway yet",
    "tool_choice": "tool calling is not supported by this gateway yet",
    "parallel_tool_calls": "tool calling is not supported by this gateway yet",
    "functions": "function calling is not supported by this gateway (and deprecated by OpenAI)",
    "function_call": "function calling is not supported by this gateway (and deprecated by OpenAI)",
    "audio": "audio output is not supported by this gateway",
    "modalities": "only text output is supported by this gateway",
    "prediction": "predicted outputs are not supported by this gateway",
    "web_search_options": "web search is not supported by this gateway",
    "reasoning_effort": "reasoning_effort is not supported by this gateway yet",
    "store": "stored completions are not supported by this gateway",
    "metadata": "stored-completion metadata is not supported by this gateway",
    "service_tier": "service_tier is not supported by this gateway",
    "echo": "echo is not supported by this gateway",
    "best_of": "best_of is not supported by this gateway",
    "suffix": "suffix is not supported by this gateway",
}


class _Body(BaseModel):
    # strict: "yes" is not a boolean and "1" is not a number, as in OpenAI's own API.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    refusal: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class _Common(_Body):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def cross_checks(self) -> None:
        """Rules that tie several fields together (raised with the field to blame)."""
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise bad_request("Invalid value for 'stop': at most 4 sequences.", param="stop", code="invalid_value")
        if self.stream_options is not None and not self.stream:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options", code="invalid_value")


class ChatCompletionBody(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    def cross_checks(self) -> None:
        super().cross_checks()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs",
                              code="invalid_value")


class CompletionBody(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def cross_checks(self) -> None:
        super().cross_checks()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise bad_request("Invalid value for 'prompt': this gateway takes one prompt per request.",
                              param="prompt", code="invalid_value")


def _param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's location as OpenAI spells a param: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[...]", "function-after[_has_content()]") or "[" in str(part):
            continue  # union-branch labels, not part of the client's field path
        else:
            out += ("." if out else "") + str(part)
    return out


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over `max_bytes` without reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise too_large(max_bytes)
        except ValueError as exc:
            raise bad_request("Content-Length is not a number.") from exc
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise APIError(400, "The client closed the connection while sending the body.",
                       code="client_disconnected") from exc
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in body:
        if name in UNSUPPORTED and body[name] is not None:
            raise bad_request(f"Unsupported parameter: '{name}': {UNSUPPORTED[name]}.", param=name,
                              code="unsupported_parameter")


def _validate(model: type[_Common], body: dict[str, Any]) -> _Common:
    _refuse_unsupported(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param_path(error["loc"])
        if error["type"] == "extra_forbidden":
            raise bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                              code="unknown_parameter") from exc
        if error["type"] == "missing":
            raise bad_request(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter") from exc
        message = error["msg"].removeprefix("Value error, ")
        where = f"'{param}'" if param else "the request"
        raise bad_request(f"Invalid value for {where}: {message}.", param=param or None,
                          code="invalid_value") from exc


class ParsedRequest:
    """A validated request: what to generate, and the few things the gateway itself needs."""

    __slots__ = ("model", "stream", "include_usage", "generation", "user")

    def __init__(self, model: str, stream: bool, include_usage: bool, generation: GenerationRequest,
                 user: str | None) -> None:
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        self.generation = generation
        self.user = user


def parse_request(kind: RequestKind, body: dict[str, Any]) -> ParsedRequest:
    """Validate an OpenAI chat or completion body (raises `APIError` 400)."""
    schema = ChatCompletionBody if kind == "chat" else CompletionBody
    parsed = _validate(schema, body)
    parsed.cross_checks()
    params = {name: body[name] for name in SAMPLING_PARAMS if body.get(name) is not None}
    if params.get("n") == 1:
        del params["n"]
    generation = GenerationRequest(kind=kind, params=params)
    if kind == "chat":
        generation.messages = body["messages"]
    else:
        prompt = body["prompt"]
        generation.prompt = prompt[0] if isinstance(prompt, list) else prompt
    stream = bool(parsed.stream)
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    return ParsedRequest(parsed.model, stream, include_usage, generation, parsed.user)
