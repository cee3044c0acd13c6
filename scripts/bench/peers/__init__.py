"""Comparators for scripts/bench.py: MAML as a user would write it first, in JAX and in PyTorch."""
