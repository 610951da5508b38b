#!/usr/bin/env python3
"""Vendor the part of OpenAI's published OpenAPI specification that Frugal implements.

    git clone <the openai/openai-openapi repository> /tmp/openai-openapi
    .venv/bin/python scripts/vendor-openai-spec.py /tmp/openai-openapi/openapi.yaml

writes tests/openai_spec/openai-openapi-subset.json: the operations createChatCompletion, createCompletion,
listModels and retrieveModel, and the component schemas they reach (nothing else). The specification is
MIT-licensed; its licence is kept beside the subset (tests/openai_spec/LICENSE).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OPERATIONS = ("createChatCompletion", "createCompletion", "listModels", "retrieveModel")
OUT = Path(__file__).resolve().parents[1] / "tests" / "openai_spec" / "openai-openapi-subset.json"


def refs(node: Any) -> set[str]:
    """Every `#/components/...` reference inside `node`."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/"):
                found.add(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def main() -> None:
    spec = yaml.safe_load(Path(sys.argv[1]).read_text())
    paths: dict[str, Any] = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and operation.get("operationId") in OPERATIONS:
                kept = {k: v for k, v in operation.items() if k not in ("x-oaiMeta",)}
                paths.setdefault(path, {})[method] = kept
    components: dict[str, dict[str, Any]] = {}
    pending = refs(paths)
    while pending:
        ref = pending.pop()
        _, _, kind, name = ref.split("/", 3)
        if name in components.get(kind, {}):
            continue
        value = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = value
        pending |= refs(value)
    subset = {
        "openapi": spec["openapi"],
        "info": {**{k: v for k, v in spec["info"].items() if k in ("title", "version", "license")},
                 "description": f"A subset of OpenAI's specification {spec['info']['version']}: "
                                f"{', '.join(OPERATIONS)} (scripts/vendor-openai-spec.py)."},
        "servers": spec.get("servers", []),
        "security": spec.get("security", []),
        "paths": paths,
        "components": {**components, "securitySchemes": spec["components"].get("securitySchemes", {})},
    }
    OUT.write_text(json.dumps(subset, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(paths)} paths, {sum(len(v) for v in components.values())} components")


if __name__ == "__main__":
    main()
