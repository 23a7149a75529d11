"""Reading configuration files: tiered's own, and MaxText's as MaxText reads it (its
``base_config`` chain, then its ``key=value`` overrides). Each file error is one
``ConfigError`` naming the file and, for YAML, the line."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tiered.config import TieredConfig
from tiered.config_check import config_from_mapping, parse_scalar
from tiered.config_problems import Key, key_lines
from tiered.errors import ConfigError

_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


def split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other words, MaxText's ``key=value`` overrides) of a command line."""
    overrides = [w for w in words if _OVERRIDE.fullmatch(w)]
    return [w for w in words if not _OVERRIDE.fullmatch(w)], overrides


def _read_yaml(path: Path, what: str, lines: dict[Key, str] | None = None) -> dict[str, Any]:
    """The mapping a YAML file holds; ``lines`` gets each key's ``path:line``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} is a directory, not a file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: {what} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror}") from None
    if lines is not None:
        lines.update(key_lines(text, str(path)))
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}"
        )
    return raw


def read_maxtext_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    origins: dict[Key, str] | None = None,
) -> dict:
    """A MaxText config as MaxText reads it: its ``base_config`` chain (relative to each file),
    then the ``key=value`` overrides of MaxText's command line. A base config that is not there
    (MaxText's own ``base.yml`` when maxtext is not installed here) is skipped: the checkpointing
    keys tiered needs are the ones a run sets. ``origins`` gets where each key was set last
    (``file:line``, or ``override key=value``)."""
    merged: dict[str, Any] = {}
    chain: list[dict[str, Any]] = []
    chain_lines: list[dict[Key, str]] = []
    current: Path | None = Path(path).expanduser()
    seen: set[Path] = set()
    while current is not None:
        if current.resolve() in seen:
            raise ConfigError(f"{current}: base_config loops back to a file already read")
        seen.add(current.resolve())
        chain_lines.append({})
        data = _read_yaml(current, "MaxText config", chain_lines[-1])
        chain.append(data)
        base = data.get("base_config")
        current = None
        if isinstance(base, str) and base:
            candidate = (
                (Path(path).expanduser().parent / base)
                if not Path(base).is_absolute()
                else Path(base)
            )
            if not candidate.exists():
                candidate = _maxtext_package_config(base) or candidate
            current = candidate if candidate.exists() else None
    for data, lines in zip(reversed(chain), reversed(chain_lines), strict=True):
        merged.update({k: v for k, v in data.items() if k != "base_config"})
        if origins is not None:
            origins.update(lines)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"override {item!r}: expected key=value, as MaxText takes them")
        merged[key] = parse_scalar(value)
        if origins is not None:
            origins[(key,)] = f"override {item}"
    return merged


def _maxtext_package_config(name: str) -> Path | None:
    """MaxText's own configs (``base.yml``), when maxtext is importable here."""
    try:
        spec = importlib.util.find_spec("maxtext")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for candidate in (Path(root) / "configs" / name, Path(root).parent / "configs" / name):
            if candidate.exists():
                return candidate
    return None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    maxtext: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> TieredConfig:
    """Read and validate the configuration. ``env`` defaults to ``os.environ``.

    ``path`` alone: one file with MaxText's keys and a ``tiered:`` section. With ``maxtext``:
    MaxText's checkpointing keys come from that file (and ``overrides``), and ``path``, if
    given, may hold only the ``tiered:`` section.
    """
    environ = os.environ if env is None else env
    if maxtext is None:
        if path is None:
            raise ConfigError(
                "no configuration: give --config (tiered's file) or --maxtext-config (MaxText's "
                "own YAML), or both"
            )
        if overrides:
            raise ConfigError(
                f"key=value overrides ({overrides[0]!r}) go with --maxtext-config, as on "
                "MaxText's command line; use TIERED_<KEY> variables with --config alone"
            )
        origins: dict[Key, str] = {}
        raw = _read_yaml(Path(path).expanduser(), "config file", origins)
        return config_from_mapping(raw, env=environ, source=str(path), origins=origins)
    origins = {}
    data = read_maxtext_config(maxtext, overrides, origins)
    if "tiered" in data:
        raise ConfigError(
            f"{maxtext}: a tiered: section in MaxText's config makes MaxText refuse it "
            "(ValueError: 'tiered' not in ...); move it to the file given with --config"
        )
    source = str(maxtext)
    if path is not None:
        ours = _read_yaml(Path(path).expanduser(), "config file", origins)
        extra = sorted(k for k in ours if k != "tiered")
        if extra:
            raise ConfigError(
                f"{path}: with --maxtext-config this file holds only the tiered: section, but it "
                f"also sets {extra[0]!r}; set MaxText's keys in {maxtext} or as {extra[0]}=VALUE"
            )
        data["tiered"] = ours.get("tiered")
        source = f"{maxtext} + {path}"
    return config_from_mapping(data, env=environ, source=source, origins=origins, maxtext=True)
