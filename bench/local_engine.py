"""The local tier's speed on this machine, side by side with llama.cpp on the same GGUF.

For each of our builds (fp32, the int8 default, the fast int8-activation profile) and for llama-cpp-python (a
bench-only dependency: `pip install llama-cpp-python==0.3.36`, which compiles from source in ~7 min) and, if
installed, transformers+torch: prefill time of a 500-token prompt, decode tokens/s at short (~20 tokens) and
500-token context (after `WARMUP_STEPS` untimed decode steps, for every engine alike), peak memory, and
fidelity (top-1 agreement with our fp32 build, teacher-forced; greedy answers identical to fp32's). Each
engine runs in a child process of its own so its peak RSS is its own. Also: where a decode step's time goes
(onnxruntime profile, default build) and the memory bandwidth bound (weight bytes read per token / measured
bandwidth).

    .venv/bin/python bench/local_engine.py [--model NAME] [--json] [--record] [--threads N] [--decode-tokens N]
        [--rounds N]

`--model`: smollm2-135m-instruct (default) or a fetched catalogue model (qwen2.5-coder-0.5b-instruct); every
engine runs that model's GGUF.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from workers.local.catalog import KNOWN, build, models_dir  # noqa: E402

#: The model every engine runs (`--model`), and its GGUF.
MODEL = "smollm2-135m-instruct"


def source_gguf() -> Path:
    return KNOWN[MODEL][1](None)

#: (quant, compute, label): float32, the default (weight-only int8: for this Q4_1 GGUF the same graph as int4),
#: and the fast profile with int8 activations.
VARIANTS = [("fp32", None, "fp32"), ("int8", None, "int8 (default)"), ("int4", "int8", "int4, int8 compute (fast)")]


def prompt_ids(n: int) -> list[int]:
    """n real tokens: a chat prompt around a long passage (the same ids for every engine)."""
    from workers.local.gguf_tokenizer import load_gguf_tokenizer

    bundle = load_gguf_tokenizer(source_gguf())
    passage = " ".join(["The history of the printing press shows how a technology spreads: slowly, then "
                        "all at once, as costs fall and readers multiply."] * 40)
    text = bundle.chat_template.render([{"role": "user", "content": passage + " Summarise this."}])
    ids = bundle.tokenizer.encode(text, add_special_tokens=False).ids
    return ids[:n]


#: Teacher-forced text for top-1 agreement with the fp32 build (prose, code, numbers, unicode), and the prompts
#: whose greedy answers must match fp32's.
FIDELITY_TEXT = (
    "The printing press spread through Europe within fifty years of Gutenberg's first Bible, around 1455. "
    "By 1500, presses in some 250 towns had printed perhaps twenty million copies. Prices fell, literacy rose, "
    "and scholars could compare identical copies of a text for the first time. Historians still argue about "
    "how much the Reformation owed to cheap pamphlets.\n\n"
    "def mean(values):\n    if not values:\n        raise ValueError('empty')\n    return sum(values) / len(values)\n\n"
    "Q: A train leaves at 14:05 and arrives at 16:50. How long is the journey?\nA: 2 hours 45 minutes.\n"
    "Café, naïve, Zürich and 東京 are spelled with characters outside ASCII; emoji such as 🎉 take four bytes. "
    "In spring the river floods the lower fields, and farmers plant rice once the water recedes."
)
#: Decode steps run before the timed ones, by every engine alike: the first steps of a fresh cache (and our
#: decode graph's first runs in a process) pay one-off allocations that a serving engine, whose cache pool
#: lives as long as the process, pays once.
WARMUP_STEPS = 8
ANSWER_PROMPTS = ["What is the capital of France?", "What is 2 + 2?", "Name three primary colors."]


def fidelity_ids() -> list[int]:
    from workers.local.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(source_gguf()).tokenizer.encode(FIDELITY_TEXT, add_special_tokens=False).ids


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ours(folder: str, threads: int, decode_tokens: int, fidelity: bool) -> dict:
    """One timed prefill and decode per measure (after a warm-up): `main` repeats children in rounds."""
    from workers.local.runtime import DecoderSession

    session = DecoderSession(Path(folder), threads=threads)
    result: dict = {}
    long_prompt = prompt_ids(500)
    times = []
    for _ in range(2):  # the first run warms up
        cache = session.new_cache(600)
        started = time.perf_counter()
        session.forward(long_prompt, cache, 1)
        times.append(time.perf_counter() - started)
    result["prefill_500_ms"] = times[-1] * 1000
    for label, context in (("short", 20), ("500", 500)):
        cache = session.new_cache(context + WARMUP_STEPS + decode_tokens + 4)
        token = int(np.argmax(session.forward(long_prompt[:context], cache, 1)[-1]))
        for _ in range(WARMUP_STEPS):
            token = int(np.argmax(session.forward([token], cache, 1)[-1]))
        started = time.perf_counter()
        for _ in range(decode_tokens):  # one sequence: the decode graph where the build has one, as the engine
            token = int(np.argmax(session.forward([token], cache, 1)[-1]))
        result[f"decode_{label}_tok_s"] = decode_tokens / (time.perf_counter() - started)
    result["peak_rss_mb"] = peak_rss_mb()
    if not fidelity:
        return result
    # Fidelity, after the memory peak is read: argmax per position, and greedy answers.
    ids = fidelity_ids()
    result["argmax"] = session.forward(ids, session.new_cache(len(ids) + 1), 0).argmax(-1).tolist()
    del session
    from workers.local.generate import Generation, LocalGenerator
    from workers.local.sampling import SamplingParams

    generator = LocalGenerator(Path(folder), threads=threads)
    answers = []
    for text in ANSWER_PROMPTS:
        state = Generation()
        prompt = generator.encode(generator.chat_prompt([{"role": "user", "content": text}]))
        list(generator.stream(prompt, SamplingParams(temperature=0), 48, [], state))
        answers.append(state.text)
    result["answers"] = answers
    return result


def child_llamacpp(threads: int, decode_tokens: int, fidelity: bool) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(source_gguf()), n_ctx=1024, n_threads=threads, n_batch=512,
                          verbose=False)
    long_prompt = prompt_ids(500)
    times = []
    for _ in range(2):  # the first run warms up
        llm.reset()  # otherwise llama-cpp-python reuses the cached prompt and skips the prefill
        generator = llm.generate(long_prompt, temp=0.0, top_k=1, reset=True)
        started = time.perf_counter()
        next(generator)  # prefill + the first sampled token
        times.append(time.perf_counter() - started)
    result = {"prefill_500_ms": times[-1] * 1000}
    for label, context in (("short", 20), ("500", 500)):
        llm.reset()
        generator = llm.generate(long_prompt[:context], temp=0.0, top_k=1, reset=True)
        next(generator)
        for _ in range(WARMUP_STEPS):
            next(generator)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            next(generator)
        result[f"decode_{label}_tok_s"] = decode_tokens / (time.perf_counter() - started)
    result["peak_rss_mb"] = peak_rss_mb()
    del llm
    if not fidelity:
        return result
    ids = fidelity_ids()
    scorer = llama_cpp.Llama(model_path=str(source_gguf()), n_ctx=1024, n_threads=threads, logits_all=True,
                             verbose=False)
    scorer.eval(ids)
    result["argmax"] = np.asarray(scorer.scores[:len(ids)]).argmax(-1).tolist()
    return result


def child_transformers(gguf_path: str, ids_file: str, threads: int, decode_tokens: int, fidelity: bool) -> dict:
    """transformers + torch (CPU, float32) on the same GGUF, which transformers dequantizes on load."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    long_prompt = json.loads(Path(ids_file).read_text())
    result: dict = {}
    with torch.no_grad():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            model(torch.tensor([long_prompt]), use_cache=True)
            times.append(time.perf_counter() - started)
        result["prefill_500_ms"] = statistics.median(times) * 1000
        for label, context in (("short", 20), ("500", 500)):
            rates = []
            for _ in range(3):
                out = model(torch.tensor([long_prompt[:context]]), use_cache=True)
                token = out.logits[0, -1].argmax().reshape(1, 1)
                past = out.past_key_values
                started = time.perf_counter()
                for _ in range(decode_tokens):
                    out = model(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[0, -1].argmax().reshape(1, 1)
                rates.append(decode_tokens / (time.perf_counter() - started))
            result[f"decode_{label}_tok_s"] = statistics.median(rates)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def profile_decode(folder: Path, threads: int) -> list[tuple[str, float]]:
    """Milliseconds per decode step by operator type (onnxruntime's profiler)."""
    import onnxruntime as ort

    from workers.local.runtime import DecoderSession

    session = DecoderSession(folder, threads=threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    graph = "model_decode.onnx" if session.decode_session is not None else "model.onnx"  # what a lone decode runs
    profiled = ort.InferenceSession(str(folder / graph), options, providers=["CPUExecutionProvider"])
    session.session = session.decode_session = profiled
    cache = session.new_cache(128)
    session.forward(prompt_ids(20), cache, 1)
    steps = 20
    for _ in range(steps):
        session.forward([5], cache, 1)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]
    start = runs[0]["ts"]
    by_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    total = sum(r["dur"] for r in runs) / len(runs) / 1000
    rows = [(op, dur / len(runs) / 1000) for op, dur in by_op.most_common(8)]
    rows.append(("(framework overhead between kernels)", total - sum(by_op.values()) / len(runs) / 1000))
    return rows


def bandwidth_gb_s() -> float:
    """Memory read bandwidth: summing a 512 MB array (best of 5)."""
    data = np.ones(64 * 1024 * 1024, dtype=np.float64)
    best = min(_timed(data.sum) for _ in range(5))
    return data.nbytes / best / 1e9


def _timed(function: object) -> float:
    started = time.perf_counter()
    function()  # type: ignore[operator]
    return time.perf_counter() - started


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of weights a decode step reads: everything but the embedding table (one row is gathered)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        size = int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if tensor.name != "embed_tokens" and "cos_cache" not in tensor.name and "sin_cache" not in tensor.name:
            total += size
    return total


def _combine(rounds: list[dict]) -> dict | None:
    """Medians of the rounds' figures; fidelity from the round that measured it."""
    if not rounds:
        return None
    combined = {key: statistics.median(r[key] for r in rounds)
                for key, value in rounds[0].items() if isinstance(value, float)}
    for key in ("argmax", "answers"):
        found = next((r[key] for r in rounds if key in r), None)
        if found is not None:
            combined[key] = found
    return combined


def run_child(args: list[str], python: str = sys.executable) -> dict | None:
    done = subprocess.run([python, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a catalogue model (fetched if downloadable)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="measurements of every engine, interleaved")
    parser.add_argument("--torch-python", help="an interpreter with torch and transformers installed (the project "
                        "never installs torch): measures transformers' CPU generation on the same GGUF")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    parser.add_argument("--fidelity", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL  # noqa: PLW0603 - one model per run, children included
    MODEL = args.model
    if args.child == "ours":
        print(json.dumps(child_ours(args.folder, args.threads, args.decode_tokens, args.fidelity)))
        return
    if args.child == "llamacpp":
        print(json.dumps(child_llamacpp(args.threads, args.decode_tokens, args.fidelity)))
        return
    if args.child == "transformers":
        print(json.dumps(child_transformers(args.folder, args.ids_file, args.threads, args.decode_tokens,
                                            args.fidelity)))
        return

    common = ["--model", MODEL, "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
    engines: list[tuple[str, list[str], str]] = []  # (name, child arguments, interpreter)
    folders = {}
    for quant, compute, label in VARIANTS:
        folder = build(MODEL, quant, compute=compute)
        folders[label] = folder
        engines.append((f"frugal ONNX {label}", ["--child", "ours", "--folder", str(folder), *common], sys.executable))
    llama_name = "llama.cpp (llama-cpp-python 0.3.36)"
    try:
        import llama_cpp  # noqa: F401

        engines.append((llama_name, ["--child", "llamacpp", *common], sys.executable))
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 (compiles ~7 min)",
              file=sys.stderr)
    if args.torch_python:
        ids_file = Path(tempfile.mkdtemp()) / "prompt_ids.json"
        ids_file.write_text(json.dumps(prompt_ids(500)))
        engines.append(("transformers + torch (CPU, fp32)", ["--child", "transformers", "--folder",
                                                             str(source_gguf()), "--ids-file", str(ids_file),
                                                             *common], args.torch_python))
    else:
        print("transformers+torch: not measured (pass --torch-python with an interpreter that has them)",
              file=sys.stderr)
    # Rounds over all engines, so that each round compares engines measured minutes apart: this machine's
    # speed drifts by 10-20% over a run. Figures are medians over rounds; ratios are medians of per-round ratios.
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
    for index in range(args.rounds):
        for name, child_args, python in engines:
            measured = run_child(child_args + (["--fidelity"] if index == 0 else []), python)
            if measured is not None:
                runs[name].append(measured)
    results = {name: _combine(rounds) for name, rounds in runs.items()}
    for name, rounds in runs.items():
        if results[name] is not None and runs.get(llama_name):
            ratios = [r["decode_short_tok_s"] / ref["decode_short_tok_s"]
                      for r, ref in zip(rounds, runs[llama_name], strict=False)]
            results[name]["decode_vs_llamacpp"] = statistics.median(ratios)

    fp32 = results.get("frugal ONNX fp32") or {}
    rows = []
    for name, r in results.items():
        if r is None:
            rows.append([name, "failed", "", "", "", "", "", ""])
            continue
        ratio = f"{r['decode_vs_llamacpp']:.2f}x" if "decode_vs_llamacpp" in r else "n/a"
        agreement = same_answers = "n/a"
        if fp32.get("argmax") and r.get("argmax"):
            agreement = f"{np.mean(np.array(r['argmax']) == np.array(fp32['argmax'])):.1%}"
        if fp32.get("answers") and r.get("answers"):
            same_answers = f"{sum(a == b for a, b in zip(r['answers'], fp32['answers'], strict=True))}/" \
                           f"{len(ANSWER_PROMPTS)}"
        rows.append([name, f"{r['prefill_500_ms']:.0f}", f"{r['decode_short_tok_s']:.1f}",
                     f"{r['decode_500_tok_s']:.1f}", ratio, f"{r['peak_rss_mb']:.0f}", agreement, same_answers])
    table = markdown_table(["engine", "prefill 500 tok (ms)", "decode tok/s (short ctx)", "decode tok/s (500 ctx)",
                            "decode vs llama.cpp", "peak RSS (MB)", "top-1 = fp32", "greedy answers = fp32"], rows)
    profile = profile_decode(folders["int8 (default)"], args.threads)
    bandwidth = bandwidth_gb_s()
    per_token = {q: weight_bytes_per_token(f) for q, f in folders.items()}
    bound = {q: bandwidth * 1e9 / b for q, b in per_token.items()}
    notes = [f"Fidelity: top-1 agreement with the fp32 build, teacher-forced over {len(fidelity_ids())} tokens of "
             "prose, code and unicode (the fp32 build agrees with an independent numpy reference within 1.3e-4); "
             f"greedy answers (48 tokens) to {len(ANSWER_PROMPTS)} questions identical to fp32's.", "",
             "Where a decode step goes (default build, one sequence, so its decode graph; ms per step, by the "
             "onnxruntime profiler, which adds overhead of its own to every operator):", "",
             markdown_table(["operator", "ms/step"], [[op, f"{ms:.2f}"] for op, ms in profile]), "",
             f"Memory bandwidth (numpy sum over 512 MB): {bandwidth:.1f} GB/s. Weight bytes read per decode step and "
             "the decode ceiling they imply: " + "; ".join(f"{q}: {per_token[q] / 1e6:.0f} MB -> {bound[q]:.0f} tok/s"
                                                          for q in per_token) + "."]
    emit(args, f"Local engine ({MODEL})", "bench/local_engine.py",
         {"results": results, "rounds": args.rounds, "profile_ms_per_step": profile, "bandwidth_gb_s": bandwidth,
          "weight_bytes_per_token": per_token, "models_dir": str(models_dir())}, table, "\n".join(notes))


if __name__ == "__main__":
    main()
