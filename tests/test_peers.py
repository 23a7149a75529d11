"""Peer replication: the real peer server and client on loopback, real peer stores on disk.

Each node is a directory and a ``PeerServer`` as the daemon runs it. The steps are plain step
directories (the transport does not care what orbax wrote); the multi-process tests in
``test_multiprocess.py`` run the whole thing with real JAX processes and daemons. The fault rows
are in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.peer_server import PeerContext, PeerServer
from tiered import ConfigError, LocalTier, PeerRefused, StorageError, config_from_mapping
from tiered.layout import COMMIT_MARKER, PEER_NONCES, REPLICA_INFO
from tiered.peerauth import NonceRecord, job_identity
from tiered.peering import (
    AUTH_HEADER,
    SIG_HEADER,
    PeerAuth,
    PeerClient,
    header_for,
    load_secret,
    partners,
    recover_own,
)
from tiered.policy import agree_step
from tiered.storage.replicas import Header, PeerStore, encode

from conftest import DaemonProc, config_dict, free_port, wait_for

SECRET = b"s3cret-shared-by-the-whole-job-0123456789"
JOB = "the-test-job"


def auth_of(rank: int, secret: bytes = SECRET, *, job: str = JOB) -> PeerAuth:
    """A node's signing half (what its clients use)."""
    return PeerAuth(secret, rank, job=job)


