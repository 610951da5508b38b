"""Reading and validating client requests: 400 with the offending `param` for anything wrong, and a 400 that
says so for OpenAI parameters this gateway does not support (never a silent ignore). The body shapes are in
`gateway/request_shapes.py`."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from gateway.errors import APIError, bad_request, too_large
from gateway.request_shapes import (
    INTEGER_PARAMS,
    MAX_CHOICES,
    MESSAGE_ROLES,
    PART_NEEDS,
    ChatCompletionBody,
    CommonBody,
    CompletionBody,
)
from workers.backend import FORWARDED_PARAMS, GenerationRequest, RequestKind
from workers.tokens import decode_tokens

#: OpenAI parameters that exist but that this gateway does not implement yet, with the reason. Each is
#: refused with a 400 that says so, unless its value asks for nothing this gateway does not do (`HARMLESS`).
UNSUPPORTED: dict[str, str] = {
    "audio": "audio output is not supported by this gateway",
    "modalities": "only text output is supported by this gateway",
    "prediction": "predicted outputs are not supported by this gateway",
    "web_search_options": "web search is not supported by this gateway",
    "store": "stored completions are not supported by this gateway",
    "metadata": "stored-completion metadata is not supported by this gateway",
    "service_tier": "choosing a provider's service tier (which changes its price) is not supported by this gateway",
    "moderation": "OpenAI's moderation of input and output is not run by this gateway",
    "echo": "echo is not supported by this gateway",
    "best_of": "best_of is not supported by this gateway",
    "suffix": "suffix is not supported by this gateway",
}

#: Values of unsupported parameters that ask for what this gateway does anyway: accepted, not forwarded.
HARMLESS: dict[str, Any] = {
    "store": lambda value, body: value is False,
    "metadata": lambda value, body: body.get("store") is not True,  # metadata only matters to stored completions
    "modalities": lambda value, body: value == ["text"],
    "service_tier": lambda value, body: value in ("auto", "default"),
    "echo": lambda value, body: value is False,
    "best_of": lambda value, body: value == 1,
    "suffix": lambda value, body: value == "",
}


#: Bodies nested deeper than this are refused: every body is serialised again (cache keys, upstream
#: requests), and serialisers have a recursion limit (orjson's is 255).
MAX_JSON_DEPTH = 64
#: The prompt of a completion that gives none (OpenAI's default: the start of a new document).
DEFAULT_PROMPT = "<|endoftext|>"


def _as_sent_back(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message without what only responses carry (clients append a response's message to the
    conversation as they got it): its annotations, and a stream `index` in its tool calls."""
    if message.get("role") != "assistant":
        return message
    calls = message.get("tool_calls")
    if "annotations" not in message and not (isinstance(calls, list)
                                             and any(isinstance(c, dict) and "index" in c for c in calls)):
        return message
    message = {k: v for k, v in message.items() if k != "annotations"}
    if isinstance(calls, list):
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} if isinstance(c, dict) else c
                                 for c in calls]
    return message


def _check_message(index: int, message: Any) -> None:
    """One chat message against its role's shape; the 400 names the message and field."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"Invalid value for '{where}': a message must be an object.", param=where,
                          code="invalid_value")
    role = message.get("role")
    shape = MESSAGE_ROLES.get(role) if isinstance(role, str) else None
    if shape is None:
        raise bad_request(f"Invalid value for '{where}.role': expected one of {', '.join(MESSAGE_ROLES)}.",
                          param=f"{where}.role", code="invalid_value")
    try:
        shape.model_validate(message)
    except ValidationError as exc:
        raise _validation_error(exc, prefix=where) from exc


def needs_of(body: dict[str, Any]) -> frozenset[str]:
    """What a chat body needs of a model beyond text: tools (tool definitions, or a conversation with tool
    calls or results in it), images, audio, files (content parts of those types)."""
    needs = set()
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    for message in body.get("messages") or ():
        if message.get("role") in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            needs.add("tools")
        content = message.get("content")
        if isinstance(content, list):
            needs.update(PART_NEEDS[p["type"]] for p in content if p.get("type") in PART_NEEDS)
    return frozenset(needs)


def _param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's location as OpenAI spells a param: messages[0].content."""
    out = ""
    after_index = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            after_index = True
            continue
        label = str(part)
        tag = after_index and label in _UNION_LABELS  # a tagged union's branch, right after a list index
        after_index = False
        if tag or label in ("str", "list[...]", "int", "function-after[_has_content()]") or "[" in label:
            continue  # union-branch labels, not part of the client's field path
        out += ("." if out else "") + label
    return out


#: Labels pydantic puts in an error's location for the branch of a union (tagged unions use the tag).
_UNION_LABELS = frozenset({"text", "refusal", "image_url", "input_audio", "file", "function", "custom", "dict"})


def json_depth(value: Any) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (a scalar is 0 deep)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


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
    if json_depth(body) > MAX_JSON_DEPTH:
        raise bad_request(f"The JSON body nests objects or arrays more than {MAX_JSON_DEPTH} levels deep.",
                          code="invalid_json")
    return body


