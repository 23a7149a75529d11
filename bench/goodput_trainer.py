"""One life of the goodput scenario's trainer (``python -m bench.goodput_trainer``): a real JAX
loop of fixed compute steps over a state of ``--size-mb``, checkpointed by plain orbax straight
to the durable tier (``--system orbax``, no signal handling, as a user's loop is today) or by
``tiered.CheckpointManager`` (``--system tiered``, which saves on SIGTERM/SIGINT). It restores
whatever there is, trains to ``--steps``, and appends what it did to ``--events`` (JSON lines:
ready, restored, save, end, each with its wall time); it prints ``step N SECONDS`` after each
step (its compute time), for the driver's failure trace."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any


def compute_step(step_ms: float) -> Any:
    """A step of ``step_ms`` of compute: jitted matmul chains (about 2 ms each) until the step's
    time is up. Compute, not a sleep, yet of a fixed length: the helpers that share this
    machine change how fast a chain runs, and a fixed amount of work would make each system's
    steps, and so the weight of its fixed restart cost, depend on when it ran."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 256), jnp.float32) / 256

    @jax.jit
    def one(a: jax.Array) -> jax.Array:
        for _ in range(8):
            a = jnp.tanh(a @ a)
        return a

    def step() -> None:
        end = time.perf_counter() + step_ms / 1000
        a = x
        while time.perf_counter() < end:
            a = one(a)
            a.block_until_ready()

    one(x).block_until_ready()
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["orbax", "tiered"], required=True)
    p.add_argument("--target", required=True, help="orbax: the durable URL; tiered: a config")
    p.add_argument("--period", type=int, default=0, help="orbax's save interval")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--size-mb", type=int, required=True)
    p.add_argument("--step-ms", type=float, required=True, help="compute per step")
    p.add_argument("--events", required=True)
    p.add_argument("--life", type=int, default=0, help="which life of the run this is")
    args = p.parse_args(argv)
    # Ctrl+C raises KeyboardInterrupt, as in a terminal, even when the driver was started in
    # the background (which leaves SIGINT ignored for its children)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from bench.common import random_state

    events = open(args.events, "a")  # noqa: SIM115 (open for the life of the process)

    def emit(ev: str, **kw: Any) -> None:
        line = {"ev": ev, "t": time.time(), "life": args.life, "pid": os.getpid(), **kw}
        events.write(json.dumps(line) + "\n")
        events.flush()

    compute = compute_step(args.step_ms)
    state = random_state(args.size_mb)
    emit("ready")
    t0 = time.perf_counter()
    if args.system == "orbax":
        import orbax.checkpoint as ocp

        mgr = ocp.CheckpointManager(
            args.target,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=args.period, max_to_keep=2, create=True
            ),
        )
        latest = mgr.latest_step()
        if latest is not None:
            state = mgr.restore(latest, args=ocp.args.StandardRestore(state))
        start = latest if latest is not None else -1

        def save(step: int, *, final: bool = False) -> bool:
            if final and step in mgr.all_steps():
                return False
            return bool(mgr.save(step, args=ocp.args.StandardSave(state), force=final))

        def should_stop() -> bool:
            return False
    else:
        import tiered

        mgr = tiered.CheckpointManager(Path(args.target))
        restored = mgr.restore(state)
        if restored is not None:
            state = restored.state
        start = restored.step if restored is not None else -1

        def save(step: int, *, final: bool = False) -> bool:
            return bool(mgr.save(step, state, final=final))

        def should_stop() -> bool:
            return mgr.should_stop()

    emit("restored", step=start, seconds=time.perf_counter() - t0)
    step = start
    for step in range(start + 1, args.steps):
        t0 = time.perf_counter()
        compute()
        print(f"step {step} {time.perf_counter() - t0:.6f}", flush=True)
        t0 = time.perf_counter()
        if save(step):
            kind = "preemption" if should_stop() else "periodic"
            emit("save", step=step, seconds=time.perf_counter() - t0, kind=kind)
        if should_stop():
            emit("stopped", step=step)
            mgr.close()
            return 0
    t0 = time.perf_counter()
    saved = step >= 0 and save(args.steps - 1, final=True)
    mgr.wait_until_finished()  # the run is over once its last step is on disk
    if saved:
        emit("save", step=args.steps - 1, seconds=time.perf_counter() - t0, kind="final")
    mgr.close()
    emit("end", step=args.steps - 1, wchar=_wchar())
    return 0


def _wchar() -> int:
    """Bytes this process has written so far (the driver's count of durable-tier writes)."""
    text = Path("/proc/self/io").read_text()
    return int(text.split("wchar:")[1].split()[0])


if __name__ == "__main__":
    raise SystemExit(main())
