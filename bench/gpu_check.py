"""The local engine on CUDAExecutionProvider, checked against the CPU build (run by scripts/gpu-check.sh).

1. Builds the GGUF (int8, the default) once; the same folder serves both providers.
2. Greedy answers (48 tokens) to the correctness prompts on CUDA and on CPU: identical, or the first
   differing token and both texts are printed (and the exit status is 1).
3. Decode tok/s at 1, 8 and 32 concurrent streams on CUDA (engine counters, as bench/batching.py).
4. Time to first token of a ~1,000-token prompt: cold, then with its first ~950 tokens in the prefix cache.

    .venv/bin/python bench/gpu_check.py --source path/to/model.gguf [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine, markdown_table  # noqa: E402
from bench.batching import concurrency_level  # noqa: E402
from workers.local.catalog import build  # noqa: E402
from workers.local.engine import EngineConfig  # noqa: E402
from workers.local.generate import Generation, LocalGenerator  # noqa: E402
from workers.local.sampling import SamplingParams  # noqa: E402

PROMPTS = ["What is the capital of France?", "What is 2 + 2?", "Name three primary colors.",
           "Write a Python function that reverses a string, and explain it in one sentence."]
GREEDY = SamplingParams(temperature=0)


def answers(generator: LocalGenerator) -> list[str]:
    texts = []
    for text in PROMPTS:
        state = Generation()
        prompt = generator.encode(generator.chat_prompt([{"role": "user", "content": text}]))
        list(generator.stream(prompt, GREEDY, 48, [], state))
        texts.append(state.text)
    return texts


def first_token_ms(generator: LocalGenerator, prompt: list[int]) -> float:
    started = time.perf_counter()
    for _ in generator.stream(prompt, GREEDY, 1, [], Generation()):
        break
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="The GGUF to build")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--provider", default="cuda", help="cuda; cpu only to try the script itself")
    args = parser.parse_args()
    folder = build(args.source, "int8")
    cpu = LocalGenerator(folder, provider="cpu")
    expected = answers(cpu)
    cpu.close()
    gpu = LocalGenerator(folder, provider=args.provider, engine=EngineConfig(max_batch=32, max_queue=256))
    providers = gpu.session.session.get_providers()
    got = answers(gpu)
    same = [a == b for a, b in zip(got, expected, strict=True)]
    for text, a, b, ok in zip(PROMPTS, got, expected, same, strict=True):
        if not ok:
            print(f"DIFFERENT ANSWER to {text!r}:\n  cuda: {a!r}\n  cpu:  {b!r}", file=sys.stderr)
    concurrency_level(gpu, 2, 8)  # warm-up
    levels = [concurrency_level(gpu, n, args.tokens) for n in (1, 8, 32)]
    passage = " ".join(["The history of the printing press shows how a technology spreads: slowly, then all at "
                        "once, as costs fall and readers multiply."] * 40)
    long_prompt = gpu.encode(gpu.chat_prompt([{"role": "user", "content": passage + " Summarise this."}]))[:1000]
    cold = first_token_ms(gpu, long_prompt)
    warm = first_token_ms(gpu, long_prompt[:-50] + gpu.encode(" And now in one line, please."))
    gpu.close()
    print(f"machine: {machine()}; providers: {providers}")
    print(f"greedy answers identical to the CPU build: {sum(same)}/{len(same)}")
    print(markdown_table(["streams", "aggregate decode tok/s", "end-to-end tok/s", "TTFT p50 (ms)"],
                         [[r["streams"], f"{r['decode_tok_s']:.0f}", f"{r['tok_s']:.0f}", f"{r['ttft_p50_ms']:.0f}"]
                          for r in levels]))
    print(f"TTFT of a {len(long_prompt)}-token prompt: {cold:.0f} ms cold, {warm:.0f} ms with its prefix cached")
    print(json.dumps({"providers": providers, "same_answers": same, "levels": levels, "ttft_cold_ms": cold,
                      "ttft_prefix_ms": warm}))
    sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
    main()
