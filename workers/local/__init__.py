"""The local tier: small models built from GGUF / safetensors into ONNX without torch, run on ONNX Runtime."""
