"""The shape of the code, as docs/design.md draws it: layers that import down only, modules of
one job each, and a public surface that shadows nothing."""

from __future__ import annotations

import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiered

ROOT = Path(__file__).resolve().parents[1]
# Modules docs/design.md allows past 450 lines, each with its reason there (none today).
ONE_IDEA: set[str] = set()


def test_no_import_points_up_a_layer() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists() and shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [str(lint) if lint.exists() else "lint-imports"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout


def test_modules_stay_small() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for folder in ("tiered", "daemon")
        for p in (ROOT / folder).rglob("*.py")
    }
    big = {path: n for path, n in sizes.items() if n > 450 and path not in ONE_IDEA}
    assert not big, f"split these (docs/design.md names each module's job): {big}"


def test_the_public_surface_shadows_no_module() -> None:
    submodules = {m.name for m in pkgutil.iter_modules(tiered.__path__)}
    for name in tiered.__all__:
        assert name not in submodules, f"tiered.{name} hides the module tiered/{name}"
        if name not in ("CheckpointManager", "Restored"):  # loaded lazily: they import jax
            assert hasattr(tiered, name)


@pytest.mark.parametrize("module", ["tiered", "tiered.types", "tiered.errors"])
def test_importing_tiered_loads_no_storage_config_or_training_stack(module: str) -> None:
    # A fresh interpreter: this test process has long imported everything.
    probe = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fsspec', 'pydantic', 'jax', 'orbax', 'yaml') or m.startswith('tiered.storage'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"import {module} loaded: {done.stdout.strip()}"


def test_design_doc_names_every_module() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    for folder in ("tiered", "daemon"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p.name.startswith("__"):
                continue
            named = re.search(rf"(`|tiered\.|\| ){p.stem}(`|\s|\|)", design)
            assert named, f"docs/design.md does not name {p.relative_to(ROOT)}'s job"


def test_no_module_reads_another_objects_private_names() -> None:
    """``other._name`` couples a module to another's insides where the import graph cannot see
    it (upload read DurableTier's ``_step_manifest``; the loader read the manager's ``_mgr``):
    only ``self``, ``cls`` and ``super()`` reach underscore names. ``os._exit`` is the one
    foreign exception (a child after fork, and a fault point, end without cleanup)."""
    import ast

    allowed = {"os._exit"}
    found = []
    for folder in ("tiered", "daemon"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (
                    isinstance(node, ast.Attribute)
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    continue
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                    continue
                if ast.unparse(node) not in allowed:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_the_daemon_contract_forbids_every_module_but_the_surface() -> None:
    """A new module is forbidden to the daemon until the contract says otherwise: the list in
    pyproject.toml names every module of tiered/ but ``tiered`` and ``tiered.sidecar``."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c.get("source_modules") == ["daemon"])
    modules = {
        f"tiered.{p.stem}" if p.is_file() else f"tiered.{p.name}"
        for p in (ROOT / "tiered").iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "sidecar"))
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert modules == set(contract["forbidden_modules"])


def test_the_daemon_is_composed_not_inherited() -> None:
    """``Daemon`` was ``Daemon(Outcomes, Views, Peering)``: mixins sharing some 25 attributes
    declared on a base with ``NotImplementedError`` stubs. Its parts are objects now, each
    handed what it needs by ``Daemon.__init__``: no class of the daemon's inherits from another
    (but for ``daemon.http``'s ``Server`` and ``Handler``, which the status and peer servers
    specialize), and no stub waits for a subclass to fill it in."""
    import ast
    import importlib
    import inspect

    import daemon
    from daemon.http import Handler, Server
    from daemon.service import Daemon

    assert Daemon.__mro__ == (Daemon, object)
    stubs = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if ast.unparse(raised) == "NotImplementedError":
                    stubs.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not stubs, f"stubs for a subclass to fill in: {stubs}"
    inherited = []
    for info in pkgutil.iter_modules(daemon.__path__, "daemon."):
        if info.name == "daemon.__main__":
            continue  # running it runs the daemon
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != info.name:
                continue
            for base in cls.__mro__[1:]:
                ours = base.__module__.split(".")[0] == "daemon"
                if ours and base not in (Handler, Server):
                    inherited.append(f"{cls.__module__}.{cls.__qualname__}({base.__qualname__})")
    assert not inherited, f"compose these, do not inherit: {inherited}"
