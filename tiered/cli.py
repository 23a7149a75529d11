"""The ``tiered`` command. Every subcommand takes ``--config``; the work is done elsewhere.

User errors (a bad config, an unreachable bucket, a step that does not exist) print one line,
``tiered: error: ...``, and exit with status 2. Checksum failures exit with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tiered.config import TieredConfig, load_config
from tiered.errors import ChecksumMismatch, TieredError
from tiered.lock import DaemonLock
from tiered.ops import apply_deletes, fetch_step, human_bytes, open_tiers, promote_step, snapshot
from tiered.policy import plan, rules_for
from tiered.status import collect_status, is_settled, render_table
from tiered.storage import LocalTier

log = logging.getLogger("tiered")


def _progress_bar(label: str) -> Any:
    """A one-line progress bar on a terminal; None (no output) otherwise."""
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / 1e6 / max(time.monotonic() - started, 1e-6)
        sys.stderr.write(
            f"\r{label} [{bar:<30}] {frac:6.1%} {human_bytes(done)}/{human_bytes(total)} "
            f"{rate:.0f} MB/s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cmd_status(cfg: TieredConfig, args: argparse.Namespace) -> int:
    status = collect_status(cfg, ask_daemon=not args.no_daemon)
    if args.wait_settled is not None:
        deadline = time.monotonic() + args.wait_settled
        while not is_settled(status) and time.monotonic() < deadline:
            time.sleep(1.0)
            status = collect_status(cfg, ask_daemon=not args.no_daemon)
    print(status.to_json() if args.json else render_table(status))
    if args.wait_settled is not None and not is_settled(status):
        print(
            f"tiered: still busy after {args.wait_settled:.0f} s (an upload, or a preemption or "
            "final checkpoint not yet durable)",
            file=sys.stderr,
        )
        return 1
    return 0


@contextlib.contextmanager
def _sole_writer(local: LocalTier, what: str) -> Iterator[None]:
    """Hold the daemon's lock while ``what`` writes the tiers: a running daemon makes this
    refuse, and a daemon started meanwhile is refused until it is done."""
    lock = DaemonLock(local.tiered_dir, what=f"tiered {what}")
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
        promote_step(local, durable, args.step, progress=_progress_bar(f"promote {args.step}"))
    print(f"step {args.step} committed at {durable.step_url(args.step)}")
    return 0


def cmd_restore(cfg: TieredConfig, args: argparse.Namespace) -> int:
    local, durable = open_tiers(cfg)
    steps = durable.committed_steps()
    if not steps:
        raise TieredError(f"no committed step on {durable.url} that tiered can verify")
    step = args.step if args.step is not None else max(steps)
    if step not in steps:
        raise TieredError(f"step {step} is not committed on {durable.url} (have {steps})")
    with _sole_writer(local, "restore"):
        path = fetch_step(local, durable, step, progress=_progress_bar(f"restore {step}"))
    print(f"step {step} is in {path}, verified")
    return 0


def cmd_verify(cfg: TieredConfig, args: argparse.Namespace) -> int:
    local, durable = open_tiers(cfg)
    manifest = durable.read_manifest(args.step)
    if args.tier == "durable":
        durable.verify_step(args.step, manifest)
        where = durable.step_url(args.step)
    else:
        from tiered.manifest import verify_local

        verify_local(local.step_dir(args.step), manifest)
        where = str(local.step_dir(args.step))
    print(f"{where}: {len(manifest.files)} files, {human_bytes(manifest.total_bytes)}, all match")
    return 0


def cmd_prune(cfg: TieredConfig, args: argparse.Namespace) -> int:
    local, durable = open_tiers(cfg)
    holder = DaemonLock(local.tiered_dir).holder()
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


def cmd_daemon(cfg: TieredConfig, args: argparse.Namespace) -> int:
    from daemon.service import run_daemon

    return run_daemon(cfg, log_format=args.log_format or cfg.tiered.log_format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiered", description="Two-tier checkpointing for JAX training."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log DEBUG detail")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="the YAML config file")
        return p

    p = add("status", "show both tiers, each step's state, and the daemon's health")
    p.add_argument("--json", action="store_true", help="print the JSON form (docs/status.md)")
    p.add_argument("--no-daemon", action="store_true", help="read the tiers, do not ask the daemon")
    p.add_argument(
        "--wait-settled",
        type=float,
        metavar="SECONDS",
        default=None,
        help="first wait (up to SECONDS) until no upload is running and every preemption or "
        "final checkpoint is durable; exit 1 if that does not happen (for preStop hooks)",
    )
    p.set_defaults(func=cmd_status)
    p = add("promote", "upload, verify and commit one local step to the durable tier now")
    p.add_argument("step", type=int)
    p.set_defaults(func=cmd_promote)
    p = add("restore", "download a durable step into the local tier, verified")
    p.add_argument("--step", type=int, default=None, help="default: the newest durable step")
    p.set_defaults(func=cmd_restore)
    p = add("verify", "check a step's files against its manifest")
    p.add_argument("step", type=int)
    p.add_argument("--tier", choices=("local", "durable"), default="durable")
    p.set_defaults(func=cmd_verify)
    p = add("prune", "apply the retention policy to both tiers")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    p.set_defaults(func=cmd_prune)
    p = add("daemon", "run the sidecar: watch, promote, verify, commit, prune, report")
    p.add_argument("--log-format", choices=("text", "json"), default=None)
    p.set_defaults(func=cmd_daemon)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "daemon":
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(message)s",
            stream=sys.stderr,
        )
    try:
        cfg = load_config(args.config)
        rc: int = args.func(cfg, args)
        return rc
    except ChecksumMismatch as err:
        print(f"tiered: verification failed: {err}", file=sys.stderr)
        return 3
    except TieredError as err:
        print(f"tiered: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"tiered: error: not found: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiered: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
