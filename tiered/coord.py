"""Multi-node agreement through the durable tier: one restore step for every node.

No extra service: the nodes meet in ``<checkpoint_dir>/.tiered/restore/``.

1. Every node posts ``request-<r>.json``: a fresh nonce, the committed steps it holds locally
   (a node that lost its disk first gets its own steps back from its peers, ``tiered.peering``),
   the epoch each was saved under, and which came back from a peer.
2. Node 0 waits until each of the N nodes has posted a request it has not answered yet, then
   writes ``decision.json``: the step (the newest one every node holds locally, saved under one
   epoch, or the newest committed durable step when that is newer), which nodes hold it already,
   which of those got it from a peer, the nonces it answers, and a new epoch.
3. Every node polls ``decision.json`` until it answers its own nonce.

The epoch is what keeps a restart honest: part markers carry the epoch they were written under,
and node 0 commits a step only from parts of the current epoch. A part uploaded before a restart
(when the run then went back to an older step and saved this step number again) is stale and is
never mixed into a commit.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tiered.errors import AgreementTimeout, CommitError
from tiered.layout import DECISION_NAME, RESTORE_COORD_DIR, restore_request_name
from tiered.policy import agree_step
from tiered.storage import DurableTier

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
"""The shortest period at which a node reads ``decision.json`` (node 0's, at any N)."""


@dataclass(frozen=True)
class Decision:
    """What node 0 decided for one restore round."""

    epoch: int
    step: int | None
    holders: frozenset[int]
    """Nodes that hold ``step`` locally; every other node downloads its own part."""
    nonces: dict[int, str]
    from_peers: dict[int, int] = field(default_factory=dict)
    """Nodes whose part of ``step`` came back from a peer just before (node -> peer)."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "epoch": self.epoch,
                "step": self.step,
                "holders": sorted(self.holders),
                "nonces": {str(r): n for r, n in sorted(self.nonces.items())},
                "from_peers": {str(r): p for r, p in sorted(self.from_peers.items())},
                "time": time.time(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Decision:
        data = json.loads(text)
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]) if data.get("step") is not None else None,
            holders=frozenset(int(r) for r in data.get("holders", [])),
            nonces={int(r): str(n) for r, n in data.get("nonces", {}).items()},
            from_peers={int(r): int(p) for r, p in data.get("from_peers", {}).items()},
        )


class Rendezvous:
    """One node's side of the restore agreement."""

    def __init__(self, durable: DurableTier, *, poll_seconds: float | None = None) -> None:
        self.durable = durable
        self.rank = durable.topology.rank
        self.nodes = durable.topology.nodes
        # Every waiting node reads decision.json once per poll: keep the total near 200 reads
        # a second however many nodes there are. Node 0 is one reader, and decides: it polls
        # at the shortest period, so the decision waits on the last request, not on node 0's
        # own poll as well (at 1,024 nodes that was 5 s of every agreement's 10).
        self.poll_seconds = (
            poll_seconds
            if poll_seconds is not None
            else (
                POLL_SECONDS if durable.topology.committer else max(POLL_SECONDS, self.nodes / 200)
            )
        )

    def _decision(self) -> Decision | None:
        text = self.durable.store.read_text(f"{RESTORE_COORD_DIR}/{DECISION_NAME}")
        if text is None:
            return None
        try:
            return Decision.from_json(text)
        except (ValueError, KeyError, TypeError) as err:
            raise CommitError(
                f"{self.durable.url}/{RESTORE_COORD_DIR}/{DECISION_NAME}: {err}"
            ) from None

    def current_epoch(self) -> int:
        """The epoch new part markers carry (0 before the first restore round)."""
        decision = self._decision()
        return decision.epoch if decision else 0

    def post(
        self,
        local_steps: Iterable[int],
        *,
        epochs: Mapping[int, int] | None = None,
        from_peers: Mapping[int, int] | None = None,
    ) -> str:
        """Ask: the committed steps this node holds, the epoch each was saved under (where
        recorded), and which of them came back from a peer (step -> peer)."""
        nonce = uuid.uuid4().hex
        self.durable.store.write_text(
            f"{RESTORE_COORD_DIR}/{restore_request_name(self.rank)}",
            json.dumps(
                {
                    "nonce": nonce,
                    "local": sorted(set(local_steps)),
                    "epochs": {str(s): e for s, e in sorted((epochs or {}).items())},
                    "from_peers": {str(s): p for s, p in sorted((from_peers or {}).items())},
                    "time": time.time(),
                }
            ),
        )
        return nonce

    def try_decide(self) -> Decision | None:
        """Node 0: answer the round once every node has posted a request not yet answered."""
        if self.rank != 0:
            raise CommitError(f"node {self.rank} asked to decide a restore; only node 0 decides")
        previous = self._decision()
        answered = set(previous.nonces.values()) if previous else set()
        requests = self._requests()
        if len(requests) < self.nodes or any(
            "nonce" not in req or req["nonce"] in answered for req in requests.values()
        ):
            return None
        local = {r: [int(s) for s in req.get("local", [])] for r, req in requests.items()}
        epochs = {r: _int_map(req.get("epochs")) for r, req in requests.items()}
        peers = {r: _int_map(req.get("from_peers")) for r, req in requests.items()}
        step = agree_step(local, [f.step for f in self.durable.scan() if f.own], epochs=epochs)
        holders = frozenset(r for r, steps in local.items() if step in steps)
        decision = Decision(
            epoch=(previous.epoch if previous else 0) + 1,
            step=step,
            holders=holders,
            nonces={r: str(req["nonce"]) for r, req in requests.items()},
            from_peers={r: peers[r][step] for r in holders if step in peers[r]},
        )
        self.durable.store.write_text(f"{RESTORE_COORD_DIR}/{DECISION_NAME}", decision.to_json())
        log.info(
            "Restore agreement (epoch %d): every node restores %s; %s",
            decision.epoch,
            f"step {step}" if step is not None else "nothing (fresh start)",
            "all hold it locally"
            if len(decision.holders) == self.nodes
            else f"nodes {sorted(set(range(self.nodes)) - decision.holders)} download their part",
        )
        for rank, peer in sorted(decision.from_peers.items()):
            log.info("Node %d's part of step %s came back from peer node %d", rank, step, peer)
        return decision

    def answer(self, nonce: str) -> Decision | None:
        decision = self._decision()
        if decision is not None and decision.nonces.get(self.rank) == nonce:
            return decision
        return None

    def agree(
        self,
        local_steps: Iterable[int],
        *,
        timeout: float,
        should_stop: Callable[[], bool] | None = None,
        epochs: Mapping[int, int] | None = None,
        from_peers: Mapping[int, int] | None = None,
    ) -> Decision:
        """Post this node's request and wait for the decision (node 0 makes it)."""
        nonce = self.post(local_steps, epochs=epochs, from_peers=from_peers)
        started = time.monotonic()
        deadline = started + timeout
        said = started
        while True:
            if self.rank == 0:
                self.try_decide()
            decision = self.answer(nonce)
            if decision is not None:
                return decision
            if time.monotonic() - said >= self.say_every:
                said = time.monotonic()
                self._say_waiting(said - started, timeout)
            if time.monotonic() > deadline or (should_stop and should_stop()):
                missing = self.missing_requests() if self.rank == 0 else []
                raise AgreementTimeout(
                    f"no restore agreement after {timeout:.0f} s through {self.durable.url}: "
                    + (
                        f"nodes {missing} have not asked to restore"
                        if missing
                        else "node 0 has not answered (is its daemon or trainer running?)"
                    )
                )
            time.sleep(self.poll_seconds)

    say_every = 10.0
    """While a restore agreement waits, a log line this often says for what."""

    def _say_waiting(self, waited: float, timeout: float) -> None:
        """Node 0 names the nodes that have not asked yet (one listing, no reads); the others
        say they wait for node 0's answer."""
        if self.rank == 0:
            names = self.durable.store.list_names(RESTORE_COORD_DIR)
            missing = [r for r in range(self.nodes) if restore_request_name(r) not in names]
            what = f"nodes {_ranges(missing)} have not asked yet" if missing else "deciding"
        else:
            what = "waiting for node 0's answer"
        log.info(
            "Restore agreement: %.0f s of %.0f s; %s (%d nodes)", waited, timeout, what, self.nodes
        )

    def _requests(self, *, all_or_none: bool = True) -> dict[int, dict]:
        """Every node's current request: one listing, then the files read in parallel (at a
        thousand nodes that is a thousand small GETs, so only once all of them are there)."""
        names = self.durable.store.list_names(RESTORE_COORD_DIR)
        ranks = [r for r in range(self.nodes) if restore_request_name(r) in names]
        if all_or_none and len(ranks) < self.nodes:
            return {r: {} for r in ranks}
        texts = self.durable.store.read_texts(
            [f"{RESTORE_COORD_DIR}/{restore_request_name(r)}" for r in ranks],
            workers=self.durable.concurrency,
        )
        out = {}
        for rank, text in zip(ranks, texts, strict=True):
            try:
                out[rank] = json.loads(text) if text else {}
            except ValueError:
                out[rank] = {}  # being written
        return out

    def missing_requests(self) -> list[int]:
        """Nodes whose newest request node 0 has already answered (or that never asked)."""
        previous = self._decision()
        answered = set(previous.nonces.values()) if previous else set()
        requests = self._requests(all_or_none=False)
        return [
            r
            for r in range(self.nodes)
            if r not in requests or requests[r].get("nonce") in (answered | {None})
        ]


def _int_map(raw: object) -> dict[int, int]:
    """A request's ``{"step": number}`` mapping; anything malformed counts as absent."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        try:
            out[int(k)] = int(v)
        except (TypeError, ValueError):
            continue
    return out


def _ranges(ranks: list[int]) -> str:
    """``0-3, 7, 9-12``: a thousand ranks in a line a user can read."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
