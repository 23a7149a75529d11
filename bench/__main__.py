"""``python -m bench [SCENARIO ...]``: run benchmarks, write bench/results/*.json, and regenerate
docs/benchmarks.md (tables and PNG plots) from every result present.

Scenarios: stall, promote, restore, interference, footprint, physical, scaling, peers,
hashing, scale, goodput, bytes, dedup (default: all).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

from bench import report, scenarios
from bench.common import gcs_emulator, save_result

ALL = [
    "stall",
    "promote",
    "restore",
    "interference",
    "footprint",
    "physical",
    "scaling",
    "peers",
    "hashing",
    "scale",
    "goodput",
    "bytes",
    "dedup",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("scenarios", nargs="*", choices=[*ALL, []], default=[])
    p.add_argument("--size-mb", type=int, default=1024, help="state size (random float32)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--stall-size-mb",
        type=int,
        default=None,
        help="state size for the stall scenario (default: --size-mb)",
    )
    p.add_argument("--steps", type=int, default=60, help="training steps per stall run")
    p.add_argument("--local-period", type=int, default=10)
    p.add_argument("--step-ms", type=float, default=200.0, help="compute per training step")
    p.add_argument(
        "--per-node-mb", type=int, default=128, help="state per process for the scaling scenario"
    )
    p.add_argument(
        "--memory-mb", type=int, default=2048, help="file size for the footprint's memory table"
    )
    p.add_argument(
        "--nodes",
        type=int,
        nargs="+",
        default=None,
        help="simulated node counts for the scale scenario (default: 16 64 256 1024)",
    )
    g = p.add_argument_group("goodput (the user's run, scaled down, through a failure trace)")
    g.add_argument("--goodput-size-mb", type=int, default=128, help="the trainer's state")
    g.add_argument("--goodput-steps", type=int, default=300, help="steps of the whole run")
    g.add_argument("--goodput-step-ms", type=float, default=100.0, help="compute per step")
    g.add_argument(
        "--mtbf-steps", type=float, default=60.0, help="mean steps computed between interruptions"
    )
    g.add_argument("--restart-s", type=float, default=1.0, help="fixed cost of each restart")
    g.add_argument("--seed", type=int, default=0, help="the failure trace's seed")
    p.add_argument("--report-only", action="store_true", help="only regenerate the docs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chosen = args.scenarios or ALL
    if not args.report_only:
        work = scenarios.workdir()
        try:
            with gcs_emulator():
                for name in chosen:
                    print(f"== {name}", flush=True)
                    result = run(name, args, work)
                    # With the state on a GPU, the stall includes the device-to-host copy:
                    # its results get their own file and table.
                    device = result.get("params", {}).get("device", "cpu")
                    path = save_result(name if device == "cpu" else f"{name}-{device}", result)
                    print(f"   wrote {path}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    out = report.write()
    print(f"regenerated {out}")
    return 0


def run(name: str, args: argparse.Namespace, work) -> dict:  # type: ignore[no-untyped-def]
    if name == "stall":
        return scenarios.training_stall(
            size_mb=args.stall_size_mb or args.size_mb,
            reps=args.reps,
            steps=args.steps,
            local_period=args.local_period,
            step_ms=args.step_ms,
            work=work,
        )
    if name == "promote":
        return {
            backend: scenarios.promotion_throughput(
                size_mb=args.size_mb,
                reps=args.reps,
                backend=backend,
                work=work,
                latency=backend == "gs",
            )
            for backend in ("gs", "file")
        }
    if name == "restore":
        return scenarios.fresh_node_restore(size_mb=args.size_mb, reps=args.reps, work=work)
    if name == "interference":
        return scenarios.interference(
            size_mb=args.size_mb, reps=args.reps, step_ms=args.step_ms, work=work
        )
    if name == "footprint":
        return scenarios.footprint(work=work, memory_mb=args.memory_mb)
    if name == "scaling":
        return scenarios.scaling(per_node_mb=args.per_node_mb, reps=min(args.reps, 2), work=work)
    if name == "peers":
        from bench import peers

        return peers.peers(size_mb=args.size_mb, reps=args.reps, step_ms=args.step_ms, work=work)
    if name == "hashing":
        from bench import hashing

        return hashing.hashing(size_mb=args.size_mb, reps=args.reps, work=work)
    if name == "scale":
        from bench import scale

        return scale.scale(work=work, node_counts=tuple(args.nodes or scale.NODE_COUNTS))
    if name == "goodput":
        from bench import goodput

        return goodput.goodput(
            size_mb=args.goodput_size_mb,
            steps=args.goodput_steps,
            local_period=args.local_period,
            step_ms=args.goodput_step_ms,
            mtbf_steps=args.mtbf_steps,
            restart_s=args.restart_s,
            seed=args.seed,
            work=work,
        )
    if name == "bytes":
        from bench import bytes as bytes_bench

        return bytes_bench.bytes_scenario(work=work)
    if name == "dedup":
        from bench import dedup_plan

        return dedup_plan.dedup_plan(work=work)
    if name == "physical":
        from bench import physical

        return physical.physical_limit(size_mb=args.size_mb, reps=args.reps, work=work)
    raise SystemExit(f"unknown scenario {name}")


if __name__ == "__main__":
    sys.exit(main())
