"""The stand-in provider's HTTP server: OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Plus two control endpoints for tests: `POST/DELETE /_standin/faults` and `GET /_standin/stats`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from standin.anthropic import handle_messages
from standin.data import RecordedAnswers, Recording, deterministic_answer
from standin.faults import Behaviour, FaultRule, Faults
from workers.openai_format import content_text
from workers.tokens import count_tokens, split_tokens


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    headers = {"retry-after": "1"} if status == 429 else None
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}}, status, headers)


def query_candidates(messages: list[dict[str, Any]]) -> list[str]:
    """Texts under which a chat may have been recorded: the last user message, alone or with the system
    prompt in the data pack's `System: ...\\n\\nUser: ...` form."""
    user = next((content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    system = next((content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")), None)
    candidates = [user]
    if system is not None:
        candidates.insert(0, f"System: {system}\n\nUser: {user}")
    return candidates


class _Answer:
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

    def _answer(self, model: str, candidates: list[str], prompt_tokens: int, params: dict) -> _Answer:
        user = params.get("user")
        recording = self.answers.find(model, candidates, user if isinstance(user, str) else None)
        if recording is not None and recording.answer is not None:
            text = recording.answer
            if recording.input_tokens is not None:
                prompt_tokens = int(recording.input_tokens)
        else:
            recording = None
            text = deterministic_answer(model, candidates[-1])
        return _Answer(text, recording, prompt_tokens, params)

    def _logprobs(self, kind: str, answer: _Answer, pieces: list[str], top_n: int) -> Any:
        if answer.token_logprob is None:
            return None
        value = answer.token_logprob
        if kind == "chat":
            return {
                "content": [
                    {
                        "token": p,
                        "logprob": value,
                        "bytes": list(p.encode()),
                        "top_logprobs": [{"token": p, "logprob": value, "bytes": list(p.encode())}][:top_n],
                    }
                    for p in pieces
                ]
            }
        return {
            "tokens": pieces,
            "token_logprobs": [value] * len(pieces),
            "top_logprobs": [{p: value} for p in pieces] if top_n else None,
            "text_offset": [],
        }

    async def _admit(self, request: Request) -> tuple[dict[str, Any], str, Behaviour] | Response:
        """Authenticate, parse, count and apply the injected faults: a body to answer, or an error."""
        if self.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if request.headers.get("x-api-key", given) != self.api_key:
                return _error(401, "Incorrect API key provided.", "authentication_error")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "you must provide a model parameter")
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
            return _error(behaviour.status, behaviour.message, "server_error")
        return body, model, behaviour

    async def handle(self, request: Request, kind: str) -> Response:
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        body, model, behaviour = admitted
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _error(400, "messages must be a non-empty list")
            candidates = query_candidates(messages)
            prompt_tokens = sum(count_tokens(content_text(m.get("content"))) + 3 for m in messages) + 3
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return _error(400, "prompt must be a string")
            candidates = [prompt]
            prompt_tokens = count_tokens(prompt)
        answer = self._answer(model, candidates, prompt_tokens, body)
        n = int(body.get("n") or 1)
        top_n = int(body.get("top_logprobs") or 0) if kind == "chat" else int(body.get("logprobs") or 0)
        want_logprobs = bool(body.get("logprobs"))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(kind, model, answer, n, want_logprobs, top_n, include_usage, behaviour),
                media_type="text/event-stream",
            )
        choices = []
        for index in range(n):
            logprobs = self._logprobs(kind, answer, answer.pieces, top_n) if want_logprobs else None
            if kind == "chat":
                message = {"role": "assistant", "content": answer.text}
                choices.append({"index": index, "message": message, "logprobs": logprobs,
                                "finish_reason": answer.finish_reason})
            else:
                choices.append({"index": index, "text": answer.text, "logprobs": logprobs,
                                "finish_reason": answer.finish_reason})
        return _json({
            "id": f"standin-{uuid.uuid4().hex}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens * n,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens * n,
            },
        })

    async def _stream(self, kind: str, model: str, answer: _Answer, n: int, want_logprobs: bool,
                      top_n: int, include_usage: bool, behaviour: Behaviour) -> AsyncIterator[bytes]:
        ident = f"standin-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def frame(choices: list[dict], usage: dict | None = None) -> bytes:
            payload: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": model,
                                       "choices": choices}
            if include_usage:
                payload["usage"] = usage
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        if kind == "chat":
            yield frame([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
        for position, piece in enumerate(answer.pieces):
            if position == behaviour.fail_after_chunks:
                raise ConnectionAbortedError("injected mid-stream failure")  # the server drops the connection
            if behaviour.chunk_latency_ms:
                await asyncio.sleep(behaviour.chunk_latency_ms / 1000)
            logprobs = self._logprobs(kind, answer, [piece], top_n) if want_logprobs else None
            if kind == "chat":
                yield frame([{"index": i, "delta": {"content": piece}, "logprobs": logprobs,
                              "finish_reason": None} for i in range(n)])
            else:
                yield frame([{"index": i, "text": piece, "logprobs": logprobs, "finish_reason": None}
                             for i in range(n)])
        if kind == "chat":
            yield frame([{"index": i, "delta": {}, "finish_reason": answer.finish_reason} for i in range(n)])
        else:
            yield frame([{"index": i, "text": "", "finish_reason": answer.finish_reason} for i in range(n)])
        if include_usage:
            usage = {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens * n,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens * n,
            }
            yield frame([], usage)
        yield b"data: [DONE]\n\n"


def create_standin_app(answers: RecordedAnswers, faults: Faults | None = None,
                       api_key: str | None = None) -> Starlette:
    """The stand-in provider as an ASGI app."""
    standin = StandIn(answers, faults or Faults(), api_key)

    async def chat(request: Request) -> Response:
        return await standin.handle(request, "chat")

    async def completions(request: Request) -> Response:
        return await standin.handle(request, "completion")

    async def messages(request: Request) -> Response:
        return await handle_messages(standin, request)

    async def models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "frugal-stand-in"}
                for m in sorted(standin.answers.models)]
        return _json({"object": "list", "data": data})

    async def faults_endpoint(request: Request) -> Response:
        if request.method == "DELETE":
            standin.faults.clear()
            return _json({"rules": []})
        if request.method == "POST":
            try:
                standin.faults.add(FaultRule(**orjson.loads(await request.body())))
            except (TypeError, orjson.JSONDecodeError) as exc:
                return _error(400, f"bad fault rule: {exc}")
        return _json({"rules": [dataclasses.asdict(rule) for rule in standin.faults.rules()]})

    async def stats(request: Request) -> Response:
        return _json({"requests": dict(standin.requests), "last_params": standin.last_params,
                      "last_input": standin.last_input,
                      "queries": len(standin.answers),
                      "models": sorted(standin.answers.models)})

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/_standin/faults", faults_endpoint, methods=["GET", "POST", "DELETE"]),
        Route("/_standin/stats", stats, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ])
    app.state.standin = standin
    return app