def _without_unsupported(body: dict[str, Any]) -> dict[str, Any]:
    """`body` without the unsupported parameters whose values are harmless; 400 for any other one."""
    present = [name for name in body if name in UNSUPPORTED]
    for name in present:
        if not HARMLESS.get(name, lambda value, body: False)(body[name], body):
            raise bad_request(f"Unsupported parameter: '{name}': {UNSUPPORTED[name]}.", param=name,
                              code="unsupported_parameter")
    return {k: v for k, v in body.items() if k not in UNSUPPORTED} if present else body


def _validation_error(exc: ValidationError, prefix: str = "") -> APIError:
    """The 400 for a pydantic error: of its errors the most specific (the deepest location), so that a
    list of parts is blamed on the part that is wrong, not on not being a string."""
    errors = exc.errors()
    # the deepest error; at equal depth one that says what is wrong with a value of the right type
    error = max(errors, key=lambda e: (len(_param_path(e["loc"])), not e["type"].endswith("_type")))
    param = _param_path(error["loc"])
    if error["type"] == "string_type" and any(e["type"] == "list_type" and _param_path(e["loc"]) == param
                                               for e in errors):
        where = (prefix + "." + param) if prefix else param
        items = "content parts" if where.endswith("content") else "strings"
        return bad_request(f"Invalid value for '{where}': expected a string or an array of {items}.", param=where,
                           code="invalid_value")
    if prefix:
        param = prefix + ("." + param if param and not param.startswith("[") else param)
    if error["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if error["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = error["msg"].removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request"
    return bad_request(f"Invalid value for {where}: {message}.", param=param or None, code="invalid_value")


#: Every parameter OpenAI defines for each endpoint: an explicit null for one of them means "absent", as
#: at OpenAI.
KNOWN_PARAMS = {"chat": frozenset(ChatCompletionBody.model_fields) | frozenset(UNSUPPORTED),
                "completion": frozenset(CompletionBody.model_fields) | frozenset(UNSUPPORTED)}


def _validate(kind: RequestKind, body: dict[str, Any]) -> CommonBody:
    model = ChatCompletionBody if kind == "chat" else CompletionBody
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


class ParsedRequest:
    """A validated request: what to generate, and the few things the gateway itself needs."""

    __slots__ = ("model", "stream", "include_usage", "generation", "user", "prompts")

    def __init__(self, model: str, stream: bool, include_usage: bool, generation: GenerationRequest,
                 user: str | None, prompts: list[str] | None = None) -> None:
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        self.generation = generation
        self.user = user
        #: Completions: every prompt of the request (`generation.prompt` is the first).
        self.prompts = prompts or [generation.prompt]


def _prompts(prompt: str | list[Any]) -> list[str]:
    """A completion's prompts as text: a string, a list of strings, or token ids (one list, or a list of
    lists) in cl100k_base, the encoding of OpenAI's completion models."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    token_lists = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    try:
        return [decode_tokens(ids) for ids in token_lists]
    except ValueError as exc:
        raise bad_request(f"Invalid value for 'prompt': {exc}.", param="prompt", code="invalid_value") from exc


def parse_request(kind: RequestKind, body: dict[str, Any]) -> ParsedRequest:
    """Validate an OpenAI chat or completion body (raises `APIError` 400)."""
    known = KNOWN_PARAMS[kind]
    null_prompt = kind == "completion" and "prompt" in body and body["prompt"] is None
    body = {name: value for name, value in body.items() if value is not None or name not in known}
    if null_prompt:
        body["prompt"] = DEFAULT_PROMPT  # OpenAI's default for a null prompt
    body = _without_unsupported(body)
    parsed = _validate(kind, body)
    parsed.cross_checks()
    if kind == "chat":
        for index, message in enumerate(body["messages"]):
            _check_message(index, _as_sent_back(message) if isinstance(message, dict) else message)
    params = {name: body[name] for name in FORWARDED_PARAMS if body.get(name) is not None}
    for name in INTEGER_PARAMS & params.keys():
        params[name] = getattr(parsed, name)  # 2.0 was read as 2
    if params.get("n") == 1:
        del params["n"]
    generation = GenerationRequest(kind=kind, params=params)
    prompts = None
    if kind == "chat":
        generation.messages = [_as_sent_back(m) for m in body["messages"]]
        generation.needs = needs_of(body)
    else:
        prompts = _prompts(body["prompt"])
        generation.prompt = prompts[0]
        if parsed.n * len(prompts) > MAX_CHOICES:
            raise bad_request(f"Invalid value for 'prompt': at most {MAX_CHOICES} choices in all (n times the "
                              "number of prompts).", param="prompt", code="invalid_value")
        if len(prompts) > 1 and parsed.stream:
            raise bad_request("Streaming several prompts in one request is not supported by this gateway; send "
                              "one request per prompt.", param="prompt", code="unsupported_value")
    stream = bool(parsed.stream)
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    return ParsedRequest(parsed.model, stream, include_usage, generation, parsed.user, prompts)
