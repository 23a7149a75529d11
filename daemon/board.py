"""The daemon's TensorBoard scalars (``tiered.tensorboard_dir``): the checkpoint facts of the
status, written through tensorboardX each time a step commits on either tier, keyed by the
newest local step (the newest training step the daemon knows). No jax: the writer is
tensorboardX's own."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tiered.sidecar import checkpoint_facts, last_blocking_seconds, summary_writer, write_scalars

log = logging.getLogger("daemon")


class Board:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.writer = summary_writer(cfg.tiered.tensorboard_dir)
        self._written: tuple[int | None, int | None] | None = None
        log.info("Writing TensorBoard scalars to %s", cfg.tiered.tensorboard_dir)

    def update(self, snap: Any, status: Callable[[], Any]) -> None:
        """Write when the snapshot's newest local or durable step changed since the last write;
        only then is the status built."""
        newest = (
            max((s.step for s in snap.local if s.committed), default=None),
            max((d.step for d in snap.durable or () if d.kept), default=None),
        )
        if newest == self._written or newest[0] is None:
            return
        facts = checkpoint_facts(status(), blocking=last_blocking_seconds(self.cfg))
        write_scalars(self.writer, facts, newest[0])
        self._written = newest

    def close(self) -> None:
        self.writer.close()
