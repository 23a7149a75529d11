"""Multi-node agreement through the durable tier: one restore step for every node.

No extra service: the nodes meet in ``<checkpoint_dir>/.tiered/restore/``.

1. Every node posts ``request-<r>.json``: a fresh nonce and the committed steps it holds locally.
2. Node 0 waits until each of the N nodes has posted a request it has not answered yet, then
   writes ``decision.json``: the step (the newest one every node holds locally, or the newest
   committed durable step when that is newer), which nodes hold it already, the nonces it
   answers, and a new epoch.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tiered.errors import AgreementTimeout, CommitError
from tiered.layout import DECISION_NAME, RESTORE_COORD_DIR, restore_request_name
from tiered.policy import agree_step
from tiered.storage import DurableTier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What node 0 decided for one restore round."""

    epoch: int
    step: int | None
    holders: frozenset[int]
    """Nodes that hold ``step`` locally; every other node downloads its own part."""
    nonces: dict[int, str]

    def to_json(self) -> str:
        return json.dumps(
            {
                "epoch": self.epoch,
                "step": self.step,
                "holders": sorted(self.holders),
                "nonces": {str(r): n for r, n in sorted(self.nonces.items())},
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
        )


class Rendezvous:
    """One node's side of the restore agreement."""

    def __init__(self, durable: DurableTier, *, poll_seconds: float | None = None) -> None:
        self.durable = durable
        self.rank = durable.topology.rank
        self.nodes = durable.topology.nodes
        # Every waiting node reads decision.json once per poll: keep the total near 200 reads
        # a second however many nodes there are.
        self.poll_seconds = (
            poll_seconds if poll_seconds is not None else max(0.25, self.nodes / 200)
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

    def post(self, local_steps: Iterable[int]) -> str:
        nonce = uuid.uuid4().hex
        self.durable.store.write_text(
            f"{RESTORE_COORD_DIR}/{restore_request_name(self.rank)}",
            json.dumps({"nonce": nonce, "local": sorted(set(local_steps)), "time": time.time()}),
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
        step = agree_step(local, [f.step for f in self.durable.scan() if f.own])
        decision = Decision(
            epoch=(previous.epoch if previous else 0) + 1,
            step=step,
            holders=frozenset(r for r, steps in local.items() if step in steps),
            nonces={r: str(req["nonce"]) for r, req in requests.items()},
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
    ) -> Decision:
        """Post this node's request and wait for the decision (node 0 makes it)."""
        nonce = self.post(local_steps)
        deadline = time.monotonic() + timeout
        while True:
            if self.rank == 0:
                self.try_decide()
            decision = self.answer(nonce)
            if decision is not None:
                return decision
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
