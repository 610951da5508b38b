"""`GET /v1/models` and `GET /v1/models/{id}`: the configured models and routes, as OpenAI lists models."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import KeyStore
from gateway.errors import APIError, model_not_found
from gateway.responses import json_response


def _model_object(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "frugal"}


def model_routes(names: list[str], keys: KeyStore) -> APIRouter:
    """The two endpoints over `names` (models, then routes); both need a client key."""
    routes = APIRouter()

    @routes.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            client = await keys.authenticate(request)
        except APIError as error:
            return error.response()
        created = int(time.time())
        return json_response({"object": "list", "data": [_model_object(n, created) for n in names
                                                         if client.may_call(n)]})

    @routes.get("/v1/models/{name:path}")
    async def retrieve_model(request: Request, name: str) -> Response:
        try:
            client = await keys.authenticate(request)
            if name not in names or not client.may_call(name):
                raise model_not_found(name)
        except APIError as error:
            return error.response()
        return json_response(_model_object(name, int(time.time())))

    return routes
