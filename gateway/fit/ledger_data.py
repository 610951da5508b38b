"""The labelled answers of one judged tier, read from the ledger (docs/learning.md, "Retraining").

Each answer the tier gave (accepted or rejected) whose trace kept the judge's features, and that has a label:
the client's, else an audit's, else an escalation's. Its weight is 1 / the label's sampling rate, so that
audited answers (a sample of the accepted ones) stand for all the accepted answers they were drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select

from gateway.ledger import labels_table, make_engine, requests_table

#: Which label an answer keeps when it has several.
PRIORITY = {"client": 0, "audit": 1, "escalation": 2}


@dataclass(frozen=True)
class LabelledAnswer:
    request_id: str
    created_at: datetime
    features: np.ndarray
    #: The score the judge of the time gave, and that judge's version.
    score: float | None
    judge: str | None
    outcome: str
    good: bool
    weight: float
    source: str
    #: Answers of one query share a group (the request id when nothing else says so).
    group: str


def labelled_answers(ledger_url: str, route: str, model: str, since: datetime | None = None) -> list[LabelledAnswer]:
    """Oldest first."""
    engine = make_engine(ledger_url)
    r, c = requests_table.c, labels_table.c
    query = select(r.id, r.created_at, r.trace).where(r.route == route, r.purpose == "client", r.trace.is_not(None))
    labels_query = select(c.request_id, c.source, c.label, c.sample_rate).where(c.route == route, c.model == model)
    if since is not None:
        query = query.where(r.created_at >= since)
    try:
        with engine.connect() as connection:
            labels: dict[str, tuple[str, str, float]] = {}
            for row in connection.execute(labels_query):
                kept = labels.get(row.request_id)
                if kept is None or PRIORITY.get(row.source, 9) < PRIORITY.get(kept[0], 9):
                    labels[row.request_id] = (row.source, row.label, float(row.sample_rate or 1.0))
            out = []
            for row in connection.execute(query.order_by(r.created_at)):
                label = labels.get(row.id)
                tier = _tier(row.trace, model)
                if label is None or tier is None or not tier.get("features"):
                    continue
                out.append(LabelledAnswer(
                    row.id, row.created_at, np.asarray(tier["features"], dtype=np.float32), tier.get("score"),
                    tier.get("judge"), str(tier.get("outcome")), label[1] == "good", 1.0 / max(label[2], 1e-6),
                    label[0], str((row.trace or {}).get("query_hash") or row.id)))
    finally:
        engine.dispose()
    return out


def _tier(trace: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    for tier in (trace or {}).get("tiers") or []:
        if tier.get("model") == model and tier.get("outcome") in ("accepted", "rejected", "fallback_accepted"):
            return dict(tier)
    return None
