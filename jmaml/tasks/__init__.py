"""Task distributions and fixed task sets."""

from jmaml.tasks import seed

__all__ = ["seed"]
