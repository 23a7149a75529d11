"""How a peer request proves it comes from this job, for this node, once (peer protocol v2).

Every request carries ``X-Tiered-Auth: v2 <sender> <receiver> <job> <unix time> <nonce> <hex>``:
an HMAC-SHA256, under the job's shared secret, over the protocol version, the HTTP method, the
path, the sender's rank, the receiver's rank, the job, the timestamp and a random nonce. The job
is ``job_identity(durable_url)``: two jobs that share a secret and a durable URL are the same job
(they write the same checkpoints); any other pair is refused.

A receiver takes a request only when all of these hold:

* the signature is right (the sender has the job's secret), for this job and this node's rank;
* its timestamp is within ``WINDOW_SECONDS`` of the receiver's clock;
* its nonce is not in the receiver's record of nonces taken (``NonceRecord``), which is written
  and synced *before* the request is served, lives under ``.tiered/peer-nonces``, and keeps each
  nonce for twice the window (so a replay is refused until its timestamp is too old anyway,
  across restarts of the daemon);
* when the daemon started without that record (a new disk, a deleted file), the request is
  signed after the daemon started: a nonce it might have taken before is then too old.

Whatever goes wrong with the record (unreadable, unwritable, full) refuses the request: the
check fails closed. The replica header (the manifest) carries an HMAC of its own, written by its
owner (``sign_header``), so a peer cannot pass off another manifest.

A request of another protocol version is refused with ``PeerProtocolMismatch`` naming both
versions (HTTP 426 on the wire); every answer of a v2 server carries ``X-Tiered-Peer-Protocol``,
so a client can tell an older server's refusal from a wrong secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from tiered.errors import PeerProtocolMismatch, PeerRefused, StorageError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
AUTH_HEADER = "X-Tiered-Auth"
SIG_HEADER = "X-Tiered-Replica-Sig"
VERSION_HEADER = "X-Tiered-Peer-Protocol"
WINDOW_SECONDS = 300.0
RECORD_CAP = 100_000
"""The most nonces a record keeps: 333 requests a second over the window, far above what a
job's nodes send (a few per checkpoint); past it, requests are refused until entries expire."""

_NONCE = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"v([0-9]{1,6})")


def job_identity(durable_url: str) -> str:
    """The job a request is for: a digest of its durable tier's URL."""
    return hashlib.sha256(durable_url.rstrip("/").encode()).hexdigest()[:16]


def mismatch(theirs: str) -> str:
    return (
        f"the peer speaks peer protocol {theirs}, this node v{PROTOCOL_VERSION}: run the same "
        "tiered version on every node of the job"
    )


