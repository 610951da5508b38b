"""The stand-in provider's state and what every protocol shares: admission (key, body, injected faults) and
the answer to send (a recorded answer, cut by max_tokens and stop). The protocols' endpoints are in
`standin.openai` and `standin.anthropic`; `standin.server` puts them together."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from standin.data import RecordedAnswers, Recording, deterministic_answer
from standin.faults import Behaviour, Faults
from workers.openai_format import content_text
from workers.tokens import split_tokens


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    headers = {"retry-after": "1"} if status == 429 else None
    return json_response({"error": {"message": message, "type": kind, "param": None, "code": None}}, status, headers)


def query_candidates(messages: list[dict[str, Any]]) -> list[str]:
    """Texts under which a chat may have been recorded: the last user message, alone or with the system
    prompt in the data pack's `System: ...\\n\\nUser: ...` form."""
    user = next((content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    system = next((content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")), None)
    candidates = [user]
    if system is not None:
        candidates.insert(0, f"System: {system}\n\nUser: {user}")
    return candidates


class Answer:
    """The text to send for one request, cut by max_tokens and stop, with usage and log-probs."""

    def __init__(self, text: str, recording: Recording | None, prompt_tokens: int, params: dict[str, Any]):
        pieces = split_tokens(text)
        finish = "stop"
        limit = params.get("max_completion_tokens") or params.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        stops = params.get("stop")
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        joined = "".join(pieces)
        cut = min((joined.find(s) for s in stops if s and s in joined), default=-1)
        if cut >= 0:
            pieces, finish = split_tokens(joined[:cut]), "stop"
        self.pieces = pieces
        self.text = "".join(pieces)
        self.finish_reason = finish
        self.prompt_tokens = prompt_tokens
        if recording is not None and recording.output_tokens is not None and finish == "stop":
            self.completion_tokens = int(recording.output_tokens)
        else:
            self.completion_tokens = len(pieces)
        # The recorded confidence is a log-prob of the answer; spread it over the answer's tokens.
        self.token_logprob: float | None = None
        if recording is not None and recording.confidence is not None and pieces:
            self.token_logprob = float(recording.confidence) / len(pieces)


class StandIn:
    """Answers requests from recorded answers; counts what it was asked."""

    def __init__(self, answers: RecordedAnswers, faults: Faults, api_key: str | None = None) -> None:
        self.answers = answers
        self.faults = faults
        self.api_key = api_key
        self.requests: Counter[str] = Counter()
        #: The last request body per model, without messages/prompt (tests check what was forwarded).
        self.last_params: dict[str, dict[str, Any]] = {}
        #: The last messages (chat) or prompt (completion) per model, as received (tests of prompt rewriting).
        self.last_input: dict[str, Any] = {}

    def answer(self, model: str, candidates: list[str], prompt_tokens: int, params: dict) -> Answer:
        user = params.get("user")
        recording = self.answers.find(model, candidates, user if isinstance(user, str) else None)
        if recording is not None and recording.answer is not None:
            text = recording.answer
            if recording.input_tokens is not None:
                prompt_tokens = int(recording.input_tokens)
        else:
            recording = None
            text = deterministic_answer(model, candidates[-1])
        return Answer(text, recording, prompt_tokens, params)

    async def admit(self, request: Request) -> tuple[dict[str, Any], str, Behaviour] | Response:
        """Authenticate, parse, count and apply the injected faults: a body to answer, or an error."""
        if self.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if request.headers.get("x-api-key", given) != self.api_key:
                return error_response(401, "Incorrect API key provided.", "authentication_error")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error_response(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error_response(400, "you must provide a model parameter")
        model = body["model"]
        self.requests[model] += 1
        self.last_params[model] = {k: v for k, v in body.items() if k not in ("messages", "prompt", "system")}
        self.last_input[model] = body.get("messages", body.get("prompt"))
        behaviour = self.faults.decide(model)
        if behaviour.latency_ms:
            await asyncio.sleep(behaviour.latency_ms / 1000)
        if behaviour.hang:
            await asyncio.Event().wait()  # until the client gives up and disconnects
        if behaviour.status is not None:
            return error_response(behaviour.status, behaviour.message, "server_error")
        return body, model, behaviour
