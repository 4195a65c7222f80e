"""Reading and writing files: safetensors, checkpoints, the sidecar formats, and every output policy."""