class NonceRecord:
    """The nonces this node took within their validity, on disk: one ``<time> <nonce>`` line
    per request, appended and synced before the request is served; rewritten without the
    expired ones when it has grown to twice what it keeps."""

    def __init__(
        self, path: Path, *, keep_seconds: float = 2 * WINDOW_SECONDS, cap: int = RECORD_CAP
    ) -> None:
        self.path = path
        self.keep_seconds = keep_seconds
        self.cap = cap
        self._seen: dict[str, float] = {}
        self._file: int | None = None
        self._lines = 0
        self._lock = threading.Lock()
        self._loaded = False
        self.not_before = 0.0
        """Requests timestamped before this are refused: the start, when the record was lost."""
        with self._lock:
            try:
                self._load()
            except OSError as err:
                log.error("The record of peer requests %s cannot be read (%s)", path, err)

    def _load(self) -> None:
        """Read the record (once it is read, it is only ever rewritten from memory: an
        unreadable record is never overwritten, so its nonces stay refused)."""
        now = time.time()
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            self.not_before = now
            log.info(
                "No record of the peer requests taken (%s): requests signed before now are refused",
                self.path,
            )
            text = ""
        for line in text.splitlines():
            ts_text, _, nonce = line.partition(" ")
            with contextlib.suppress(ValueError):  # a torn last line: that request was not served
                if _NONCE.fullmatch(nonce):
                    self._seen[nonce] = float(ts_text)
        self._loaded = True
        self._rewrite(now)

    def _rewrite(self, now: float) -> None:
        """The record with only the live nonces, replaced in one rename; then append to it."""
        self._close()
        self._seen = {n: t for n, t in self._seen.items() if now - t <= self.keep_seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write("".join(f"{t:.3f} {n}\n" for n, t in self._seen.items()).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = len(self._seen)

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = None

    def take(self, nonce: str, ts: float) -> None:
        """Record ``nonce`` as taken; ``PeerRefused`` if it was, ``StorageError`` (transient)
        when the record cannot keep it: the request is then refused too."""
        with self._lock:
            now = time.time()
            try:
                if not self._loaded:
                    self._load()
                if ts < self.not_before:
                    raise PeerRefused(
                        "the request was signed before this daemon started, and its record of "
                        "the requests it took is gone: it may be a replay"
                    )
                if nonce in self._seen:
                    raise PeerRefused("the request replays one already served")
                if self._file is None or self._lines >= max(1024, 2 * len(self._seen)):
                    self._rewrite(now)
                if len(self._seen) >= self.cap:
                    self._rewrite(now)
                    if len(self._seen) >= self.cap:
                        raise StorageError(
                            f"{len(self._seen)} peer requests taken in {self.keep_seconds:.0f} s: "
                            "refusing more until they expire",
                            transient=True,
                        )
                assert self._file is not None
                os.write(self._file, f"{ts:.3f} {nonce}\n".encode())
                os.fsync(self._file)
            except OSError as err:
                self._close()
                raise StorageError(
                    f"the record of peer requests {self.path} cannot be kept ({err}): "
                    "refusing the request",
                    transient=True,
                ) from None
            self._seen[nonce] = ts
            self._lines += 1

    def close(self) -> None:
        with self._lock:
            self._close()


class PeerAuth:
    """Signs this node's requests; with a ``record``, checks other nodes' too."""

    def __init__(
        self,
        secret: bytes,
        rank: int,
        *,
        job: str,
        record: NonceRecord | None = None,
        window: float = WINDOW_SECONDS,
    ) -> None:
        self._secret = secret
        self.rank = rank
        self.job = job
        self.record = record
        self.window = window

    def _mac(self, *parts: object) -> str:
        text = "\n".join(str(p) for p in parts).encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()

    def _request_mac(self, method: str, path: str, fields: list[str]) -> str:
        return self._mac("tiered-peer", f"v{PROTOCOL_VERSION}", method, path, *fields)

    def request_header(self, method: str, path: str, *, to: int) -> str:
        """The ``X-Tiered-Auth`` value of one request of this node to node ``to``."""
        fields = [str(self.rank), str(to), self.job, f"{time.time():.3f}", secrets.token_hex(16)]
        mac = self._request_mac(method, path, fields)
        return " ".join([f"v{PROTOCOL_VERSION}", *fields, mac])

    def check_request(self, header: str | None, method: str, path: str, *, receiver: int) -> int:
        """The rank that signed a request to node ``receiver``, taken once; ``PeerRefused``
        (``PeerProtocolMismatch`` for another version) when nothing valid did."""
        if not header:
            raise PeerRefused("the request is not signed (no X-Tiered-Auth header)")
        parts = header.split(" ")
        version = _VERSION.fullmatch(parts[0])
        if version is not None and int(version.group(1)) != PROTOCOL_VERSION:
            raise PeerProtocolMismatch(mismatch(parts[0]))
        if len(parts) != 7 or version is None or not (parts[1].isdigit() and parts[2].isdigit()):
            raise PeerRefused("the request's X-Tiered-Auth header is malformed")
        _v, sender, to, job, ts_text, nonce, mac = parts
        if not hmac.compare_digest(mac, self._request_mac(method, path, parts[1:6])):
            raise PeerRefused("the request's signature is wrong: the sender has another secret")
        if job != self.job:
            raise PeerRefused(
                f"the request is for job {job}, this node is of job {self.job} (another durable "
                "URL with the same secret)"
            )
        if int(to) != receiver:
            raise PeerRefused(f"the request is for node {to}, this is node {receiver}")
        try:
            ts = float(ts_text)
        except ValueError:
            raise PeerRefused("the request's timestamp is malformed") from None
        skew = abs(time.time() - ts)
        if not skew <= self.window:
            raise PeerRefused(f"the request is {skew:.0f} s off this node's clock")
        if not _NONCE.fullmatch(nonce):
            raise PeerRefused("the request's nonce is malformed")
        if self.record is None:
            raise PeerRefused("this process takes no peer requests")
        self.record.take(nonce, ts)
        return int(sender)

    def sign_header(self, raw: bytes) -> str:
        return self._mac("replica", hashlib.sha256(raw).hexdigest())

    def check_header(self, raw: bytes, sig: str | None) -> None:
        if not sig or not hmac.compare_digest(sig, self.sign_header(raw)):
            raise PeerRefused(
                "the replica's header is not signed with this job's secret: it was not written "
                "by one of its nodes, or it was changed since"
            )
