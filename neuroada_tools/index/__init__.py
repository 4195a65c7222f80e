"""Stage 1: build the index sidecar (selection criteria, target resolution)."""
