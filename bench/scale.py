"""``python -m bench scale``: the multi-node protocol measured at 16 to 1,024 nodes, one machine.

Each simulated node is the daemon's own code over its own rank's ``DurableTier`` and its own
small local step, shaped as orbax saves one process's part (step and item metadata, its
``array_metadatas/process_<r>``, a real OCDBT database in ``ocdbt.process_<r>/`` and its own
root): ``tiered.tiers.promote_step`` (the part and its marker), node 0's ``commit_parts`` tried
once a second as the daemon's loop tries it (the merge included), one listing of the durable
tier as each daemon makes after its own writes (``daemon.jobs.listing``), the restore agreement
(``tiered.tiers.agree``) and pruning (``tiered.tiers.apply_deletes``).

Node 0 runs in a process of its own (``python -m bench.scale node0``), so its peak RSS, and its
merge child's, are its own; the other nodes run on threads of this process. Every node's store
operations are counted by wrapping its filesystem (and, on ``file://``, the writes tiered makes
with plain OS calls); on the GCS emulator the HTTP requests are counted at the server as well,
the merge child's included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tiered import DurableTier, LocalTier
from tiered.layout import COMMIT_MARKER
from tiered.policy import Delete
from tiered.storage.stores import PosixStore
from tiered.tiers import agree, apply_deletes, commit_parts, promote_step
from tiered.types import Topology

STEP = 100
NODE_COUNTS = (16, 64, 256, 1024)
COMMIT_POLL_SECONDS = 1.0  # daemon.service: node 0 tries a waiting commit once a second
# Filesystem calls that reach the store (invalidate_cache and the like do not).
_REMOTE_CALLS = frozenset(
    [
        "ls",
        "find",
        "info",
        "cat_file",
        "cat",
        "pipe_file",
        "put_file",
        "get_file",
        "cp_file",
        "rm_file",
        "rm",
        "open",
        "exists",
        "mkdir",
        "makedirs",
        "glob",
        "du",
    ]
)
# PosixStore writes with plain OS calls (rename, link): each is one operation on the store.
_POSIX_WRITES = ("put", "write_small", "create_exclusive", "copy", "move")


class Counter:
    """Store operations, in all and by name."""

    def __init__(self) -> None:
        self.n = 0
        self.by_name: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self.n += 1
            self.by_name[name] = self.by_name.get(name, 0) + 1


class _CountedFS:
    """An fsspec filesystem that counts the calls that reach the store."""

    def __init__(self, fs: Any, counter: Counter) -> None:
        self._fs = fs
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if name not in _REMOTE_CALLS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._counter.add(name)
            return attr(*args, **kwargs)

        return call


def _counting(method: Callable[..., Any], counter: Counter) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        counter.add(method.__name__)
        return method(*args, **kwargs)

    return call


def open_node(
    url: str, options: dict[str, Any], rank: int, nodes: int
) -> tuple[DurableTier, Counter]:
    """Node ``rank``'s durable tier, as its daemon opens it, with its store calls counted."""
    tier = DurableTier(url, storage_options=options, topology=Topology(rank, nodes))
    counter = Counter()
    store = tier.store
    if isinstance(store, PosixStore):
        for name in _POSIX_WRITES:
            setattr(store, name, _counting(getattr(store, name), counter))
    store.fs = _CountedFS(store.fs, counter)
    return tier, counter


