"""Table-driven tests of the pure planner: steps in, decisions out."""

from __future__ import annotations

import pytest

from tiered.policy import (
    AnyOf,
    EveryNSteps,
    LatestN,
    PolicyContext,
    StepFacts,
    StepInfo,
    due_steps,
    merge_inventories,
    plan,
)


def ctx(**kw: object) -> PolicyContext:
    base: dict[str, object] = {"now": 1000.0, "durable_period": 50, "local_max_to_keep": 2}
    base.update(kw)
    return PolicyContext(**base)  # type: ignore[arg-type]


def local(*steps: int, reason: str = "periodic", t: float | None = None) -> list[StepInfo]:
    return [
        StepInfo(step=s, reason=reason, local=True, commit_time=t if t else float(s)) for s in steps
    ]


def deletes(p, tier: str) -> list[int]:
    return sorted(d.step for d in p.delete if d.tier == tier)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (local(10, 20, 30, 40, 50), [50]),
        (local(50, 100, 110), [50, 100]),
        ([*local(40), *local(45, reason="preemption")], [45]),
        ([*local(60), *local(61, reason="final")], [61]),
        ([StepInfo(step=50, local=True, durable=True), *local(60)], []),
        (local(0, 10), []),  # step 0 is the initial state: not worth a durable copy
        (local(0, reason="preemption"), [0]),
        ([], []),
    ],
)
def test_due_steps(rows: list[StepInfo], expected: list[int]) -> None:
    assert due_steps(rows, ctx()) == expected


def test_time_based_promotion_counts_from_the_newest_durable_step() -> None:
    rows = [
        StepInfo(step=10, local=True, durable=True, commit_time=0.0),
        StepInfo(step=20, local=True, commit_time=100.0),
        StepInfo(step=30, local=True, commit_time=400.0),
        StepInfo(step=40, local=True, commit_time=500.0),
        StepInfo(step=60, local=True, commit_time=800.0),
    ]
    c = ctx(backup_interval_seconds=300.0, durable_period=10_000)
    assert due_steps(rows, c) == [30, 60]


@pytest.mark.parametrize(
    ("rows", "kw", "local_deleted"),
    [
        # keep the newest 2; 50 is due (not durable yet) so it is pinned
        (local(10, 20, 30, 40, 50, 60, 70), {}, [10, 20, 30, 40]),
        # once 50 is durable it can go
        (
            [*local(10, 20), StepInfo(step=50, local=True, durable=True), *local(60, 70)],
            {},
            [10, 20, 50],
        ),
        # in flight and staged steps are pinned too
        (local(10, 20, 30, 40), {"in_flight": frozenset({10}), "staged": frozenset({20})}, []),
        # failed steps keep their local copy
        (local(10, 20, 30, 40), {"failed": frozenset({20})}, [10]),
        # disk pressure: only the newest plus pins
        (
            [*local(10, 20, 30, 40, 50), *local(60, 70)],
            {"disk_pressure": True},
            [10, 20, 30, 40, 60],
        ),
    ],
)
def test_local_retention(
    rows: list[StepInfo], kw: dict[str, object], local_deleted: list[int]
) -> None:
    p = plan(rows, ctx(**kw))
    assert deletes(p, "local") == local_deleted
    for d in p.delete:
        assert d.step not in p.pinned


@pytest.mark.parametrize(
    ("durable", "kw", "deleted"),
    [
        ([50, 100, 150, 200], {"max_num_checkpoints_to_keep": 2}, [50, 100]),
        ([50, 100, 150, 200], {}, []),
        (
            [50, 100, 150, 200, 250],
            {"max_num_checkpoints_to_keep": 1, "keep_period": 100},
            [50, 150],
        ),
        ([50], {"max_num_checkpoints_to_keep": 1}, []),
    ],
)
def test_durable_retention(durable: list[int], kw: dict[str, object], deleted: list[int]) -> None:
    rows = [StepInfo(step=s, durable=True, commit_time=float(s)) for s in durable]
    assert deletes(plan(rows, ctx(**kw)), "durable") == deleted


def test_partial_upload_is_deleted_only_when_nothing_can_finish_it() -> None:
    rows = [
        StepInfo(step=50, durable_partial=True),  # no local source: garbage
        StepInfo(step=100, durable_partial=True, local=True, commit_time=1.0),  # resumable
        StepInfo(step=150, durable=True, commit_time=2.0),
    ]
    p = plan(rows, ctx())
    assert deletes(p, "durable") == [50]
    assert [x.step for x in p.promote] == [100]


def test_precious_steps_go_first_then_oldest_first() -> None:
    rows = [*local(50, 100), *local(105, reason="preemption")]
    assert [p.step for p in plan(rows, ctx()).promote] == [105, 50, 100]


def test_in_flight_and_failed_are_not_planned_again() -> None:
    rows = local(50, 100, 150)
    p = plan(rows, ctx(in_flight=frozenset({50}), failed=frozenset({100})))
    assert [x.step for x in p.promote] == [150]


def test_backlog_newest_skips_older_due_steps_and_unpins_them() -> None:
    rows = local(50, 100, 150, 160)
    p = plan(rows, ctx(backlog="newest"))
    assert [x.step for x in p.promote] == [150]
    assert list(p.skipped) == [50, 100]
    assert deletes(p, "local") == [50, 100]


def test_rules_compose() -> None:
    steps = [10, 20, 30, 40, 50]
    rule = AnyOf((LatestN(1), EveryNSteps(20)))
    assert rule.keep(steps) == [False, True, False, True, True]
    with pytest.raises(ValueError):
        EveryNSteps(0)
    with pytest.raises(ValueError):
        ctx(durable_period=0)


def test_merge_prefers_local_facts_and_keeps_durable_reason() -> None:
    rows = merge_inventories(
        [
            StepFacts(step=5, committed=True, reason="unknown", commit_time=3.0),
            StepFacts(step=7, committed=False),
        ],
        [
            StepFacts(step=5, committed=True, reason="preemption", commit_time=2.0),
            StepFacts(step=9, committed=False),
        ],
    )
    assert [(r.step, r.local, r.durable, r.durable_partial, r.reason) for r in rows] == [
        (5, True, True, False, "preemption"),
        (9, False, False, True, "unknown"),
    ]
