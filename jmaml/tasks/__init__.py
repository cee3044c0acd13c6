"""Task distributions and fixed task sets."""

from jmaml.tasks import images, seed, sinusoid

__all__ = ["images", "seed", "sinusoid"]
