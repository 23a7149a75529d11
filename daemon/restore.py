"""Orbax's multi-tier restore flow: the client's ``replicator.yaml`` accepted, the restore step
chosen (by the planner's ``restore_options`` on one node, by the agreement across several), the
step staged from the durable tier when this node lacks it, and the answer written. Only the
loop thread calls it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from daemon import jobs
from daemon.mtc import MtcProtocol
from daemon.settings import Settings
from daemon.state import DaemonState
from daemon.workers import Lane, Outcome
from tiered import LocalTier, TieredError
from tiered.sidecar import (
    Decision,
    PeerSetup,
    RestoreOption,
    go_on_from,
    restore_choice_ready,
    restore_options,
)

log = logging.getLogger("daemon")

FRESH = RestoreOption(step=0, source="local")
"""The restore choice "no checkpoint anywhere: start fresh"."""


class RestoreFlow:
    """The service side of orbax's restore: it runs its jobs on the ``transfer`` lane and
    watches the ``local`` lane (a step being checksummed is not moved)."""

    def __init__(
        self,
        mtc: MtcProtocol,
        settings: Settings,
        local: LocalTier,
        *,
        transfer: Lane,
        local_lane: Lane,
        stopping: threading.Event,
        on_accept: Callable[[], None],
    ) -> None:
        self._mtc = mtc
        self._settings = settings
        self._local = local
        self._transfer = transfer
        self._local_lane = local_lane
        self._stopping = stopping
        self._on_accept = on_accept
        self._started = time.monotonic()
        self.choice: RestoreOption | None = None
        """The step chosen for the pending restore, until it is offered."""

    def staged(self) -> frozenset[int]:
        """The step chosen for a restore: never pruned until offered."""
        choice = self.choice
        return frozenset({choice.step}) if choice is not None and choice != FRESH else frozenset()

    def cycle(self, state: DaemonState) -> DaemonState:
        """Read the client's request; choose, stage and offer the restore step."""
        mtc, settings = self._mtc, self._settings
        accepted = mtc.consume()
        if accepted is not None:
            settings.accept(
                steps=accepted.backup_interval_steps,
                minutes=accepted.backup_interval_minutes,
                topology=mtc.topology,
            )
            self.choice = None
            state = replace(state, scan_requested=True)
            # The client writes replicator.yaml after jax.distributed.initialize: its coordinator
            # is up now. Probe in this cycle, not up to 2 s later; a short run can be gone by
            # then, and a run never seen is never known to have ended (no final step).
            self._on_accept()
        if mtc.pending_restore is None or self._transfer.job is not None:
            return state  # nothing asked; or an upload, a staging or an agreement is running
        setup = settings.now
        if self.choice is None:
            if setup.topology.multi:
                self._transfer.submit(
                    jobs.agreement(
                        self._local,
                        setup.durable,
                        timeout=setup.cfg.tiered.restore_agreement_timeout_seconds,
                        stopping=self._stopping,
                        peers=PeerSetup(
                            setup.cfg, explicit=mtc.active.peer_ranks if mtc.active else None
                        ),
                    )
                )
                return state
            if not restore_choice_ready(
                durable_listed=state.durable is not None,
                waited_seconds=time.monotonic() - self._started,
            ):
                return state  # give the first durable listing a chance: it may hold a newer step
            local = self._local.scan()
            options = restore_options(local, state.durable or (), nodes=setup.topology.nodes)
            self.choice = options[0] if options else FRESH
        choice = self.choice
        if choice == FRESH:
            mtc.offer_fresh()
            self.choice = None
        elif choice.source == "local":
            job = self._local_lane.job
            if job is not None and job.step == choice.step:
                return state  # being checksummed: its files must not move now
            mtc.stage_local(self._local, choice.step)
            mtc.offer(choice.step, source="local")
            self.choice = None
        else:
            self._transfer.submit(jobs.stage(self._local, setup.durable, choice.step))
        return state

    def on_stage(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        if outcome.error is not None:
            return self._failed(state, outcome.error)
        self._mtc.offer(outcome.job.step or 0, source="durable")
        self.choice = None
        return state

    def on_agree(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        if outcome.error is not None:
            return self._failed(state, outcome.error)
        decision: Decision = outcome.value
        state = replace(state, epoch=decision.epoch, scan_requested=True)
        go_on_from(self._local, decision.step)
        if decision.step is None:
            self.choice = FRESH
        else:
            holds = self._settings.topology.rank in decision.holders
            self.choice = RestoreOption(decision.step, "local" if holds else "durable")
        return state

    def _failed(self, state: DaemonState, err: BaseException) -> DaemonState:
        if not isinstance(err, TieredError | OSError):
            raise err
        log.error("Restore for the multi-tier client failed: %s", err)
        self._mtc.fail(f"restore failed: {err}")
        self.choice = None
        return state.error("restore", str(err), time.time())
