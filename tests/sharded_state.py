"""Sharded state through both tiers, on 8 host devices (run by tests/test_orbax_api.py in a
process of its own: the device count is fixed when jax starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_state.py CONFIG FRESH

Saves a state sharded over a 4x2 mesh, promotes it, and restores it bit-exact onto the same
sharding, onto a 2x4 mesh with the axes swapped, onto 8 devices in a row (orbax's args form),
and, from the durable tier on a node whose disk is empty (FRESH, a second config), onto the 2x4
mesh again. Prints one OK line per check.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import tiered


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(shape), names)


def state_on(m: Mesh, specs: dict[str, P]) -> dict[str, jax.Array]:
    host = {
        "w": np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 7,
        "b": np.arange(8, dtype=np.int32) * 3,
        "count": np.asarray(12345, dtype=np.int64),
    }
    return {k: jax.device_put(v, NamedSharding(m, specs[k])) for k, v in host.items()}


def abstract_on(m: Mesh, specs: dict[str, P], like: dict[str, jax.Array]) -> dict:
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(m, specs[k]))
        for k, v in like.items()
    }


def same(got: dict[str, jax.Array], want: dict[str, jax.Array], m: Mesh, specs: dict) -> None:
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype)
        assert got[k].sharding.is_equivalent_to(NamedSharding(m, specs[k]), got[k].ndim), k


def main(config: str, fresh_config: str) -> int:
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    m42, m24, m8 = mesh((4, 2), ("data", "model")), mesh((2, 4), ("a", "b")), mesh((8,), ("x",))
    saved_specs = {"w": P("data", "model"), "b": P("model"), "count": P()}
    swapped = {"w": P("b", "a"), "b": P("a"), "count": P()}
    row = {"w": P("x"), "b": P("x"), "count": P()}
    state = state_on(m42, saved_specs)

    with tiered.CheckpointManager(config, install_signal_handlers=False) as mgr:
        assert mgr.save(10, state)
        mgr.wait_until_finished()
        got = mgr.restore(abstract_on(m42, saved_specs, state))
        same(got.state, state, m42, saved_specs)
        print("OK same sharding, local", flush=True)
        got = mgr.restore(abstract_on(m24, swapped, state))
        same(got.state, state, m24, swapped)
        print("OK resharded onto 2x4, local", flush=True)
        raw = mgr.restore(10, args=ocp.args.StandardRestore(abstract_on(m8, row, state)))
        same(raw, state, m8, row)
        print("OK resharded onto 8, orbax's args form", flush=True)
        tiered.promote_step(mgr.local, mgr.durable, 10)

    with tiered.CheckpointManager(fresh_config, install_signal_handlers=False) as mgr:
        assert mgr.local.committed_steps() == []
        got = mgr.restore(abstract_on(m24, swapped, state))
        assert got is not None and (got.step, got.source) == (10, "durable"), got
        same(got.state, state, m24, swapped)
        print("OK fresh node, from the durable tier, resharded onto 2x4", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
