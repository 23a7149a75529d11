"""A training loop written for plain orbax, switched to tiered by its import and constructor.

    python examples/orbax_loop.py --directory /tmp/ckpt --steps 200            # plain orbax
    python examples/orbax_loop.py --directory gs://b/run --local-dir /ssd/run --tiered

A Flax NNX model with an optax optimizer, and a data iterator whose position is saved beside
it (a JSON item of a ``Composite``), so a resumed run sees exactly the batch it would have seen.
Everything below ``make_manager`` is the same for both: ``save(step, args=Composite(...),
metrics=...)``, ``should_save``, ``reached_preemption``, ``latest_step``, ``restore(step,
args=Composite(...))``, ``wait_until_finished``, ``close``. One line per event goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx


class Regressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))[..., 0]


class Batches:
    """A deterministic data iterator: batch i depends on i alone, and ``position`` is its
    whole state (what grain's iterator state is to a real input pipeline)."""

    def __init__(self, position: int = 0) -> None:
        self.position = position

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.position)
        self.position += 1
        x = rng.standard_normal((32, 8)).astype(np.float32)
        return x, (x @ np.linspace(-1, 1, 8)).astype(np.float32)


def make_manager(args: argparse.Namespace):  # the one place a user's code changes
    options = ocp.CheckpointManagerOptions(save_interval_steps=args.every, max_to_keep=3)
    if args.tiered:
        import tiered

        return tiered.CheckpointManager(args.directory, options=options, local_dir=args.local_dir)
    return ocp.CheckpointManager(args.directory, options=options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--directory", required=True)
    p.add_argument("--local-dir")
    p.add_argument("--tiered", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--stop-at", type=int, default=None, help="stop (as if preempted) after it")
    p.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step")
    args = p.parse_args(argv)

    model = Regressor(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graph, state = nnx.split((model, optimizer))
    data = Batches()

    @jax.jit
    def train_step(state: nnx.State, x: jax.Array, y: jax.Array) -> tuple[nnx.State, jax.Array]:
        model, optimizer = nnx.merge(graph, state)

        def loss_fn(m: Regressor) -> jax.Array:
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    mgr = make_manager(args)
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        restored = mgr.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()
            ),
        )
        state, data = restored.state, Batches(restored.data["position"])
        start = latest + 1
        print(f"RESUMED step={latest} position={data.position}", flush=True)
    else:
        print("FRESH", flush=True)
    loss = jnp.zeros(())
    for step in range(start, args.steps):
        x, y = next(data)
        if step == start:
            print(f"FIRST_BATCH step={step} sum={float(np.sum(x)):.6f}", flush=True)
        state, loss = train_step(state, x, y)
        time.sleep(args.step_time)
        if mgr.should_save(step) or step == args.stop_at:
            mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave({"position": data.position}),
                ),
                metrics={"loss": float(loss)},
                force=step == args.stop_at,
            )
        if mgr.reached_preemption(step) or step == args.stop_at:
            mgr.wait_until_finished()
            print(f"STOPPED step={step} loss={float(loss):.6f}", flush=True)
            mgr.close()
            return 0
    mgr.wait_until_finished()
    print(f"DONE step={args.steps - 1} loss={float(loss):.6f}", flush=True)
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
