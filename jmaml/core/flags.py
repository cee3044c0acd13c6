"""Command-line flags declared on a config dataclass's own fields.

A recipe's config is the one place its settings are described: each field that the command line sets
carries a ``Flag`` in its metadata (``setting(default, "help", ...)``), and ``add_flags``, ``given`` and
``conflicts`` turn those into argparse options, a ``{field: value}`` dict of what was given, and the
flags that contradict a recorded run. Every flag's argparse default is ``None``, so a flag given on the
command line is known as given: a resume can refuse one that contradicts the recorded config, and a
default can come from the config (or from the recipe's own preset) rather than from argparse.

Plain data and argparse only: no jmaml imports, so any layer may declare its flags here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_NO_CONST = object()


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag of a config field.

    ``name``: the flag without dashes, underscores for dashes (``"inner_lr"`` is ``--inner-lr``; default:
    the field's name). ``help``: the help text; ``(default X)`` is added from the field's default unless the
    text says "default" itself. ``parse``: argparse's ``type``. ``const``: a flag without a value that sets
    the field to this (``--remat`` sets True, ``--no-pretrain`` False). ``also``: further fields the flag
    sets to the same value (``--episodes`` sets the inner and the outer episodes). ``group``: the help
    section. ``aliases``: more spellings (``--k`` for ``--inner-steps``).
    """

    help: str
    name: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    const: Any = _NO_CONST
    also: tuple[str, ...] = ()
    group: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field with ``default`` and one command-line flag (``Flag(help, **flag)``)."""
    return dataclasses.field(default=default, metadata={"flags": (Flag(help, **flag),)})


def settings(default: Any, *flags: Flag) -> Any:
    """A dataclass field with several flags (a switch and its opposite)."""
    return dataclasses.field(default=default, metadata={"flags": tuple(flags)})


@dataclasses.dataclass(frozen=True)
class Option:
    """A config's flag, resolved: its argparse ``dest``, the field(s) it sets and the field's default."""

    dest: str
    fields: tuple[str, ...]
    flag: Flag
    default: Any

    @property
    def spelling(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def value(self, args: argparse.Namespace) -> Any:
        """The value given on the command line, or None."""
        return getattr(args, self.dest, None)


def options(cls: type) -> dict[str, Option]:
    """Every flag the config class ``cls`` declares, by argparse dest, in field order."""
    out: dict[str, Option] = {}
    for field in dataclasses.fields(cls):
        for flag in field.metadata.get("flags", ()):
            dest = flag.name or field.name
            if dest in out:
                raise TypeError(f"{cls.__name__} declares the flag --{dest.replace('_', '-')} twice")
            default = field.default if field.default is not dataclasses.MISSING else None
            out[dest] = Option(dest, (field.name, *flag.also), flag, default)
    return out


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_flags(parser: Any, cls: type, names: Iterable[str] | None = None, *, groups: Mapping[str, Any] | None = None,
              defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Adds ``cls``'s flags (those in ``names``, in that order; default all) to ``parser``, each into
    ``groups[flag.group]`` where given. ``defaults`` replaces a field's shown default (a command whose own
    defaults differ from the config's, e.g. a sweep's shorter runs). Returns the dests added."""
    table = options(cls)
    chosen = list(table) if names is None else list(names)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise KeyError(f"{cls.__name__} has no flags {unknown}; it has {sorted(table)}")
    shown_defaults = dict(defaults or {})
    for dest in chosen:
        option = table[dest]
        flag = option.flag
        where = (groups or {}).get(flag.group, parser) if flag.group else parser
        spellings = [option.spelling, *("--" + a.replace("_", "-") for a in flag.aliases)]
        text = flag.help
        default = shown_defaults.get(dest, option.default)
        if flag.const is _NO_CONST and "default" not in text and default is not None:
            text = f"{text} (default {_shown(default)})"
        if flag.const is not _NO_CONST:
            where.add_argument(*spellings, dest=dest, action="store_const", const=flag.const, default=None,
                               help=text)
        else:
            where.add_argument(*spellings, dest=dest, type=flag.parse, choices=flag.choices, default=None,
                               metavar=flag.metavar, help=text)
    return chosen


def given(args: argparse.Namespace, cls: type, names: Iterable[str] | None = None) -> dict[str, Any]:
    """``{field: value}`` for every flag of ``cls`` (in ``names``; default all) given in ``args``."""
    table = options(cls)
    out: dict[str, Any] = {}
    for dest in (table if names is None else names):
        option = table[dest]
        value = option.value(args)
        if value is not None:
            out.update((field, value) for field in option.fields)
    return out


def conflicts(args: argparse.Namespace, cls: type, recorded: Any, names: Iterable[str] | None = None) -> list[str]:
    """The flags given in ``args`` that contradict the ``recorded`` config, each as
    ``--flag VALUE (recorded VALUE)``."""
    table = options(cls)
    out = []
    for dest in (table if names is None else names):
        option = table[dest]
        value = option.value(args)
        if value is None:
            continue
        old = getattr(recorded, option.fields[0])
        if value != old:
            shown = "" if option.flag.const is not _NO_CONST else f" {value!r}"
            out.append(f"{option.spelling}{shown} (recorded {old!r})")
    return out


def refuse_conflicts(args: argparse.Namespace, cls: type, recorded: Any, where: str,
                     names: Iterable[str] | None = None) -> None:
    """Raises ValueError naming every flag in ``args`` that contradicts the run recorded in ``where``."""
    found = conflicts(args, cls, recorded, names)
    if found:
        raise ValueError(f"--resume continues the run recorded in {where}; these flags contradict it: "
                         f"{'; '.join(found)}. Drop them, or start over with --overwrite")


def number_list(convert: Callable[[str], Any], example: str) -> Callable[[str], tuple]:
    """An argparse type for comma-separated numbers (``"40,40"`` -> ``(40, 40)``)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(convert(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}, got {text!r}") from None
    return parse


ints = number_list(int, "40,40")
floats = number_list(float, "0.001,0.01")
