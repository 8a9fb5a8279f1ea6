from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from agentbus.contracts import (
    Budget,
    BudgetExhausted,
    BudgetFigure,
    BudgetKind,
    ModelUsage,
    OnBudget,
    Plan,
    PlanStep,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    TaskApproved,
    TaskPaused,
    TaskResumed,
    TaskStatus,
    TaskSubmitted,
    Usage,
    parse_event,
)
from agentbus.planner import domain
from agentbus.planner.domain import PlanError, parse_plan


def plan(*steps: tuple[str, list[str]]) -> Plan:
    return Plan(steps=[PlanStep(id=i, title=i, instructions="x", depends_on=d) for i, d in steps])


def started(p: Plan, budget: Budget | None = None) -> domain.TaskState:
    event = TaskSubmitted(task_id="tsk_1", goal="goal", budget=budget or Budget())
    state = domain.new_state(event, event.budget)
    state.start(p, Usage())
    return state


def types(state: domain.TaskState) -> list[str]:
    return [e.event_type for e in state.pending_events()]


def test_start_publishes_plan_and_dispatches_only_ready_steps() -> None:
    state = started(plan(("a", []), ("b", []), ("c", ["a", "b"])))
    assert types(state) == ["task.plan_created", "step.ready", "step.ready"]
    ready = [e for e in state.pending_events() if isinstance(e, StepReady)]
    assert {e.step.id for e in ready} == {"a", "b"}  # independent steps go out together


def test_dependent_step_waits_for_all_deps_and_gets_their_outputs() -> None:
    state = started(plan(("a", []), ("b", []), ("c", ["a", "b"])))
    state.outbox.clear()
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="a", output="A!"))
    assert state.outbox == []
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="b", output="B!"))
    (ready,) = state.pending_events()
    assert isinstance(ready, StepReady)
    assert ready.step.id == "c"
    assert ready.inputs == {"a": "A!", "b": "B!"}


def test_all_steps_done_moves_to_finishing_then_complete_emits_answer() -> None:
    state = started(plan(("a", [])))
    usage = Usage.of("m", ModelUsage(prompt_tokens=5, calls=1))
    state.step_completed(
        StepCompleted(
            task_id="tsk_1", step_id="a", output="x", usage=usage, workspace_files=["f.txt"]
        ),
    )
    assert state.phase is TaskStatus.FINISHING
    state.outbox.clear()
    state.complete("the answer", Usage.of("m", ModelUsage(prompt_tokens=1, calls=1)))
    (done,) = state.pending_events()
    assert done.event_type == "task.completed"
    assert done.answer == "the answer"  # type: ignore[attr-defined]
    assert done.artifacts == ["f.txt"]  # type: ignore[attr-defined]
    assert done.usage.total.prompt_tokens == 6  # type: ignore[attr-defined]


def test_repeated_completion_changes_nothing() -> None:
    state = started(plan(("a", []), ("b", ["a"])))
    event = StepCompleted(task_id="tsk_1", step_id="a", output="x")
    state.step_completed(event)
    state.mark_applied(event)
    before = state.model_dump()
    assert state.was_applied(event)
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="a", output="other"))
    assert state.model_dump() == before


def test_failed_step_fails_task_with_reason_when_replanning_is_off() -> None:
    state = started(plan(("a", [])), Budget(max_replans=0))
    state.outbox.clear()
    state.step_failed(StepFailed(task_id="tsk_1", step_id="a", error="disk on fire"))
    (failed,) = state.pending_events()
    assert failed.event_type == "task.failed"
    assert "step a" in failed.reason and "disk on fire" in failed.reason  # type: ignore[attr-defined]
    assert "re-planning is off" in failed.reason  # type: ignore[attr-defined]
    assert state.terminal


def failed_midway() -> domain.TaskState:
    """a done, b running, c failed, d pending (after c)."""
    state = started(plan(("a", []), ("b", []), ("c", []), ("d", ["c"])))
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="a", output="A!"))
    state.step_failed(StepFailed(task_id="tsk_1", step_id="c", error="no such module"))
    state.outbox.clear()
    return state


def test_failed_step_moves_to_replanning_with_the_failure_in_context() -> None:
    state = failed_midway()
    assert state.phase is TaskStatus.REPLANNING
    assert state.outbox == []
    (_, user) = domain.replan_messages(state)
    assert "[a] a: A!" in user[1] and "[b] b" in user[1]
    assert "step c (c) failed: no such module" in user[1]
    assert "do not reuse): a, b, c, d" in user[1]


