"""Checkpoint facts where users already look: W&B and TensorBoard, keyed by the training step.

``checkpoint_facts`` turns a ``tiered status`` (from the daemon when it answers, else from
both tiers) into flat scalars; ``WandbLogger`` and ``TensorBoardLogger`` put them beside the
loss through the libraries' own writers (``wandb.Run.log``, tensorboardX's ``SummaryWriter``),
never a hand-written event format. Each ``log(step)`` asks the daemon (one local HTTP request)
or, with no daemon, lists both tiers: call it at saves, not at every step.

Neither library nor jax is imported until a logger is built (extras ``tiered[wandb]`` and
``tiered[tensorboard]``), so the daemon can write TensorBoard files without jax.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from tiered.config import TieredConfig
from tiered.errors import ConfigError
from tiered.layout import TRAINER_STATS
from tiered.report import TierStatus, replicated_step
from tiered.status_client import collect_status
from tiered.storage import LocalTier


class CheckpointManager(Protocol):
    """What a logger needs of ``tiered.CheckpointManager`` (named here without importing it:
    that module loads jax)."""

    @property
    def config(self) -> TieredConfig: ...


PREFIX = "checkpoint/"
KEYS = (
    "newest_local_step",
    "newest_durable_step",
    "newest_peer_step",
    "steps_at_risk_crash",
    "steps_at_risk_node",
    "save_blocking_seconds",
    "durable_lag_seconds",
)


def checkpoint_facts(
    status: TierStatus, *, step: int | None = None, blocking: float | None = None
) -> dict[str, float]:
    """The scalars logged at ``step`` (``checkpoint/<key>``, keys in ``KEYS``); a fact not
    known (no durable step yet, no daemon to report peers) is left out.

    With the training step given, the steps at risk are exact: a crash loses the steps since
    the newest local step, losing the node those since the newest durable step or the newest
    step every peer holds, whichever is newer. Without it they are ``tiered status``'s
    estimates. The durable lag is the training time between the newest local step and the
    newest durable one (0 when the durable tier has the newest step)."""
    local, durable = status.latest.get("local"), status.latest.get("durable")
    peer = replicated_step(status.daemon.get("peers"))
    safe_off_node = max((s for s in (durable, peer) if s is not None), default=None)
    if step is not None:
        crash: float | None = max(0, step - local) if local is not None else step
        node: float | None = max(0, step - safe_off_node) if safe_off_node is not None else step
    else:
        crash = (status.at_risk.get("crash") or {}).get("steps")
        node = (status.at_risk.get("node") or {}).get("steps")
    ages = {s.step: s.age_seconds for s in status.steps}
    lag = None
    if local is not None and durable is not None:
        local_age, durable_age = ages.get(local), ages.get(durable)
        if local_age is not None and durable_age is not None:
            lag = max(0.0, durable_age - local_age)
    values = (local, durable, peer, crash, node, blocking, lag)
    return {PREFIX + k: float(v) for k, v in zip(KEYS, values, strict=True) if v is not None}


def _config(source: CheckpointManager | TieredConfig) -> TieredConfig:
    return source if isinstance(source, TieredConfig) else source.config


def last_blocking_seconds(cfg: TieredConfig) -> float | None:
    """How long the newest periodic save held the loop (what ``tiered.CheckpointManager``
    records in ``.tiered/trainer-stats.json``)."""
    try:
        stats = json.loads((LocalTier(cfg.local_dir).tiered_dir / TRAINER_STATS).read_text())
        return float(stats["save_blocking_seconds"][-1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


class _Logger:
    def __init__(self, source: CheckpointManager | TieredConfig, *, ask_daemon: bool) -> None:
        self.config = _config(source)
        self.ask_daemon = ask_daemon

    def facts(self, step: int | None) -> dict[str, float]:
        status = collect_status(self.config, ask_daemon=self.ask_daemon)
        return checkpoint_facts(status, step=step, blocking=last_blocking_seconds(self.config))

    def log(self, step: int, **scalars: float) -> dict[str, float]:
        """Log the checkpoint facts at ``step``, with the caller's ``scalars`` (the loss)."""
        facts = self.facts(step)
        self.write({**scalars, **facts}, step)
        return facts

    def log_scalars(self, step: int, **scalars: float) -> None:
        """Log only the caller's scalars (between saves: no status is collected)."""
        self.write(scalars, step)

    def write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and close what this logger opened (never the user's W&B run)."""

    def __enter__(self) -> _Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WandbLogger(_Logger):
    """``log(step)`` puts the checkpoint facts in a W&B run (``wandb.run`` unless ``run=``)::

    wandb.init(project="p")
    ckpt_log = tiered.integrations.WandbLogger(mgr)
    ...
    if mgr.save(step, state):
        ckpt_log.log(step, loss=loss)
    """

    def __init__(
        self, source: CheckpointManager | TieredConfig, *, run: Any = None, ask_daemon: bool = True
    ) -> None:
        super().__init__(source, ask_daemon=ask_daemon)
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("W&B logging needs wandb: pip install 'tiered[wandb]'") from err
        self.run: Any = run if run is not None else wandb.run
        if self.run is None:
            raise ConfigError("no W&B run: call wandb.init() first, or pass run=")

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)


class TensorBoardLogger(_Logger):
    """``log(step)`` writes the checkpoint facts as TensorBoard scalars under ``logdir``
    (MaxText's ``tensorboard_dir`` too: they show beside its loss)."""

    def __init__(
        self,
        source: CheckpointManager | TieredConfig,
        logdir: str | os.PathLike[str],
        *,
        ask_daemon: bool = True,
    ) -> None:
        super().__init__(source, ask_daemon=ask_daemon)
        self.writer = summary_writer(logdir)

    def write(self, values: dict[str, float], step: int) -> None:
        write_scalars(self.writer, values, step)

    def close(self) -> None:
        self.writer.close()


def summary_writer(logdir: str | os.PathLike[str]) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "TensorBoard logging needs tensorboardX: pip install 'tiered[tensorboard]'"
        ) from err
    return SummaryWriter(logdir=str(logdir))


def write_scalars(writer: Any, facts: dict[str, float], step: int) -> None:
    for key, value in facts.items():
        writer.add_scalar(key, value, global_step=step)
    writer.flush()
