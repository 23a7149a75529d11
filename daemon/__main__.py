"""``python -m daemon --config FILE``: the same as ``tiered daemon --config FILE``, for images
that run the sidecar by module name."""

from __future__ import annotations

import argparse
import sys

from daemon.main import run_daemon
from tiered import TieredError, load_config
from tiered.sidecar import split_overrides


def main(argv: list[str]) -> int:
    words, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m daemon", description=__doc__)
    p.add_argument(
        "--config", help="tiered's YAML (only its tiered: section with --maxtext-config)"
    )
    p.add_argument("--maxtext-config", help="MaxText's own YAML, read as MaxText reads it")
    p.add_argument("--log-format", choices=("text", "json"), default=None)
    args = p.parse_args(words)
    try:
        cfg = load_config(args.config, maxtext=args.maxtext_config, overrides=overrides)
    except TieredError as err:
        print(f"tiered: error: {err}", file=sys.stderr)
        return 2
    return run_daemon(cfg, log_format=args.log_format or cfg.tiered.log_format)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
