"""``tiered advise``: Young/Daly periods, from this run's measurements or from figures given on
the command line (before a run exists, none is needed: ``--step-seconds``, ``--save-seconds``,
``--upload-seconds``, ``--mtbf``).

Every percentage printed is a share of the run's wall time, so it lies between 0 and 100 %: the
first-order waste ``C / T + T / 2M`` (seconds lost per useful second) is ``x``, and of the wall
time ``x / (1 + x)`` is lost. An interval longer than the MTBF is outside what that model
describes, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from typing import Any

from tiered.config import TieredConfig
from tiered.errors import TieredError
from tiered.layout import TRAINER_STATS
from tiered.risk import Advice, Interruptions, advise, forecast_goodput
from tiered.status_client import collect_status
from tiered.storage import LocalTier
from tiered.units import human_duration

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``6h``, ``7d`` in seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise TieredError(f"expected a positive duration such as 6h, 30m or 90s, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and not (value > 0 and value < float("inf")):
        raise TieredError(f"{name} must be a positive number of seconds, got {value}")
    return value


def cmd_advise(cfg: TieredConfig | None, args: argparse.Namespace) -> int:
    """Young/Daly periods from what was measured on this run, or from the figures given."""
    if (args.mtbf is None) == (args.interruptions_per_day is None):
        raise TieredError("give the failure rate: --mtbf 6h, or --interruptions-per-day 4")
    if args.interruptions_per_day is not None and not args.interruptions_per_day > 0:
        raise TieredError(
            f"--interruptions-per-day must be positive, got {args.interruptions_per_day}"
        )
    mtbf = parse_duration(args.mtbf) if args.mtbf else 86400.0 / args.interruptions_per_day
    node_mtbf = parse_duration(args.node_mtbf) if args.node_mtbf else mtbf
    given_step = _positive("--step-seconds", args.step_seconds)
    _positive("--save-seconds", args.save_seconds)
    _positive("--upload-seconds", args.upload_seconds)
    local_period = args.local_period or (cfg.local_checkpoint_period if cfg else 1000)
    durable_period = args.durable_period or (cfg.durable_period if cfg else 5 * local_period)
    if durable_period % local_period:
        raise TieredError(
            f"--durable-period ({durable_period}) must be a multiple of the local period "
            f"({local_period})"
        )
    blocking: list[float] = []
    promo: dict = {}
    per_step = given_step
    if cfg is not None:
        status = collect_status(cfg)
        per_step = given_step or status.at_risk.get("step_seconds")
        stats = LocalTier(cfg.local_dir).tiered_dir / TRAINER_STATS
        try:
            blocking = json.loads(stats.read_text())["save_blocking_seconds"]
        except (OSError, ValueError, KeyError, TypeError):
            blocking = []
        promo = status.daemon.get("last_promotion") or {}
    if per_step is None:
        raise TieredError(
            "no step time: give --step-seconds, or run first (it comes from two committed "
            "local steps' commit times)"
            if cfg is not None
            else "without --config, give the figures: --step-seconds, --save-seconds and/or "
            "--upload-seconds (and --local-period, --durable-period; default 1000 and 5 x)"
        )
    save_cost = args.save_seconds or (statistics.median(blocking) if blocking else None)
    upload_cost = args.upload_seconds or promo.get("seconds")
    lines = [
        f"measured  {per_step:.3f} s per step"
        + (" (given)" if given_step else " (between local saves)"),
        f"          a local save blocks the loop {save_cost:.3f} s"
        + (f" (median of {len(blocking)})" if blocking and not args.save_seconds else " (given)")
        if save_cost
        else "          a local save's blocking time: not measured (tiered.CheckpointManager "
        "records it; give --save-seconds)",
        f"          an upload takes {upload_cost:.1f} s"
        + (" (given)" if args.upload_seconds else " (the daemon's last)")
        if upload_cost
        else "          an upload's time: not measured yet (the daemon reports it; give "
        "--upload-seconds)",
        f"failures  an interruption every {human_duration(mtbf)}; "
        f"a lost node every {human_duration(node_mtbf)}",
        "",
    ]
    local_advice = None
    if save_cost:
        local_advice = advise(
            cost_seconds=save_cost,
            mtbf_seconds=mtbf,
            step_seconds=per_step,
            current_steps=local_period,
        )
        lines += _advice_lines(
            "local_checkpoint_period", local_period, local_advice, per_step, mtbf
        )
    if upload_cost:
        unit = local_advice.period_steps if local_advice else local_period
        durable_advice = advise(
            cost_seconds=upload_cost,
            mtbf_seconds=node_mtbf,
            step_seconds=per_step,
            current_steps=durable_period,
            multiple_of=unit,
        )
        lines += _advice_lines(
            "checkpoint_period", durable_period, durable_advice, per_step, node_mtbf
        )
        if durable_advice.interval_seconds < upload_cost:
            lines.append("          (an upload takes longer than that: uploads would queue)")
        if local_advice is not None:
            lines += _goodput_lines(
                args,
                per_step=per_step,
                save=save_cost or 0.0,
                upload=upload_cost,
                mtbf=mtbf,
                node_mtbf=node_mtbf,
                now=(local_period, durable_period),
                advised=(local_advice.period_steps, durable_advice.period_steps),
            )
    if not save_cost and not upload_cost:
        raise TieredError(
            "nothing to advise on: give --save-seconds (a local save's blocking time) and/or "
            "--upload-seconds (one durable upload)"
        )
    lines += [
        "",
        "Young/Daly: an interval of sqrt(2 x cost x MTBF) minimises the time lost to checkpoints "
        "plus the time redone after an interruption (docs/status.md).",
    ]
    print("\n".join(lines))
    return 0


def goodput_of(
    periods: tuple[int, int],
    *,
    per_step: float,
    save: float,
    upload: float,
    mtbf: float,
    node_mtbf: float,
    restart: float,
) -> float:
    """The goodput of a day of training at these (local, durable) periods, to first order
    (``tiered.risk.forecast_goodput``): every interruption taken as a crash (a preemption
    loses less), a lost node restored by a download as long as an upload."""
    day = 86400.0
    return forecast_goodput(
        steps=max(1, round(day / per_step)),
        step_seconds=per_step,
        local_period=periods[0],
        durable_period=periods[1],
        save_seconds=save,
        preemption_save_seconds=save,
        restore_seconds=save,
        restart_seconds=restart,
        durable_lag_seconds=upload,
        interruptions=Interruptions(crashes=day / mtbf, node_losses=day / node_mtbf),
        node_restore_seconds=upload,
    ).goodput


def _goodput_lines(args: argparse.Namespace, **figures: Any) -> list[str]:
    now, advised = figures.pop("now"), figures.pop("advised")
    restart = args.restart_seconds or 0.0
    g_now, g_advised = (goodput_of(p, restart=restart, **figures) for p in (now, advised))
    lines = [
        "goodput",
        f"  now      {g_now * 100:.2f}%; advised {g_advised * 100:.2f}% (a day of training, each "
        f"interruption a crash, {restart:g} s per restart: --restart-seconds)",
    ]
    if g_advised < g_now:
        lines.append(
            "          (an upload does not stop training: the durable period's advice weighs its "
            "time and egress, and for goodput alone a shorter one, down to the upload time, "
            "is better)"
        )
    return lines


def _advice_lines(
    key: str, current: int, advice: Advice, per_step: float, mtbf: float
) -> list[str]:
    def line(label: str, steps: int, waste: float, mtbf_steps: float) -> str:
        text = (
            f"  {label:<8} {steps:>8} steps: {share_lost(waste) * 100:.2f}% of the run lost; on "
            f"average {steps / 2:.0f} steps ({steps / 2 * per_step:.0f} s) redone per interruption"
        )
        if steps > mtbf_steps:
            text += " (longer than the time between interruptions: most intervals never finish)"
        return text

    mtbf_steps = mtbf / per_step
    return [
        key,
        line("now", current, advice.current_overhead, mtbf_steps),
        line("advised", advice.period_steps, advice.overhead, mtbf_steps),
    ]


def share_lost(waste: float) -> float:
    """The share of wall time lost, from the first-order waste per useful second: below 1."""
    return waste / (1.0 + waste)