def make_local_step(root: Path, rank: int, nodes: int, *, step: int = STEP) -> LocalTier:
    """Node ``rank``'s local tier holding one committed step: its process's part of a
    data-parallel save (a replicated key every node holds, and a sharded one of its own)."""
    import tensorstore as ts

    local = root / f"node{rank}"
    d = local / str(step)
    item = d / "state"
    (item / "array_metadatas").mkdir(parents=True, exist_ok=True)
    meta = {
        "item_handlers": {"state": "PyTreeCheckpointHandler"},
        "commit_timestamp_nsecs": time.time_ns(),
        "custom_metadata": {"tiered": {"reason": "periodic", "nodes": nodes, "epoch": 0}},
    }
    (d / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    (item / "_METADATA").write_text(json.dumps({"tree_metadata": {"w": {}, "b": {}}}))
    (item / "_sharding").write_text(json.dumps({"w": "sharded", "b": "replicated"}))
    (item / "array_metadatas" / f"process_{rank}").write_text(json.dumps({"rank": rank}))
    for db in (item / f"ocdbt.process_{rank}", item):
        kv = ts.KvStore.open(
            {"driver": "ocdbt", "base": {"driver": "file", "path": f"{db}/"}}
        ).result()
        with ts.Transaction() as txn:
            kv.with_transaction(txn).write(f"w/c/{rank}.0", os.urandom(1024)).result()
            kv.with_transaction(txn).write("b/c/0", b"\0" * 256).result()
    (d / COMMIT_MARKER).write_text("committed")
    return LocalTier(local)


def listing(tier: DurableTier) -> None:
    """What each daemon's listing job reads (``daemon.jobs.listing``)."""
    from tiered.coord import Rendezvous

    tier.check()
    tier.scan()
    Rendezvous(tier).current_epoch()
    tier.list_displaced()


def emulator_requests() -> int | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return None
    with urllib.request.urlopen(f"{host}/_tiered/requests", timeout=30) as answer:
        return int(json.load(answer)["requests"])


# -- node 0, in its own process ------------------------------------------------------------------


def node0_main(spec: dict[str, Any]) -> int:
    """Node 0's daemon work, phase by phase as this bench's driver asks on stdin; one JSON line
    per phase on stdout."""
    import tiered.storage.merge as merge
    import tiered.storage.parts as parts
    from bench.peak import peak_mb

    nodes, url, options = spec["nodes"], spec["url"], spec["options"]
    local = LocalTier(Path(spec["local"]))
    tier, counter = open_node(url, options, 0, nodes)
    merges: list[dict[str, float]] = []
    real_merge = parts.merge_roots
    peak_file = Path(spec["local"]) / "merge-peak.txt"

    def run_measured(argv: list[str], **kwargs: Any) -> Any:
        # The merge child as it is, under bench.peak: its own peak RSS (VmHWM), not the
        # ru_maxrss Linux carries over from the parent that forked it.
        module = argv.index("-m") + 1
        argv = [*argv[:module], "bench.peak", str(peak_file), *argv[module:]]
        return subprocess.run(argv, **kwargs)

    def timed_merge(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        real_merge(*args, **kwargs)
        merges.append(
            {
                "seconds": time.perf_counter() - started,
                "peak_rss_mb": float(peak_file.read_text()),
            }
        )

    parts.merge_roots = timed_merge
    merge.subprocess = SimpleNamespace(  # type: ignore[assignment]
        run=run_measured, TimeoutExpired=subprocess.TimeoutExpired
    )

    def reply(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    for line in sys.stdin:
        command = line.strip()
        before = counter.n
        if command == "part":
            result = promote_step(local, tier, STEP, reason="periodic")
            reply(committed=result.committed, requests=counter.n - before)
        elif command == "commit":
            # As the daemon's loop does while a commit waits: one try a second.
            polls, last_call = 0, 0.0
            while True:
                time.sleep(COMMIT_POLL_SECONDS)
                polls += 1
                started = time.perf_counter()
                missing = commit_parts(local, tier, STEP, epoch=0)
                last_call = time.perf_counter() - started
                if not missing:
                    break
            committed_at = time.time()
            listing(tier)
            reply(
                committed_at=committed_at,
                commit_call_s=last_call,
                polls=polls,
                requests=counter.n - before,
                merge=merges[-1] if merges else None,
                by_name=counter.by_name,
            )
        elif command == "agree":
            started = time.time()
            decision = agree(local, tier, timeout=900)
            reply(
                started=started, done=time.time(), step=decision.step, requests=counter.n - before
            )
        elif command == "prune":
            started = time.perf_counter()
            apply_deletes([Delete("durable", STEP, "bench")], local, tier)
            reply(seconds=time.perf_counter() - started, requests=counter.n - before)
        elif command == "exit":
            reply(peak_rss_mb=peak_mb())
            return 0
    return 1


class Node0:
    """The driver's handle on node 0's process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "node0", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node 0's process ended (exit status {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> dict[str, Any]:
        self.send("exit")
        out = self.answer()
        self.proc.wait(60)
        return out


# -- the driver ----------------------------------------------------------------------------------


def run_nodes(
    nodes: int, url: str, work: Path, *, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One durable step through ``nodes`` simulated nodes: its promotion and commit, a restore
    agreement, and its pruning; every figure of one row of the table."""
    options = options or {}
    root = work / f"nodes-{nodes}"
    started = time.perf_counter()
    locals_ = [make_local_step(root, r, nodes) for r in range(nodes)]
    setup_s = time.perf_counter() - started
    others = [open_node(url, options, r, nodes) for r in range(1, nodes)]
    node0 = Node0({"nodes": nodes, "url": url, "options": options, "local": str(locals_[0].root)})
    try:
        # 1. Every node promotes its part; node 0 commits once all are in.
        at_emulator = url.startswith("gs://")
        http0 = emulator_requests() if at_emulator else None
        node0.send("part")  # first, so that its own try to commit finds parts missing
        part0 = node0.answer()
        assert not part0["committed"], part0
        node0.send("commit")
        marked: list[float] = []

        def promote(rank: int) -> None:
            tier, _ = others[rank - 1]
            promote_step(locals_[rank], tier, STEP, reason="periodic")
            marked.append(time.time())

        with ThreadPoolExecutor(max_workers=min(32, nodes)) as pool:
            list(pool.map(promote, range(1, nodes)))
        promoted = node0.answer()
        with ThreadPoolExecutor(max_workers=min(32, nodes)) as pool:
            list(pool.map(lambda t: listing(t[0]), others))
        step_requests = [c.n for _, c in others]
        http_step = _delta(http0, emulator_requests() if at_emulator else None)

        # 2. A restore agreement: every node posts its request, node 0 decides.
        for _, c in others:
            c.n = 0
        node0.send("agree")
        agreed: list[tuple[float, float]] = []

        def agree_one(rank: int) -> None:
            tier, _ = others[rank - 1]
            t0 = time.time()
            decision = agree(locals_[rank], tier, timeout=900)
            assert decision.step == STEP, decision
            agreed.append((t0, time.time()))

        threads = [threading.Thread(target=agree_one, args=(r,)) for r in range(1, nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        decided = node0.answer()
        agree_requests = [c.n for _, c in others]

        # 3. Node 0 prunes the step (the only writer that deletes on the durable tier).
        node0.send("prune")
        pruned = node0.answer()
    finally:
        final = node0.close()
    last_part = max(marked)
    merge = promoted["merge"] or {}
    return {
        "nodes": nodes,
        "setup_s": round(setup_s, 2),
        "last_part_to_commit_s": round(promoted["committed_at"] - last_part, 3),
        "commit_call_s": round(promoted["commit_call_s"], 3),
        "commit_polls": promoted["polls"],
        "merge_s": round(merge.get("seconds", float("nan")), 3),
        "merge_peak_rss_mb": round(merge.get("peak_rss_mb", float("nan")), 1),
        "node0_peak_rss_mb": round(final["peak_rss_mb"], 1),
        "requests_node0_per_step": part0["requests"] + promoted["requests"],
        "requests_per_other_node_per_step": _spread(step_requests),
        "http_requests_per_step": http_step,
        "agreement_s": round(
            max(d for _, d in agreed) - min(min(s for s, _ in agreed), decided["started"]), 3
        ),
        "requests_node0_agreement": decided["requests"],
        "requests_per_other_node_agreement": _spread(agree_requests),
        "prune_s": round(pruned["seconds"], 3),
        "requests_node0_prune": pruned["requests"],
    }


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def _spread(values: list[int]) -> dict[str, float]:
    return {
        "mean": round(sum(values) / len(values), 2),
        "min": min(values),
        "max": max(values),
    }


def scale(
    *,
    work: Path,
    node_counts: tuple[int, ...] = NODE_COUNTS,
    backends: tuple[str, ...] = ("file", "gs"),
) -> dict[str, Any]:
    """The table: one row per node count, each backend's figures in it."""
    from bench.common import drop_bucket, new_bucket

    rows = []
    for nodes in node_counts:
        row: dict[str, Any] = {"nodes": nodes}
        for backend in backends:
            print(f"   {nodes} nodes, {backend}", flush=True)
            base = work / f"scale-{backend}-{nodes}"
            if backend == "file":
                row[backend] = run_nodes(nodes, f"file://{base}/durable", base)
            else:
                bucket = new_bucket()
                try:
                    row[backend] = run_nodes(
                        nodes, f"gs://{bucket}/run", base, options={"token": "anon"}
                    )
                finally:
                    drop_bucket(bucket)
            shutil.rmtree(base, ignore_errors=True)
            print(f"     {json.dumps(row[backend])}", flush=True)
        rows.append(row)
    return {"params": {"step": STEP, "commit_poll_s": COMMIT_POLL_SECONDS}, "rows": rows}


if __name__ == "__main__":
    if sys.argv[1:2] == ["node0"]:
        sys.exit(node0_main(json.loads(sys.argv[2])))
    raise SystemExit("usage: python -m bench scale (this module's entry point is node 0's process)")
