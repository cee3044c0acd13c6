"""Task distributions and fixed task sets, and the registry of task families by name.

``FAMILIES`` maps the names ``TrainConfig.task`` and ``jmaml train --task`` accept to a
``TaskFamily``; a new family is a module with its ``family()`` and one line here.
"""

from jmaml.tasks import images, seed, sinusoid
from jmaml.tasks.family import EvalProtocol, TaskFamily

FAMILIES: dict[str, TaskFamily] = {
    "sinusoid": sinusoid.family(),
    "omniglot": images.family("omniglot"),
    "miniimagenet": images.family("miniimagenet"),
    "tieredimagenet": images.family("tieredimagenet"),
    "cifarfs": images.family("cifarfs"),
    "fc100": images.family("fc100"),
}


def family(name: str) -> TaskFamily:
    """The registered family ``name``; ValueError naming the choices for an unknown one."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"task must be one of {', '.join(FAMILIES)}; got {name!r}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "EvalProtocol", "TaskFamily", "family", "images", "seed", "sinusoid"]
