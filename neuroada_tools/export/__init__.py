"""Stage 3: merge the sidecars into the base and export (safetensors, ONNX)."""
