#!/usr/bin/env bash
# The local engine on CUDAExecutionProvider (onnxruntime-gpu): builds Qwen2.5-Coder-0.5B, checks its greedy
# answers against the CPU build, and prints decode tok/s at 1/8/32 streams and time to first token with and
# without a reused prefix. Run it on a machine with an NVIDIA GPU; nothing in `make test` needs one.
#
#   scripts/gpu-check.sh [path/to/qwen2.5-coder-0.5b-instruct.gguf]
#
# Without an argument the GGUF is fetched (`frugal models fetch`); on a machine without network access, copy
# the fetched file (~490 MB, ~/.cache/frugal/models/downloads/) and pass its path. Prints one JSON object too.
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
PY=.venv/bin/python
if ! $PY -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    echo "error: onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu with CUDA 12 and cuDNN 9 needed)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
SOURCE="${1:-}"
if [ -z "$SOURCE" ]; then
    SOURCE="$(.venv/bin/frugal models fetch qwen2.5-coder-0.5b-instruct | tail -1)"
fi
exec $PY bench/gpu_check.py --source "$SOURCE"