def test_replan_keeps_done_and_running_steps_and_dispatches_new_ones() -> None:
    state = failed_midway()
    text = (
        '{"steps": [{"id": "c2", "title": "c again", "instructions": "x", "depends_on": ["a"]},'
        ' {"id": "d2", "title": "d", "instructions": "x", "depends_on": ["b", "c2"]}]}'
    )
    new = domain.parse_replan(text, state)
    state.replan(new, Usage())
    assert state.phase is TaskStatus.RUNNING
    assert list(state.steps) == ["a", "b", "c2", "d2"]
    assert state.retired_ids == ["c", "d"]
    created, ready = state.pending_events()
    assert created.event_type == "task.plan_created" and created.revision == 2  # type: ignore[attr-defined]
    assert isinstance(ready, StepReady) and ready.step.id == "c2"
    assert ready.inputs == {"a": "A!"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ('[{"id": "c", "title": "t", "instructions": "i"}]', "already used in this task: c"),
        (
            '[{"id": "e", "title": "t", "instructions": "i", "depends_on": ["zz"]}]',
            "unknown steps: zz",
        ),
        ('"nope"', "'steps' list"),
    ],
)
def test_invalid_replans_are_rejected_with_the_reason(steps: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        domain.parse_replan(f'{{"steps": {steps}}}', failed_midway())


def test_replan_limit_then_fail() -> None:
    state = started(plan(("a", [])), Budget(max_replans=1))
    state.step_failed(StepFailed(task_id="tsk_1", step_id="a", error="e1"))
    state.replan(
        domain.parse_replan('{"steps": [{"id": "a2", "title": "t", "instructions": "i"}]}', state),
        Usage(),
    )
    state.outbox.clear()
    state.step_failed(StepFailed(task_id="tsk_1", step_id="a2", error="e2"))
    (failed,) = state.pending_events()
    assert "step a2 (t) failed: e2 after 1 re-plan(s)" in failed.reason  # type: ignore[attr-defined]


def test_completion_during_replanning_is_recorded_but_dispatches_nothing() -> None:
    state = failed_midway()
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="b", output="B!"))
    assert state.outbox == []
    assert state.steps["b"].output == "B!"
    assert state.phase is TaskStatus.REPLANNING


def test_wall_time_limit_excludes_time_awaiting_approval() -> None:
    state = started(plan(("a", [])), Budget(max_wall_seconds=5))
    t0 = state.submitted_at
    assert not state.over_time(t0 + timedelta(seconds=1))
    assert state.over_time(t0 + timedelta(seconds=6))
    state.budget_exhausted(exhausted(t0 + timedelta(seconds=100)), t0 + timedelta(seconds=2))
    assert not state.over_time(t0 + timedelta(seconds=50))  # waiting: the clock stops
    state.approved(TaskApproved(task_id="tsk_1"), t0 + timedelta(seconds=52))
    assert not state.over_time(t0 + timedelta(seconds=54))  # 2 s + 2 s ran
    assert state.over_time(t0 + timedelta(seconds=56))
    assert state.next_deadline() == t0 + timedelta(seconds=55)


def exhausted(
    deadline: datetime, action: OnBudget = OnBudget.PAUSE, rnd: int = 0
) -> BudgetExhausted:
    return BudgetExhausted(
        task_id="tsk_1",
        figure=BudgetFigure(kind=BudgetKind.COST, used=0.9, limit=1.0),
        needed=0.2,
        reason="cost budget exhausted; waiting for approval: agentbus approve",
        cause="cost budget exhausted",
        action=action,
        approval_deadline=deadline,
        round=rnd,
    )


def test_exhausted_budget_pauses_and_approval_resumes_the_paused_step() -> None:
    state = started(plan(("a", []), ("b", [])))
    state.outbox.clear()
    now = domain.now()
    state.budget_exhausted(exhausted(now + timedelta(hours=1)), now)
    assert state.phase is TaskStatus.AWAITING_APPROVAL
    state.step_paused(StepPaused(task_id="tsk_1", step_id="a", reason="r", attempt=1))
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="b", output="B!"))
    assert types(state) == ["task.paused"]  # the decision is published; nothing dispatched
    state.approved(TaskApproved(task_id="tsk_1", add_cost_usd=1), now + timedelta(minutes=5))
    assert state.phase is TaskStatus.RUNNING
    pause, resume, ready = state.pending_events()
    assert isinstance(pause, TaskPaused) and isinstance(resume, TaskResumed)
    assert (pause.round, resume.round, pause.reason) == (0, 0, "cost budget exhausted")
    assert isinstance(ready, StepReady)
    assert (ready.step.id, ready.attempt) == ("a", 2)
    assert state.paused_seconds == pytest.approx(300)


def test_stale_exhaustion_after_an_approval_is_ignored() -> None:
    state = started(plan(("a", [])))
    now = domain.now()
    state.approved(TaskApproved(task_id="tsk_1", add_cost_usd=1), now)  # round 1
    state.budget_exhausted(exhausted(now, rnd=0), now)
    assert state.phase is TaskStatus.RUNNING


