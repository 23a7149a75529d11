"""A small "latency network": an MLP regressor on synthetic data, checkpointed with tiered.

    python examples/train.py --config configs/demo.yml --steps 300

It saves locally every ``local_checkpoint_period`` steps, writes a preemption checkpoint and
exits cleanly on SIGTERM or Ctrl+C, and resumes from the newest checkpoint on either tier. Run
the daemon beside it (``tiered daemon --config ...``) to get every fifth checkpoint onto the
durable tier. Progress goes to stdout as one line per event, so scripts can follow it.

``--tensorboard DIR`` and ``--wandb`` log the loss and, at each save, the checkpoint facts
(``tiered.integrations``: newest step per tier, steps at risk, blocking time, durable lag) beside
it, keyed by the training step (W&B: ``WANDB_PROJECT``, ``WANDB_MODE=offline`` as usual).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tiered


class LatencyNet(nn.Module):
    """Predicts a request's latency from 16 features."""

    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


def make_batch(key: jax.Array, batch: int = 128) -> tuple[jax.Array, jax.Array]:
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (batch, 16))
    w = jnp.linspace(-1.0, 1.0, 16)
    y = jnp.exp(0.3 * x @ w) + 0.05 * jax.random.normal(kn, (batch,))
    return x, y


def init_state(seed: int = 0) -> tuple[dict, optax.GradientTransformation, LatencyNet]:
    model = LatencyNet()
    key = jax.random.PRNGKey(seed)
    params = model.init(key, jnp.zeros((1, 16)))["params"]
    tx = optax.adam(1e-3)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.PRNGKey(seed + 1),
    }
    return state, tx, model


def replicate_across_processes(state: dict) -> dict:
    """The same state on every process, as one global array per leaf (a data-parallel job):
    orbax saves global arrays, never host-local ones, in a multi-process job."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def to_global(leaf: jax.Array) -> jax.Array:
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, replicated, lambda idx: host[idx])

    return jax.tree.map(to_global, state)


def make_train_step(model: LatencyNet, tx: optax.GradientTransformation):
    @jax.jit
    def train_step(state: dict) -> tuple[dict, jax.Array]:
        rng, batch_key = jax.random.split(state["rng"])
        x, y = make_batch(batch_key)

        def loss_fn(params: dict) -> jax.Array:
            return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": rng,
        }, loss

    return train_step


class Loggers:
    """The loss every step and the checkpoint facts at each save, to the loggers asked for."""

    def __init__(self, mgr: tiered.CheckpointManager, args: argparse.Namespace) -> None:
        from tiered.integrations import TensorBoardLogger, WandbLogger

        self.loggers: list[TensorBoardLogger | WandbLogger] = []
        self.run = None
        if args.tensorboard:
            self.loggers.append(TensorBoardLogger(mgr, args.tensorboard))
        if args.wandb:
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tiered-example"))
            self.loggers.append(WandbLogger(mgr, run=self.run))

    def log(self, step: int, *, saved: bool, **scalars: jax.Array) -> None:
        values = {k: float(v) for k, v in scalars.items()} if self.loggers else {}
        for logger in self.loggers:
            if saved:
                logger.log(step, **values)
            else:
                logger.log_scalars(step, **values)

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self.loggers:
            logger.close()
        if self.run is not None:
            self.run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one process of a multi-host job: jax.distributed.initialize with the process "
        "count and id from TIERED_NUM_NODES / TIERED_NODE_RANK and the coordinator from "
        "JAX_COORDINATOR_ADDRESS",
    )
    parser.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard scalars to DIR")
    parser.add_argument("--wandb", action="store_true", help="log to a W&B run (wandb.init)")
    args = parser.parse_args(argv)
    if args.distributed:
        if os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            num_processes=int(os.environ.get("TIERED_NUM_NODES", "1")),
            process_id=int(os.environ.get("TIERED_NODE_RANK", "0")),
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    state, tx, model = init_state()
    if jax.process_count() > 1:
        state = replicate_across_processes(state)
    train_step = make_train_step(model, tx)
    with tiered.CheckpointManager(args.config) as mgr, Loggers(mgr, args) as loggers:
        restored = mgr.restore(state)
        start = 0
        if restored is not None:
            state = restored.state
            start = restored.step + 1
            print(f"RESUMED step={restored.step} from={restored.source}", flush=True)
        else:
            print("FRESH start", flush=True)
        step = start - 1
        for step in range(start, args.steps):
            state, loss = train_step(state)
            if args.step_time:
                time.sleep(args.step_time)
            saved = mgr.save(step, state)
            loggers.log(step, saved=saved, loss=loss)
            if saved:
                print(f"SAVED step={step} loss={float(loss):.4f}", flush=True)
            if mgr.should_stop():
                print(f"STOPPED step={step} (preemption checkpoint written)", flush=True)
                return 0
        if step >= start and mgr.save(step, state, final=True):
            loggers.log(step, saved=True)
        print(f"DONE step={step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
