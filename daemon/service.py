"""The service loop: lock, watch, plan, promote, prune, report, drain.

All state that matters is derived from the two tiers, so a daemon killed with -9 and restarted
simply rescans and carries on: partial remote uploads are completed (files already there with the
right checksum are skipped) and never taken for checkpoints, because the commit marker goes last.
What lives only in memory is what the status reports: the upload in progress, recent prunes,
errors, and steps that failed permanently in this run.

Loop: wait for a watch event or the rescan timer; answer orbax's protocol files; scan the local
tier (cheap) and use the cached durable inventory (refreshed on the timer and after each of our
writes); plan with ``tiered.policy``; hand the next promotion to the promoter; apply deletions.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any

from daemon.http import StatusServer
from daemon.metrics import Metrics
from daemon.mtc import MtcProtocol
from daemon.promoter import Promoter
from daemon.watcher import Watcher
from tiered import (
    Plan,
    StepFacts,
    StepInfo,
    StorageError,
    TieredConfig,
    TieredError,
    TransferResult,
    apply_deletes,
    build_status,
    commit_parts,
    context_for,
    open_tiers,
    plan,
)
from tiered.coord import Rendezvous
from tiered.layout import STATUS_NAME, is_tmp_name
from tiered.lock import DaemonLock
from tiered.policy import PRECIOUS_REASONS, merge_inventories

log = logging.getLogger("daemon")


class Daemon:
    def __init__(self, cfg: TieredConfig) -> None:
        self.cfg = cfg
        self.local, self.durable = open_tiers(cfg)
        self.metrics = Metrics()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.lock = DaemonLock(self.local.tiered_dir)
        self.promoter = Promoter(
            self.local,
            self.durable,
            retry_initial=cfg.tiered.retry_initial_seconds,
            retry_max=cfg.tiered.retry_max_seconds,
            attempts=cfg.tiered.retry_attempts,
            on_done=self._promotion_done,
        )
        self.mtc: MtcProtocol | None = None
        if cfg.speaks_mtc:
            init = (
                (
                    cfg.tiered.process_id
                    if cfg.tiered.process_id is not None
                    else cfg.tiered.node_rank,
                    cfg.tiered.coordinator_address,
                )
                if cfg.tiered.write_jax_init_info and cfg.tiered.coordinator_address
                else None
            )
            self.mtc = MtcProtocol(
                self.local,
                self.durable,
                local_period=cfg.local_checkpoint_period,
                jax_init_info=init,
                configured_nodes=cfg.tiered.num_nodes,
                agreement_timeout=cfg.tiered.restore_agreement_timeout_seconds,
            )
        self._state_lock = threading.RLock()
        self._durable_facts: list[StepFacts] = []
        self._durable_refreshed = 0.0
        self._last_prune = 0.0
        self._prune_requested = False
        self._failed: dict[int, str] = {}
        self._cooldown: dict[int, float] = {}
        self._skipped: list[int] = []
        self._pruned: deque[dict[str, Any]] = deque(maxlen=20)
        self._last_error: str | None = None
        self._last_error_time: float | None = None
        self._failing_since: float | None = None
        self._last_promotion: dict[str, Any] | None = None
        self._disk_pressure = False
        # Multi-node: steps whose part this node uploaded, by the epoch it carries; what node 0
        # still waits for; steps given up on; and the current restore epoch.
        self._parts: dict[int, int] = {}
        self._missing: dict[int, list[int]] = {}
        self._abandoned: set[int] = set()
        self._epoch = 0
        self._started = time.time()
        self.server: StatusServer | None = None
        self.watcher: Watcher | None = None

    # -- state shared with the HTTP thread --

    def _record_error(self, kind: str, message: str) -> None:
        with self._state_lock:
            self._last_error = message
            self._last_error_time = time.time()
            if self._failing_since is None:
                self._failing_since = self._last_error_time
        self.metrics.errors.labels(kind=kind).inc()

    def health(self) -> tuple[bool, str]:
        with self._state_lock:
            since = self._failing_since
        if since is not None:
            failing = time.time() - since
            if failing > self.cfg.tiered.unhealthy_after_seconds:
                return False, f"promotion failing for {failing:.0f}s: {self._last_error}"
            return True, "degraded"
        return True, "ok"

    def live_state(self) -> dict[str, Any]:
        healthy, health = self.health()
        current = self.promoter.current
        with self._state_lock:
            return {
                "running": True,
                "pid": os.getpid(),
                "health": health if healthy else "unhealthy",
                "started_at": self._started,
                "current_upload": (
                    {
                        "step": current.step,
                        "elapsed_seconds": round(time.time() - current.started, 1),
                        "bytes_done": current.bytes_done,
                        "bytes_total": current.bytes_total,
                        "attempt": current.attempt,
                    }
                    if current
                    else None
                ),
                "skipped": list(self._skipped),
                "failed": {str(k): v for k, v in self._failed.items()},
                "last_error": self._last_error,
                "last_error_time": self._last_error_time,
                "last_promotion": self._last_promotion,
                "throughput_mb_s": (self._last_promotion or {}).get("mb_per_s"),
                "recently_pruned": list(self._pruned),
                "disk_pressure": self._disk_pressure,
                "mtc_job": self.mtc.active.job_name if self.mtc and self.mtc.active else None,
                "node": (
                    {
                        "rank": self.durable.node_rank,
                        "nodes": self.durable.num_nodes,
                        "epoch": self._epoch,
                        "committing": {
                            str(step): {"missing": self._missing.get(step)}
                            for step in sorted(self._parts)
                        },
                        "abandoned": sorted(self._abandoned),
                    }
                    if self.durable.multi_node
                    else None
                ),
            }

    def status_json(self) -> str:
        with self._state_lock:
            durable = list(self._durable_facts)
        status = build_status(
            self.cfg,
            local=self.local.scan(with_size=True),
            durable=durable,
            live=self.live_state(),
            now=time.time(),
        )
        return status.to_json()

    # -- inventories --

    def refresh_durable(self) -> None:
        try:
            facts = self.durable.scan()
        except StorageError as err:
            self._record_error("list", str(err))
            log.warning("Cannot list the durable tier: %s", err)
            return
        if self.durable.multi_node:
            try:
                self._epoch = Rendezvous(self.durable).current_epoch()
            except (StorageError, TieredError) as err:
                self._record_error("list", str(err))
                log.warning("Cannot read the restore epoch: %s", err)
        with self._state_lock:
            self._durable_facts = facts
            self._durable_refreshed = time.monotonic()
        newest = max((f.commit_time or 0 for f in facts if f.committed), default=0)
        if newest:
            self.metrics.last_success.labels(tier="durable").set(newest)

    def rows(self) -> list[StepInfo]:
        local = self.local.scan()
        newest_local = max((f.commit_time or 0 for f in local if f.committed), default=0)
        if newest_local:
            self.metrics.last_success.labels(tier="local").set(newest_local)
        with self._state_lock:
            durable = list(self._durable_facts)
        return merge_inventories(local, durable)

    # -- the cycle --

    def cycle(self, *, force_rescan: bool = False) -> Plan:
        now_mono = time.monotonic()
        if force_rescan or now_mono - self._durable_refreshed >= self.cfg.tiered.rescan_seconds:
            self.refresh_durable()
        if self.mtc is not None:
            self._mtc_cycle()
        rows = self.rows()
        if self.durable.multi_node:
            rows = self._parts_cycle(rows)
        pressure = self._check_disk()
        with self._state_lock:
            failed = frozenset(self._failed)
        cooling = frozenset(s for s, t in self._cooldown.items() if t > time.monotonic())
        staged: frozenset[int] = frozenset()
        if self.mtc is not None and self.mtc.pending_restore is not None:
            choice = self.mtc.choose_restore(rows)
            staged = frozenset({choice[0]}) if choice else frozenset()
        ctx = context_for(
            self.cfg,
            now=time.time(),
            disk_pressure=pressure,
            # A part waiting for node 0's commit is neither uploaded again nor pruned.
            in_flight=self.promoter.in_flight() | frozenset(self._parts),
            staged=staged,
            failed=failed | cooling,
            abandoned=frozenset(self._abandoned),
        )
        decided = plan(rows, ctx)
        self._fingerprint(decided)
        with self._state_lock:
            self._skipped = list(decided.skipped)
        self.metrics.backlog.set(len(decided.promote) + len(ctx.in_flight))
        self.metrics.skipped.set(len(decided.skipped))
        self.metrics.failed.set(len(failed))
        if decided.promote and not self.promoter.busy and not self.stopping.is_set():
            nxt = decided.promote[0]
            if self.promoter.submit(nxt.step):
                log.info(
                    "Promoting step %d (%s)%s",
                    nxt.step,
                    nxt.reason,
                    f", {len(decided.promote) - 1} more due" if len(decided.promote) > 1 else "",
                )
        prune_due = now_mono - self._last_prune >= self.cfg.tiered.prune_interval_seconds
        if decided.delete and (prune_due or pressure or self._prune_requested):
            self._prune(decided)
        self._write_status_file()
        return decided

    def _parts_cycle(self, rows: list[StepInfo]) -> list[StepInfo]:
        """Multi-node bookkeeping: node 0 commits steps whose parts are all in; every node
        forgets parts that are committed or stale, and gives up on steps that can never commit.
        Returns the rows again when a commit changed them."""
        durable = {r.step for r in rows if r.durable}
        local = {r.step for r in rows if r.local}
        newest_durable = max(durable, default=-1)
        self._abandoned &= local  # forget what is pruned
        committed_now = False
        for step, epoch in sorted(self._parts.items()):
            if step in durable or step not in local or epoch != self._epoch:
                # Committed; or gone; or uploaded before a restart: upload it again if still due.
                self._parts.pop(step)
                self._missing.pop(step, None)
                continue
            if self.durable.node_rank == 0:
                try:
                    missing = commit_parts(self.local, self.durable, step, epoch=epoch)
                except (TieredError, OSError) as err:
                    self._record_error("commit", f"step {step}: {err}")
                    log.warning("Cannot commit step %d: %s", step, err)
                    continue
                if not missing:
                    self._parts.pop(step)
                    self._missing.pop(step, None)
                    committed_now = True
                    continue
                if missing != self._missing.get(step):
                    log.info("Step %d: waiting for the parts of nodes %s", step, missing)
                self._missing[step] = missing
            if step < newest_durable:
                log.warning(
                    "Giving up on step %d: it was never committed (%s), and the newer step %d "
                    "is durable",
                    step,
                    f"nodes {self._missing[step]} never uploaded their part"
                    if step in self._missing
                    else "node 0 never committed it",
                    newest_durable,
                )
                self._parts.pop(step)
                self._missing.pop(step, None)
                self._abandoned.add(step)
        if committed_now:
            self.refresh_durable()
            self._prune_requested = True
            return self.rows()
        return rows

    def _fingerprint(self, decided: Plan) -> None:
        """Checksum newly due steps now, soon after the trainer wrote them, not at upload time."""
        for promote in decided.promote:
            try:
                self.local.manifest(promote.step)
            except (TieredError, OSError) as err:
                # The promoter meets the same problem and reports it as the step's failure.
                log.debug("Cannot fingerprint step %d yet: %s", promote.step, err)

    def _prune(self, decided: Plan) -> None:
        self._last_prune = time.monotonic()
        self._prune_requested = False
        # Never delete what started uploading since the plan was made.
        busy = self.promoter.in_flight()
        deletes = [d for d in decided.delete if not (d.tier == "local" and d.step in busy)]
        if self.durable.node_rank != 0:
            # One writer prunes the durable tier: node 0, the committer.
            deletes = [d for d in deletes if d.tier == "local"]
        try:
            done = apply_deletes(deletes, self.local, self.durable)
        except (StorageError, OSError) as err:
            self._record_error("prune", str(err))
            log.warning("Pruning stopped: %s", err)
            return
        finally:
            if any(d.tier == "durable" for d in deletes):
                self.refresh_durable()
        for d in done:
            self.metrics.pruned.labels(tier=d.tier).inc()
            with self._state_lock:
                self._pruned.append({"tier": d.tier, "step": d.step, "time": time.time()})

    def _check_disk(self) -> bool:
        floor = self.cfg.tiered.min_free_local_fraction
        try:
            free = self.local.free_fraction()
        except OSError:
            return False
        pressure = free < floor
        if pressure != self._disk_pressure:
            if pressure:
                log.warning(
                    "Local disk pressure: %.1f%% free, below the %.1f%% floor; keeping only the "
                    "newest and pinned local steps",
                    free * 100,
                    floor * 100,
                )
            else:
                log.info("Local disk pressure over: %.1f%% free", free * 100)
        self._disk_pressure = pressure
        self.metrics.disk_pressure.set(1 if pressure else 0)
        return pressure

    def _mtc_cycle(self) -> None:
        assert self.mtc is not None
        accepted = self.mtc.consume()
        if accepted is not None:
            self.cfg = self.cfg.with_durable_period(
                steps=accepted.backup_interval_steps, minutes=accepted.backup_interval_minutes
            )
            self.refresh_durable()
        if self.mtc.pending_restore is None:
            return
        rows = self.rows()
        choice = self.mtc.choose_restore(rows)
        if choice is not None and choice[0] in self.promoter.in_flight():
            return  # wait: the step's files must not move while they upload
        if self.durable.multi_node and self.promoter.busy:
            return  # the agreed step is not known yet: let the upload finish first
        try:
            self.mtc.expose_restore(rows, should_stop=self.stopping.is_set)
            if self.mtc.last_decision_epoch is not None:
                self._epoch = self.mtc.last_decision_epoch
        except (TieredError, OSError) as err:
            log.error("Restore negotiation failed: %s", err)
            self._record_error("restore", str(err))
            self.mtc.fail(f"restore failed: {err}")
            self.mtc.pending_restore = None

    def _promotion_done(
        self,
        step: int,
        result: TransferResult | None,
        error: BaseException | None,
        permanent: bool,
    ) -> None:
        if result is not None and not result.committed:
            self._parts[step] = result.epoch
            self.wake.set()
        if result is not None:
            self.metrics.promoted.inc()
            self.metrics.bytes_uploaded.inc(result.bytes_moved)
            self.metrics.upload_seconds.observe(result.seconds)
            with self._state_lock:
                self._failing_since = None
                self._last_promotion = {
                    "step": step,
                    "time": time.time(),
                    "seconds": round(result.seconds, 3),
                    "bytes": result.bytes_total,
                    "mb_per_s": round(result.mb_per_s, 1),
                }
                self._failed.pop(step, None)
            self._cooldown.pop(step, None)
            self._prune_requested = True
        else:
            kind = "permanent" if permanent else "transient"
            self._record_error(kind, f"step {step}: {error}")
            if permanent:
                log.error(
                    "Promotion of step %d failed permanently; its local copy is kept: %s",
                    step,
                    error,
                )
                with self._state_lock:
                    self._failed[step] = str(error)
            else:
                log.warning(
                    "Promotion of step %d failed, will retry after %.0f s: %s",
                    step,
                    self.cfg.tiered.retry_max_seconds,
                    error,
                )
                self._cooldown[step] = time.monotonic() + self.cfg.tiered.retry_max_seconds
        self.refresh_durable()
        self.wake.set()

    def _write_status_file(self) -> None:
        path = self.local.tiered_dir / STATUS_NAME
        tmp = path.with_name(STATUS_NAME + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(self.live_state(), indent=1, default=str))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)

    # -- run --

    def start(self) -> None:
        """Lock, check the durable tier, start the watcher and the HTTP server."""
        os.umask(0o022)
        self.local.ensure()
        self.lock.acquire()
        self.local.empty_trash()
        self.durable.check()
        self.watcher = Watcher(self.local.root, self.wake)
        self.watcher.start()
        self.server = StatusServer(
            self.cfg.tiered.status_address,
            {
                "/status": lambda: (200, "application/json", self.status_json().encode()),
                "/metrics": lambda: (200, "text/plain; version=0.0.4", self.metrics.render()),
                "/healthz": self._healthz,
            },
        )
        self.server.start()
        if self.mtc is not None:
            self.mtc.ensure_jax_init_info()
        log.info(
            "tiered daemon %d serving %s -> %s (durable every %d steps), status on http://%s",
            os.getpid(),
            self.local.root,
            self.durable.url,
            self.cfg.durable_period,
            self.server.address,
        )

    def _healthz(self) -> tuple[int, str, bytes]:
        healthy, why = self.health()
        return (200 if healthy else 503), "text/plain", f"{why}\n".encode()

    def run(self) -> int:
        self.start()
        try:
            self.cycle(force_rescan=True)
            tick = min(self.cfg.tiered.rescan_seconds, self.cfg.tiered.prune_interval_seconds, 5.0)
            while not self.stopping.is_set():
                # Node 0 polls for the other nodes' parts every second while a commit waits.
                self.wake.wait(1.0 if self._parts and self.durable.node_rank == 0 else tick)
                self.wake.clear()
                if self.stopping.is_set():
                    break
                try:
                    self.cycle()
                except (TieredError, OSError) as err:
                    self._record_error("cycle", str(err))
                    log.warning("Cycle failed, retrying: %s", err)
            return self.drain()
        finally:
            self.close()

    def drain(self) -> int:
        """Finish in-flight work and promote fresh preemption/final steps, within the grace."""
        grace = self.cfg.tiered.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        settle_until = time.monotonic() + min(3.0, grace / 10)
        log.info("Draining (up to %.0f s): finishing uploads and promoting preemption steps", grace)
        while time.monotonic() < deadline:
            self.promoter.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            if self.promoter.busy:
                continue
            saving = self._save_in_progress()
            rows = self.rows()
            pending = [
                r.step
                for r in rows
                if r.local
                and not r.durable
                and r.reason in PRECIOUS_REASONS
                and r.step not in self._failed
            ]
            if pending and self.durable.multi_node:
                rows = self._parts_cycle(rows)
                durable = {r.step for r in rows if r.durable}
                uploaded = [p for p in pending if p in self._parts]
                pending = [p for p in pending if p not in self._parts and p not in durable]
                if not pending and uploaded and self.durable.node_rank == 0:
                    # Node 0 commits: it waits for the other nodes' parts of these steps.
                    time.sleep(0.5)
                    continue
            if pending:
                step = max(pending)
                log.info("Draining: promoting step %d before exit", step)
                self.promoter.submit(step)
                continue
            if saving or time.monotonic() < settle_until:
                time.sleep(0.2)
                continue
            log.info("Drained: nothing left to promote; exiting")
            return 0
        self.promoter.abort()
        current = self.promoter.current
        rows = self.rows()
        left = [r.step for r in rows if r.local and not r.durable and r.reason in PRECIOUS_REASONS]
        log.error(
            "Shutdown grace of %.0f s ran out. Left undone: %s%s",
            grace,
            f"upload of step {current.step} ({current.bytes_done}/{current.bytes_total} bytes); "
            if current
            else "",
            f"preemption/final steps not durable: {left}" if left else "no other steps",
        )
        return 1

    def _save_in_progress(self, *, quiet_seconds: float = 5.0) -> bool:
        """Whether the trainer is writing a save now: a tmp directory written to recently.

        A tmp directory left by a trainer killed mid-save stays forever; it must not hold the
        drain until the grace period runs out.
        """
        try:
            tmps = [p for p in self.local.root.iterdir() if is_tmp_name(p.name)]
        except OSError:
            return False
        cutoff = time.time() - quiet_seconds
        for tmp in tmps:
            for dirpath, _dirs, files in os.walk(tmp):
                for name in [".", *files]:
                    with contextlib.suppress(OSError):
                        if os.stat(os.path.join(dirpath, name)).st_mtime > cutoff:
                            return True
        return False

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.server is not None:
            self.server.stop()
        self._write_status_file()
        self.lock.release()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(fmt: str, *, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in (
        "urllib3",
        "botocore",
        "aiobotocore",
        "gcsfs",
        "fsspec",
        "watchdog",
        "google",
        "asyncio",
        "s3fs",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def lower_cpu_priority(nice: int) -> int:
    """Run at least at ``nice`` (``tiered.daemon_nice``), so that on a busy host the trainer's
    threads win the CPU and the daemon takes what is left. Returns the nice value now in force.

    Called before the daemon starts any thread: on Linux the nice value is per thread and new
    threads inherit it. It only ever lowers the priority, which needs no privilege; a daemon
    started at a higher nice value keeps it.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:  # e.g. a seccomp profile that forbids it: run anyway, and say so
            log.warning("Could not lower the daemon's CPU priority to nice %d: %s", nice, err)
            return current
        return nice
    return current


def run_daemon(cfg: TieredConfig, *, log_format: str = "text") -> int:
    """The ``tiered daemon`` entry point: run until SIGTERM/SIGINT, then drain."""
    configure_logging(log_format)
    nice = lower_cpu_priority(cfg.tiered.daemon_nice)
    log.info("Running at nice %d (tiered.daemon_nice: %d)", nice, cfg.tiered.daemon_nice)
    daemon = Daemon(cfg)

    def on_signal(signum: int, frame: object) -> None:
        log.info("Received %s", signal.Signals(signum).name)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 <pid>` prints every thread's stack: stuck work is visible without a debugger.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return daemon.run()
    except TieredError as err:
        log.error("%s", err)
        print(f"tiered: error: {err}", file=sys.stderr)
        return 2
