"""A local model's own answers to the data pack's queries, with the signals its judge reads: where they are
cached and how they are read back.

`router.fit.judge_outcomes.collect` writes them: each pack query sent to the local model exactly as the
gateway's cascade sends it to a judged local tier (`router.judge.judge_request`), one JSON line per query in
a cache outside the repository (`~/.cache/frugal/judge-outcomes/<model>-<settings hash>/<dataset>.jsonl`;
`$FRUGAL_JUDGE_OUTCOMES` moves it). The lines hold the answers and signals, never the query text (the pack
holds that). Grading happens when the judge is built (`scorer.fit.grading`), so a change of grading needs no
new run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import orjson

from scorer.fit.dataset import Grid
from scorer.signals import JUDGE_SETTINGS, JudgeSettings


def messages_of(query: str) -> list[dict[str, str]]:
    """A pack query as chat messages: `System: ...\\n\\nUser: ...` is a system and a user message (the
    inverse of `router.cascade.query_text`), anything else one user message."""
    if query.startswith("System: ") and "\n\nUser: " in query:
        system, user = query[len("System: "):].split("\n\nUser: ", 1)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": query}]


def outcomes_root() -> Path:
    return Path(os.environ.get("FRUGAL_JUDGE_OUTCOMES") or Path.home() / ".cache" / "frugal" / "judge-outcomes")


def outcomes_folder(model_dir: Path, settings: JudgeSettings = JUDGE_SETTINGS, root: Path | None = None) -> Path:
    """Where a model's outcomes under `settings` are cached: named by the model and a hash of what decides
    the answers (the model's source and build, and the request settings)."""
    config = json.loads((Path(model_dir) / "frugal_model.json").read_text())
    key = {"source_sha256": config.get("source_sha256"), "builder_version": config.get("builder_version"),
           "quant": config.get("quant"), "settings": settings.to_json()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return (root or outcomes_root()) / f"{Path(model_dir).name}-{digest}"


def chosen_queries(grid: Grid, per_split: int | None) -> list[int]:
    """The queries to run: per split, the first `per_split` in an order fixed by a hash of the query id (a
    reproducible sample), or all of them."""
    rows: list[int] = []
    for split in ("train", "test"):
        ids = [q for q in range(len(grid)) if grid.splits[q] == split]
        ids.sort(key=lambda q: hashlib.sha256(grid.query_ids[q].encode()).hexdigest())
        rows.extend(ids if per_split is None else ids[:per_split])
    return rows


def read_outcomes(path: Path) -> dict[str, dict[str, Any]]:
    """The cached outcomes of one dataset, by query id (a line cut short by a crash is ignored)."""
    found: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            found[row["query_id"]] = row
    return found
