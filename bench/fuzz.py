"""Conformance fuzzing with a large budget: schemathesis against the gateway's own OpenAPI document and
against OpenAI's published specification (the subset in tests/openai_spec/), the same runs as
tests/test_openapi.py and tests/test_openai_spec.py (which use a small budget in `make test`).

    .venv/bin/python bench/fuzz.py [--examples N] [--json] [--record]

Prints, per document, operation and mode: requests sent, the statuses answered, and the findings (server
errors, schema violations, valid requests refused outside the listed deliberate differences).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from tests.conformance import fuzz  # noqa: E402
from tests.harness import API_KEY, TINY_ROWS, Gateway, standin, write_dataset  # noqa: E402
from tests.harness import model_entry as entry  # noqa: E402
from tests.test_openai_spec import SPEC  # noqa: E402
from tests.test_openai_spec import judge as openai_judge  # noqa: E402
from tests.test_openai_spec import point_at_a_model as openai_model  # noqa: E402
from tests.test_openapi import point_at_a_model as own_model  # noqa: E402


def counting(stats: collections.Counter, judge: Any = None) -> Any:
    def count(case: Case, mode: GenerationMode, response: Any) -> str | None:
        stats[(case.operation.label, mode.value, response.status_code)] += 1
        return judge(case, mode, response) if judge else None

    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500, help="generated requests per operation and mode")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="frugal-fuzz-"))
    provider = standin(tmp, [write_dataset(tmp / "tiny.jsonl.gz", TINY_ROWS)])
    gateway = Gateway(tmp, {"models": [entry("alpha", "alpha", provider.url, "http")],
                            "routes": [{"name": "frugal/auto", "models": ["alpha"]}],
                            "limits": {"max_body_bytes": 1048576}})
    gateway.start()
    headers = {"authorization": f"Bearer {API_KEY}"}
    runs: dict[str, Any] = {}
    try:
        for name, schema, base, prepare, judge, checks in (
            ("own document", schemathesis.openapi.from_url(gateway.url + "/openapi.json"), gateway.url, own_model,
             None, [not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance, negative_data_rejection]),
            ("OpenAI's specification", schemathesis.openapi.from_path(str(SPEC)), gateway.url + "/v1",
             openai_model, openai_judge, [not_a_server_error, response_schema_conformance, negative_data_rejection]),
        ):
            stats: collections.Counter = collections.Counter()
            started = time.perf_counter()
            sent, findings = fuzz(schema, base, headers=headers, examples=args.examples, prepare=prepare,
                                  judge=counting(stats, judge), checks=checks)
            runs[name] = {"sent": sent, "seconds": round(time.perf_counter() - started, 1),
                          "findings": [str(f) for f in findings], "statuses": stats}
    finally:
        gateway.stop()
        provider.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, run in runs.items():
        by_operation: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        for (operation, mode, status), count in run["statuses"].items():
            by_operation[(operation, mode)][status] += count
        for (operation, mode), statuses in sorted(by_operation.items()):
            rows.append([name, operation, mode, sum(statuses.values()),
                         ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))])
    table = markdown_table(["document", "operation", "mode", "requests", "statuses"], rows)
    notes = "\n".join(f"{name}: {run['sent']} requests in {run['seconds']} s, {len(run['findings'])} findings "
                      "(server errors, schema violations, valid requests refused outside the listed differences)"
                      + "".join(f"\n  - {f[:300]}" for f in run["findings"][:10]) for name, run in runs.items())
    result = {name: {k: v for k, v in run.items() if k != "statuses"} for name, run in runs.items()}
    emit(args, "Conformance fuzzing (schemathesis)", "bench/fuzz.py", result, table, notes)
    if any(run["findings"] for run in runs.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
