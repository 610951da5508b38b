"""The stand-in provider's HTTP server: OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
Anthropic's `/v1/messages`.

Plus two control endpoints for tests: `POST/DELETE /_standin/faults` and `GET /_standin/stats`.
"""

from __future__ import annotations

import dataclasses

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from standin import anthropic, openai
from standin.core import StandIn, error_response, json_response
from standin.data import RecordedAnswers
from standin.faults import FaultRule, Faults


def create_standin_app(answers: RecordedAnswers, faults: Faults | None = None,
                       api_key: str | None = None) -> Starlette:
    """The stand-in provider as an ASGI app."""
    standin = StandIn(answers, faults or Faults(), api_key)

    async def chat(request: Request) -> Response:
        return await openai.handle(standin, request, "chat")

    async def completions(request: Request) -> Response:
        return await openai.handle(standin, request, "completion")

    async def messages(request: Request) -> Response:
        return await anthropic.handle_messages(standin, request)

    async def models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "frugal-stand-in"}
                for m in sorted(standin.answers.models)]
        return json_response({"object": "list", "data": data})

    async def faults_endpoint(request: Request) -> Response:
        if request.method == "DELETE":
            standin.faults.clear()
            return json_response({"rules": []})
        if request.method == "POST":
            try:
                standin.faults.add(FaultRule(**orjson.loads(await request.body())))
            except (TypeError, orjson.JSONDecodeError) as exc:
                return error_response(400, f"bad fault rule: {exc}")
        return json_response({"rules": [dataclasses.asdict(rule) for rule in standin.faults.rules()]})

    async def stats(request: Request) -> Response:
        return json_response({"requests": dict(standin.requests), "last_params": standin.last_params,
                      "last_input": standin.last_input,
                      "queries": len(standin.answers),
                      "models": sorted(standin.answers.models)})

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

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
