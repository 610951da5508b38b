"""`POST /v1/feedback`: a client says whether the answer it got was good (docs/gateway.md, "Feedback").

    {"request_id": "...", "label": "good" | "bad"}          or   {"request_id": "...", "score": 0.8}
    optional: "comment" (kept), "correction" (the right answer; kept only with ledger.store_content)

`request_id` is the `x-request-id` header of the answer, or its body's `id` (`chatcmpl-…`/`cmpl-…`). Only the
key that made the request may label it: any other key gets the same 404 as an unknown id, so ids of other
tenants cannot be probed. One label per request and source: sending it again replaces it (idempotent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import KeyStore
from gateway.errors import APIError, bad_request
from gateway.ledger import Ledger
from gateway.metrics import GatewayMetrics
from gateway.requests import read_json
from gateway.responses import json_response

FIELDS = {"request_id", "label", "score", "comment", "correction"}
MAX_COMMENT = 4096
MAX_CORRECTION = 65536
#: A score at or above this is a good answer.
GOOD_FROM = 0.5


@dataclass(frozen=True, slots=True)
class Feedback:
    request_id: str
    label: str
    score: float
    comment: str | None
    correction: str | None


def _text(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string.", param=name, code="invalid_type")
    if len(value) > limit:
        raise bad_request(f"'{name}' is longer than {limit} characters.", param=name, code="string_above_max_length")
    return value


def parse_feedback(body: dict[str, Any]) -> Feedback:
    """The feedback in `body`, or a 400 that names the field."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0],
                          code="unknown_parameter")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise bad_request("'request_id' is required: the x-request-id header (or the id) of the answer.",
                          param="request_id", code="missing_required_parameter")
    request_id = request_id.strip()
    for prefix in ("chatcmpl-", "cmpl-"):
        request_id = request_id.removeprefix(prefix)
    if len(request_id) > 64:
        raise bad_request("'request_id' is not a request id.", param="request_id", code="invalid_value")
    label, score = body.get("label"), body.get("score")
    if label is None and score is None:
        raise bad_request("Send 'label' (\"good\" or \"bad\") or 'score' (0 to 1).", param="label",
                          code="missing_required_parameter")
    if label is not None and label not in ("good", "bad"):
        raise bad_request("'label' must be \"good\" or \"bad\".", param="label", code="invalid_value")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score) \
                or not 0 <= score <= 1:
            raise bad_request("'score' must be a number from 0 to 1.", param="score", code="invalid_value")
        score = float(score)
        implied = "good" if score >= GOOD_FROM else "bad"
        if label is not None and label != implied:
            raise bad_request(f"'label' {label!r} contradicts 'score' {score} (a score of {GOOD_FROM} or more is "
                              "good).", param="label", code="invalid_value")
        label = implied
    else:
        score = 1.0 if label == "good" else 0.0
    return Feedback(request_id, str(label), float(score), _text(body, "comment", MAX_COMMENT),
                    _text(body, "correction", MAX_CORRECTION))


def ledger_unavailable() -> APIError:
    """The ledger database cannot be read or written now: the client may retry."""
    return APIError(503, "The ledger database is unavailable; retry shortly.", type="server_error",
                    code="ledger_unavailable", retry_after_s=5)


def not_found(request_id: str) -> APIError:
    return APIError(404, f"No request with id '{request_id}' was made with this API key.", param="request_id",
                    code="request_not_found")


class FeedbackEndpoint:
    def __init__(self, keys: KeyStore, ledger: Ledger, metrics: GatewayMetrics, store_content: bool,
                 max_body_bytes: int) -> None:
        self.keys = keys
        self.ledger = ledger
        self.metrics = metrics
        self.store_content = store_content
        self.max_body_bytes = max_body_bytes

    def _owned(self, request_id: str, key_id: str) -> dict[str, Any]:
        row = self.ledger.request(request_id)
        if row is None:
            self.ledger.flush(5.0)  # the answer may be queued for the ledger still (it is written in batches)
            row = self.ledger.request(request_id)
        if row is None or row["key_id"] != key_id:
            raise not_found(request_id)
        return row

    def _store(self, feedback: Feedback, key_id: str) -> dict[str, Any]:
        row = self._owned(feedback.request_id, key_id)
        if row["model"] is None:
            raise APIError(409, f"Request '{feedback.request_id}' got no answer to label.", param="request_id",
                           code="no_answer")
        return self.ledger.upsert_label(
            request_id=feedback.request_id, source="client", model=row["model"], route=row["route"], key_id=key_id,
            label=feedback.label, score=feedback.score, comment=feedback.comment,
            correction=feedback.correction if self.store_content else None, sample_rate=1.0)

    async def handle(self, request: Request) -> Response:
        client = await self.keys.authenticate(request)
        body = await read_json(request, self.max_body_bytes)
        feedback = parse_feedback(body)
        try:
            stored = await run_in_threadpool(self._store, feedback, client.key_id)
        except SQLAlchemyError as exc:
            raise ledger_unavailable() from exc
        self.metrics.feedback.labels(stored["route"] or "unknown", "client", stored["label"]).inc()
        return json_response({
            "object": "feedback",
            "request_id": stored["request_id"],
            "source": "client",
            "model": stored["model"],
            "label": stored["label"],
            "score": stored["score"],
            "comment": stored["comment"],
            "correction_stored": stored["correction"] is not None,
            "created_at": int(stored["created_at"].timestamp()),
            "updated_at": int(stored["updated_at"].timestamp()),
        })
