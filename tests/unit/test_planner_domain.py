from __future__ import annotations

from datetime import timedelta

import pytest

from agentbus.contracts import (
    Budget,
    ModelUsage,
    Plan,
    PlanStep,
    StepCompleted,
    StepFailed,
    StepReady,
    TaskSubmitted,
    Usage,
    parse_event,
)
from agentbus.planner import domain
from agentbus.planner.domain import PlanError, TaskPhase, parse_plan


def plan(*steps: tuple[str, list[str]]) -> Plan:
    return Plan(steps=[PlanStep(id=i, title=i, instructions="x", depends_on=d) for i, d in steps])


def started(p: Plan, budget: Budget | None = None) -> domain.TaskState:
    event = TaskSubmitted(task_id="tsk_1", goal="goal", budget=budget or Budget())
    state = domain.new_state(event)
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
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="a", output="A!"), domain.now())
    assert state.outbox == []
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="b", output="B!"), domain.now())
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
        domain.now(),
    )
    assert state.phase is TaskPhase.FINISHING
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
    state.step_completed(event, domain.now())
    state.mark_applied(event)
    before = state.model_dump()
    assert state.was_applied(event)
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="a", output="other"), domain.now())
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
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="a", output="A!"), domain.now())
    state.step_failed(StepFailed(task_id="tsk_1", step_id="c", error="no such module"))
    state.outbox.clear()
    return state


def test_failed_step_moves_to_replanning_with_the_failure_in_context() -> None:
    state = failed_midway()
    assert state.phase is TaskPhase.REPLANNING
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
    assert state.phase is TaskPhase.RUNNING
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
    state.step_completed(StepCompleted(task_id="tsk_1", step_id="b", output="B!"), domain.now())
    assert state.outbox == []
    assert state.steps["b"].output == "B!"
    assert state.phase is TaskPhase.REPLANNING


def test_budget_overrun_fails_task() -> None:
    state = started(plan(("a", []), ("b", ["a"])), Budget(max_tokens=100))
    state.outbox.clear()
    usage = Usage.of("m", ModelUsage(prompt_tokens=90, completion_tokens=20, calls=1))
    state.step_completed(
        StepCompleted(task_id="tsk_1", step_id="a", output="x", usage=usage), domain.now()
    )
    assert types(state) == ["task.failed"]
    assert "token budget exceeded: used 110 of 100" in state.reason


def test_wall_time_limit() -> None:
    state = started(plan(("a", [])), Budget(max_wall_seconds=5))
    assert state.budget_problem(state.submitted_at + timedelta(seconds=1)) is None
    assert "time limit" in (state.budget_problem(state.submitted_at + timedelta(seconds=6)) or "")


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