def test_a_pause_in_the_round_of_an_approval_under_way_waits_for_the_next_one() -> None:
    state = started(plan(("a", []), ("b", [])))
    state.outbox.clear()
    now = domain.now()
    state.budget_exhausted(exhausted(now + timedelta(hours=1), rnd=0), now)
    # The ledger applied an approval (round 1), ran out again, and said so before this
    # state saw the approval: the approval answers round 0 only.
    state.budget_exhausted(exhausted(now + timedelta(hours=2), rnd=1), now)
    state.approved(TaskApproved(task_id="tsk_1", add_cost_usd=1), now)
    assert state.phase is TaskStatus.AWAITING_APPROVAL
    assert types(state) == ["task.paused", "task.resumed", "task.paused"]
    assert [getattr(e, "round", None) for e in state.pending_events()] == [0, 0, 1]
    assert state.approval_deadline == now + timedelta(hours=2)
    state.approved(TaskApproved(task_id="tsk_1", add_cost_usd=1), now)
    assert state.phase is TaskStatus.RUNNING
    assert types(state)[-1] == "task.resumed"  # its steps were never stopped


def test_a_later_round_exhaustion_while_running_is_not_answered_by_the_approval() -> None:
    state = started(plan(("a", [])))
    state.outbox.clear()
    now = domain.now()
    state.budget_exhausted(exhausted(now + timedelta(hours=1), rnd=1), now)
    state.approved(TaskApproved(task_id="tsk_1"), now)  # round 1: answers round 0
    assert state.phase is TaskStatus.AWAITING_APPROVAL
    assert types(state) == ["task.paused", "task.resumed", "task.paused"]


def test_fail_policy_fails_the_task_with_the_reason() -> None:
    state = started(plan(("a", [])))
    state.outbox.clear()
    state.budget_exhausted(exhausted(domain.now(), OnBudget.FAIL), domain.now())
    assert types(state) == ["task.failed"]
    assert "cost budget exhausted" in state.reason


def test_approval_timeout_fails_the_task_only_after_the_deadline() -> None:
    state = started(plan(("a", [])))
    state.outbox.clear()
    now = domain.now()
    state.budget_exhausted(exhausted(now + timedelta(seconds=30)), now)
    state.approval_timed_out(now + timedelta(seconds=29))
    assert state.phase is TaskStatus.AWAITING_APPROVAL
    state.approval_timed_out(now + timedelta(seconds=31))
    assert types(state) == ["task.paused", "task.failed"]
    assert "no approval came within 31 s" in state.reason
    assert state.reason.startswith("cost budget exhausted; no approval came")
    assert "agentbus approve" not in state.reason  # the hint is for a task still waiting


def test_a_failure_while_waiting_is_re_planned_after_approval() -> None:
    state = started(plan(("a", []), ("b", [])), Budget(max_replans=1))
    now = domain.now()
    state.budget_exhausted(exhausted(now + timedelta(hours=1)), now)
    state.step_failed(StepFailed(task_id="tsk_1", step_id="b", error="boom"))
    assert state.phase is TaskStatus.AWAITING_APPROVAL
    state.approved(TaskApproved(task_id="tsk_1"), now)
    assert state.phase is TaskStatus.REPLANNING


def test_the_prompt_states_the_budget_left() -> None:
    (_, user) = domain.plan_messages("g", Budget(), "$0.0400 left of $0.0500")
    assert "Budget left for this task: $0.0400 left of $0.0500" in user[1]
    assert "Budget" not in domain.plan_messages("g", Budget())[1][1]


def test_outbox_events_have_deterministic_ids() -> None:
    a = started(plan(("a", [])))
    b = started(plan(("a", [])))
    assert [e["event_id"] for e in a.outbox] == [e["event_id"] for e in b.outbox]
    a.published({a.outbox[0]["event_id"]})
    assert len(a.outbox) == 1
    assert parse_event(a.outbox[0]).event_type == "step.ready"


def test_parse_plan_accepts_fenced_json() -> None:
    text = '```json\n{"steps": [{"id": "s1", "title": "t", "instructions": "i"}]}\n```'
    assert parse_plan(text, Budget()).steps[0].id == "s1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("sure, here is the plan", "no JSON object"),
        ('{"steps": [', "no JSON object"),
        ('{"steps": [}', "not valid JSON"),
        ('{"steps": [{"id": "s1"}]}', "does not match the schema"),
        (
            '{"steps": [{"id": "a", "title": "t", "instructions": "i", "depends_on": ["a"]}]}',
            "cycle",
        ),
    ],
)
def test_parse_plan_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan(text, Budget())


def test_parse_plan_enforces_step_budget() -> None:
    steps = ",".join(f'{{"id": "s{i}", "title": "t", "instructions": "i"}}' for i in range(5))
    with pytest.raises(PlanError, match="at most 3"):
        parse_plan(f'{{"steps": [{steps}]}}', Budget(max_steps=3))


def test_a_step_paused_before_the_pause_reached_the_planner_waits_for_the_approval() -> None:
    state = started(plan(("a", [])))
    state.outbox.clear()
    state.step_paused(StepPaused(task_id="tsk_1", step_id="a", reason="r", attempt=1))
    assert state.outbox == []  # not sent out again while the budget may still be paused
    assert state.has_paused_steps()
    state.approved(TaskApproved(task_id="tsk_1", add_cost_usd=1), domain.now())
    (ready,) = state.pending_events()  # approved before BudgetExhausted came: it goes on
    assert isinstance(ready, StepReady)
    assert ready.attempt == 2
