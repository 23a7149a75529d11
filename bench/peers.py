"""Scenario 8: peer replication.

1. **A replaced node's restore**: its part of the newest step, from the peer that kept a copy
   (``tiered.peering.recover_own`` against a real daemon's peer server), against the same step
   from the durable tier (``DurableTier.download_step``, the GCS emulator). Both end where the
   trainer can load: a verified local step. The order alternates each round.
2. **Training while replicating**: compute steps timed while one real daemon sends a step to
   another (both at the daemon's default nice), against the same steps with the daemons idle;
   uncapped and with ``tiered.peer_bandwidth_mb_per_s``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import (
    config_mapping,
    daemon,
    free_port,
    median,
    new_bucket,
    random_state,
    save_state_locally,
    settle,
    slowdown_summary,
    state_bytes,
    write_config,
)

SECRET = "bench-peer-secret-0123456789abcdef"


def _peer_config(
    work: Path, rank: int, local: Path, durable: str, addresses: list[str], **tiered: Any
) -> dict[str, Any]:
    secret = work / "peer-secret"
    secret.write_text(SECRET)
    return config_mapping(
        local,
        durable,
        checkpoint_period=10000,  # nothing here is due for the durable tier
        local_checkpoint_period=100,
        tiered={
            "num_nodes": 2,
            "node_rank": rank,
            "peer_addresses": addresses,
            "peer_secret_file": str(secret),
            "status_address": f"127.0.0.1:{free_port()}",
            "local_max_to_keep": 10,
            # no trainer here: a drain would owe the newest step as final and wait for the
            # other node's part of it
            "shutdown_grace_seconds": 1,
            **tiered,
        },
    )


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def replaced_node_restore(*, size_mb: int, reps: int, work: Path) -> dict[str, Any]:
    import tiered
    from tiered import DurableTier, LocalTier
    from tiered.peering import recover_own
    from tiered.storage.replicas import PeerStore

    state = random_state(size_mb)
    bucket = new_bucket()
    durable_url = f"gs://{bucket}/run"
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    node = [work / f"peer-restore-node{r}" for r in range(2)]
    step_dir = save_state_locally(node[1], 500, state)
    DurableTier(durable_url, storage_options={"token": "anon"}).upload_step(step_dir, step=500)
    cfgs = []
    for rank in range(2):
        mapping = _peer_config(work, rank, node[rank], durable_url, addresses)
        cfgs.append(write_config(work / f"peer-restore-{rank}.yml", mapping))
    times: dict[str, list[float]] = {"from_peer": [], "from_durable": []}
    with daemon(cfgs[0]), daemon(cfgs[1]):
        # node 1's daemon sends step 500 to node 0's
        _wait(lambda: PeerStore(node[0]).replicas(1), 600, "the replica at node 0")
    shutil.rmtree(node[1])
    cfg1 = tiered.config_from_mapping(
        _peer_config(work, 1, node[1], durable_url, addresses), env={}
    )

    def from_peer() -> None:
        LocalTier(node[1]).ensure()
        settle()
        t0 = time.perf_counter()
        got = recover_own(cfg1, LocalTier(node[1]), rank=1, nodes=2)
        times["from_peer"].append(time.perf_counter() - t0)
        assert [g.step for g in got] == [500], got
        shutil.rmtree(node[1])

    def from_durable() -> None:
        dest = work / "peer-restore-durable"
        durable = DurableTier(durable_url, storage_options={"token": "anon"})
        settle()
        t0 = time.perf_counter()
        durable.download_step(500, dest)
        times["from_durable"].append(time.perf_counter() - t0)
        shutil.rmtree(dest)

    # node 0's daemon serves the copy; node 1 is the replaced node
    with daemon(cfgs[0]):
        _wait(lambda: _answers(addresses[0]), 60, "node 0's peer server")
        for rep in range(reps):
            for run in (from_peer, from_durable) if rep % 2 == 0 else (from_durable, from_peer):
                run()
    medians = {k: median(v) for k, v in times.items()}
    return {
        "params": {"size_mb": size_mb, "bytes": state_bytes(state), "reps": reps},
        "times_s": times,
        "median": medians,
        "ratios": {"peer_vs_durable_time": medians["from_peer"] / medians["from_durable"]},
    }


def _answers(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.2).close()
    except OSError:
        return False
    return True


def replication_interference(
    *, size_mb: int, reps: int, step_ms: float, work: Path
) -> dict[str, Any]:
    from bench.scenarios import _compute_step
    from tiered.storage.replicas import PeerStore

    compute = _compute_step(step_ms)
    results: dict[str, dict[str, list[float]]] = {}
    for label, cap in (("uncapped", None), ("capped_50MBps", 50.0)):
        idle, busy = [], []
        for rep in range(reps):
            addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
            node = [work / f"peer-int-{label}-{rep}-node{r}" for r in range(2)]
            save_state_locally(node[0], 100, random_state(size_mb, seed=rep))
            node[1].mkdir(parents=True)
            cfgs = []
            for rank in range(2):
                mapping = _peer_config(
                    work,
                    rank,
                    node[rank],
                    f"file://{work}/peer-int-durable-{label}-{rep}",
                    addresses,
                    **({"peer_bandwidth_mb_per_s": cap} if cap else {}),
                )
                cfgs.append(write_config(work / f"peer-int-{label}-{rep}-{rank}.yml", mapping))
            for _ in range(20):
                t0 = time.perf_counter()
                compute()
                idle.append(time.perf_counter() - t0)
            settle()
            store = PeerStore(node[1])

            def started(store: PeerStore = store) -> bool:
                partial = any(".tiered-tmp-" in p.name for p in store.root.glob("*/*"))
                return partial or bool(store.replicas(0))

            with daemon(cfgs[1]), daemon(cfgs[0], wait=False):
                # from the transfer's first bytes at node 1 to the copy being complete there
                _wait(started, 300, "the transfer to start")
                while not store.replicas(0):
                    t0 = time.perf_counter()
                    compute()
                    busy.append(time.perf_counter() - t0)
            for n in node:
                shutil.rmtree(n, ignore_errors=True)
        results[label] = {"idle_step_s": idle, "busy_step_s": busy}
    summary = slowdown_summary(results)
    return {
        "params": {"size_mb": size_mb, "step_ms": step_ms, "reps": reps},
        "samples": results,
        "summary": summary,
    }


def peers(*, size_mb: int, reps: int, step_ms: float, work: Path) -> dict[str, Any]:
    return {
        "restore": replaced_node_restore(size_mb=size_mb, reps=reps, work=work),
        "interference": replication_interference(
            size_mb=size_mb, reps=reps, step_ms=step_ms, work=work
        ),
    }
