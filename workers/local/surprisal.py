"""Per-token surprisal of a text under a small early-exit copy of the local decoder.

Prompt compression (`router.compression`) needs -log p(token | the tokens before it) at every position of
a prompt. The serving graph returns logits for the last positions only, and a 1,000-token prefill of the
whole 30-layer SmolLM2-135M takes seconds on this CPU, so scoring runs on a model of its own, built by the
same builder (`workers.local.llama_graph`) from the same GGUF:

- **the first `layers` layers only**, followed by the model's final norm (an early exit, "logit lens"),
  and no KV cache kept: one pass over each window of the text;
- **int8 matmuls**: by default every projection and the partial output layer run as onnxruntime's
  `DynamicQuantizeMatMul` (int8 weights per output row, uint8 activations per tensor), 2x faster than
  `MatMulNBits` with int8 activations per block and a float head (47-48 against 94-101 ms per 1,000 tokens,
  interleaved, measured), and rougher (a median 0.28 nats from the blocked build's surprisal, at most 2.4;
  rank correlation 0.999); `dynamic_int8=False` builds the blocked form;
- **a partial output layer in the graph**: the exact logit of the token that follows, normalized over the
  `head_vocab` most frequent tokens (BPE ids are in merge order, so the lowest ids are the most frequent
  pieces) plus that token, so the graph returns the surprisal itself. The full 49k-row head would cost more
  than all the layers; computed in numpy beside onnxruntime it cost more than the layers too (numpy's BLAS
  threads and onnxruntime's spinning ones took turns on two cores: 44 ms a 512-token window, against 6 ms for
  the same product inside the graph; measured).

The trade-off between `layers`, `head_vocab`, speed and what the compression keeps is measured in
`bench/compression.py` (docs/compression.md). Nothing is built or loaded at import.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.local.catalog import BUILDER_VERSION, MODEL_FILE, models_dir, smollm2_gguf

#: The defaults chosen from the measurements in docs/compression.md.
DEFAULT_LAYERS = 1
DEFAULT_HEAD_VOCAB = 4096
#: Tokens scored in one pass; longer texts are cut into windows scored independently.
DEFAULT_WINDOW = 512
GRAPH_FILE = "model.onnx"
#: The scoring model's own format, beside the builder's version: 2 = the surprisal computed in the graph,
#: 3 = with the choice of int8 matmuls.
SURPRISAL_FORMAT = 3


def surprisal_folder(layers: int, head_vocab: int = DEFAULT_HEAD_VOCAB, root: Path | None = None,
                     name: str = "smollm2-135m-instruct", dynamic_int8: bool = True) -> Path:
    suffix = "-dq" if dynamic_int8 else ""
    return (root or models_dir()) / f"{name}-surprisal-l{layers}-h{head_vocab}{suffix}"


def build_surprisal_model(layers: int = DEFAULT_LAYERS, head_vocab: int = DEFAULT_HEAD_VOCAB, *,
                          root: Path | None = None, source: Path | None = None, name: str = "smollm2-135m-instruct",
                          dynamic_int8: bool = True, force: bool = False,
                          progress: Callable[[str], None] | None = None) -> Path:
    """Build (once) the early-exit scoring model: the first `layers` layers of the GGUF's decoder, and the
    surprisal normalized over the first `head_vocab` output rows (all of them when it is at least the
    vocabulary), with its tokenizer; its matmuls as `DynamicQuantizeMatMul` (`dynamic_int8`) or as
    `MatMulNBits` with int8 activations and a float head. Returns the folder."""
    from workers.local.gguf_model import GGUFModel, file_sha256  # noqa: PLC0415
    from workers.local.gguf_tokenizer import load_gguf_tokenizer, save_tokenizer  # noqa: PLC0415
    from workers.local.llama_graph import COMPUTE_LEVELS, build_hidden_graph  # noqa: PLC0415

    out = surprisal_folder(layers, head_vocab, root, name, dynamic_int8)
    if _is_current(out) and not force:
        return out
    say = progress or (lambda _message: None)
    source = source or smollm2_gguf()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    model = GGUFModel(source)
    tokenizer = load_gguf_tokenizer(source)
    staging.mkdir(parents=True)
    save_tokenizer(tokenizer.tokenizer, staging, tokenizer.info, tokenizer.chat_template)
    head_vocab = min(head_vocab, model.shape.vocab)
    build_hidden_graph(model, "int8", staging / GRAPH_FILE, layers=layers, accuracy_level=COMPUTE_LEVELS["int8"],
                       surprisal_rows=head_vocab, dynamic_int8=dynamic_int8, progress=say)
    config = {"name": name, "kind": "surprisal", "layers": layers, "head_vocab": head_vocab,
              "matmuls": "DynamicQuantizeMatMul" if dynamic_int8 else "MatMulNBits",
              "shape": model.shape.to_json(), "builder_version": BUILDER_VERSION,
              "surprisal_format": SURPRISAL_FORMAT, "source": str(source), "source_sha256": file_sha256(source),
              "build_seconds": round(time.perf_counter() - started, 2)}
    (staging / MODEL_FILE).write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _is_current(folder: Path) -> bool:
    try:
        config = json.loads((folder / MODEL_FILE).read_text())
    except (OSError, ValueError):
        return False
    return config.get("builder_version") == BUILDER_VERSION and config.get("surprisal_format") == SURPRISAL_FORMAT


@dataclass(frozen=True, slots=True)
class TokenSurprisal:
    """A text cut into tokens: each token's character span and its surprisal in nats (-log p given the
    tokens before it; the first token of each window, which has no context, gets +inf)."""

    starts: np.ndarray
    ends: np.ndarray
    surprisal: np.ndarray

    def __len__(self) -> int:
        return len(self.surprisal)


class SurprisalModel:
    """Scores texts with a built surprisal model; thread-safe (one pass at a time)."""

    def __init__(self, model_dir: Path, *, window: int = DEFAULT_WINDOW, threads: int | None = None) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        from workers.local.gguf_tokenizer import load_tokenizer  # noqa: PLC0415

        self.model_dir = Path(model_dir)
        config = json.loads((self.model_dir / MODEL_FILE).read_text())
        shape = config["shape"]
        self.layers = int(config["layers"])
        self.head_vocab = int(config["head_vocab"])
        self.window = max(2, window)
        self._kv_shape = (1, shape["n_kv_heads"], 0, shape["head_dim"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.model_dir / GRAPH_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self._kv_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.tokenizer = load_tokenizer(self.model_dir).tokenizer
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def score(self, text: str) -> TokenSurprisal:
        """Each token of `text` with its surprisal."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        surprisal = np.full(len(ids), np.inf, dtype=np.float32)
        for start in range(0, len(ids), self.window):
            chunk = ids[start:start + self.window]
            if len(chunk) > 1:
                surprisal[start + 1:start + len(chunk)] = self.window_surprisal(chunk)
        return TokenSurprisal(offsets[:, 0], offsets[:, 1], surprisal)

    def window_surprisal(self, ids: np.ndarray) -> np.ndarray:
        """-log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, in one pass."""
        return self._run(ids, "surprisal")

    def hidden_states(self, ids: np.ndarray) -> np.ndarray:
        """The final hidden state (after the last kept layer and the final norm) of every position."""
        return self._run(ids, "hidden")

    def _run(self, ids: np.ndarray, output: str) -> np.ndarray:
        feed: dict[str, np.ndarray] = {"input_ids": ids.reshape(1, -1).astype(np.int64),
                                       "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        empty = np.zeros(self._kv_shape, dtype=np.float32)
        for name in self._kv_names:
            feed[name] = empty
        with self._lock:
            (values,) = self.session.run([output], feed)
        return values[0]
