"""A hostile peer: requests recorded on the wire and replayed (after the receiver's restart, to
another node, to another job), an older protocol version, and connection floods against the
peer server and the status server. Real daemons and real servers on loopback; the fault rows
are in docs/reliability.md, the rule in docs/multinode.md."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_peers import SECRET, Node, write_step

from daemon.http import StatusServer
from tiered import LocalTier, PeerProtocolMismatch, PeerRefused, StorageError, config_from_mapping
from tiered.layout import PEER_NONCES, REPLICA_INFO
from tiered.peerauth import AUTH_HEADER, VERSION_HEADER, NonceRecord, PeerAuth, job_identity
from tiered.peering import PeerClient, header_for

from conftest import DaemonProc, config_dict, free_port, wait_for


class Recorder:
    """A TCP proxy that records what each client connection sent (a wiretap on the job's
    network)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.sent: list[bytearray] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            record = bytearray()
            self.sent.append(record)
            threading.Thread(
                target=self._pump, args=(client, upstream, record), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dest: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dest):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def replay(address: str, recorded: bytes) -> tuple[int, bytes]:
    """Send recorded bytes to a server as they were; its status and body."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)

    def send() -> None:
        # the server may answer and close before taking the body: fine
        with contextlib.suppress(OSError):
            sock.sendall(recorded)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sender.join(10)
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


# -- replays ------------------------------------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Node 1 as a real daemon; node 0 in this process, its requests through a wiretap."""
    import yaml

    (tmp_path / "secret").write_bytes(SECRET)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    data = config_dict(
        tmp_path,
        f"file://{tmp_path / 'durable'}",
        tiered={
            "num_nodes": 2,
            "peer_addresses": addresses,
            "peer_secret_file": str(tmp_path / "secret"),
        },
    )
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(data))
    local = [tmp_path / f"node{r}" for r in range(2)]
    env = {
        "TIERED_NODE_RANK": "1",
        "TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(local[1]),
        "TIERED_STATUS_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    cfg0 = config_from_mapping(
        data, env={"TIERED_NODE_RANK": "0", "TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(local[0])}
    )
    daemons: list[DaemonProc] = []

    def start() -> DaemonProc:
        daemon = DaemonProc(config_path, config_from_mapping(data, env=env), env=env)
        daemons.append(daemon)
        daemon.wait_ready()
        wait_for(lambda: listening(addresses[1]), timeout=30, what=daemon.log())
        return daemon

    recorder = Recorder(addresses[1])
    auth = PeerAuth(SECRET, 0, job=job_identity(cfg0.durable_url))
    yield {
        "start": start,
        "daemons": daemons,
        "local": local,
        "address": addresses[1],
        "recorder": recorder,
        "client": PeerClient(1, recorder.address, auth, timeout=10),
    }
    recorder.close()
    for d in daemons:
        d.kill()


def test_a_recorded_request_replayed_after_the_receivers_restart_is_refused(
    two_nodes: dict[str, Any],
) -> None:
    """Node 0's signed PUT and GET, taped on the wire, replayed to node 1's daemon: refused
    while it runs, after it restarts, and after it restarts without its record of nonces
    (those requests were signed before it started); the step is stored once, and node 0's own
    fresh requests are taken all along."""
    t = two_nodes
    first = t["start"]()
    local0 = LocalTier(t["local"][0])
    write_step(local0.root, 70, owner=0, nodes=2, size=3000)
    header = header_for(local0, 70, 0, local0.manifest(70))
    t["client"].send(local0.step_dir(70), header)
    assert [h.step for h in t["client"].held()] == [70]
    put, get = (bytes(r) for r in t["recorder"].sent)
    assert put.startswith(b"PUT /v1/replicas/0/70 ") and get.startswith(b"GET /v1/replicas/0 ")
    info = t["local"][1] / ".tiered" / "peers" / "node-0" / "70" / REPLICA_INFO
    stored = info.stat().st_mtime_ns

    assert replay(t["address"], put)[0] == 401
    assert replay(t["address"], get)[0] == 401
    first.terminate()
    second = t["start"]()
    put_status, put_body = replay(t["address"], put)
    assert put_status == 401 and b"replays one already served" in put_body, put_body
    assert replay(t["address"], get)[0] == 401
    assert [h.step for h in t["client"].held()] == [70]  # a fresh request is taken

    second.terminate()
    (t["local"][1] / ".tiered" / PEER_NONCES).unlink()  # the record is lost
    third = t["start"]()
    put_status, put_body = replay(t["address"], put)
    assert put_status == 401 and b"signed before this daemon started" in put_body, put_body
    assert replay(t["address"], get)[0] == 401
    assert [h.step for h in t["client"].held()] == [70]

    logs = "".join(d.log() for d in (first, second, third))
    assert logs.count("Keeping node 0's step 70") == 1, logs
    assert info.stat().st_mtime_ns == stored, "the step was stored again"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Any]:
    made: list[Node] = []

    def make(count: int, where: str = "a") -> list[Node]:
        (tmp_path / where).mkdir(exist_ok=True)
        ns = [Node(tmp_path / where, r, count) for r in range(count)]
        made.extend(ns)
        return ns

    yield make
    for n in made:
        n.server.stop()


