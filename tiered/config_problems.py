"""What is wrong with a configuration, all of it at once, each problem where its value came from.

A file with two misspelt keys gets both named in one run, each with its fix, and each value is
blamed on where it was written: ``c.yml:7`` (file and line), ``TIERED_CHECKPOINT_PERIOD=abc``
(the environment), ``override checkpoint_period=abc`` (MaxText's command line). The
configuration model (``tiered.config``) keeps the rules; this module only collects and words
what breaks them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

Key = tuple[str, ...]
"""A setting's place: ``("checkpoint_period",)`` or ``("tiered", "upload_concurrency")``."""

SECTION = "tiered"


@dataclass
class Problems:
    """The problems found so far, in the order found, with where each value came from."""

    source: str
    origins: Mapping[Key, str] = field(default_factory=dict)
    found: list[tuple[Key, str]] = field(default_factory=list)

    def add(self, key: Key, message: str) -> None:
        if (key, message) not in self.found:
            self.found.append((key, message))

    def where(self, key: Key) -> str:
        for n in range(len(key), 0, -1):
            origin = self.origins.get(key[:n])
            if origin is not None:
                return origin
        return self.source

    def lines(self) -> list[str]:
        return [f"{self.where(key)}: {message}" for key, message in self.found]

    def render(self) -> str:
        """One line for one problem; a count and one line each for more."""
        lines = self.lines()
        if len(lines) == 1:
            return lines[0]
        return f"{self.source}: {len(lines)} problems\n" + "\n".join(f"  {x}" for x in lines)

    def add_validation(self, err: ValidationError) -> None:
        for item in err.errors():
            if item["type"] == "extra_forbidden":
                continue  # an unknown key: already named, with its nearest valid key
            key = tuple(str(part) for part in item["loc"])
            name = ".".join(key)
            self.add(key, f"{name}: {item['msg']} (got {item.get('input')!r})")


def misspelt_section(key: object, value: object) -> bool:
    """Whether a top-level key is surely our section name misspelt (``teired:``, ``Tiered:``):
    a mapping under a name a letter or two from ``tiered``. MaxText's own keys never are."""
    if not isinstance(key, str) or key == SECTION or not isinstance(value, dict):
        return False
    name = key.strip().lower().replace("-", "_")
    return name == SECTION or difflib.SequenceMatcher(None, name, SECTION).ratio() >= 0.8


def nearest(key: str, valid: Iterable[str]) -> str:
    options = sorted(valid)
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def near_miss(key: str, fields: Iterable[str]) -> str | None:
    """The field ``key`` is one edit away from, if it is not one itself
    (``local_checkpoint_perod``): MaxText's files hold hundreds of other keys, so only these
    near misses are worth a word."""
    names = set(fields)
    if key in names:
        return None
    for name in sorted(names):
        if _one_edit(key, name):
            return name
    return None


def _one_edit(a: str, b: str) -> bool:
    """Whether one insertion, deletion, substitution or swap of neighbours turns ``a`` into
    ``b``."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diffs = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diffs) == 1:
            return True
        i, j = diffs[0], diffs[-1]
        return len(diffs) == 2 and j == i + 1 and a[i] == b[j] and a[j] == b[i]
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i in range(len(short)) if short[i] != long[i]), len(short))
    return short[i:] == long[i + 1 :]


def key_lines(text: str, path: str) -> dict[Key, str]:
    """``path:line`` of each top-level key of a YAML file and of each key under its mappings
    (``tiered:``), for naming where a bad value was written. Empty if the text does not
    compose (the parse that follows names that problem)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    out: dict[Key, str] = {}
    if not isinstance(root, yaml.MappingNode):
        return out
    for knode, vnode in root.value:
        if not isinstance(knode, yaml.ScalarNode):
            continue
        out[(str(knode.value),)] = f"{path}:{knode.start_mark.line + 1}"
        if isinstance(vnode, yaml.MappingNode):
            for ck, _cv in vnode.value:
                if isinstance(ck, yaml.ScalarNode):
                    out[(str(knode.value), str(ck.value))] = f"{path}:{ck.start_mark.line + 1}"
    return out


def env_origins(env: Mapping[str, str], prefix: str, top: set[str], section: set[str]) -> dict:
    """Where each setting set by a ``TIERED_*`` variable came from: the variable itself."""
    out: dict[Key, str] = {}
    for name, value in env.items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix) :].lower()
        if key in top:
            out[(key,)] = f"{name}={value}"
        elif key in section:
            out[(SECTION, key)] = f"{name}={value}"
    return out


def describe(value: Any) -> str:
    return type(value).__name__
