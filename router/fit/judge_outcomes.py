"""Running a local model on the data pack's queries as a judged cascade tier, for its judge's training.

Each query goes to the local backend exactly as the gateway's cascade sends it to a judged local tier
(`router.judge.judge_request`: the client's request, here greedy with `max_tokens` from the settings, plus
token log-probs with their top alternatives and self-consistency samples); one JSON line per query is
appended to the outcome cache (`scorer.fit.outcomes`), so a run that stops resumes where it was.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from router.judge import judge_request
from scorer.fit.dataset import Grid
from scorer.fit.outcomes import chosen_queries, messages_of, read_outcomes
from scorer.signals import JUDGE_SETTINGS, JudgeSettings
from workers.backend import GenerationRequest, GenerationResult


def outcome_row(grid: Grid, q: int, result: GenerationResult, seconds: float) -> dict[str, Any]:
    choice = result.choices[0]
    tokens = [[lp.token, round(lp.logprob, 5), [round(t.logprob, 5) for t in lp.top]] for lp in choice.logprobs or []]
    return {"dataset": grid.name, "query_id": grid.query_ids[q], "split": str(grid.splits[q]), "text": choice.text,
            "finish_reason": choice.finish_reason, "tokens": tokens, "samples": result.samples,
            "prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
            "sample_tokens": result.sample_tokens, "seconds": round(seconds, 4)}


@dataclass
class Progress:
    done: int = 0
    total: int = 0


async def collect(backend: Any, grids: Iterable[Grid], folder: Path, *, per_split: int | None = None,
                  concurrency: int = 3, settings: JudgeSettings = JUDGE_SETTINGS,
                  progress: Callable[[str, Progress], None] | None = None) -> dict[str, Path]:
    """Run the local `backend` on each grid's chosen queries not yet in the cache; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings.to_json(), indent=2) + "\n")
    files: dict[str, Path] = {}
    for grid in grids:
        path = folder / f"{grid.name}.jsonl"
        files[grid.name] = path
        have = read_outcomes(path)
        todo = [q for q in chosen_queries(grid, per_split) if grid.query_ids[q] not in have]
        state = Progress(0, len(todo))
        gate = asyncio.Semaphore(concurrency)
        with path.open("ab") as out:

            async def one(q: int, out: Any = out, grid: Grid = grid, state: Progress = state,
                          gate: asyncio.Semaphore = gate) -> None:
                async with gate:
                    request: GenerationRequest = judge_request(
                        GenerationRequest("chat", messages_of(grid.queries[q]), params={"temperature": 0.0,
                                          "max_tokens": settings.max_tokens}, timeout_s=600.0), settings)
                    started = time.perf_counter()
                    result = await backend.generate(request)
                    out.write(orjson.dumps(outcome_row(grid, q, result, time.perf_counter() - started)) + b"\n")
                    out.flush()
                    state.done += 1
                    if progress:
                        progress(grid.name, state)

            await asyncio.gather(*(one(q) for q in todo))
    return files
