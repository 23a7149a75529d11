"""Real orbax saves of real JAX arrays, for tests that need committed local steps."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def example_state(seed: int = 0) -> Any:
    from train import init_state

    state, _tx, _model = init_state(seed)
    return state


def orbax_save(local_dir: Path, step: int, state: Any, *, reason: str = "periodic") -> None:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(
        str(local_dir), options=ocp.CheckpointManagerOptions(create=True)
    ) as mgr:
        mgr.save(
            step,
            args=ocp.args.StandardSave(state),
            custom_metadata={"tiered": {"reason": reason}},
        )
        mgr.wait_until_finished()


class Trainer:
    """A long-lived orbax CheckpointManager, as a training loop holds one (its step list is
    cached, so steps the daemon prunes meanwhile do not disturb it)."""

    def __init__(self, local_dir: Path) -> None:
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.mgr = ocp.CheckpointManager(
            str(local_dir), options=ocp.CheckpointManagerOptions(create=True)
        )

    def save(self, step: int, state: Any, *, reason: str = "periodic") -> None:
        self.mgr.save(
            step,
            args=self.ocp.args.StandardSave(state),
            custom_metadata={"tiered": {"reason": reason}},
        )
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.close()


def orbax_restore(directory: str, step: int, target: Any) -> Any:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory) as mgr:
        return mgr.restore(step, args=ocp.args.StandardRestore(target))


def assert_trees_equal(a: Any, b: Any) -> None:
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def corrupt_largest_file(durable: Any, step: int) -> str:
    """Flip one bit in the biggest object of a durable step; return its relative path."""
    manifest = durable.read_manifest(step)
    victim = max(manifest.files, key=lambda r: manifest.files[r].size)
    data = bytearray(durable.fs.cat_file(durable.object_path(step, victim)))
    data[len(data) // 2] ^= 0x01
    durable.fs.pipe_file(durable.object_path(step, victim), bytes(data))
    return str(victim)
