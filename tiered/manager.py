"""``tiered.CheckpointManager``: the training-side API for any JAX loop.

A thin layer on orbax's ``CheckpointManager`` that writes only to the local tier (the daemon
owns the durable tier), saves at once after SIGTERM/SIGINT, and restores the newest checkpoint
across both tiers. This is the only module that imports jax or orbax, and it does so lazily so
that ``import tiered`` stays light for the daemon.

Each save carries its reason (``periodic``, ``preemption`` or ``final``) in orbax's
``custom_metadata``, which the daemon reads from ``_CHECKPOINT_METADATA`` without orbax.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tiered.config import TieredConfig
from tiered.errors import (
    ChecksumMismatch,
    CommitError,
    ConfigError,
    LayoutError,
    NotFound,
    StorageError,
)
from tiered.layout import TRAINER_LOCK_NAME
from tiered.loading import PARTIAL_DIR, Loader, named_step_failed
from tiered.lock import DirectoryLock
from tiered.observe import RESTORE, SAVE_BLOCKING, SaveRecord, record_duration
from tiered.orbax_api import jax_topology, local_manager, plain_metrics, resolve_config
from tiered.policy import RestoreOption, is_periodic, restore_options, save_over, save_reason
from tiered.progress import LogProgress
from tiered.saving import SaveStats, disk_full_is_clear, warn_if_nearly_full
from tiered.storage import DurableTier, LocalTier
from tiered.tiers import PeerSetup, agree_restore, fetch_step, open_durable, set_aside_newer

log = logging.getLogger(__name__)


VERIFIED = (StorageError, ChecksumMismatch, CommitError, LayoutError)
"""What a step that failed verification raises (anything else: it failed to load)."""


@dataclass(frozen=True)
class Restored:
    """What ``restore`` found: the step, the state, and the tier it came from."""

    step: int
    state: Any
    source: str


class CheckpointManager:
    """Save to the local tier, restore from whichever tier has the newest good step: orbax's
    ``CheckpointManager`` surface over both tiers. The README's "In the training loop" shows the
    typical loop (restore, save every step, ``should_stop``, a final save)."""

    def __init__(
        self,
        config: TieredConfig | str | os.PathLike[str],
        *,
        options: Any = None,
        local_dir: str | os.PathLike[str] | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        """``config``: a ``TieredConfig``, a YAML file, or, as orbax takes it, the checkpoint
        directory (then the durable tier), with the node-local directory in ``local_dir`` or
        ``TIERED_LOCAL_CHECKPOINT_DIRECTORY``. ``options``: orbax's
        ``CheckpointManagerOptions`` (``tiered.orbax_api`` says which fields apply)."""
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.config = resolve_config(config, options=options, local_dir=local_dir)
        cfg = self.config
        self.local = LocalTier(cfg.local_dir)
        self.local.ensure()
        self._lock = DirectoryLock(
            self.local.tiered_dir, name=TRAINER_LOCK_NAME, what="tiered.CheckpointManager"
        )
        self._lock.acquire()
        # what a restore in part left when its process died (the lock makes the folder ours)
        shutil.rmtree(self.local.tiered_dir / PARTIAL_DIR, ignore_errors=True)
        self._durable: DurableTier | None = None
        self._restored_step: int | None = None
        """The step this manager restored (-1: started fresh), or None before ``restore``."""
        self._epoch: int | None = None
        """The restore epoch the nodes agreed under (several nodes): every save records it."""
        self._saved_here: set[int] = set()
        self._last_save: tuple[int, float] | None = None  # (step, time) of last save/restore
        self._stats = SaveStats(self.local)
        self._saves = SaveRecord(self.local)
        try:
            self._multi = jax_topology(cfg.tiered)
        except ConfigError:
            self._lock.release()
            raise
        self._mgr = local_manager(
            cfg,
            multi=self._multi,
            on_saved=self._saves.finished if cfg.async_checkpointing else None,
        )
        self._loader = Loader(self, ocp, self._mgr, multi=self._multi)
        self._signal: int | None = None
        self._stop = False
        self._previous_handlers: dict[int, Any] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    # -- signals --

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            # A second Ctrl+C means "now": give the user their KeyboardInterrupt.
            raise KeyboardInterrupt
        self._signal = signum
        log.warning(
            "Received %s: the next save() writes a preemption checkpoint, then should_stop() "
            "is True",
            signal.Signals(signum).name,
        )

    def request_stop(self) -> None:
        """Behave as if SIGTERM arrived (for schedulers that warn through other channels)."""
        self._signal = signal.SIGTERM

    def should_stop(self) -> bool:
        """True once a preemption checkpoint has been written after SIGTERM/SIGINT."""
        return self._stop

    # -- saving --

    @property
    def durable(self) -> DurableTier:
        if self._durable is None:
            self._durable = open_durable(
                self.config, concurrency=self.config.tiered.download_concurrency
            )
        return self._durable

    def save(
        self,
        step: int,
        state: Any = None,
        *,
        args: Any = None,
        metrics: Any = None,
        force: bool = False,
        final: bool = False,
    ) -> bool:
        """Save ``state`` (or orbax's ``args``: ``StandardSave``, ``PyTreeSave``, ``Composite``
        of any registered items) locally when due. Returns whether a save was started.

        Periodic saves are asynchronous. A preemption save (after a signal) or a final save
        waits until the step is committed on disk. ``metrics`` are kept in the step's metadata,
        as orbax keeps them.
        """
        if (state is None) == (args is None):
            raise TypeError("save takes the state, or orbax's args=, not both (and not neither)")
        cfg = self.config
        if not cfg.enable_checkpointing:
            return False
        reason = save_reason(
            step,
            local_period=cfg.local_checkpoint_period,
            signalled=self._signal is not None and not self._stop,
            final=final,
            force=force,
            save_on_completion=cfg.save_checkpoint_on_completion,
        )
        if reason is None:
            return False
        blocking = reason != "periodic"
        restored = self._restored_step if self._restored_step is not None else -1
        meets = save_over(
            step, local=self._mgr.all_steps(), saved_here=self._saved_here, restored=restored
        )
        if meets == "done":
            if blocking:
                self._mgr.wait_until_finished()
                self._stop = self._stop or reason == "preemption"
            return False
        if meets == "rolled_back":  # the local step of this number is another trajectory's
            self._mgr.wait_until_finished()
            set_aside_newer(self.local, step - 1, why="the run saves these step numbers again")
            self._mgr.reload()
        warn_if_nearly_full(self.local, self.config.tiered.local_capacity)
        started, last = time.perf_counter(), self._last_save
        per_step = (started - last[1]) / (step - last[0]) if last and step > last[0] else None
        self._saves.started(step, reason, started)
        with disk_full_is_clear(self.config.local_dir), self._saves.settled_on_error():
            saved = bool(
                self._mgr.save(
                    step,
                    args=args if args is not None else self._ocp.args.PyTreeSave(state),
                    metrics=metrics,
                    force=True,
                    custom_metadata={
                        "tiered": {
                            "reason": reason,
                            "wall_time": time.time(),
                            # the job's shape: a step of another shape is never restored locally
                            "nodes": self.config.tiered.num_nodes,
                        }
                        # the run it belongs to: parts of one save share it (tiered.coord)
                        | ({"epoch": self._epoch} if self._epoch is not None else {})
                        | ({"seconds_per_step": per_step} if per_step else {})
                    }
                    | ({"metrics": plain_metrics(metrics)} if metrics is not None else {}),
                )
            )
            if not saved:
                self._saves.dropped()
            elif not cfg.async_checkpointing:
                self._saves.finished()
            if blocking:
                self._mgr.wait_until_finished()
                self._saves.settled()
        if saved:
            self._saved_here.add(step)
            self._last_save = (step, started)
            record_duration(SAVE_BLOCKING, time.perf_counter() - started)
            if not blocking:
                self._stats.record_blocking(time.perf_counter() - started)
        if reason == "preemption":
            self._stop = True
        return saved

    def wait_until_finished(self) -> None:
        with disk_full_is_clear(self.config.local_dir), self._saves.settled_on_error():
            self._mgr.wait_until_finished()
        self._saves.settled()

    # -- restoring --

    def latest_step(self) -> int | None:
        """The newest committed step on either tier (what ``restore`` would try first)."""
        options = self._options()
        return options[0].step if options else None

    def _options(self) -> list[RestoreOption]:
        """What a restore may use, best first (``tiered.policy.restore_options``)."""
        try:
            durable = self.durable.scan()
        except StorageError as err:
            log.warning(
                "Durable tier %s unreadable, using local steps only: %s", self.durable.url, err
            )
            durable = []
        return restore_options(self.local.scan(), durable, nodes=self.config.tiered.num_nodes)

    def restore(self, target: Any = None, args: Any = None, *, step: int | None = None) -> Any:
        """Restore the newest good checkpoint across both tiers (or exactly ``step``).

        Two forms. tiered's, ``restore(target=None, step=None)``, returns a ``Restored`` (the
        step, the state, the tier it came from), or None when there is no checkpoint anywhere.
        orbax's, ``restore(step, args=...)`` or ``restore(step)``, returns what orbax returns:
        the item, or the ``Composite`` of items; with no step it takes the newest good one, and
        raises ``NotFound`` (a ``FileNotFoundError``, as orbax raises) when there is none.

        A durable-only step is downloaded into the local tier and verified against its manifest
        first. Without an explicit step, a step that fails to verify or load is skipped with a
        warning, and the next older one is tried. A step named explicitly is never swapped for
        another: one that fails raises ``StepUnreadable`` naming it and the cause (orbax's
        form raises what orbax raised).
        """
        orbax_form = args is not None or (isinstance(target, int) and not isinstance(target, bool))
        if not orbax_form:
            return self._restore(target, None, step=step, orbax_form=False)
        if target is not None and step is not None:
            raise TypeError("restore takes the step once: restore(step, args=...)")
        found = self._restore(None, args, step=step if target is None else target, orbax_form=True)
        if found is None:
            raise NotFound(
                f"no checkpoint to restore on either tier ({self.local.root}, {self.durable.url})"
            )
        return found.state

    def _restore(
        self, target: Any, args: Any, *, step: int | None, orbax_form: bool
    ) -> Restored | None:
        self._mgr.wait_until_finished()
        if self._multi and step is None:
            return self._restore_agreed(target, args, orbax_form=orbax_form)
        options = self._options()
        if step is not None:
            options = [o for o in options if o.step == step]
            if not options:
                raise CommitError(f"step {step} is committed on neither tier")
        order = [o.step for o in options]
        self._restored_step = -1
        for option in options:
            s, source = option.step, option.source
            began = time.perf_counter()
            try:
                state = self._loader.load(s, source, target, args, orbax_form=orbax_form)
            except Exception as err:  # orbax raises many types for unreadable data
                if step is not None:
                    named_step_failed(s, source, err, orbax_form=orbax_form)
                checked = isinstance(
                    err, (StorageError, ChecksumMismatch, CommitError, LayoutError)
                )
                log.warning(
                    "Step %d from the %s tier failed %s: %s; falling back to an older step",
                    s,
                    source,
                    "verification" if checked else "to load",
                    err if checked else f"{type(err).__name__}: {err}",
                )
                continue
            record_duration(RESTORE, time.perf_counter() - began, source=source)
            log.info("Restored step %d from the %s tier", s, source)
            self._restored_step, self._last_save = s, (s, time.perf_counter())
            return Restored(step=s, state=state, source=source)
        if order:
            log.warning("No checkpoint could be restored (tried steps %s)", order)
        return None

    def _restore_agreed(self, target: Any, args: Any, *, orbax_form: bool) -> Restored | None:
        """Multi-process restore: every process restores the one step the nodes agree on.

        The agreement goes through the durable tier (``tiered.coord``): the newest step every
        node holds locally, or the newest durable one when that is newer. A node without it
        downloads only its own part. Local steps newer than it are set aside: the other nodes
        lack them, so they are not a checkpoint of this run any more.
        """
        decision = agree_restore(
            self.local,
            self.durable,
            timeout=self.config.tiered.restore_agreement_timeout_seconds,
            peers=PeerSetup(self.config),
        )
        self._mgr.reload()
        self._epoch = decision.epoch
        self._restored_step = decision.step if decision.step is not None else -1
        if decision.step is None:
            log.info("No checkpoint every node can restore: starting fresh")
            return None
        rank = self.config.tiered.node_rank
        source = "local" if rank in decision.holders else "durable"
        began = time.perf_counter()
        state, source = self._loader.load_agreed(
            decision.step, source, target, args, orbax_form=orbax_form
        )
        if source == "local" and rank in decision.from_peers:
            source = "peer"  # this node's own part, back from a peer's copy
        record_duration(RESTORE, time.perf_counter() - began, source=source)
        log.info(
            "Restored step %d from the %s tier (agreed by all %d nodes, epoch %d)",
            decision.step,
            source,
            self.config.tiered.num_nodes,
            decision.epoch,
        )
        return Restored(step=decision.step, state=state, source=source)

    def manager_over(self, directory: Path) -> Any:
        """An orbax manager over ``directory``, read as the local tier is (``Loader``)."""
        return local_manager(self.config, multi=self._multi, directory=directory)

    def fetch(self, step: int, *, progress: Any = None) -> Path:
        """Download a durable step into the local tier, verified, and return its directory."""
        progress = progress or LogProgress(f"restoring step {step}", logger=log)
        return fetch_step(self.local, self.durable, step, progress=progress)

    # -- orbax's queries --

    def all_steps(self) -> list[int]:
        """Every step a restore could use, on either tier, oldest first."""
        return sorted({o.step for o in self._options()})

    def should_save(self, step: int) -> bool:
        """Whether to save ``step``, as orbax answers: never a step at or below the newest one
        this run holds (``_newest_held``); otherwise a periodic step, or a signal arrived."""
        if not self.config.enable_checkpointing:
            return False
        newest = self._newest_held()
        if newest is not None and step <= newest:
            return False
        return self._signal is not None or is_periodic(step, self.config.local_checkpoint_period)

    def _newest_held(self) -> int | None:
        """The newest step of this run: saved by this manager, or restored by it (the local
        steps above a restored one are another trajectory's, which ``save`` writes again);
        before any restore, also the newest local step, as orbax reads its directory."""
        held = set(self._saved_here)
        if self._restored_step is None:
            held.update(self._mgr.all_steps())
        elif self._restored_step >= 0:
            held.add(self._restored_step)
        return max(held, default=None)

    def reached_preemption(self, step: int) -> bool:
        """orbax's name for "a signal arrived": save now, then stop."""
        return self._signal is not None

    def reload(self) -> None:
        self._mgr.reload()

    def item_metadata(self, step: int) -> Any:
        """orbax's metadata of a local step's items (fetch a durable-only step first)."""
        self._mgr.reload()
        if step not in self._mgr.all_steps():
            where = (
                "the durable tier only: fetch(step) it" if step in self.all_steps() else "no tier"
            )
            raise CommitError(f"step {step} is on {where}")
        return self._mgr.item_metadata(step)

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The ``metrics`` saved with a local step (kept in its metadata even without orbax's
        ``best_fn``, which tiered's retention does not use)."""
        self._mgr.reload()
        custom = self._mgr.metadata(step).custom_metadata or {}
        found = custom.get("metrics")
        return dict(found) if isinstance(found, dict) else None

    # -- lifecycle --

    def close(self) -> None:
        self._loader.wait()
        self._mgr.wait_until_finished()
        self._mgr.close()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
