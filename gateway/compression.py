"""Prompt compression from the configuration: the policies per route and model, and the shared scorer.

The scoring model (`workers.local.surprisal`) is built and loaded on the first request that needs it, not
when the gateway starts, and one instance serves every route.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.settings import CompressionConfig, CompressorConfig, FrugalConfig
from router.compression import CompressionPolicy, CompressionRules, Compressor, TokenScorer


def _policy(block: CompressionConfig) -> CompressionPolicy:
    return CompressionPolicy(target_ratio=block.target_ratio, min_prompt_tokens=block.min_prompt_tokens,
                             keep_recent=block.keep_recent, unit=block.unit,
                             min_input_usd_per_mtok=block.min_input_usd_per_mtok,
                             question_aware=block.question_aware, reorder=block.reorder)


def scorer_loader(config: CompressorConfig) -> Callable[[], TokenScorer]:
    def load() -> TokenScorer:
        from workers.local.surprisal import SurprisalModel, build_surprisal_model  # noqa: PLC0415

        folder = build_surprisal_model(config.layers, config.head_vocab, dynamic_int8=config.dynamic_int8)
        return SurprisalModel(folder, window=config.window, threads=config.threads)

    return load


def build_compression(config: FrugalConfig) -> CompressionRules | None:
    """The compression rules of `config`, or None when no route or model compresses."""
    routes = {r.name: _policy(r.compression) for r in config.routes if r.compression and r.compression.enabled}
    models = {m.name: _policy(m.compression) for m in config.models if m.compression and m.compression.enabled}
    if not routes and not models:
        return None
    return CompressionRules(Compressor(scorer_loader(config.compressor)), routes=routes, models=models)