def write_step(
    root: Path,
    step: int,
    *,
    epoch: int | None = 1,
    size: int = 300_000,
    owner: int = 1,
    nodes: int = 3,
) -> Path:
    """A committed local step of node ``owner``: a few files of known bytes, orbax's metadata."""
    d = root / str(step)
    data = d / "state" / f"ocdbt.process_{owner}" / "d"
    data.mkdir(parents=True)
    seed = hashlib.sha256(f"{step}".encode()).digest()
    (data / "blob").write_bytes(seed * (size // 32))
    (d / "state" / "_METADATA").write_text(json.dumps({"step": step}))
    meta: dict[str, Any] = {"tiered": {"reason": "periodic", "nodes": nodes}}
    if epoch is not None:
        meta["tiered"]["epoch"] = epoch
    (d / "_CHECKPOINT_METADATA").write_text(json.dumps({"custom_metadata": meta}))
    (d / COMMIT_MARKER).write_text("ok\n")
    return d


def stream_of(local: LocalTier, header: Header) -> bytes:
    """The whole replica stream of a local step, as the sender would send it."""
    return b"".join(encode(header, lambda rel: (local.step_dir(header.step) / rel).open("rb")))


def files_of(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != REPLICA_INFO
    }


class Node:
    """One node: a local directory, its peer store, its peer server."""

    def __init__(
        self, tmp: Path, rank: int, nodes: int, *, secret: bytes = SECRET, free: int | None = None
    ) -> None:
        self.rank = rank
        self.local = LocalTier(tmp / f"node{rank}")
        self.local.ensure()
        self.store = PeerStore(self.local.root)
        self.job = job_identity(f"file://{tmp / 'durable'}")  # config_for's durable tier
        ctx = PeerContext(
            store=self.store,
            auth=PeerAuth(
                secret,
                rank,
                job=self.job,
                record=NonceRecord(self.local.tiered_dir / PEER_NONCES),
            ),
            rank=lambda: rank,
            nodes=lambda: nodes,
            keep=2,
            free_bytes=(lambda: free) if free is not None else lambda: 10**12,
            slots=threading.Semaphore(2),
        )
        self.server = PeerServer("127.0.0.1:0", ctx, timeout=2.0)
        self.server.start()
        self.address = self.server.address

    def client_to(self, other: Node, *, secret: bytes = SECRET) -> PeerClient:
        return PeerClient(
            other.rank, other.address, auth_of(self.rank, secret, job=self.job), timeout=5
        )

    def send(self, step: int, to: Node, *, secret: bytes = SECRET) -> None:
        manifest = self.local.manifest(step)
        header = header_for(self.local, step, self.rank, manifest)
        self.client_to(to, secret=secret).send(self.local.step_dir(step), header)


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    made: list[Node] = []

    def make(nodes: int = 3, **kw: Any) -> list[Node]:
        ns = [Node(tmp_path, r, nodes, **kw) for r in range(nodes)]
        made.extend(ns)
        return ns

    yield make
    for n in made:
        n.server.stop()


def config_for(tmp_path: Path, nodes: list[Node], rank: int, **tiered: Any) -> Any:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_bytes(SECRET + b"\n")
    return config_from_mapping(
        {
            "checkpoint_dir": str(tmp_path / "durable"),
            "local_checkpoint_directory": str(nodes[rank].local.root),
            "tiered": {
                "num_nodes": len(nodes),
                "node_rank": rank,
                "peer_addresses": [n.address for n in nodes],
                "peer_secret_file": str(secret),
                **tiered,
            },
        },
        env={},
    )


def no_partials(node: Node) -> None:
    leftovers = [p for p in node.store.root.rglob("*") if ".tiered-tmp-" in p.name]
    assert leftovers == [], leftovers


def test_a_step_replicated_and_wiped_comes_back_byte_for_byte(cluster: Any, tmp_path: Path) -> None:
    n0, n1, n2 = cluster(3)
    original = files_of(write_step(n1.local.root, 70))
    n1.send(70, n2)
    held = n2.store.replicas(1)
    assert [(r.owner, r.step, r.epoch) for r in held] == [(1, 70, 1)]
    assert files_of(n2.store.replica_dir(1, 70)) == original
    assert n2.local.committed_steps() == [], "a replica is never a step of the node keeping it"
    # node 1 loses its disk
    for p in sorted(n1.local.root.iterdir()):
        os.system(f"rm -rf '{p}'")
    got = recover_own(config_for(tmp_path, [n0, n1, n2], 1), n1.local, rank=1, nodes=3)
    assert [(g.step, g.peer) for g in got] == [(70, 2)]
    assert files_of(n1.local.step_dir(70)) == original
    # the manifest it came with is kept, so later bit flips are caught against it
    assert n1.local.cached_manifest(70) == n2.store.info(1, 70)[0].manifest  # type: ignore[index]
    assert [s.epoch for s in n1.local.scan()] == [1]


def test_a_sender_without_the_secret_is_refused_and_nothing_is_kept(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _n0, n1, n2 = cluster(3)
    write_step(n1.local.root, 70)
    with caplog.at_level(logging.WARNING), pytest.raises(PeerRefused, match="HTTP 401"):
        n1.send(70, n2, secret=b"another-secret-of-at-least-16b")
    assert n2.store.replicas() == []
    assert "another secret" in caplog.text
    no_partials(n2)
    # nor can it list, or read back, what the node keeps
    n1.send(70, n2)
    with pytest.raises(PeerRefused):
        n1.client_to(n2, secret=b"another-secret-of-at-least-16b").held()


def test_a_node_reads_and_writes_its_own_replicas_only(cluster: Any) -> None:
    _n0, n1, n2 = cluster(3)
    write_step(n1.local.root, 70)
    n1.send(70, n2)
    # node 0, with the job's secret, asks node 2 for node 1's step by forging the path
    auth = auth_of(0, job=n2.job)
    for method, path in (("GET", "/v1/replicas/1"), ("GET", "/v1/replicas/1/70")):
        conn = http.client.HTTPConnection(*n2.address.split(":"), timeout=5)
        conn.request(method, path, headers={AUTH_HEADER: auth.request_header(method, path, to=2)})
        assert conn.getresponse().status == 401
    # nothing but the replica API exists: no other path, no traversal
    for path in ("/", "/v1/replicas/1/../../0", "/v1/replicas/1/70/state", "/status"):
        conn = http.client.HTTPConnection(*n2.address.split(":"), timeout=5)
        conn.request("GET", path, headers={AUTH_HEADER: auth.request_header("GET", path, to=2)})
        assert conn.getresponse().status == 404, path


def test_a_replayed_request_is_refused(cluster: Any) -> None:
    _n0, _n1, n2 = cluster(3)
    path = "/v1/replicas/1"
    header = auth_of(1, job=n2.job).request_header("GET", path, to=2)
    statuses = []
    for _ in range(2):
        conn = http.client.HTTPConnection(*n2.address.split(":"), timeout=5)
        conn.request("GET", path, headers={AUTH_HEADER: header})
        statuses.append(conn.getresponse().status)
    assert statuses == [200, 401]


def test_bytes_that_differ_from_the_manifest_are_refused(cluster: Any) -> None:
    _n0, n1, n2 = cluster(3)
    step_dir = write_step(n1.local.root, 70)
    manifest = n1.local.manifest(70)
    header = header_for(n1.local, 70, 1, manifest)
    blob = step_dir / "state" / "ocdbt.process_1" / "d" / "blob"
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0x01  # a bit flips on the sender after its manifest was made
    blob.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"HTTP 400.*differ"):
        n1.client_to(n2).send(step_dir, header)
    assert n2.store.replicas() == []
    no_partials(n2)


def test_a_sender_killed_mid_transfer_leaves_nothing(cluster: Any) -> None:
    _n0, n1, n2 = cluster(3)
    write_step(n1.local.root, 70)
    manifest = n1.local.manifest(70)
    header = header_for(n1.local, 70, 1, manifest)
    raw = header.to_bytes()
    auth = auth_of(1, job=n2.job)
    path = "/v1/replicas/1/70"
    host, port = n2.address.split(":")
    sock = socket.create_connection((host, int(port)))
    signed = auth.request_header("PUT", path, to=2)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: x\r\n{AUTH_HEADER}: {signed}\r\n"
        f"{SIG_HEADER}: {auth.sign_header(raw)}\r\n"
        f"Content-Length: {header.stream_length(raw)}\r\n\r\n"
    ).encode()
    body = stream_of(n1.local, header)
    sock.sendall(head + body[: len(body) - 100_000])  # the real bytes, then it dies
    time.sleep(0.3)
    assert any(".tiered-tmp-" in p.name for p in n2.store.root.rglob("*")), "it was receiving"
    sock.close()  # the sender dies
    deadline = time.monotonic() + 10
    while any(".tiered-tmp-" in p.name for p in n2.store.root.rglob("*")):
        assert time.monotonic() < deadline, "the partial replica was never removed"
        time.sleep(0.1)
    assert n2.store.replicas() == []


def test_a_sender_that_goes_quiet_is_dropped_after_the_timeout(cluster: Any) -> None:
    _n0, n1, n2 = cluster(3)
    write_step(n1.local.root, 70)
    header = header_for(n1.local, 70, 1, n1.local.manifest(70))
    raw = header.to_bytes()
    auth = auth_of(1, job=n2.job)
    path = "/v1/replicas/1/70"
    host, port = n2.address.split(":")
    sock = socket.create_connection((host, int(port)))
    signed = auth.request_header("PUT", path, to=2)
    sock.sendall(
        (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\n{AUTH_HEADER}: {signed}"
            f"\r\n{SIG_HEADER}: {auth.sign_header(raw)}\r\n"
            f"Content-Length: {header.stream_length(raw)}\r\n\r\n"
        ).encode()
        + stream_of(n1.local, header)[:-1000]
    )
    # the server's timeout is 2 s: it answers and closes, and keeps nothing
    sock.settimeout(10)
    answer = b""
    while chunk := sock.recv(1000):  # the server answers, then closes
        answer += chunk
    assert answer.startswith(b"HTTP/1.0 500") and b"timed out" in answer, answer
    sock.close()
    assert n2.store.replicas() == []
    no_partials(n2)


def test_a_peer_that_lies_on_the_way_back_is_caught_and_the_next_one_used(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n0, n1, n2 = cluster(3)
    original = files_of(write_step(n1.local.root, 70))
    n1.send(70, n0)
    n1.send(70, n2)
    # node 0's copy rots on its disk (or node 0 lies): one flipped byte
    blob = n0.store.replica_dir(1, 70) / "state" / "ocdbt.process_1" / "d" / "blob"
    data = bytearray(blob.read_bytes())
    data[5] ^= 0xFF
    blob.write_bytes(bytes(data))
    os.system(f"rm -rf '{n1.local.step_dir(70)}' '{n1.local.tiered_dir}'")
    cfg = config_for(tmp_path, [n0, n1, n2], 1, peers=[0, 2])
    with caplog.at_level(logging.WARNING):
        got = recover_own(cfg, n1.local, rank=1, nodes=3, explicit=None)
    assert [(g.step, g.peer) for g in got] == [(70, 2)]
    assert "differ" in caplog.text and "node 0" in caplog.text
    assert files_of(n1.local.step_dir(70)) == original
    assert not any(p.name.startswith("peer-") for p in n1.local.staging_dir.iterdir())


def test_a_truncating_or_unsigned_peer_gives_nothing_back(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n0, n1, n2 = cluster(3)
    write_step(n1.local.root, 70)
    n1.send(70, n2)
    info = n2.store.replica_dir(1, 70) / REPLICA_INFO
    blob = n2.store.replica_dir(1, 70) / "state" / "ocdbt.process_1" / "d" / "blob"
    os.system(f"rm -rf '{n1.local.step_dir(70)}'")
    cfg = config_for(tmp_path, [n0, n1, n2], 1)
    # a truncated copy: the stream ends short
    full = blob.read_bytes()
    blob.write_bytes(full[:-10])
    with caplog.at_level(logging.WARNING):
        assert recover_own(cfg, n1.local, rank=1, nodes=3) == []
    assert "short" in caplog.text
    assert n2.store.replicas(1) == [], "a copy found damaged while serving it is dropped"
    # a copy whose header was re-signed by someone without the secret
    blob.parent.mkdir(parents=True, exist_ok=True)
    n1.local.step_dir(70).mkdir()
    write_step(n1.local.root / "again", 70)
    n1b = LocalTier(n1.local.root / "again")
    n2_client = PeerClient(2, n2.address, auth_of(1, job=n2.job), timeout=5)
    n2_client.send(n1b.step_dir(70), header_for(n1b, 70, 1, n1b.manifest(70)))
    data = json.loads(info.read_text())
    data["sig"] = auth_of(1, b"an-impostor-secret-0123456789").sign_header(data["header"].encode())
    info.write_text(json.dumps(data))
    os.system(f"rm -rf '{n1.local.step_dir(70)}'")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert recover_own(cfg, n1.local, rank=1, nodes=3) == []
    assert "not signed with this job's secret" in caplog.text
    assert not n1.local.step_dir(70).exists()


def test_a_peer_down_or_full_is_an_error_for_the_sender_only(cluster: Any, tmp_path: Path) -> None:
    n0, n1, n2 = cluster(3, free=1000)
    write_step(n1.local.root, 70)
    with pytest.raises(StorageError, match=r"HTTP 507.*no room") as full:
        n1.send(70, n2)
    assert full.value.transient
    n2.server.stop()
    with pytest.raises(StorageError, match="does not answer") as down:
        n1.client_to(n2).held()
    assert down.value.transient
    # a node that asks its (down) peer for its steps just gets none, and says so
    assert recover_own(config_for(tmp_path, [n0, n1, n2], 1), n1.local, rank=1, nodes=3) == []
    assert n1.local.committed_steps() == [70]
    n2.server = PeerServer("127.0.0.1:0", n2.server.handler.ctx, timeout=2)
    n2.server.start()


def test_a_peer_keeps_the_newest_copies_by_epoch_then_step(cluster: Any) -> None:
    """A copy of step 90 saved before a rollback (epoch 1) never pushes out the run's live
    steps 70 and 80 of epoch 2."""
    _n0, n1, n2 = cluster(3)
    for step, epoch in ((90, 1), (70, 2), (80, 2)):
        write_step(n1.local.root, step, epoch=epoch, size=3000)
        n1.send(step, n2)
    assert [(r.step, r.epoch) for r in n2.store.replicas(1)] == [(80, 2), (70, 2)]
    write_step(n1.local.root / "b", 80, epoch=3, size=3000)
    other = LocalTier(n1.local.root / "b")
    PeerClient(2, n2.address, auth_of(1, job=n2.job), timeout=5).send(
        other.step_dir(80), header_for(other, 80, 1, other.manifest(80))
    )
    assert [(r.step, r.epoch) for r in n2.store.replicas(1)] == [(80, 3), (70, 2)]
    assert files_of(n2.store.replica_dir(1, 80)) == files_of(other.step_dir(80))
    assert n2.store.drop_newer(70)[0].step == 80
    assert [r.step for r in n2.store.replicas(1)] == [70]


def test_parts_saved_under_different_epochs_are_never_one_step() -> None:
    local = {0: [60, 70], 1: [60, 70]}
    assert agree_step(local, [50], epochs={0: {60: 2, 70: 2}, 1: {60: 2, 70: 2}}) == 70
    # node 1's 70 came back from a peer that kept it from before the rollback
    assert agree_step(local, [50], epochs={0: {60: 2, 70: 3}, 1: {60: 2, 70: 2}}) == 60
    assert agree_step(local, [65], epochs={0: {60: 2, 70: 3}, 1: {60: 2, 70: 2}}) == 65
    # where no epoch was recorded (orbax's own client), a step counts as before
    assert agree_step(local, [50], epochs={0: {}, 1: {70: 2}}) == 70


def test_partners_default_to_a_ring() -> None:
    assert [partners(r, 4, None) for r in range(4)] == [[1], [2], [3], [0]]
    assert partners(1, 4, [1, 3, 7]) == [3]
    assert partners(0, 1, None) == []


def test_peer_settings_are_checked(tmp_path: Path) -> None:
    base = {
        "checkpoint_dir": str(tmp_path / "d"),
        "local_checkpoint_directory": str(tmp_path / "l"),
    }

    def cfg(**tiered: Any) -> Any:
        return config_from_mapping({**base, "tiered": {"num_nodes": 2, **tiered}}, env={})

    with pytest.raises(ConfigError, match="peer_secret_file is not"):
        cfg(peer_addresses=["a:1", "b:1"])
    with pytest.raises(ConfigError, match="template with"):
        cfg(peer_addresses="host:1", peer_secret_file="s")
    with pytest.raises(ConfigError, match="lists 3 addresses"):
        cfg(peer_addresses=["a:1", "b:1", "c:1"], peer_secret_file="s")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        cfg(peer_addresses=["a:1", "b"], peer_secret_file="s")
    with pytest.raises(ConfigError, match="own steps"):
        cfg(peer_addresses="n{rank}:1", peer_secret_file="s", peers=[0])
    short = tmp_path / "short"
    short.write_text("abc\n")
    good = cfg(peer_addresses="n{rank}.svc:8478", peer_secret_file=str(short))
    with pytest.raises(ConfigError, match="3 bytes; at least 16"):
        load_secret(good)
    missing = cfg(peer_addresses="n{rank}.svc:8478", peer_secret_file=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="No such file"):
        load_secret(missing)


def test_a_header_with_reserved_or_escaping_names_is_refused() -> None:
    from tiered import LayoutError, Manifest
    from tiered.manifest import FileEntry

    for name in ("commit_success.txt", "tiered-replica.json", "../x"):
        m = Manifest(step=1, files={name: FileEntry(1, 0)})
        h = Header(owner=1, step=1, epoch=None, marker="", manifest=m)
        with pytest.raises(LayoutError):
            Header.from_bytes(h.to_bytes())


def test_daemons_replicate_past_a_peer_that_is_down_or_killed_mid_transfer(tmp_path: Path) -> None:
    """Two real daemons. While node 1 is down, node 0 still promotes its part of step 50 and
    says in its status that node 1 does not answer; node 1 then dies in the middle of taking
    the step, and once it is back, its leftover is cleared and node 0 sends the step whole."""
    import yaml

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    data = config_dict(
        tmp_path,
        f"file://{tmp_path / 'durable'}",
        tiered={
            "num_nodes": 2,
            "peer_addresses": addresses,
            "peer_secret_file": str(secret),
            "peer_bandwidth_mb_per_s": 2,
            "shutdown_grace_seconds": 2,  # node 0 would wait for node 1's part of step 50
        },
    )
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(data))
    local = [tmp_path / f"node{r}" for r in range(2)]

    def start(rank: int) -> DaemonProc:
        env = {
            "TIERED_NODE_RANK": str(rank),
            "TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(local[rank]),
            "TIERED_STATUS_ADDRESS": f"127.0.0.1:{free_port()}",
        }
        daemon = DaemonProc(config_path, config_from_mapping(data, env=env), env=env)
        daemon.wait_ready()
        return daemon

    def sends_to_1(daemon: DaemonProc) -> dict[str, Any]:
        return json.loads(daemon.get("/status")[1])["daemon"]["peers"]["sends_to"]["1"]

    d0 = start(0)
    d1: DaemonProc | None = None
    try:
        original = files_of(write_step(local[0], 50, owner=0, nodes=2, size=4_000_000))
        wait_for(lambda: sends_to_1(d0)["error"], timeout=30, what="node 1 reported down")
        assert "does not answer" in sends_to_1(d0)["error"]
        # promotion does not wait for the peer: node 0's part of step 50 is up
        wait_for(
            lambda: (tmp_path / "durable" / "50" / "tiered-parts" / "0.json").exists(),
            timeout=30,
            what=f"node 0's part of step 50\n{d0.log()[-2000:]}",
        )
        d1 = start(1)
        store1 = PeerStore(local[1])

        def receiving() -> bool:
            return any(".tiered-tmp-" in p.name for p in store1.root.rglob("*"))

        wait_for(receiving, timeout=30, what=f"node 1 receiving\n{d0.log()[-2000:]}")
        d1.kill()  # mid-transfer: 4 MB at 2 MB/s
        assert store1.replicas() == [] and receiving(), "killed half way"
        d1 = start(1)
        wait_for(
            lambda: [r.step for r in store1.replicas(0)] == [50],
            timeout=60,
            what=f"node 0's step 50 at node 1\n{d0.log()[-3000:]}",
        )
        assert not receiving(), "the dead receiver's leftover was cleared"
        assert files_of(store1.replica_dir(0, 50)) == original
        wait_for(lambda: sends_to_1(d0) == {"step": 50, "error": None}, timeout=30)
        assert "Replicating step 50 to peer node 1 failed" in d0.log()
    finally:
        d0.terminate()
        if d1 is not None:
            d1.terminate()


def test_a_local_file_gone_mid_send_is_the_senders_error_not_the_peers(cluster: Any) -> None:
    """The step is pruned while it is being sent: the sender says so at once (it does not wait
    out the peer's timeout and blame the peer), and the peer keeps nothing."""
    _n0, n1, n2 = cluster(3)
    step_dir = write_step(n1.local.root, 70)
    header = header_for(n1.local, 70, 1, n1.local.manifest(70))
    (step_dir / "state" / "ocdbt.process_1" / "d" / "blob").unlink()
    started = time.monotonic()
    with pytest.raises(StorageError, match="reading the local step") as err:
        n1.client_to(n2).send(step_dir, header)
    assert not err.value.transient and time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while any(".tiered-tmp-" in p.name for p in n2.store.root.rglob("*")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert n2.store.replicas() == []
