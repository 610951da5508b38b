"""Tool calls for the stand-in provider. The data packs record no tool calls, so these are synthetic and
deterministic: asked with tools (and a tool choice other than "none"), the stand-in calls the tool the
request forces, else the first one, with arguments made from the tool's JSON schema and the user's
question; once the conversation ends with a tool's result, it answers the user's question with the
recorded answer, as a model would after using the tool. docs/standin.md says so."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON


def _value(schema: Any, text: str) -> Any:
    """A value that fits `schema`, taken from `text` where it can be."""
    if not isinstance(schema, dict):
        return text
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    numbers = _NUMBER.findall(text)
    if kind == "integer":
        return int(float(numbers[0])) if numbers else 1
    if kind == "number":
        return float(numbers[0]) if numbers else 1.0
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return arguments_for(schema, text)
    return text[:80]


def arguments_for(schema: Any, text: str) -> dict[str, Any]:
    """Arguments for a tool whose parameters are `schema`: every required property (every property when
    none is marked required)."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    names = schema.get("required") if isinstance(schema.get("required"), list) else list(properties)
    return {name: _value(properties.get(name), text) for name in names if isinstance(name, str)}


def choose_call(model: str, tools: list[tuple[str, Any]], forced: str | None, question: str) -> ToolCall | None:
    """The call to make among `tools` ((name, parameters schema) pairs), or None when there is none."""
    if not tools:
        return None
    name, schema = next(((n, s) for n, s in tools if n == forced), tools[0])
    digest = hashlib.sha256(f"{model}\x00{name}\x00{question}".encode()).hexdigest()[:24]
    return ToolCall(f"call_{digest}", name, orjson.dumps(arguments_for(schema, question)).decode())


def openai_call(model: str, body: dict[str, Any], question: str) -> ToolCall | None:
    """The call an OpenAI chat body asks for: tools given, tool choice not "none", and the conversation not
    already ending with a tool's result."""
    messages = body.get("messages") or []
    choice = body.get("tool_choice")
    if choice == "none" or (messages and isinstance(messages[-1], dict)
                            and messages[-1].get("role") in ("tool", "function")):
        return None
    tools = [(t["function"].get("name", ""), t["function"].get("parameters"))
             for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    tools += [(f.get("name", ""), f.get("parameters")) for f in body.get("functions") or [] if isinstance(f, dict)]
    forced = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    return choose_call(model, tools, forced, question)


def anthropic_call(model: str, body: dict[str, Any], question: str) -> ToolCall | None:
    """The same for an Anthropic Messages body (`tools` with `input_schema`, results as `tool_result`)."""
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    content = last.get("content")
    if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
        return None
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
    if choice.get("type") == "none":
        return None
    tools = [(t.get("name", ""), t.get("input_schema")) for t in body.get("tools") or [] if isinstance(t, dict)]
    return choose_call(model, tools, choice.get("name") if choice.get("type") == "tool" else None, question)
