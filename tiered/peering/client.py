"""The client side of the peer transport: list, fetch and send replicas, every request signed."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiered.errors import (
    LayoutError,
    PeerProtocolMismatch,
    PeerRefused,
    StorageError,
)
from tiered.layout import COMMIT_MARKER
from tiered.manifest import Manifest
from tiered.peerauth import (
    AUTH_HEADER,
    PROTOCOL_VERSION,
    SIG_HEADER,
    VERSION_HEADER,
    PeerAuth,
    mismatch,
)
from tiered.storage import LocalTier
from tiered.storage.local import step_metadata
from tiered.storage.replicas import Header, encode, read_header, receive_files
from tiered.storage.transfer import RateLimiter

log = logging.getLogger("tiered.peering")

# -- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A replica of this node's held by a peer, as that peer lists it."""

    step: int
    epoch: int | None
    identity: str
    bytes: int


class PeerClient:
    """This node talking to one peer's server."""

    def __init__(
        self,
        rank: int,
        address: str,
        auth: PeerAuth,
        *,
        timeout: float,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.rank = rank
        self.address = address
        self.auth = auth
        self.timeout = timeout
        self.limiter = limiter

    def __str__(self) -> str:
        return f"node {self.rank} ({self.address})"

    def _connect(self) -> http.client.HTTPConnection:
        host, _, port = self.address.rpartition(":")
        return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)

    def _path(self, step: int | None = None) -> str:
        base = f"/v1/replicas/{self.auth.rank}"
        return base if step is None else f"{base}/{step}"

    @contextlib.contextmanager
    def _exchange(self, failed: str) -> Iterator[http.client.HTTPConnection]:
        """One connection to the peer, closed after; a network or protocol error becomes a
        transient ``StorageError`` saying ``failed``."""
        conn = self._connect()
        try:
            yield conn
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise StorageError(f"{failed}: {err}", transient=True) from None
        finally:
            conn.close()

    def _answer(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        """The peer's response; ``PeerProtocolMismatch`` when its server is of another version
        (every v2 answer names its version; the servers before it named none)."""
        resp = conn.getresponse()
        theirs = resp.getheader(VERSION_HEADER)
        if theirs != str(PROTOCOL_VERSION):
            body = resp.read(2000).decode(errors="replace").strip()
            named = f"v{theirs}" if theirs else "v1 (an older tiered, which names no version)"
            raise PeerProtocolMismatch(
                f"peer {self}: {mismatch(named)} (HTTP {resp.status} {body})"
            )
        return resp

    def _fail(self, what: str, resp: http.client.HTTPResponse) -> StorageError:
        body = resp.read(2000).decode(errors="replace").strip()
        message = f"peer {self}: {what}: HTTP {resp.status} {body}"
        if resp.status in (401, 403):
            return PeerRefused(message)
        return StorageError(message, transient=resp.status >= 500 or resp.status == 507)

    def held(self) -> list[Held]:
        """This node's replicas the peer holds, newest first."""
        path = self._path()
        with self._exchange(f"peer {self} does not answer") as conn:
            conn.request(
                "GET",
                path,
                headers={AUTH_HEADER: self.auth.request_header("GET", path, to=self.rank)},
            )
            resp = self._answer(conn)
            if resp.status != 200:
                raise self._fail("listing its replicas", resp)
            data = json.loads(resp.read(16 * 2**20))  # a short list of steps
        return [
            Held(
                step=int(r["step"]),
                epoch=r.get("epoch"),
                identity=str(r["identity"]),
                bytes=int(r["bytes"]),
            )
            for r in data.get("replicas", [])
        ]

    def send(
        self,
        step_dir: Path,
        header: Header,
        *,
        progress: Callable[[int, int], None] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        """Stream one local step to the peer (it checks every byte as it arrives), at
        ``limiter``'s pace (default: this client's cap)."""
        raw = header.to_bytes()
        path = self._path(header.step)
        total = header.stream_length(raw)
        with self._exchange(f"peer {self}: sending step {header.step} failed") as conn:
            conn.putrequest("PUT", path)
            conn.putheader(AUTH_HEADER, self.auth.request_header("PUT", path, to=self.rank))
            conn.putheader(SIG_HEADER, self.auth.sign_header(raw))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(total))
            conn.endheaders()

            def open_file(rel: str) -> Any:
                return _open_inside(step_dir, rel)

            chunks = encode(header, open_file, raw=raw)
            dropped = self._stream(conn, chunks, total, progress, limiter or self.limiter)
            if dropped is not None:
                # The peer may have answered (and closed) before taking it all: say why.
                try:
                    resp = self._answer(conn)
                except (OSError, http.client.HTTPException):
                    raise StorageError(
                        f"peer {self} dropped the transfer of step {header.step} after "
                        f"{dropped[0]} of {total} bytes: {dropped[1]}",
                        transient=True,
                    ) from None
                raise self._fail(f"storing step {header.step}", resp) from None
            resp = self._answer(conn)
            if resp.status != 200:
                raise self._fail(f"storing step {header.step}", resp)
            resp.read()

    def _stream(
        self,
        conn: http.client.HTTPConnection,
        chunks: Iterator[bytes],
        total: int,
        progress: Callable[[int, int], None] | None,
        limiter: RateLimiter | None,
    ) -> tuple[int, OSError] | None:
        """Send ``chunks``; (bytes sent, the error) when the peer's side of the connection
        failed. An error reading this node's own files is not the peer's: it is raised."""
        done = 0
        while True:
            try:
                chunk = next(chunks, None)
            except OSError as err:  # this node's own file (pruned meanwhile, say)
                raise StorageError(
                    f"reading the local step to send it: {err}", transient=False
                ) from None
            if chunk is None:
                return None
            if limiter is not None:
                limiter.take(len(chunk))
            try:
                conn.send(chunk)
            except OSError as err:
                return done, err
            done += len(chunk)
            if progress is not None:
                progress(done, total)

    def fetch(self, step: int, dest: Path) -> Header:
        """Download this node's step ``step`` from the peer into ``dest`` (a new directory),
        every byte checked against the owner-signed manifest; raises on any difference."""
        path = self._path(step)
        with self._exchange(f"peer {self}: reading step {step} failed") as conn:
            conn.request(
                "GET",
                path,
                headers={AUTH_HEADER: self.auth.request_header("GET", path, to=self.rank)},
            )
            resp = self._answer(conn)
            if resp.status != 200:
                raise self._fail(f"reading step {step}", resp)
            header, raw = read_header(resp)
            self.auth.check_header(raw, resp.getheader(SIG_HEADER))
            if header.owner != self.auth.rank or header.step != step:
                raise LayoutError(
                    f"peer {self} answered for step {step} with node {header.owner}'s step "
                    f"{header.step}"
                )
            dest.mkdir(parents=True)
            receive_files(resp, header, dest)
            return header


def _open_inside(step_dir: Path, rel: str) -> Any:
    """A file of a local step for sending, never through a symlink that leaves the step."""
    path = step_dir / rel
    real = os.path.realpath(path)
    if not Path(real).is_relative_to(os.path.realpath(step_dir)):
        raise LayoutError(f"{path}: symlink points outside the step directory; not sent")
    return open(real, "rb")


def header_for(local: LocalTier, step: int, rank: int, manifest: Manifest) -> Header:
    """What a replica of this node's local ``step`` carries."""
    step_dir = local.step_dir(step)
    epoch = step_metadata(step_dir).epoch
    with open(step_dir / COMMIT_MARKER, "rb") as f:
        marker = f.read(65536).decode(errors="replace")  # orbax's marker: one small line
    return Header(owner=rank, step=step, epoch=epoch, marker=marker, manifest=manifest)
