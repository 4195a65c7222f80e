"""Compiled kernels behind the bypass and the selection, with pure torch fallbacks."""
