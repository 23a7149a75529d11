"""The ``tiered`` command. Every subcommand takes ``--config``; the work is done elsewhere.

User errors (a bad config, an unreachable bucket, a step that does not exist) print one line,
``tiered: error: ...``, and exit with status 2. Checksum failures exit with status 3.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from tiered import __version__
from tiered.advice import cmd_advise
from tiered.commands import cmd_export, cmd_promote, cmd_prune, cmd_restore, cmd_verify
from tiered.config import TieredConfig
from tiered.config_files import load_config, split_overrides
from tiered.errors import ChecksumMismatch, TieredError
from tiered.logs import configure
from tiered.report import is_settled, render_table
from tiered.status_client import collect_status

log = logging.getLogger("tiered")


def cmd_status(cfg: TieredConfig, args: argparse.Namespace) -> int:
    status = collect_status(cfg, ask_daemon=not args.no_daemon, durable_timeout=args.timeout)
    if args.wait_settled is not None:
        deadline = time.monotonic() + args.wait_settled
        while not is_settled(status) and time.monotonic() < deadline:
            time.sleep(1.0)
            status = collect_status(
                cfg, ask_daemon=not args.no_daemon, durable_timeout=args.timeout
            )
    print(status.to_json() if args.json else render_table(status))
    if args.wait_settled is not None and not is_settled(status):
        print(
            f"tiered: still busy after {args.wait_settled:.0f} s (an upload, or a preemption or "
            "final checkpoint not yet durable)",
            file=sys.stderr,
        )
        return 1
    if status.durable_error is not None:
        return 1  # a script must not read "no durable steps" into a tier it could not read
    return 0


def cmd_jax_env(cfg: TieredConfig, args: argparse.Namespace) -> int:
    from tiered.jaxenv import jax_env, render

    devices: list[int] = []
    if args.local_devices:
        try:
            devices = [int(d) for d in args.local_devices.split(",")]
        except ValueError:
            raise TieredError(
                f"--local-devices {args.local_devices!r}: expected device ids such as 0,1,2,3"
            ) from None
    env = jax_env(
        rank=cfg.tiered.node_rank if args.rank is None else args.rank,
        nodes=cfg.tiered.num_nodes if args.nodes is None else args.nodes,
        coordinator=args.coordinator or cfg.tiered.coordinator_address,
        job=cfg.run_name or str(cfg.local_dir),
        local_devices=devices,
    )
    sys.stdout.write(render(env, fmt=args.format))
    return 0


def cmd_daemon(cfg: TieredConfig, args: argparse.Namespace) -> int:
    from daemon.main import run_daemon

    return run_daemon(
        cfg,
        log_format=args.log_format or cfg.tiered.log_format,
        verbose=args.verbose,
        debug_loggers=tuple(args.debug_logger),
    )


def cmd_run(cfg: TieredConfig, args: argparse.Namespace) -> int:
    from tiered.launcher import launch

    return launch(
        cfg, args.trainer, daemon_args=args.daemon_args, grace=args.grace, verbose=args.verbose
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tiered: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiered", description="Two-tier checkpointing for JAX training.")
    parser.add_argument("--version", action="version", version=f"tiered {__version__}")
    # -v and --debug-logger go before or after the command; SUPPRESS keeps the subcommand's
    # default from overwriting what was given before it.
    common = _Parser(add_help=False)
    for target, default in ((parser, True), (common, False)):
        target.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=False if default else argparse.SUPPRESS,
            help="log DEBUG detail (tiered's own; libraries stay at WARNING)",
        )
        target.add_argument(
            "--debug-logger",
            action="append",
            metavar="NAME",
            default=[] if default else argparse.SUPPRESS,
            help="also log this library at DEBUG (botocore, gcsfs, ...); repeatable",
        )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.add_argument(
            "--config",
            help="tiered's YAML file (MaxText's keys and a tiered: section; only the tiered: "
            "section when --maxtext-config is given)",
        )
        p.add_argument(
            "--maxtext-config",
            metavar="FILE",
            help="MaxText's own YAML, read as MaxText reads it (base_config, then the key=value "
            "overrides after the command)",
        )
        return p

    def overrides(p: argparse.ArgumentParser) -> None:
        """``key=value`` words anywhere on the line are MaxText-style overrides (``main`` takes
        them out before argparse sees the rest); listed here for the help text."""
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="MaxText-style overrides of --maxtext-config (run_name=... and so on)",
        )

    p = add("advise", "recommend both periods from this run's measurements (Young/Daly)")
    p.add_argument("--mtbf", help="mean time between interruptions (crash or preemption): 6h")
    p.add_argument("--interruptions-per-day", type=float, help="or the rate: 4")
    p.add_argument("--node-mtbf", help="mean time between losing a node (default: --mtbf)")
    p.add_argument("--save-seconds", type=float, help="blocking time per local save, if known")
    p.add_argument("--upload-seconds", type=float, help="time per durable upload, if known")
    p.add_argument("--step-seconds", type=float, help="time per training step, if known")
    p.add_argument(
        "--restart-seconds", type=float, help="time a restart costs before training goes on"
    )
    p.add_argument("--local-period", type=int, help="current local period (default: config)")
    p.add_argument("--durable-period", type=int, help="current durable period (default: config)")
    p.set_defaults(func=cmd_advise)
    p = add("status", "show both tiers, each step's state, and the daemon's health")
    p.add_argument("--json", action="store_true", help="print the JSON form (docs/status.md)")
    p.add_argument("--no-daemon", action="store_true", help="read the tiers, do not ask the daemon")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the durable tier's listing before calling it unreachable "
        "(default 5)",
    )
    p.add_argument(
        "--wait-settled",
        type=float,
        metavar="SECONDS",
        default=None,
        help="first wait (up to SECONDS) until no upload is running and every preemption or "
        "final checkpoint is durable; exit 1 if that does not happen (for preStop hooks)",
    )
    overrides(p)
    p.set_defaults(func=cmd_status)
    p = add("promote", "upload, verify and commit one local step to the durable tier now")
    p.add_argument("step", type=int)
    overrides(p)
    p.set_defaults(func=cmd_promote)
    p = add("restore", "download a durable step into the local tier, verified")
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="default: the step a restore would use (the planner's choice)",
    )
    overrides(p)
    p.set_defaults(func=cmd_restore)
    p = add(
        "export",
        "write a standard orbax checkpoint of a step (or of one item: --item state for "
        "MaxText's load_full_state_path) into a new directory, verified",
    )
    p.add_argument("step", type=int)
    p.add_argument("dest", help="a new (or empty) local directory")
    p.add_argument("--item", default=None, help="one item of the step, such as state")
    overrides(p)
    p.set_defaults(func=cmd_export)
    p = add("verify", "check a step's files against its manifest")
    p.add_argument("step", type=int)
    p.add_argument(
        "--tier",
        choices=("local", "durable"),
        default=None,
        help="default: the durable tier when it holds the step, else the local one",
    )
    overrides(p)
    p.set_defaults(func=cmd_verify)
    p = add("prune", "apply the retention policy to both tiers")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    overrides(p)
    p.set_defaults(func=cmd_prune)
    p = add(
        "jax-env",
        "print the environment jax.distributed needs off GKE (MaxText's multi-tier start on "
        'plain VMs, GPU hosts, laptops): eval "$(tiered jax-env ...)" before the trainer',
    )
    p.add_argument("--rank", type=int, default=None, help="default: tiered.node_rank")
    p.add_argument("--nodes", type=int, default=None, help="default: tiered.num_nodes")
    p.add_argument(
        "--coordinator", default=None, help="HOST:PORT; default: tiered.coordinator_address"
    )
    p.add_argument(
        "--local-devices",
        default=None,
        metavar="IDS",
        help="with one process per host of several accelerators: all their ids (0,1,...,7)",
    )
    p.add_argument("--format", choices=("sh", "env"), default="sh")
    overrides(p)
    p.set_defaults(func=cmd_jax_env)
    p = add(
        "run",
        "launch a trainer (tiered run [--config FILE] -- CMD ...): Ctrl+C saves a checkpoint, "
        "and a daemon runs beside it when none serves this config",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="after the first Ctrl+C or SIGTERM, how long the trainer has to save and exit "
        "before it is stopped with SIGKILL (default 120)",
    )
    p.set_defaults(func=cmd_run)
    p = add("daemon", "run the sidecar: watch, promote, verify, commit, prune, report")
    p.add_argument("--log-format", choices=("text", "json"), default=None)
    overrides(p)
    p.set_defaults(func=cmd_daemon)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `tiered run ... -- CMD`: the trainer's command is its own, key=value words included
    cut = argv.index("--") if "--" in argv and "run" in argv[: argv.index("--")] else len(argv)
    trainer = argv[cut + 1 :]
    words, overrides = split_overrides(argv[:cut])
    args = build_parser().parse_args(words)
    args.overrides = overrides
    if args.command == "run":
        from tiered.launcher import configs_for

        args.trainer = trainer
        args.maxtext_config, args.overrides, args.daemon_args = configs_for(
            trainer, config=args.config, maxtext=args.maxtext_config, overrides=overrides
        )
    if args.command != "daemon":
        configure(verbose=args.verbose, debug_loggers=args.debug_logger, text_format="%(message)s")
    try:
        no_config = args.command == "advise" and not (args.config or args.maxtext_config)
        cfg = (
            None  # advise before a run exists: the figures come from the command line
            if no_config
            else load_config(
                args.config, maxtext=args.maxtext_config, overrides=args.overrides or ()
            )
        )
        rc: int = args.func(cfg, args)
        return rc
    except ChecksumMismatch as err:
        print(f"tiered: verification failed: {err}", file=sys.stderr)
        return 3
    except TieredError as err:
        print(f"tiered: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"tiered: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiered: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
