"""Built-in attention backends: TORCH_SDPA (default) and NAIVE (reference)."""
