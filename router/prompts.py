"""Legacy completions with several prompts in one request: each prompt is answered by the route in turn,
and the answers come back as one result whose choices are numbered prompt by prompt (prompt i's choice j
is choice i * n + j), as OpenAI numbers them."""

from __future__ import annotations

from dataclasses import replace

from router.route import Route
from router.trace import DecisionTrace
from workers.backend import GenerationRequest, GenerationResult, Usage


async def answer_each_prompt(route: Route, request: GenerationRequest, prompts: list[str],
                             trace: DecisionTrace) -> GenerationResult:
    """One result for every prompt; each prompt's calls go into `trace` as they happen."""
    n = int(request.params.get("n", 1))
    choices = []
    usage = Usage()
    latency_s = cost_usd = 0.0
    result: GenerationResult | None = None
    for number, prompt in enumerate(prompts):
        own = DecisionTrace(trace.route)
        try:
            result = await route.generate(replace(request, prompt=prompt), own)
        finally:
            trace.absorb(own)
        choices += [replace(c, index=number * n + c.index) for c in result.choices]
        usage = Usage(usage.prompt_tokens + result.usage.prompt_tokens,
                      usage.completion_tokens + result.usage.completion_tokens,
                      usage.estimated or result.usage.estimated)
        latency_s += result.latency_s
        cost_usd += result.cost_usd
    assert result is not None
    return GenerationResult(result.model, choices, usage, latency_s, cost_usd)
