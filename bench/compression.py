"""Prompt compression: tokens saved against task accuracy, and what compressing costs (docs/compression.md).

The task: "room numbers". A system prompt holds an instruction paragraph, then `--facts` paragraphs of real
English prose (sentences of Python's own reference documentation, `pydoc_data.topics`, shipped with
CPython) each ending with one fact ("The room number of Grace is 9376."); the user asks for one person's
room number. SmolLM2-135M-Instruct answers it from the uncompressed prompt well above chance (a random pick
among the codes present would score 1/facts). The answer counts as correct when the expected number appears
in the greedy answer. Every scorer compresses the same prompts; the local model answers each variant.

Scorers: the early-exit surprisal models (`workers.local.surprisal`, first k layers of SmolLM2), and two
baselines without a model over the same words: a random drop of the same amount, and "longest words stay"
(every token scored alike, so a word's summed score is its length): if either did as well, surprisal would
not be what keeps the answer.

    .venv/bin/python bench/compression.py [--json] [--record] [--items 40] [--layers 1 2 4] [--ratio 0.5]
        [--seed 0] [--units word] [--orders plain question-aware reordered]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from router.compression import CompressionPolicy, Compressor, TokenScorer  # noqa: E402
from workers.backend import GenerationRequest  # noqa: E402
from workers.local.catalog import build  # noqa: E402
from workers.local.generate import Generation, LocalGenerator  # noqa: E402
from workers.local.sampling import SamplingParams  # noqa: E402
from workers.local.surprisal import SurprisalModel, TokenSurprisal, build_surprisal_model  # noqa: E402

INSTRUCTION = "Answer the question from the notes below. Reply with the number only."
#: --orders: (question_aware, reorder) of the policy.
ORDERS = {"plain": (False, False), "question-aware": (True, False), "reordered": (True, True)}
NAMES = ["Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal",
         "Lena", "Maya", "Nils", "Omar", "Priya"]


@dataclass(frozen=True)
class Item:
    messages: list[dict[str, str]]
    answer: str


def prose_sentences() -> list[str]:
    from pydoc_data.topics import topics  # noqa: PLC0415 - CPython's reference docs as plain text

    sentences = []
    for name in sorted(topics):
        for sentence in re.split(r"(?<=[.])\s+", " ".join(topics[name].split())):
            if 40 < len(sentence) < 200 and "*" not in sentence and ">>>" not in sentence:
                sentences.append(sentence)
    return sentences


def room_number_items(count: int, facts: int, filler: int, seed: int = 0) -> list[Item]:
    """`count` questions, each over `facts` paragraphs of `filler` prose sentences ending with one fact."""
    rng = random.Random(seed)
    sentences = prose_sentences()
    items = []
    for _ in range(count):
        people = rng.sample(NAMES, facts)
        codes = [str(rng.randint(1000, 9999)) for _ in people]
        notes = "\n\n".join(f"{' '.join(rng.sample(sentences, filler))} The room number of {who} is {code}."
                            for who, code in zip(people, codes, strict=True))
        asked = rng.randrange(facts)
        items.append(Item([{"role": "system", "content": f"{INSTRUCTION}\n\n{notes}"},
                           {"role": "user", "content": f"What is the room number of {people[asked]}?"}],
                          codes[asked]))
    return items


class BaselineScorer:
    """The same tokens as `model` without the model: random scores (drops the same amount in random order),
    or the same score for every token (a word then scores its length in tokens: the longest words stay)."""

    def __init__(self, model: SurprisalModel, kind: str, seed: int = 0) -> None:
        self.model = model
        self.kind = kind
        self.rng = np.random.default_rng(seed)

    def score(self, text: str) -> TokenSurprisal:
        encoding = self.model.tokenizer.encode(text, add_special_tokens=False)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        values = self.rng.random(len(offsets)) if self.kind == "random" else np.ones(len(offsets))
        return TokenSurprisal(offsets[:, 0], offsets[:, 1], values.astype(np.float32))


def answer(generator: LocalGenerator, messages: list[dict[str, str]]) -> tuple[str, int]:
    ids = generator.encode(generator.chat_prompt(messages))
    state = Generation()
    text = "".join(step.text for step in generator.stream(ids, SamplingParams(temperature=0), 24, [], state))
    return text, len(ids)


def evaluate(generator: LocalGenerator, items: list[Item], scorer: TokenScorer | None,
             policy: CompressionPolicy) -> dict:
    compressor = Compressor(lambda: scorer) if scorer is not None else None
    correct, prompt_tokens, ms_per_1k, scored_tokens = 0, [], [], 0
    for item in items:
        messages = item.messages
        if compressor is not None:
            outcome = compressor.compress(GenerationRequest("chat", messages=messages), policy)
            messages = outcome.request.messages
            ms_per_1k.append(outcome.seconds * 1000 / max(1, outcome.tokens_before) * 1000)
            scored_tokens += outcome.tokens_before
        text, tokens = answer(generator, messages)
        correct += item.answer in text
        prompt_tokens.append(tokens)
    return {"accuracy": correct / len(items), "correct": correct, "mean_prompt_tokens": statistics.mean(prompt_tokens),
            "compress_ms_per_1k_tokens_median": statistics.median(ms_per_1k) if ms_per_1k else None,
            "scored_tokens": scored_tokens}


def latency(model: SurprisalModel, text: str, runs: int) -> dict:
    """Scoring time of the first 1,000 tokens of `text`, window by window as `score` runs them (median of
    `runs`, after one untimed pass)."""
    ids = np.asarray(model.tokenizer.encode(text, add_special_tokens=False).ids[:1000], dtype=np.int64)
    windows = [ids[i:i + model.window] for i in range(0, len(ids), model.window)]
    times = []
    for run in range(runs + 1):
        started = time.perf_counter()
        for window in windows:
            model.window_surprisal(window)
        if run:
            times.append(time.perf_counter() - started)
    return {"tokens": len(ids), "total_ms": statistics.median(times) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--filler", type=int, default=8, help="prose sentences before each fact")
    parser.add_argument("--seed", type=int, default=0, help="which items (choose settings on another seed)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--head-vocab", type=int, default=4096)
    parser.add_argument("--blocked-int8", action="store_true",
                        help="score with the MatMulNBits build (the default before 2026-12-03 07:20 UTC)")
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5])
    parser.add_argument("--units", nargs="+", default=["word", "sentence"], choices=["word", "token", "sentence"])
    parser.add_argument("--unit-score", nargs="+", default=["default"], choices=["default", "sum", "mean", "max"],
                        help="how a unit's token surprisals make its score (default: sum; mean for sentences)")
    parser.add_argument("--question-aware", action="store_true",
                        help="add question-aware to --orders (as the recorded commands say)")
    parser.add_argument("--orders", nargs="+", default=["plain"], choices=list(ORDERS),
                        help="which orders to run every scorer in: surprisal alone; the sentences least relevant "
                             "to the question first; that, with the notes reordered, the most relevant last")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the model-free baselines (they do not depend on the scoring model)")
    parser.add_argument("--runs", type=int, default=5, help="latency runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    items = room_number_items(args.items, args.facts, args.filler, args.seed)
    generator = LocalGenerator(build("smollm2-135m-instruct"), threads=args.threads)
    models = {k: SurprisalModel(build_surprisal_model(k, args.head_vocab, dynamic_int8=not args.blocked_int8),
                                threads=args.threads) for k in args.layers}
    results: dict = {"task": {"items": args.items, "facts": args.facts, "filler_sentences": args.filler,
                              "seed": args.seed, "chance": 1 / args.facts},
                     "uncompressed": evaluate(generator, items, None, CompressionPolicy()), "runs": []}
    first = next(iter(models.values()))
    orders = [ORDERS[name] for name in dict.fromkeys(args.orders + ["question-aware"] * args.question_aware)]
    for ratio in args.ratio:
        for unit in args.units:
            for unit_score in args.unit_score:
                for question_aware, reorder in orders:
                    chosen = None if unit_score == "default" else unit_score
                    policy = CompressionPolicy(target_ratio=ratio, min_prompt_tokens=0, unit=unit, unit_score=chosen,
                                               question_aware=question_aware, reorder=reorder)
                    scorers: list[tuple[str, TokenScorer]] = [(f"surprisal, {k} layers", m)
                                                              for k, m in models.items()]
                    if chosen is None and args.baselines:
                        scorers.append(("random drop", BaselineScorer(first, "random")))
                        if unit == "word":
                            scorers.append(("longest words stay", BaselineScorer(first, "length")))
                    for name, scorer in scorers:
                        run = evaluate(generator, items, scorer, policy)
                        name += ", question-aware" if question_aware else ""
                        name += ", reordered" if reorder else ""
                        run.update({"scorer": name, "target_ratio": ratio,
                                    "unit": unit if chosen is None else f"{unit} ({chosen})"})
                        results["runs"].append(run)
                        print(f"  {name} ratio {ratio} {unit}: {run['accuracy']:.1%}", file=sys.stderr)
    text = "\n\n".join(item.messages[0]["content"] for item in items[:3])
    results["latency_per_1k_tokens"] = {k: latency(m, text, args.runs) for k, m in models.items()}
    generator.close()

    base = results["uncompressed"]
    rows = [["uncompressed", "-", "-", f"{base['mean_prompt_tokens']:.0f}", "1.00x", f"{base['accuracy']:.1%}", "-"]]
    for run in results["runs"]:
        rows.append([run["scorer"], run["unit"], run["target_ratio"], f"{run['mean_prompt_tokens']:.0f}",
                     f"{base['mean_prompt_tokens'] / run['mean_prompt_tokens']:.2f}x", f"{run['accuracy']:.1%}",
                     f"{run['compress_ms_per_1k_tokens_median']:.0f}"])
    table = markdown_table(["scorer", "unit", "kept (target)", "prompt tokens", "fewer tokens", "accuracy",
                            "compress ms / 1k tokens"], rows)
    latency_rows = [[k, v["tokens"], f"{v['total_ms']:.0f}"] for k, v in results["latency_per_1k_tokens"].items()]
    table += "\n\n" + markdown_table(["layers", "tokens", "scoring ms (layers and head)"], latency_rows)
    notes = (f"Task: {args.items} room-number questions (seed {args.seed}) over {args.facts} facts in prose "
             f"(chance {1 / args.facts:.0%}); answered greedily by SmolLM2-135M-Instruct (int8). "
             f"Head: {args.head_vocab} most frequent tokens + the token scored. 'fewer tokens' is the whole "
             "chat prompt's count before / after.")
    emit(args, "Prompt compression: tokens against accuracy", "bench/compression.py", results, table, notes)


if __name__ == "__main__":
    main()
