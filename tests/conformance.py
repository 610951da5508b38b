"""Running schemathesis against a live gateway: hypothesis generates requests from an OpenAPI document
(valid ones and, where asked, invalid ones), each is sent, and its response is checked. Failures are
collected rather than shrunk, so that a run has a bounded cost and reports everything it found."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.core.failures import FailureGroup


@dataclass
class Finding:
    operation: str
    mode: str
    status: int | None
    problem: str
    body: Any

    def __str__(self) -> str:
        return (f"{self.operation} [{self.mode}] -> {self.status}: {self.problem[:400]}\n"
                f"    body: {str(self.body)[:300]}")


def fuzz(schema: BaseSchema, base_url: str, *, headers: dict[str, str], examples: int,
         modes: Sequence[GenerationMode] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
         checks: Sequence[Callable[..., Any]] = (), prepare: Callable[[Case, GenerationMode], None] | None = None,
         judge: Callable[[Case, GenerationMode, Any], str | None] | None = None) -> tuple[int, list[Finding]]:
    """Send up to `examples` generated requests per operation and mode; returns how many were sent and what
    went wrong: a failed check, or what `judge(case, mode, response)` says is wrong (None: nothing)."""
    findings: list[Finding] = []
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in modes:
            run = _runner(operation, mode, examples, base_url, headers, checks, prepare, judge, findings)
            try:
                sent += run()
            except Exception as exc:  # e.g. no invalid input can be made for an operation without inputs
                if "unsatisfiable" not in f"{type(exc).__name__} {exc}".lower():
                    raise
    return sent, findings


def _runner(operation: Any, mode: GenerationMode, examples: int, base_url: str, headers: dict[str, str],
            checks: Sequence[Callable[..., Any]], prepare: Callable[[Case, GenerationMode], None] | None,
            judge: Callable[[Case, GenerationMode, Any], str | None] | None,
            findings: list[Finding]) -> Callable[[], int]:
    """A hypothesis test of one operation in one mode; calling it returns how many requests it sent."""
    sent = 0

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        nonlocal sent
        if prepare is not None:
            prepare(case, mode)
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        sent += 1
        problem = None
        try:
            case.validate_response(response, checks=list(checks), headers=headers)
        except (AssertionError, FailureGroup) as failure:
            problem = str(failure)
        if problem is None and judge is not None:
            problem = judge(case, mode, response)
        if problem is not None:
            findings.append(Finding(operation.label, mode.value, response.status_code, problem,
                                    case.body if isinstance(case.body, dict | list) else None))

    def go() -> int:
        run()
        return sent

    return go
