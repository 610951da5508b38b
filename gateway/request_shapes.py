"""The shapes of OpenAI's request bodies as this gateway validates them (strict pydantic models), and the
rules that tie fields together. `gateway/requests.py` reads bodies and applies them; `gateway/openapi.py`
publishes them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from gateway.errors import bad_request

#: Choices one request may ask for in all (`n` times the number of prompts).
MAX_CHOICES = 128


def _integral(value: Any) -> Any:
    """JSON does not tell 1 from 1.0: an integral float is an integer (JSON Schema's rule, and OpenAI's)."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


#: An integer parameter: strict (no strings, no booleans), but 1.0 is 1.
Int = Annotated[int, BeforeValidator(_integral)]
INTEGER_PARAMS = frozenset({"n", "max_tokens", "max_completion_tokens", "seed", "top_logprobs", "logprobs"})


class _Body(BaseModel):
    # strict: "yes" is not a boolean and "1" is not a number, as in OpenAI's own API.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Part(_Body):
    #: OpenAI's prompt-cache breakpoint marker; forwarded as sent.
    prompt_cache_breakpoint: dict[str, Any] | None = None


class TextPart(_Part):
    type: Literal["text"]
    text: str


class RefusalPart(_Part):
    type: Literal["refusal"]
    refusal: str


class ImageURL(_Body):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Body):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Body):
    filename: str | None = None
    file_data: str | None = None
    file_id: str | None = None


class FilePart(_Part):
    type: Literal["file"]
    file: FileRef


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
#: What a content part needs of a model (parts not named here are text).
PART_NEEDS = {"image_url": "images", "input_audio": "audio", "file": "files"}


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class CustomToolCall(_Body):
    id: str = Field(min_length=1)
    type: Literal["custom"]
    custom: dict[str, Any]


class _Message(_Body):
    name: str | None = Field(default=None, max_length=64)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[UserPart]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    refusal: str | None = None
    tool_calls: list[Annotated[ToolCall | CustomToolCall, Field(discriminator="type")]] | None = None
    function_call: FunctionCall | None = None
    audio: dict[str, Any] | None = None
    #: Output-only (a response's URL citations), sent back by clients that append the response's message to
    #: the conversation as it came: accepted, and not forwarded.
    annotations: list[Any] | None = None


class ToolMessage(_Body):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Body):
    role: Literal["function"]
    content: str | None
    name: str = Field(min_length=1, max_length=64)


MESSAGE_ROLES: dict[str, type[_Body]] = {"system": SystemMessage, "developer": SystemMessage, "user": UserMessage,
                                         "assistant": AssistantMessage, "tool": ToolMessage,
                                         "function": FunctionMessage}

_FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(_Body):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class CustomTool(_Body):
    type: Literal["custom"]
    custom: dict[str, Any]


class StreamOptions(_Body):
    include_usage: bool = False
    #: Accepted; Frugal's streams carry no obfuscation padding (docs/gateway.md).
    include_obfuscation: bool | None = None


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


class CommonBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Int | None = None
    n: Int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def cross_checks(self) -> None:
        """Rules that tie several fields together (raised with the field to blame)."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options", code="invalid_value")


class ChatCompletionBody(CommonBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Annotated[FunctionTool | CustomTool, Field(discriminator="type")]] | None = Field(
        default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, max_length=128)
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None

    def cross_checks(self) -> None:
        super().cross_checks()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs",
                              code="invalid_value")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice",
                              code="invalid_value")
        if self.parallel_tool_calls is not None and not self.tools:
            raise bad_request("'parallel_tool_calls' is only allowed when 'tools' are specified.",
                              param="parallel_tool_calls", code="invalid_value")


class CompletionBody(CommonBody):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | Annotated[
        list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    logprobs: Int | None = Field(default=None, ge=0, le=5)

    def cross_checks(self) -> None:
        super().cross_checks()
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise bad_request("Invalid value for 'prompt': a prompt list (and every token list in it) needs at "
                              "least one item.", param="prompt", code="invalid_value")
