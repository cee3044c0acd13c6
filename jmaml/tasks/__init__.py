"""Task distributions and fixed task sets."""

from jmaml.tasks import seed, sinusoid

__all__ = ["seed", "sinusoid"]
