"""The settings in force: the config, the node's topology, the planner's rules and the durable
tier opened for them. One value, replaced whole (by the loop thread only) when orbax's
multi-tier client hands over its backup interval and topology (``replicator.yaml``); every other
part of the daemon reads it and keeps no copy."""

from __future__ import annotations

from dataclasses import dataclass

from tiered import DurableTier, TieredConfig
from tiered.sidecar import Rules, Topology, open_durable, rules_for


@dataclass(frozen=True)
class Setup:
    cfg: TieredConfig
    topology: Topology
    rules: Rules
    durable: DurableTier


class Settings:
    """What is in force now. Reading ``now`` once gives a consistent set; the properties are
    for the one setting a caller needs."""

    def __init__(self, cfg: TieredConfig) -> None:
        topology = cfg.topology
        self._now = Setup(
            cfg=cfg,
            topology=topology,
            rules=rules_for(cfg, topology=topology),
            durable=open_durable(cfg, topology=topology),
        )

    @property
    def now(self) -> Setup:
        return self._now

    @property
    def cfg(self) -> TieredConfig:
        return self._now.cfg

    @property
    def topology(self) -> Topology:
        return self._now.topology

    @property
    def rules(self) -> Rules:
        return self._now.rules

    @property
    def durable(self) -> DurableTier:
        return self._now.durable

    def accept(
        self, *, steps: int | None, minutes: float | None, topology: Topology | None
    ) -> None:
        """Orbax's client set the durable period (and maybe the topology): the rules follow,
        and the durable tier is opened again for a new topology. Jobs running keep the tier
        they were given; the ones submitted from now on get the new one."""
        old = self._now
        cfg = old.cfg.with_durable_period(steps=steps, minutes=minutes)
        topology = topology or old.topology
        durable = old.durable if topology == old.topology else open_durable(cfg, topology=topology)
        self._now = Setup(cfg, topology, rules_for(cfg, topology=topology), durable)
