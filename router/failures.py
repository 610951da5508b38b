"""How a route fails as a whole: every model failed (or the request was refused upstream as invalid), every
model is in cooldown, or no model can take what the request needs. The gateway turns these into the
client's error."""

from __future__ import annotations

from router.trace import DecisionTrace
from workers.errors import CLIENT_FAULT, BackendError, FailureKind


class RouteFailed(Exception):
    """Every model of the route failed (or the request was refused upstream as invalid)."""

    def __init__(self, trace: DecisionTrace, errors: list[BackendError]) -> None:
        last = errors[-1]
        super().__init__(last.message)
        self.trace = trace
        self.errors = errors
        self.last = last

    @property
    def kind(self) -> FailureKind:
        """The failure that best describes the whole route to a client."""
        kinds = {e.kind for e in self.errors}
        if kinds & CLIENT_FAULT:
            return next(e.kind for e in self.errors if e.kind in CLIENT_FAULT)
        if kinds == {FailureKind.RATE_LIMITED}:
            return FailureKind.RATE_LIMITED
        return self.last.kind

    @property
    def retry_after_s(self) -> float | None:
        hints = [e.retry_after_s for e in self.errors if e.retry_after_s is not None]
        return min(hints) if hints else None


class RouteUnavailable(Exception):
    """Every model of the route is in cooldown."""

    def __init__(self, trace: DecisionTrace, retry_after_s: float) -> None:
        super().__init__(f"all models of {trace.route!r} are cooling down after repeated failures")
        self.trace = trace
        self.retry_after_s = retry_after_s


class RouteIncapable(Exception):
    """No model of the route can take the request: it needs what none of them declares (tools, images,
    audio, files). The request is the problem, not the models: a 400."""

    def __init__(self, trace: DecisionTrace, missing: frozenset[str]) -> None:
        super().__init__(f"no model of {trace.route!r} can take a request with {', '.join(sorted(missing))}")
        self.trace = trace
        self.missing = missing


class NoAcceptedAnswer(RouteUnavailable):
    """`on_unaccepted: error` and no tier accepted an answer: a 503 naming the tiers that could not answer."""

    def __init__(self, trace: DecisionTrace) -> None:
        missing = [f"{t.model} ({t.reason})" for t in trace.tiers if t.outcome in ("skipped", "failed")]
        super().__init__(trace, 1.0)
        self.args = (f"no tier of {trace.route!r} accepted an answer; the tiers that could not answer: "
                     f"{', '.join(missing) or 'none'}",)
