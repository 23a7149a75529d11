"""Table-driven tests of the pure planner: a snapshot in, actions and verdicts out.

Each row is one case of docs/reliability.md or of the planner issue. ``L`` and ``D`` build a
local and a durable step; by default a durable step is a verified copy of the local step with
the same number (same identity), and ``other=True`` makes it another checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tiered.policy import (
    Abandon,
    AnyOf,
    Commit,
    Delete,
    Displace,
    EveryNSteps,
    Fingerprint,
    ForgetPart,
    LatestN,
    Plan,
    Rules,
    Skip,
    Snapshot,
    Upload,
    agree_step,
    plan,
    restore_options,
)
from tiered.types import DurableStep, LocalStep, Topology

RULES = Rules(durable_period=50, local_max_to_keep=2)


def L(
    step: int, reason: str = "periodic", *, t: float | None = None, identity: str | None = "same"
) -> LocalStep:
    return LocalStep(
        step=step,
        committed=True,
        reason=reason,  # type: ignore[arg-type]
        commit_time=float(step) if t is None else t,
        identity=f"id{step}" if identity == "same" else identity,
    )


def D(
    step: int,
    *,
    other: bool = False,
    foreign: bool = False,
    partial: bool = False,
    t: float | None = None,
) -> DurableStep:
    if partial:
        return DurableStep(step=step, committed=False)
    if foreign:
        return DurableStep(step=step, committed=True, problem="no manifest", tiered=False)
    return DurableStep(
        step=step,
        committed=True,
        identity=f"other{step}" if other else f"id{step}",
        commit_time=float(step) if t is None else t,
    )


def snap(local: Any = (), durable: Any = (), **kw: Any) -> Snapshot:
    return Snapshot(
        now=1000.0, local=tuple(local), durable=durable if durable is None else tuple(durable), **kw
    )


def steps_of(p: Plan, kind: type, tier: str | None = None) -> list[int]:
    return [
        a.step
        for a in p.actions
        if isinstance(a, kind) and (tier is None or getattr(a, "tier", None) == tier)
    ]


# -- what is promoted, in what order --------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "durable", "kw", "uploads"),
    [
        pytest.param([L(10), L(20), L(30), L(40), L(50)], [], {}, [50], id="period multiple"),
        pytest.param([L(50), L(100), L(110)], [], {}, [100, 50], id="backlog newest first"),
        pytest.param([L(40), L(45, "preemption")], [], {}, [45], id="preemption off period"),
        pytest.param([L(60), L(61, "final")], [], {}, [61], id="final off period"),
        pytest.param([L(50), L(60)], [D(50)], {}, [], id="a verified copy exists"),
        pytest.param([L(0), L(10)], [], {}, [], id="step 0 is the initial state"),
        pytest.param([L(0, "preemption")], [], {}, [0], id="a preempted step 0"),
        pytest.param(
            [L(50), L(100), L(105, "preemption")], [], {}, [105, 100, 50], id="precious first"
        ),
        pytest.param(
            [L(50), L(100), L(150)],
            [],
            {"busy": frozenset({50}), "failed": {100: "crc32c mismatch"}},
            [150],
            id="busy and failed are not planned again",
        ),
        pytest.param(
            [L(40, "unknown"), L(47, "unknown")],
            [],
            {"run_ended": True},
            [47],
            id="the newest step of a run that ended",
        ),
        pytest.param(
            [L(40, "unknown"), L(47, "unknown")], [], {}, [], id="a running run owes no off-step"
        ),
        pytest.param([L(50)], [], {"retry_at": {50: 1010.0}}, [], id="waiting for the retry time"),
        pytest.param([L(50)], [], {"retry_at": {50: 990.0}}, [50], id="retry time passed"),
        pytest.param([L(50)], None, {}, [], id="durable tier unknown: no upload"),
    ],
)
def test_uploads(local: Any, durable: Any, kw: dict, uploads: list[int]) -> None:
    assert steps_of(plan(snap(local, durable, **kw), RULES), Upload) == uploads


def test_a_run_that_ended_owes_its_newest_step_as_final() -> None:
    p = plan(snap([L(40, "unknown"), L(47, "unknown")], [], run_ended=True), RULES)
    assert p.uploads == [Upload(47, "final")]
    assert p.verdicts[47].reason == "final"
    assert 47 in p.pinned and 47 in p.owed


def test_time_based_promotion_counts_from_the_step_durable_before_it() -> None:
    rules = replace(RULES, durable_period=10_000, backup_interval_seconds=300.0)
    local = [L(10, t=0.0), L(20, t=100.0), L(30, t=400.0), L(40, t=500.0), L(60, t=800.0)]
    p = plan(snap(local, [D(10, t=0.0)]), rules)
    assert sorted(steps_of(p, Upload)) == [30, 60]
    # Order-independent: once 60 is durable, 30 is still owed (measured from 10, before it).
    p = plan(snap(local, [D(10, t=0.0), D(60, t=800.0)]), rules)
    assert steps_of(p, Upload) == [30]


# -- identity by content ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("durable", "displaced", "verdict"),
    [
        pytest.param(D(50, foreign=True), [50], "conflict", id="a marker and no manifest"),
        pytest.param(D(50, other=True), [50], "conflict", id="another run's step 50"),
        pytest.param(D(50), [], "committed", id="the same content"),
    ],
)
def test_a_durable_step_counts_only_when_it_is_a_copy(
    durable: DurableStep, displaced: list[int], verdict: str
) -> None:
    p = plan(snap([L(40), L(50), L(60), L(70)], [durable]), RULES)
    assert steps_of(p, Displace) == displaced
    assert p.verdicts[50].state == verdict
    if displaced:
        assert 50 in p.pinned and 50 not in steps_of(p, Delete, "local")
        assert steps_of(p, Upload) == []  # first moved aside, then uploaded
        assert "durable" not in p.verdicts[50].tiers
    else:
        assert 50 in steps_of(p, Delete, "local")  # a copy exists: local retention may go


def test_once_moved_aside_the_new_step_is_uploaded() -> None:
    assert steps_of(plan(snap([L(50)], []), RULES), Upload) == [50]


def test_an_unknown_local_identity_is_checksummed_before_anything() -> None:
    p = plan(snap([L(50, identity=None), L(60), L(70)], [D(50)]), RULES)
    assert steps_of(p, Fingerprint) == [50]
    assert steps_of(p, Upload) == [] and steps_of(p, Displace) == []
    assert 50 in p.pinned and 50 not in steps_of(p, Delete, "local")


def test_only_node_0_moves_a_step_aside() -> None:
    rules = replace(RULES, topology=Topology(rank=1, nodes=2))
    p = plan(snap([L(50)], [D(50, other=True)]), rules)
    assert steps_of(p, Displace) == [] and p.verdicts[50].state == "conflict"
    assert "node 0" in p.verdicts[50].why


def test_foreign_steps_are_never_deleted_nor_restored_from() -> None:
    rules = replace(RULES, max_num_checkpoints_to_keep=1)
    durable = [D(10, foreign=True), D(50), D(100), D(150)]
    p = plan(snap([], durable), rules)
    assert steps_of(p, Delete, "durable") == [50, 100]
    assert p.verdicts[10].state == "foreign"
    assert [o.step for o in p.restore] == [150, 100, 50]
    assert restore_options([], [D(10, foreign=True)]) == []


# -- never upload what retention would delete ---------------------------------------------------


@pytest.mark.parametrize(
    ("local", "durable", "rules", "kw", "uploads", "skipped"),
    [
        pytest.param(
            [L(50)],
            [D(100), D(150)],
            {"max_num_checkpoints_to_keep": 2},
            {},
            [],
            [50],
            id="superseded by committed steps",
        ),
        pytest.param(
            [L(100)],
            [D(150), D(200)],
            {"max_num_checkpoints_to_keep": 1, "keep_period": 100},
            {},
            [100],
            [],
            id="keep_period keeps it forever",
        ),
        pytest.param(
            [L(50)],
            [D(100)],
            {},
            {},
            [50],
            [],
            id="keep all: nothing superseded",
        ),
        pytest.param(
            [L(50)],
            [],
            {},
            {"pruned": {50: "id50"}},
            [],
            [50],
            id="the same content was pruned before",
        ),
        pytest.param(
            [L(50, identity="new")],
            [],
            {},
            {"pruned": {50: "id50"}},
            [50],
            [],
            id="other content of a pruned number",
        ),
        pytest.param(
            [L(50), L(100), L(150), L(160)],
            [],
            {"backlog": "newest"},
            {},
            [150],
            [50, 100],
            id="backlog newest",
        ),
    ],
)
def test_never_upload_what_retention_would_delete(
    local: Any, durable: Any, rules: dict, kw: dict, uploads: list[int], skipped: list[int]
) -> None:
    p = plan(snap(local, durable, **kw), replace(RULES, **rules))
    assert steps_of(p, Upload) == uploads
    assert sorted(steps_of(p, Skip)) == skipped
    for step in skipped:
        assert p.verdicts[step].state == "skipped" and step not in p.pinned


def test_an_outage_backlog_uploads_nothing_that_is_pruned_at_once() -> None:
    """Newest first: each upload is kept; what retention would drop is never sent."""
    rules = replace(RULES, max_num_checkpoints_to_keep=2)
    local = [L(100), L(150), L(200)]
    durable = [D(50)]
    sent: list[int] = []
    for _ in range(5):
        p = plan(snap(local, durable), rules)
        if not p.uploads:
            break
        step = p.uploads[0].step
        sent.append(step)
        durable = [d for d in durable if d.step not in steps_of(p, Delete, "durable")]
        durable.append(D(step))
        durable = [
            d
            for d in durable
            if d.step not in steps_of(plan(snap(local, durable), rules), Delete, "durable")
        ]
    assert sent == [200, 150]
    assert sorted(d.step for d in durable) == [150, 200]


# -- retention ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "durable", "kw", "deleted"),
    [
        pytest.param(
            [L(s) for s in (10, 20, 30, 40, 50, 60, 70)], [], {}, [10, 20, 30, 40], id="due pinned"
        ),
        pytest.param(
            [L(10), L(20), L(50), L(60), L(70)], [D(50)], {}, [10, 20, 50], id="copy may go"
        ),
        pytest.param(
            [L(10), L(20), L(30), L(40)],
            [],
            {"busy": frozenset({10}), "staged": frozenset({20})},
            [],
            id="busy and staged pinned",
        ),
        pytest.param(
            [L(10), L(20), L(30), L(40)], [], {"failed": {20: "x"}}, [10], id="failed kept"
        ),
        pytest.param(
            [L(s) for s in (10, 20, 30, 40, 50, 60, 70)],
            [],
            {"disk_pressure": True},
            [10, 20, 30, 40, 60],
            id="disk pressure: newest plus pins",
        ),
        pytest.param(
            [L(10), L(20), L(50), L(60), L(70)],
            None,
            {},
            [10, 20],
            id="durable unknown: owed steps stay, copies too",
        ),
        pytest.param(
            [L(40), L(50), L(60), L(70)],
            [D(50, other=True)],
            {},
            [40],
            id="other content is no copy",
        ),
    ],
)
def test_local_retention(local: Any, durable: Any, kw: dict, deleted: list[int]) -> None:
    p = plan(snap(local, durable, **kw), RULES)
    assert steps_of(p, Delete, "local") == deleted
    for step in deleted:
        assert step not in p.pinned


@pytest.mark.parametrize(
    ("durable", "rules", "deleted"),
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
def test_durable_retention(durable: list[int], rules: dict, deleted: list[int]) -> None:
    p = plan(snap([], [D(s) for s in durable]), replace(RULES, **rules))
    assert steps_of(p, Delete, "durable") == deleted


def test_durable_retention_needs_a_listing_and_node_0() -> None:
    rules = replace(RULES, max_num_checkpoints_to_keep=1)
    assert steps_of(plan(snap([], None), rules), Delete, "durable") == []
    other_node = replace(rules, topology=Topology(rank=1, nodes=2))
    assert steps_of(plan(snap([], [D(50), D(100)]), other_node), Delete, "durable") == []


def test_partial_uploads_are_deleted_only_when_nothing_can_finish_them() -> None:
    durable = [D(50, partial=True), D(100, partial=True), D(150), D(200, partial=True)]
    p = plan(snap([L(100)], durable), RULES)
    # 50: no source, older than the newest durable step; 100: resumable; 200: newer, maybe live
    assert steps_of(p, Delete, "durable") == [50]
    assert steps_of(p, Upload) == [100]
    assert p.verdicts[200].state == "partial"


# -- several nodes ------------------------------------------------------------------------------


def test_parts_wait_for_node_0_then_are_forgotten() -> None:
    multi = replace(RULES, topology=Topology(rank=0, nodes=2))
    p = plan(snap([L(50), L(100)], [D(50, partial=True)], parts={50: 1}, epoch=1), multi)
    assert p.of(Commit) == [Commit(50, 1)]
    assert p.verdicts[50].state == "committing" and 50 in p.pinned
    assert steps_of(p, Upload) == [100]

    other = replace(RULES, topology=Topology(rank=1, nodes=2))
    p = plan(snap([L(50)], [], parts={50: 1}, epoch=1), other)
    assert p.of(Commit) == [] and p.verdicts[50].state == "committing"

    p = plan(snap([L(50)], [D(50)], parts={50: 1}, epoch=1), multi)
    assert p.of(ForgetPart) == [ForgetPart(50, "committed")]


def test_a_stale_part_is_forgotten_and_uploaded_again() -> None:
    multi = replace(RULES, topology=Topology(rank=0, nodes=2))
    p = plan(snap([L(50)], [], parts={50: 1}, epoch=2), multi)
    assert steps_of(p, ForgetPart) == [50] and p.verdicts[50].state == "due"
    assert plan(snap([L(50)], []), multi).uploads == [Upload(50, "periodic")]


def test_a_part_overtaken_by_a_newer_durable_step_is_abandoned() -> None:
    multi = replace(RULES, topology=Topology(rank=0, nodes=2))
    p = plan(snap([L(50), L(100)], [D(100)], parts={50: 1}, epoch=1), multi)
    assert steps_of(p, Abandon) == [50]
    p = plan(snap([L(50), L(100)], [D(100)], abandoned=frozenset({50})), multi)
    assert steps_of(p, Upload) == [] and p.verdicts[50].state == "abandoned"


# -- the one restore choice ---------------------------------------------------------------------


def test_restore_takes_the_newest_step_on_either_tier_local_first() -> None:
    options = restore_options([L(40), L(50)], [D(50, other=True), D(100), D(150, foreign=True)])
    assert [(o.step, o.source) for o in options] == [(100, "durable"), (50, "local"), (40, "local")]
    assert plan(snap([L(40)], [D(100)]), RULES).restore[0].step == 100


def test_agree_step_takes_the_newest_step_every_node_holds() -> None:
    assert agree_step({0: [10, 20, 30], 1: [10, 20], 2: [20, 30]}, []) == 20
    assert agree_step({0: [10, 20, 30], 1: [], 2: [20, 30]}, [10, 25]) == 25
    assert agree_step({0: [], 1: [5]}, []) is None


# -- the rules themselves -----------------------------------------------------------------------


def test_rules_compose_and_validate() -> None:
    steps = [10, 20, 30, 40, 50]
    assert AnyOf((LatestN(1), EveryNSteps(20))).keep(steps) == [False, True, False, True, True]
    with pytest.raises(ValueError):
        EveryNSteps(0)
    with pytest.raises(ValueError):
        Rules(durable_period=0, local_max_to_keep=1)
    with pytest.raises(ValueError):
        Topology(rank=2, nodes=2)


def test_a_step_whose_job_just_failed_reads_failed_not_uploading() -> None:
    """A lane posts its outcome a moment before it goes idle; a status taken in between sees
    the step both failed and busy. Failed is final: the step is never worked on again."""
    p = plan(snap([L(50, identity=None)], [], failed={50: "crc32c mismatch"}, busy={50}), RULES)
    assert p.verdicts[50].state == "failed" and p.verdicts[50].why == "crc32c mismatch"
    assert not p.actions


def test_every_step_gets_a_verdict_with_a_reason_in_words() -> None:
    local = [L(10), L(40, identity=None), L(50), L(60), L(100)]
    durable = [D(5, foreign=True), D(50), D(70, partial=True), D(100, other=True)]
    p = plan(snap(local, durable, failed={60: "crc32c mismatch"}), RULES)
    assert set(p.verdicts) == {5, 10, 40, 50, 60, 70, 100}
    assert all(v.why for v in p.verdicts.values())
    assert {s: v.state for s, v in p.verdicts.items()} == {
        5: "foreign",
        10: "local",
        40: "local",
        50: "committed",
        60: "failed",
        70: "partial",
        100: "conflict",
    }


def test_with_no_lock_to_tell_an_idle_run_owes_its_newest_step() -> None:
    """MaxText takes no lock: a run that stopped saving for a while has ended, so its last
    (reason-less) step is owed as final; a trainer holding its lock has not."""
    local = tuple(L(s, "unknown", t=t) for s, t in ((20, 300.0), (30, 400.0), (40, 500.0)))

    def uploads(now: float, floor: float, **kw: Any) -> list[Upload]:
        rules = replace(RULES, final_after_idle_seconds=floor, local_period=10)
        return plan(Snapshot(now=now, local=local, durable=(), **kw), rules).uploads

    assert uploads(1000.0, floor=600.0) == []  # 500 s idle, below the floor
    assert uploads(1000.0, floor=400.0) == [Upload(40, "final")]
    assert uploads(1000.0, floor=400.0, trainer_running=True) == []
    # The floor is small, but the run saves every 100 s: three intervals must pass first.
    assert uploads(750.0, floor=1.0) == []
    assert uploads(850.0, floor=1.0) == [Upload(40, "final")]


@pytest.mark.parametrize(
    ("local", "kw", "uploads"),
    [
        pytest.param([20, 30, 37], {}, [Upload(37, "preemption")], id="saved as it stopped"),
        pytest.param(
            [20, 30, 37], {"trainer_running": True}, [Upload(37, "preemption")], id="trainer up"
        ),
        pytest.param([20, 30, 37], {"last_step": 37}, [Upload(37, "final")], id="the last step"),
        pytest.param([20, 37, 40], {}, [], id="an older off-period step: not the stop"),
        pytest.param([20, 30, 40], {}, [], id="on the local period: periodic"),
        pytest.param([20, 30, 37], {"local_period": None}, [], id="no local period to tell"),
    ],
)
def test_a_reasonless_step_off_the_local_period_is_promoted_at_once(
    local: list[int], kw: dict, uploads: list[Upload]
) -> None:
    """MaxText records no reasons: its newest step off the local period is the one it saved as
    it stopped (enable_autocheckpoint's preemption step, or the last step of the run), owed at
    once, whether or not the trainer is still there."""
    running = {"trainer_running": kw.pop("trainer_running")} if "trainer_running" in kw else {}
    rules = replace(RULES, **{"local_period": 10, **kw})
    steps = [L(s, "unknown") for s in local]
    assert plan(snap(steps, [], **running), rules).uploads == uploads


def test_reasonless_steps_on_the_local_period_show_as_periodic() -> None:
    rules = replace(RULES, local_period=10)
    p = plan(snap([L(20, "unknown"), L(33, "unknown"), L(40, "unknown")], []), rules)
    assert p.verdicts[20].reason == "periodic" and p.verdicts[33].reason == "unknown"
    assert p.verdicts[40].reason == "periodic"


def test_a_trainer_long_past_its_next_save_is_taken_as_stopped_not_as_racing_on() -> None:
    # No trainer lock to ask (MaxText takes none): the newest save is an hour old at 1 s a
    # step with a local period of 10. A running trainer would have saved again long ago.
    from tiered.risk import at_risk
    from tiered.types import LocalStep

    local = [
        LocalStep(step=s, committed=True, reason="periodic", commit_time=float(s), size=1)
        for s in (10, 20, 30)
    ]
    risk = at_risk(local, None, now=3630.0, saves_on_signal=True, local_period=10)
    assert risk["crash"].steps == 0
    near = at_risk(local, None, now=45.0, saves_on_signal=True, local_period=10)
    assert near["crash"].steps == 15  # still within two periods: the estimate stands


@pytest.mark.parametrize(
    ("listed", "waited", "ready"),
    [
        (True, 0.0, True),  # the durable tier is listed: choose now
        (False, 0.0, False),  # just started: the listing may hold a newer step
        (False, 59.9, False),
        (False, 60.0, True),  # the store does not answer: go on from what is local
    ],
)
def test_when_the_restore_step_is_chosen(listed: bool, waited: float, ready: bool) -> None:
    from tiered.policy import restore_choice_ready

    assert restore_choice_ready(durable_listed=listed, waited_seconds=waited) is ready


@pytest.mark.parametrize(
    ("steps", "agreed", "again"),
    [
        ([10, 20, 30], 20, [30]),
        ([30, 10, 20, 30], None, [10, 20, 30]),  # a fresh start: every step is saved again
        ([10, 20], 20, []),
        ([], 5, []),
    ],
)
def test_the_steps_a_run_saves_again(steps: list[int], agreed: int | None, again: list[int]):
    from tiered.policy import newer_than

    assert newer_than(steps, agreed) == again


@pytest.mark.parametrize(
    ("step", "local", "saved_here", "restored", "what"),
    [
        (40, {10, 20}, set(), 20, "save"),  # nothing of that number
        (20, {10, 20}, {20}, -1, "done"),  # this run saved it
        (20, {10, 20}, set(), 20, "done"),  # the step it restored from
        (10, {10, 20}, set(), 20, "done"),  # passed on the way (the trainer resaves it)
        (30, {10, 20, 30}, set(), 20, "rolled_back"),  # another trajectory's step 30
        (10, {10, 20}, set(), -1, "rolled_back"),  # started afresh over an old run
    ],
)
def test_what_a_save_meets_on_the_local_tier(
    step: int, local: set[int], saved_here: set[int], restored: int, what: str
) -> None:
    from tiered.policy import save_over

    assert save_over(step, local=local, saved_here=saved_here, restored=restored) == what


def test_set_aside_steps_kept_are_the_policys(tmp_path) -> None:
    """The number of local steps kept in .tiered/displaced is the planner's DISPLACED_KEEP."""
    from tiered import LocalTier
    from tiered.policy import DISPLACED_KEEP
    from tiered.tiers import set_aside_newer

    from helpers import example_state, orbax_save

    local = LocalTier(tmp_path / "local")
    local.ensure()
    for round_ in range(DISPLACED_KEEP + 2):
        orbax_save(local.root, 10 + round_, example_state())
        set_aside_newer(local, None, why="test")
    assert len(local.displaced()) == DISPLACED_KEEP


@pytest.mark.parametrize(
    ("mode", "several", "allowed"),
    [("store", False, True), ("verify_first", False, False), ("store", True, False)],
)
def test_when_a_durable_step_may_be_read_in_place(mode: str, several: bool, allowed: bool):
    from tiered.policy import may_read_in_place

    assert may_read_in_place(durable_restore=mode, several_nodes=several) is allowed


@pytest.mark.parametrize(
    ("step", "signalled", "final", "force", "on_completion", "reason"),
    [
        (1000, False, False, False, True, "periodic"),
        (1001, False, False, False, True, None),  # off the local period: nothing
        (1001, False, False, True, True, "periodic"),  # forced
        (1001, True, False, False, True, "preemption"),  # a signal: whatever the step
        (1001, True, True, False, True, "preemption"),
        (1999, False, True, False, True, "final"),
        (1999, False, True, False, False, None),  # save_checkpoint_on_completion: false
    ],
)
def test_when_the_training_api_saves(
    step: int, signalled: bool, final: bool, force: bool, on_completion: bool, reason: str | None
) -> None:
    from tiered.policy import save_reason

    got = save_reason(
        step,
        local_period=1000,
        signalled=signalled,
        final=final,
        force=force,
        save_on_completion=on_completion,
    )
    assert got == reason
