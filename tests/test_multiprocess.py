"""Multi-process JAX jobs on this machine: N processes, N local directories, N daemons.

``jax.distributed`` runs on the CPU with a local coordinator; each process saves with orbax into
its own local directory (what per-node SSDs are), each node's daemon uploads that node's part,
and node 0 commits. Both clients are covered: ``tiered.CheckpointManager``
(``tests/mp_trainer.py``) and orbax's unmodified ``ReplicatorCheckpointManager``
(``tests/mtc_client.py``). The durable tier is the GCS emulator.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from tiered import DurableTier, LocalTier, config_from_mapping
from tiered.jaxenv import jax_env
from tiered.layout import COMMIT_MARKER, GLOBAL_LAYOUT, PARTS_DIR
from tiered.storage.keyindex import KEYS_NAME
from tiered.storage.replicas import PeerStore
from tiered.storage.stores import listed_crc32c
from tiered.storage.transfer import CRC32C_RESIDUE

from conftest import (
    ROOT,
    DaemonProc,
    config_dict,
    free_port,
    run_module,
    subprocess_env,
    wait_for,
)


class Cluster:
    """N nodes on one machine: one config file, per-node settings from the environment."""

    def __init__(
        self, tmp_path: Path, durable_url: str, nodes: int, *, peers: bool = False, **overrides: Any
    ) -> None:
        import yaml

        self.nodes = nodes
        self.tmp_path = tmp_path
        self.data = config_dict(tmp_path, durable_url, **overrides)
        if peers:  # every node's peer server on loopback, one secret for the job
            secret = tmp_path / "peer-secret"
            secret.write_text("0123456789abcdef0123456789abcdef\n")
            self.data["tiered"]["peer_addresses"] = [
                f"127.0.0.1:{free_port()}" for _ in range(nodes)
            ]
            self.data["tiered"]["peer_secret_file"] = str(secret)
        self.config_path = tmp_path / "config.yml"
        self.config_path.write_text(yaml.safe_dump(self.data))
        self.local = [tmp_path / f"node{r}" for r in range(nodes)]
        self.status = [f"127.0.0.1:{free_port()}" for _ in range(nodes)]
        self.daemons: list[DaemonProc | None] = [None] * nodes
        self.stderr: list[str] = []
        """The last run's standard error, one per process."""
        self.cfg = [config_from_mapping(self.data, env=self.env(r)) for r in range(nodes)]
        self.durable = DurableTier(
            durable_url, storage_options=self.data["tiered"].get("storage_options")
        )

    def env(self, rank: int) -> dict[str, str]:
        return {
            "TIERED_NODE_RANK": str(rank),
            "TIERED_NUM_NODES": str(self.nodes),
            "TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(self.local[rank]),
            "TIERED_STATUS_ADDRESS": self.status[rank],
        }

    def start_daemon(self, rank: int, *, ready: bool = True, **env: str) -> DaemonProc:
        self.local[rank].mkdir(parents=True, exist_ok=True)
        daemon = DaemonProc(self.config_path, self.cfg[rank], env={**self.env(rank), **env})
        self.daemons[rank] = daemon
        if ready:
            daemon.wait_ready()
        return daemon

    def start_daemons(self) -> None:
        for rank in range(self.nodes):
            self.start_daemon(rank)

    def stop_daemons(self) -> None:
        for d in self.daemons:
            if d is not None:
                d.terminate()

    def logs(self) -> str:
        return "\n".join(
            f"--- daemon {r} ---\n{d.log()[-3000:]}" for r, d in enumerate(self.daemons) if d
        )

    def run(
        self,
        argv_for: Any,
        *,
        timeout: float = 240,
        extra_env: dict[str, str] | None = None,
        env_for: Any = None,
    ) -> list[str]:
        """Run one process per node at once; return their stdouts (all must succeed)."""
        procs = [
            subprocess.Popen(
                [sys.executable, *argv_for(rank)],
                cwd=ROOT,
                env={
                    **subprocess_env(),
                    **self.env(rank),
                    **(extra_env or {}),
                    **(env_for(rank) if env_for else {}),
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(self.nodes)
        ]
        outs = []
        self.stderr = []
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise AssertionError(f"process {rank} timed out\n{self.logs()}") from None
            assert proc.returncode == 0, f"process {rank}:\n{out}\n{err[-4000:]}\n{self.logs()}"
            outs.append(out)
            self.stderr.append(err)
        return outs

    def native(self, steps: int, extra_env: dict[str, str] | None = None) -> list[str]:
        port = free_port()
        return self.run(
            lambda r: [
                str(ROOT / "tests" / "mp_trainer.py"),
                str(self.config_path),
                str(r),
                str(self.nodes),
                str(port),
                str(steps),
            ],
            extra_env=extra_env,
        )

    def native_held(self, steps: int, meanwhile: Any, *, client: str = "native") -> list[str]:
        """``native`` (or ``mtc``), with every process kept running after its last save while
        ``meanwhile()`` runs (say, a node dies then; it runs once all have saved their last
        step); then they are let go."""
        hold = self.tmp_path / f"hold-{uuid.uuid4().hex[:6]}"
        result: list[Any] = []

        def run() -> None:
            try:
                env = {"MP_HOLD_FILE": str(hold)}
                run_client = self.native if client == "native" else self.mtc
                result.append(run_client(steps, env))
            except BaseException as err:
                result.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_for(
                lambda: (
                    result or all(Path(f"{hold}.ready-{r}").exists() for r in range(self.nodes))
                ),
                timeout=240,
                what="every process done saving",
            )
            meanwhile()
        finally:
            hold.touch()
            thread.join(300)
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def train_until_durable(self, steps: int, durable: list[int]) -> None:
        """Daemons up, one run of ``tests/mp_trainer.py``, then the daemons stopped once the
        durable tier holds ``durable``."""
        self.start_daemons()
        try:
            self.native(steps)
            self.wait_committed(durable)
        finally:
            self.stop_daemons()

    def mtc(self, steps: int, extra_env: dict[str, str] | None = None) -> list[str]:
        """orbax's unmodified client on every node, in the environment `tiered jax-env` prints
        for that node (jax.distributed takes the process count from it)."""
        coordinator = self.data["tiered"].get("coordinator_address")
        return self.run(
            lambda r: [
                str(ROOT / "tests" / "mtc_client.py"),
                str(self.local[r]),
                str(steps),
                str(self.nodes),
            ],
            extra_env=extra_env,
            env_for=lambda r: jax_env(rank=r, nodes=self.nodes, coordinator=coordinator, job="j"),
        )

    def wait_committed(self, steps: list[int], timeout: float = 90) -> None:
        wait_for(
            lambda: self.durable_committed() == steps,
            timeout=timeout,
            what=f"durable steps {steps}\n{self.logs()}",
        )

    def durable_committed(self) -> list[int]:
        self.durable.fs.invalidate_cache()
        return self.durable.committed_steps()


def plain_restore(url: str, step: int, *, nprocs: int, devices: int) -> list[str]:
    """``tests/plain_restore.py`` as a job of ``nprocs`` processes; each one's PLAIN line."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "plain_restore.py"),
                url,
                str(step),
                str(nprocs),
                str(rank),
                port,
                str(devices),
            ],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(nprocs)
    ]
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err[-3000:]
        lines += [ln for ln in out.splitlines() if ln.startswith("PLAIN")]
    return lines


def restored_lines(outs: list[str]) -> list[dict[str, str]]:
    found = []
    for out in outs:
        line = next((ln for ln in out.splitlines() if ln.startswith("RESTORED")), None)
        assert line is not None, out
        found.append(dict(re.findall(r"(\w+)=(\[.*\]|\S+)", line)))
    return found


def node_files(step_dir: Path) -> set[str]:
    return {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("nodes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_native_api_across_processes(gs_url: str, tmp_path: Path, nodes: int) -> None:
    cluster = Cluster(tmp_path, gs_url, nodes, tiered={"local_max_to_keep": 2})
    cluster.start_daemons()
    try:
        outs = cluster.native(steps=51)
        assert all("FRESH" in out for out in outs)
        cluster.wait_committed([50])
        manifest = cluster.durable.verify_step(50)
        assert manifest.nodes == nodes and manifest.layout == GLOBAL_LAYOUT and manifest.merged
        # One orbax checkpoint: every process's shards where a global save puts them, one
        # merged OCDBT root, and each node's own copy of the shared files beside them.
        for rank in range(nodes):
            part = cluster.durable.read_part(50, rank)
            assert any(f"ocdbt.process_{rank}/" in p for p in part.files)
            assert not any(
                f"ocdbt.process_{o}/" in p for p in part.files for o in range(nodes) if o != rank
            )
            assert all(
                p in manifest.files or f"{PARTS_DIR}/node-{rank}/{p}" in manifest.files
                for p in part.files
            )
        assert "default/manifest.ocdbt" in manifest.files
        # Each key uploaded once: every node's part holds only the keys node 0's plan gave it,
        # and every key of every node's index is given to exactly one of its holders.
        indexes = {
            r: json.loads(cluster.durable.store.read_text(f"50/{PARTS_DIR}/index-{r}.json"))
            for r in range(nodes)
        }
        plans = {
            r: json.loads(cluster.durable.store.read_text(f"50/{PARTS_DIR}/plan-{r}.json"))
            for r in range(nodes)
        }
        owners: dict[str, list[int]] = {}
        for r, plan in plans.items():
            assert cluster.durable.read_part(50, r).deduped
            for key in plan["roots"]["default"]:
                assert key in indexes[r]["roots"]["default"], (r, key)
                owners.setdefault(key, []).append(r)
        held = {k for index in indexes.values() for k in index["roots"]["default"]}
        assert sorted(owners) == sorted(held)
        assert all(len(o) == 1 for o in owners.values()), owners
        shared = [k for k in held if all(k in i["roots"]["default"] for i in indexes.values())]
        assert any(k.startswith("b/") for k in shared), shared  # the replicated vector
        assert "default/_METADATA" in manifest.files and "_CHECKPOINT_METADATA" in manifest.files
        # Plain orbax reads it, with no tiered code: in one process of 8 devices, and in a
        # job of two processes.
        rows = ",".join(f"{i * 8}:{(i + 1) * 8}" for i in range(8))
        single = plain_restore(gs_url, 50, nprocs=1, devices=8)
        assert single == [f"PLAIN step=50 rows={rows} ok=True"]
        pair = plain_restore(gs_url, 50, nprocs=2, devices=1)
        assert len(pair) == 2 and all(line.endswith("ok=True") for line in pair)
        # `tiered export` on node 0 writes the whole step (not node 0's part) to a directory
        out = run_module(
            "tiered.cli",
            "export",
            "50",
            str(tmp_path / "exported" / "50"),
            "--config",
            str(cluster.config_path),
            env=cluster.env(0),
        )
        assert out.returncode == 0, out.stderr
        assert not (tmp_path / "exported" / "50" / PARTS_DIR).exists()
        exported = plain_restore(str(tmp_path / "exported"), 50, nprocs=1, devices=2)
        assert exported == ["PLAIN step=50 rows=0:32,32:64 ok=True"]
        # Local retention on every node keeps the newest two steps once 50 is durable.
        for rank in range(nodes):
            wait_for(
                lambda rank=rank: LocalTier(cluster.local[rank]).committed_steps() == [40, 50],
                timeout=30,
                what=f"node {rank} local retention\n{cluster.logs()}",
            )

    finally:
        cluster.stop_daemons()


def step_data_served(emulator: Any, url: str) -> dict[str, int]:
    """The step data (not manifests, markers or the agreement's files) the emulator served from
    this test's bucket so far."""
    if emulator is None:  # an emulator this run did not start: nothing to count
        return {}
    bucket = url.removeprefix("gs://").split("/", 1)[0]
    return {
        name: n
        for name, n in emulator.served(bucket).items()
        if not name.startswith(".tiered/") and not name.endswith((".json", COMMIT_MARKER)) and n > 0
    }


_NODE_OF = re.compile(r"/(?:tiered-parts/node-([0-9]+)|[^/]+/ocdbt\.process_([0-9]+))/")


def promoting(cluster: Cluster, step: int) -> list[int]:
    """How often each node's daemon has started promoting ``step`` so far (its log)."""
    return [
        cluster.daemons[r].log().count(f"Promoting step {step} (")  # type: ignore[union-attr]
        for r in range(cluster.nodes)
    ]


def read_for_restore(
    emulator: Any,
    url: str,
    cluster: Cluster,
    *,
    step: int,
    before: dict[str, int],
    promoting_before: list[int],
) -> dict[str, int]:
    """The step data the durable tier served since ``before`` that no promotion explains.

    Every OCDBT file has the same crc32c (the CRC-32C residue), so the crc32c GCS lists cannot
    tell it from another same-size one: a daemon promoting its part of a step reads each OCDBT
    object of that part back to check its xxh3 (before it skips one already there, and after
    it uploads it). Those reads are the promotion's verification, by a daemon that logged
    "Promoting step <step>". Anything else read (a restore's download, data
    files, another node's part) is returned."""
    now_promoting = promoting(cluster, step)
    # A promotion that started before ``before`` may read its objects back after it: the
    # dedup waits for node 0's plan between the start and the upload.
    nodes = {r for r in range(cluster.nodes) if now_promoting[r] > 0}
    bucket = url.removeprefix("gs://").split("/", 1)[0]
    fs = cluster.durable.fs
    fs.invalidate_cache()
    out = {}
    for name, n in step_data_served(emulator, url).items():
        if n == before.get(name, 0):
            continue
        node = _NODE_OF.search(name)
        owner = next((int(g) for g in node.groups() if g), None) if node else None
        listed = listed_crc32c(fs.info(f"{bucket}/{name}"))  # metadata: not served data
        if f"/{step}/" in name and listed == CRC32C_RESIDUE and owner in nodes:
            continue
        out[name] = n - before.get(name, 0)
    return out


def replicas_of(cluster: Cluster, holder: int, owner: int) -> list[int]:
    return [r.step for r in PeerStore(cluster.local[holder]).replicas(owner)]


@pytest.mark.parametrize("nodes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_replaced_node_restores_the_newest_local_step_from_its_peer(
    gs_url: str, gcs_emulator: Any, tmp_path: Path, nodes: int
) -> None:
    """Losing a node costs one local period, not one durable period: its partner (the next node
    in the ring) kept a verified copy of its newest step, so the job resumes from step 70, not
    from the durable step 50, and the durable tier serves no step data. Losing a node and its
    partner falls back to the durable step, and says why: each node with nothing local
    downloads its own part of it, and nothing else."""
    cluster = Cluster(tmp_path, gs_url, nodes, peers=True, tiered={"local_max_to_keep": 2})
    cluster.start_daemons()
    keeper = (1 + 1) % nodes  # node 1's partner in the ring

    def node_1_dies() -> None:
        """While the job runs: step 50 durable, every node's step 70 at its partner; then the
        host of node 1 dies (its daemon with it), before it could promote anything more."""
        wait_for(
            lambda: 50 in cluster.durable_committed(),
            timeout=120,
            what=f"durable step 50\n{cluster.logs()}",
        )
        for rank in range(nodes):
            wait_for(
                lambda rank=rank: replicas_of(cluster, (rank + 1) % nodes, rank)[:1] == [70],
                timeout=60,
                what=f"node {rank}'s step 70 at its peer\n{cluster.logs()}",
            )
        status = json.loads(cluster.daemons[0].get("/status")[1])  # type: ignore[union-attr]
        peers = status["daemon"]["peers"]
        assert peers["sends_to"] == {"1": {"step": 70, "error": None}}
        assert (nodes - 1, 70) in [(h["node"], h["step"]) for h in peers["holds"]]
        shown = run_module(
            "tiered.cli", "status", "--config", str(cluster.config_path), env=cluster.env(0)
        )
        assert "peers    node 1 has step 70" in shown.stdout, shown.stdout + shown.stderr
        assert f"keeping node {nodes - 1} step 70" in shown.stdout
        cluster.daemons[1].kill()  # type: ignore[union-attr]

    try:
        outs = cluster.native_held(71, node_1_dies)
        assert all("FRESH" in out for out in outs)
        assert 70 not in cluster.durable_committed()

        # Node 1's machine is replaced: its local directory is empty.
        shutil.rmtree(cluster.local[1])
        cluster.start_daemon(1)
        before = step_data_served(gcs_emulator, gs_url)
        promoting_before = promoting(cluster, 70)

        def node_1_and_its_keeper_die() -> None:
            for rank in sorted({1, keeper}):
                cluster.daemons[rank].kill()  # type: ignore[union-attr]

        outs = cluster.native_held(75, node_1_and_its_keeper_die)
        restored = restored_lines(outs)
        assert [r["step"] for r in restored] == ["70"] * nodes, cluster.stderr
        assert all(r["ok"] == "True" for r in restored), restored
        assert [r["source"] for r in restored] == [
            "peer" if rank == 1 else "local" for rank in range(nodes)
        ]
        assert not read_for_restore(
            gcs_emulator, gs_url, cluster, step=70, before=before, promoting_before=promoting_before
        ), "the durable tier served data"
        # the agreement records where node 1's part came from
        decision = json.loads(cluster.durable.store.read_text(".tiered/restore/decision.json"))
        assert decision["step"] == 70 and decision["from_peers"] == {"1": keeper}

        # Node 1 and the node that keeps its copy were both lost: back to the durable step.
        for rank in sorted({1, keeper}):
            shutil.rmtree(cluster.local[rank])
            cluster.start_daemon(rank)
        outs = cluster.native(steps=55)
        restored = restored_lines(outs)
        assert [r["step"] for r in restored] == ["50"] * nodes, cluster.stderr
        assert all(r["ok"] == "True" for r in restored), restored
        assert restored[1]["source"] == "durable"
        why = f"its peers [{keeper}] hold none of its steps newer than step 50"
        assert why in cluster.stderr[1]
        # A node with nothing of the step fetches its own part from the durable tier, only.
        fetched = node_files(cluster.local[1] / "50")
        assert any("ocdbt.process_1/" in f for f in fetched)
        assert not any("ocdbt.process_0/" in f for f in fetched)
        assert COMMIT_MARKER in fetched
        # Its part on the durable tier holds only the keys it owned: the rest of its database
        # was rebuilt from the merged root, each value checked against its index.
        part = cluster.durable.read_part(50, 1)
        assert part.deduped
        kept = LocalTier(cluster.local[1]).cached_manifest(50)
        assert kept is not None and not kept.deduped
        assert kept.copy_identity == part.local_identity  # a copy of the step node 1 saved
        assert set(kept.files) != set(part.files)  # its database rebuilt, not downloaded
    finally:
        cluster.stop_daemons()


@pytest.mark.parametrize(
    ("saved", "resumed", "same_disks"),
    [(2, 1, True), pytest.param(4, 2, False, marks=pytest.mark.slow)],
)
def test_a_job_of_another_size_restores_the_step_resharded(
    gs_url: str, tmp_path: Path, saved: int, resumed: int, same_disks: bool
) -> None:
    """A job restarted on fewer nodes (capacity lost) restores the newest durable step through
    tiered, each process its own rows of it, instead of being refused. Where a machine kept its
    disk, its local steps of the old shape (one process's shards of the old mesh: node 0's step
    50 holds half of the rows) are not used."""
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    Cluster(tmp_path / "before", gs_url, saved).train_until_durable(51, [50])
    after = Cluster(tmp_path / ("before" if same_disks else "after"), gs_url, resumed)
    assert (after.local[0] / "50").is_dir() == same_disks
    restored = restored_lines(after.native(steps=52))
    assert [r["step"] for r in restored] == ["50"] * resumed
    assert [r["source"] for r in restored] == ["durable"] * resumed
    assert all(r["ok"] == "True" for r in restored), restored
    rows = 64 // resumed
    assert [r["rows"] for r in restored] == [f"{i * rows}:{(i + 1) * rows}" for i in range(resumed)]
    if resumed == 1:
        # One process holds the whole state: it downloads the step whole, which fits this
        # shape, so the next restart restores it from the local tier, with no download.
        again = restored_lines(after.native(steps=53))
        assert [(r["step"], r["source"], r["ok"]) for r in again] == [("50", "local", "True")]
        return
    # Each process read only the keys of its own shards from the merged step, each checked
    # against the step's key index, not the whole step: each of the 2 reads the 2 of the 4 row
    # chunks its rows cover (and the replicated vector's).
    read = [read_in_part(err, 50) for err in after.stderr]
    assert all(r is not None and r[0] < r[1] for r in read), (read, after.stderr)
    if not same_disks:  # nothing of the step was downloaded as a local step
        assert not any((after.local[r] / "50").exists() for r in range(resumed))
    # Nothing of it is kept as a local step (it is a part of the old step on the new mesh, which
    # no restore of this job may take for a whole one): the next restart reads its chunks again.
    again = restored_lines(after.native(steps=53))
    assert [(r["step"], r["source"], r["ok"]) for r in again] == [
        ("50", "durable", "True")
    ] * resumed
    assert all(read_in_part(err, 50) for err in after.stderr), after.stderr


def read_in_part(stderr: str, step: int) -> tuple[int, int] | None:
    """(keys read, keys in the step) from a trainer's log line of a restore in part."""
    found = re.search(rf"Read the (\d+) of (\d+) keys of step {step} this process needs", stderr)
    return (int(found[1]), int(found[2])) if found else None


def test_the_same_nodes_on_another_mesh_read_what_they_need(gs_url: str, tmp_path: Path) -> None:
    """Two nodes keep their disks and restart with w split by columns instead of rows: each
    node's part holds the wrong shards for the new mesh, so each reads what its new shards need
    from the merged durable step instead (bit-exact), and then goes on from it."""
    cluster = Cluster(tmp_path, gs_url, 2)
    cluster.train_until_durable(51, [50])
    columns = {"MP_SHARD": "columns"}
    restored = restored_lines(cluster.native(52, extra_env=columns))
    assert [(r["step"], r["ok"], r["rows"]) for r in restored] == [  # "rows": columns here
        ("50", "True", "0:4"),
        ("50", "True", "4:8"),
    ]
    # each read what its columns need from the merged step (every row chunk holds some)
    assert all(read_in_part(err, 50) for err in cluster.stderr), cluster.stderr
    # Each node keeps its own part of the old mesh (the rows mesh still restores it locally);
    # the next restart on the columns mesh reads its chunks from the durable step again.
    again = restored_lines(cluster.native(53, extra_env=columns))
    assert [(r["step"], r["source"], r["ok"]) for r in again] == [("50", "durable", "True")] * 2
    assert all((cluster.local[r] / "50" / COMMIT_MARKER).exists() for r in range(2))
    # A key index that is not the one the manifest names (a store that lies, a bad write): the
    # restore in part refuses it and the step is downloaded whole, verified, instead.
    index = cluster.durable.object_path(50, KEYS_NAME)
    with cluster.durable.fs.open(index, "rb") as f:
        doc = json.loads(f.read())
    doc["step"] = 49
    cluster.durable.store.write_small(index, json.dumps(doc).encode())
    whole = restored_lines(cluster.native(54, extra_env=columns))
    assert [(r["step"], r["source"], r["ok"]) for r in whole] == [("50", "durable", "True")] * 2
    assert all("reading the whole step" in err for err in cluster.stderr), cluster.stderr


@pytest.mark.parametrize("nodes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_replicator_checkpoint_manager_across_processes(
    gs_url: str, tmp_path: Path, nodes: int
) -> None:
    coordinator = f"127.0.0.1:{free_port()}"
    cluster = Cluster(
        tmp_path,
        gs_url,
        nodes,
        enable_multi_tier_checkpointing=True,
        checkpoint_period=1000,
        tiered={"write_jax_init_info": True, "coordinator_address": coordinator},
    )
    cluster.start_daemons()
    try:
        outs = cluster.mtc(steps=55)
        assert all("FRESH" in out for out in outs)
        # replicator.yaml's backup interval (50) drives promotion, on every node.
        cluster.wait_committed([50])
        manifest = cluster.durable.verify_step(50)
        assert manifest.nodes == nodes and manifest.merged  # one orbax checkpoint here too

        # Every node restarts with its SSD intact except node 1's. Node 1 holds nothing, so the
        # nodes agree on the newest durable step, 50: node 1 downloads its part, the others
        # offer their local copy.
        cluster.daemons[1].terminate()
        shutil.rmtree(cluster.local[1])
        cluster.start_daemon(1)
        outs = cluster.mtc(steps=60)
        restored = restored_lines(outs)
        assert [r["step"] for r in restored] == ["50"] * nodes
        for rank, out in enumerate(outs):
            shard = next(ln for ln in out.splitlines() if ln.startswith("SHARD"))
            lo = int(shard.split()[1])
            width = 64 // nodes
            want = [i * 0.5 + 50 for i in range(lo, lo + width)]
            assert json.loads(restored[rank]["w"]) == want, f"node {rank}"
        assert "Fetched step 50" in cluster.daemons[1].log()
        for rank in (0, *range(2, nodes)):
            assert "Fetched" not in cluster.daemons[rank].log()
    finally:
        cluster.stop_daemons()


@pytest.mark.slow  # the same machinery as the native test above, through the daemon's agreement
def test_orbax_multi_tier_client_gets_a_lost_node_back_from_its_peer(
    gs_url: str, gcs_emulator: Any, tmp_path: Path
) -> None:
    """MaxText's path, unmodified orbax client: the daemons replicate, and a replaced node's
    daemon gets its step 70 back from its peer before the agreement, so orbax restores 70
    everywhere (the newest durable step is 50) and node 1 downloads nothing from the store."""
    coordinator = f"127.0.0.1:{free_port()}"
    cluster = Cluster(
        tmp_path,
        gs_url,
        2,
        peers=True,
        enable_multi_tier_checkpointing=True,
        checkpoint_period=1000,
        tiered={"write_jax_init_info": True, "coordinator_address": coordinator},
    )
    cluster.start_daemons()

    def node_1_dies() -> None:
        wait_for(lambda: 50 in cluster.durable_committed(), timeout=120, what=cluster.logs())
        for rank in range(2):
            wait_for(
                lambda rank=rank: replicas_of(cluster, 1 - rank, rank)[:1] == [70],
                timeout=60,
                what=f"node {rank}'s step 70 at its peer\n{cluster.logs()}",
            )
        cluster.daemons[1].kill()  # type: ignore[union-attr]

    try:
        outs = cluster.native_held(75, node_1_dies, client="mtc")
        assert all("FRESH" in out for out in outs)
        shutil.rmtree(cluster.local[1])
        cluster.start_daemon(1)
        before = step_data_served(gcs_emulator, gs_url)
        promoting_before = promoting(cluster, 70)
        outs = cluster.mtc(steps=80)
        restored = restored_lines(outs)
        assert [r["step"] for r in restored] == ["70", "70"], cluster.logs()
        for rank, out in enumerate(outs):
            lo = int(next(ln for ln in out.splitlines() if ln.startswith("SHARD")).split()[1])
            want = [i * 0.5 + 70 for i in range(lo, lo + 32)]
            assert json.loads(restored[rank]["w"]) == want, f"node {rank}"
        assert not read_for_restore(
            gcs_emulator, gs_url, cluster, step=70, before=before, promoting_before=promoting_before
        ), "the durable tier served data"
        log1 = cluster.daemons[1].log()  # type: ignore[union-attr]
        assert "Recovered this node's step 70 from peer node 0" in log1
        assert "Fetched" not in log1
    finally:
        cluster.stop_daemons()


def test_a_node_lost_mid_promotion_never_commits_part_of_a_step(
    gs_url: str, tmp_path: Path
) -> None:
    # Node 0 waits this long for node 1's index of a step (the dedup) before it plans without
    # it and uploads all it holds itself.
    cluster = Cluster(tmp_path, gs_url, 2, tiered={"local_max_to_keep": 2, "dedup_wait_seconds": 5})
    # Training first (saves 0..100 every 10 steps on both nodes), then the daemons.
    assert all("FRESH" in out for out in cluster.native(steps=101))
    node0 = cluster.start_daemon(0)
    # Node 1's daemon dies after uploading two files of its part of step 50.
    node1 = cluster.start_daemon(1, ready=False, TIERED_FAULT="upload-file:2")
    try:
        assert node1.proc.wait(60) == 137

        def waiting() -> dict[str, Any]:
            status = json.loads(node0.get("/status")[1])
            return status["daemon"]["node"]["committing"]

        wait_for(
            lambda: waiting() == {"50": {"missing": [1]}, "100": {"missing": [1]}},
            timeout=60,
            what=f"node 0 waiting on node 1\n{cluster.logs()}",
        )
        scan = {f.step: f.committed for f in cluster.durable.scan()}
        assert scan == {50: False, 100: False}, "nothing is committed without node 1's part"
        assert cluster.durable.part_ranks(50) == [0]

        # Node 1 comes back, but its copy of step 50 is gone with it: 50 can never complete.
        shutil.rmtree(cluster.local[1] / "50")
        node1 = cluster.start_daemon(1)
        cluster.wait_committed([100])
        cluster.durable.verify_step(100)
        # Node 0 gives up on 50, prunes it locally, and removes its partial upload.
        wait_for(
            lambda: {f.step for f in cluster.durable.scan()} == {100},
            timeout=60,
            what=f"the partial step 50 removed\n{cluster.logs()}",
        )
        assert "Giving up on step 50" in node0.log()
        assert LocalTier(cluster.local[0]).committed_steps() == [90, 100]
    finally:
        cluster.stop_daemons()


def test_example_trainer_runs_as_two_processes(tmp_path: Path) -> None:
    """The JobSet's trainer command (`examples/train.py --distributed`) on two processes."""
    cluster = Cluster(tmp_path, f"file://{tmp_path}/durable", 2, checkpoint_period=100)
    coordinator = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"}
    example = [str(ROOT / "examples" / "train.py"), "--config", str(cluster.config_path)]

    def run(steps: int) -> list[str]:
        return cluster.run(
            lambda r: [*example, "--steps", str(steps), "--distributed"], extra_env=coordinator
        )

    outs = run(50)
    assert all("FRESH start" in out and "DONE step=49" in out for out in outs)
    for rank in range(2):
        assert LocalTier(cluster.local[rank]).committed_steps() == [0, 10, 20, 30, 40, 49]
    outs = run(60)
    assert all("RESUMED step=49 from=local" in out for out in outs), outs