def test_a_request_for_one_node_replayed_to_another_is_refused(
    nodes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    n0, n1, n2 = nodes(3)
    write_step(n0.local.root, 70, owner=0, nodes=3, size=3000)
    recorder = Recorder(n1.address)
    try:
        client = PeerClient(1, recorder.address, PeerAuth(SECRET, 0, job=n0.job), timeout=5)
        client.send(n0.local.step_dir(70), header_for(n0.local, 70, 0, n0.local.manifest(70)))
        assert [h.step for h in client.held()] == [70]
    finally:
        recorder.close()
    put, get = (bytes(r) for r in recorder.sent)
    status, body = replay(n2.address, put)
    assert status == 401 and b"is for node 1, this is node 2" in body, body
    assert replay(n2.address, get)[0] == 401
    assert n2.store.replicas() == []
    assert "is for node 1, this is node 2" in caplog.text


def test_a_node_of_another_job_with_the_same_secret_is_refused(nodes: Any) -> None:
    """Two jobs share a secret (one Kubernetes Secret for the team), not a durable tier: each
    one's requests are refused by the other's nodes, recorded or fresh."""
    (a0, a1) = nodes(2, "a")
    (b0, b1) = nodes(2, "b")
    assert a1.job != b1.job
    write_step(b0.local.root, 70, owner=0, nodes=2, size=3000)
    recorder = Recorder(b1.address)
    try:
        client = PeerClient(1, recorder.address, PeerAuth(SECRET, 0, job=b0.job), timeout=5)
        client.send(b0.local.step_dir(70), header_for(b0.local, 70, 0, b0.local.manifest(70)))
    finally:
        recorder.close()
    status, body = replay(a1.address, bytes(recorder.sent[0]))
    assert status == 401 and b"for job" in body, body
    assert a1.store.replicas() == []
    with pytest.raises(PeerRefused, match="for job"):
        PeerClient(1, a1.address, PeerAuth(SECRET, 0, job=b0.job), timeout=5).held()
    assert PeerClient(1, a1.address, PeerAuth(SECRET, 0, job=a0.job), timeout=5).held() == []


# -- versions ------------------------------------------------------------------------------


def v1_header(method: str, path: str, rank: int) -> str:
    """``X-Tiered-Auth`` as a daemon of peer protocol v1 (tiered 0.2) signed it."""
    ts, nonce = f"{time.time():.3f}", "ab" * 16
    text = "\n".join(str(p) for p in ("v1", method, path, rank, ts, nonce)).encode()
    return f"v1 {rank} {ts} {nonce} {hmac.new(SECRET, text, hashlib.sha256).hexdigest()}"


def test_an_older_peer_is_refused_with_both_versions_named(nodes: Any) -> None:
    _n0, n1 = nodes(2)
    conn = http.client.HTTPConnection(*n1.address.split(":"), timeout=5)
    path = "/v1/replicas/0"
    conn.request("GET", path, headers={AUTH_HEADER: v1_header("GET", path, 0)})
    resp = conn.getresponse()
    body = json.loads(resp.read())["error"]
    assert resp.status == 426 and resp.getheader(VERSION_HEADER) == "2"
    assert "protocol v1, this node v2" in body, body


def test_a_new_node_calling_an_older_peer_says_so(nodes: Any) -> None:
    """A daemon of v1 answers a v2 request with 401 'malformed' and no version header: the
    new client names both versions instead of blaming the secret."""

    class V1(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # what the v1 server answered a header it cannot parse
            data = json.dumps({"error": "the request's X-Tiered-Auth header is malformed"})
            self.send_response(401)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args: object) -> None:
            pass

    old = ThreadingHTTPServer(("127.0.0.1", 0), V1)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    try:
        client = PeerClient(
            1, f"127.0.0.1:{old.server_address[1]}", PeerAuth(SECRET, 0, job="j"), timeout=5
        )
        with pytest.raises(PeerProtocolMismatch, match=r"protocol v1 .*this node v2"):
            client.held()
    finally:
        old.shutdown()
        old.server_close()


# -- the record of nonces ------------------------------------------------------------------


def test_the_record_of_nonces_outlives_the_process_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / ".tiered" / PEER_NONCES
    now = time.time()
    record = NonceRecord(path)
    assert record.not_before >= now  # no record yet: nothing signed before now
    with pytest.raises(PeerRefused, match="signed before this daemon started"):
        record.take("f" * 32, now - 1)
    now = time.time()
    record.take("0" * 32, now)
    record.close()
    again = NonceRecord(path)
    assert again.not_before == 0.0
    with pytest.raises(PeerRefused, match="replays"):
        again.take("0" * 32, now)
    again.take("1" * 32, now)
    # full: refused, not forgotten
    full = NonceRecord(tmp_path / "full", cap=2)
    full.take("2" * 32, time.time())
    full.take("3" * 32, time.time())
    with pytest.raises(StorageError, match="refusing more"):
        full.take("4" * 32, time.time())
    # a record that cannot be read is never overwritten: every request is refused
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(StorageError, match="cannot be kept"):
        NonceRecord(broken).take("5" * 32, time.time())
    assert broken.is_dir()


# -- floods --------------------------------------------------------------------------------


def slow_loris(address: str, count: int, stop: threading.Event) -> list[socket.socket]:
    """``count`` connections that each send a request one byte a second, never finishing."""
    host, _, port = address.rpartition(":")
    socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]

    def drip() -> None:
        while not stop.wait(1.0):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"G")

    threading.Thread(target=drip, daemon=True).start()
    return socks


