"""Stage 2: train the sparse deltas (bypass, data, the training loop)."""
