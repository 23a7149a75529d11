"""The commands that read and write the tiers by hand: ``promote``, ``restore``, ``export``,
``verify``, ``prune``. Each shows its progress (``tiered.progress``), takes the daemon's lock
while it writes (one writer per tier), and restores only what the planner would."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from tiered.config import TieredConfig
from tiered.errors import TieredError
from tiered.lock import DirectoryLock
from tiered.manifest import verify_local
from tiered.policy import plan, restore_options, rules_for
from tiered.progress import shown
from tiered.storage import DurableTier, LocalTier
from tiered.tiers import apply_deletes, export_step, fetch_step, open_tiers, promote_step, snapshot
from tiered.types import DurableStep
from tiered.units import human_bytes

log = logging.getLogger("tiered")


@contextlib.contextmanager
def _sole_writer(local: LocalTier, what: str) -> Iterator[None]:
    """Hold the daemon's lock while ``what`` writes the tiers: a running daemon makes this
    refuse, and a daemon started meanwhile is refused until it is done."""
    lock = DirectoryLock(local.tiered_dir, what=f"tiered {what}")
    holder = lock.holder()
    if holder is not None:
        raise TieredError(
            f"the daemon (pid {holder}) owns {local.root} and does this itself; stop it first "
            f"to {what} by hand"
        )
    local.ensure()
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cmd_promote(cfg: TieredConfig, args: argparse.Namespace) -> int:
    local, durable = open_tiers(cfg)
    if args.step not in local.committed_steps():
        raise TieredError(f"step {args.step} is not a committed step in {local.root}")
    with _sole_writer(local, "promote"):
        durable.check()
        with shown(f"promoting step {args.step}", logger=log) as progress:
            promote_step(local, durable, args.step, progress=progress)
    print(f"step {args.step} committed at {durable.step_url(args.step)}")
    return 0


def _never_restored(step: int, durable: DurableTier, scanned: list[DurableStep]) -> str:
    """Why the planner would never restore durable step ``step``."""
    found = next((d for d in scanned if d.step == step), None)
    if found is None:
        return f"step {step} is not on {durable.url}"
    if not found.committed:
        return f"step {step} on {durable.url} never committed (an interrupted upload)"
    why = found.problem or "its manifest cannot be read"
    return f"step {step} on {durable.url} is not one tiered can verify and restore: {why}"


def cmd_restore(cfg: TieredConfig, args: argparse.Namespace) -> int:
    """The planner's restore choice (``tiered.policy.restore_options``, as the training API and
    orbax's multi-tier client make it), downloaded and verified when only the durable tier has
    it; ``--step N`` restores N, if the planner would."""
    local, durable = open_tiers(cfg)
    scanned = durable.scan()
    options = restore_options(local.scan(), scanned, nodes=cfg.topology.nodes)
    if args.step is None:
        if not options:
            raise TieredError(f"no committed step on {durable.url} that tiered can verify")
        choice = options[0]
    else:
        choice = next((o for o in options if o.step == args.step), None)  # type: ignore[assignment]
        if choice is None:
            restorable = [o.step for o in options]
            raise TieredError(
                f"{_never_restored(args.step, durable, scanned)} (restorable: "
                f"{restorable or 'none'})"
            )
    step = choice.step
    if choice.source == "local":
        print(f"step {step} is on the local tier already: {local.step_dir(step)}; nothing to do")
        return 0
    with _sole_writer(local, "restore"), shown(f"restoring step {step}", logger=log) as progress:
        path = fetch_step(local, durable, step, progress=progress)
    print(f"step {step} is in {path}, verified")
    return 0


def cmd_export(cfg: TieredConfig, args: argparse.Namespace) -> int:
    local, durable = open_tiers(cfg)
    dest = Path(args.dest).expanduser().absolute()
    with shown(f"exporting step {args.step}", logger=log) as progress:
        export_step(local, durable, args.step, dest, item=args.item, progress=progress)
    what = f"item {args.item!r} of step {args.step}" if args.item else f"step {args.step}"
    print(f"{what} is in {dest}, verified: a plain orbax checkpoint")
    return 0


def cmd_verify(cfg: TieredConfig, args: argparse.Namespace) -> int:
    """A step's files against its manifest, on the tier named or wherever the step is (the
    durable tier first). A local step is checked against the durable manifest when the step is
    durable too, else against the manifest kept when the daemon first checksummed it."""
    local, durable = open_tiers(cfg)
    on_durable = args.step in durable.committed_steps()
    on_local = args.step in local.committed_steps()
    if args.tier is None and not (on_durable or on_local):
        raise TieredError(
            f"step {args.step} is not committed on {durable.url} (committed: "
            f"{durable.committed_steps() or 'none'}), nor in {local.root}"
        )
    tier = args.tier or ("durable" if on_durable else "local")
    if tier == "durable" and not on_durable:
        raise TieredError(
            f"step {args.step} is not committed on {durable.url}"
            + (" (it is on the local tier: --tier local)" if on_local else "")
        )
    if tier == "local" and not on_local:
        raise TieredError(f"step {args.step} is not a committed step in {local.root}")
    if tier == "durable":
        manifest = durable.read_manifest(args.step)
        durable.verify_step(args.step, manifest)
        where = durable.step_url(args.step)
    else:
        against = (
            durable.read_manifest(args.step) if on_durable else local.cached_manifest(args.step)
        )
        if against is None:
            built = local.manifest(args.step)
            print(
                f"{local.step_dir(args.step)}: no manifest was kept for this step yet; built one "
                f"now ({len(built.files)} files, {human_bytes(built.total_bytes)}): later "
                "verifications compare against it"
            )
            return 0
        manifest = against
        verify_local(local.step_dir(args.step), manifest)
        where = str(local.step_dir(args.step))
    print(f"{where}: {len(manifest.files)} files, {human_bytes(manifest.total_bytes)}, all match")
    return 0


def cmd_prune(cfg: TieredConfig, args: argparse.Namespace) -> int:
    local, durable = open_tiers(cfg)
    holder = DirectoryLock(local.tiered_dir).holder()
    if holder is not None and not args.dry_run:
        raise TieredError(
            f"the daemon (pid {holder}) owns {local.root} and prunes it; use --dry-run to see "
            "its plan, or stop the daemon first"
        )
    deletes = plan(snapshot(local, durable, now=time.time()), rules_for(cfg)).deletes
    if not deletes:
        print("nothing to prune")
        return 0
    for d in deletes:
        print(f"{'would prune' if args.dry_run else 'pruning'} {d.tier} step {d.step} ({d.why})")
    if not args.dry_run:
        with _sole_writer(local, "prune"):
            apply_deletes(deletes, local, durable)
    return 0