def healthz(address: str) -> int:
    with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as r:
        return int(r.status)


def flood_check(nodes: Any, *, slow: int, seconds: float) -> None:
    """While ``slow`` connections drip bytes at the peer server and the status server, signed
    requests and ``/healthz`` are answered at once, and neither server starts a thread per
    connection."""
    _n0, n1 = nodes(2)
    status = StatusServer("127.0.0.1:0", {"/healthz": lambda: (200, "text/plain", b"ok\n")})
    status.start()
    stop = threading.Event()
    threads_before = threading.active_count()
    socks = slow_loris(n1.address, slow, stop) + slow_loris(status.address, slow, stop)
    client = PeerClient(1, n1.address, PeerAuth(SECRET, 0, job=n1.job), timeout=5)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert client.held() == []
            assert healthz(status.address) == 200
            assert time.monotonic() - started < 2.0
            assert threading.active_count() <= threads_before + 2  # the drips, no more
            time.sleep(0.2)
    finally:
        stop.set()
        for s in socks:
            s.close()
        status.stop()


def burst_check(address: str, count: int) -> None:
    """``count`` clients connect at the same moment: every one is answered, none reset."""
    barrier = threading.Barrier(count)
    answers: list[int | str] = []

    def one() -> None:
        barrier.wait()
        try:
            answers.append(healthz(address))
        except OSError as err:
            answers.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [200] * count, [a for a in answers if a != 200][:5]


def test_a_slow_loris_starves_neither_peers_nor_healthz(nodes: Any) -> None:
    flood_check(nodes, slow=300, seconds=3)


def test_a_burst_of_connects_is_answered_not_reset() -> None:
    status = StatusServer("127.0.0.1:0", {"/healthz": lambda: (200, "text/plain", b"ok\n")})
    status.start()
    try:
        burst_check(status.address, 150)
    finally:
        status.stop()


@pytest.mark.slow
def test_a_long_flood_is_cut_at_the_head_deadline(nodes: Any) -> None:
    """1,000 slow connections for longer than the head deadline: the server closes them (the
    oldest first once past its cap), and answers signed requests throughout."""
    flood_check(nodes, slow=1000, seconds=12)
    _n0, n1 = nodes(2, "b")
    stop = threading.Event()
    socks = slow_loris(n1.address, 50, stop)
    try:
        time.sleep(11.5)  # past the 10 s deadline
        closed = 0
        for s in socks:
            s.settimeout(2)
            try:
                data = s.recv(1000)
            except OSError:
                data = b""
            closed += data == b"" or data.startswith(b"HTTP/1.0 408")
        assert closed == len(socks)
    finally:
        stop.set()
        for s in socks:
            s.close()
