from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from agentbus.contracts import (
    EVENT_TYPES,
    Budget,
    BudgetFigure,
    BudgetKind,
    ModelUsage,
    OnBudget,
    Plan,
    PlanStep,
    StepCompleted,
    TaskSubmitted,
    Usage,
    derived_event_id,
    parse_event,
    subjects,
)


def step(i: str, *deps: str) -> PlanStep:
    return PlanStep(id=i, title=f"step {i}", instructions="do it", depends_on=list(deps))


def test_event_subject_carries_task_and_type() -> None:
    event = TaskSubmitted(task_id="tsk_1", goal="g")
    assert event.subject == "agentbus.tasks.tsk_1.task.submitted"
    assert subjects.event_type_filter("task.submitted") == "agentbus.tasks.*.task.submitted"
    assert subjects.task_filter("tsk_1") == "agentbus.tasks.tsk_1.>"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "x" * 65, "a*", "a>"])
def test_task_ids_that_would_break_subjects_are_rejected(bad: str) -> None:
    with pytest.raises(ValidationError):
        TaskSubmitted(task_id=bad, goal="g")


def test_every_event_type_round_trips_through_parse_event() -> None:
    assert len(EVENT_TYPES) == 17
    for event_type, cls in EVENT_TYPES.items():
        fields = {
            "task.submitted": {"goal": "g"},
            "task.plan_created": {"steps": [step("s1")]},
            "step.ready": {"step": step("s1"), "goal": "g"},
            "step.tool_called": {"step_id": "s1", "tool": "run_python"},
            "step.completed": {"step_id": "s1", "output": "done"},
            "step.failed": {"step_id": "s1", "error": "boom"},
            "task.completed": {"answer": "42"},
            "task.failed": {"reason": "r"},
            "task.cancel_requested": {},
            "task.cancelled": {"reason": "r"},
            "task.paused": {"reason": "cost budget exhausted", "round": 1},
            "task.resumed": {"round": 1},
            "step.paused": {"step_id": "s1", "reason": "budget"},
            "llm.called": {"role": "executor", "model": "m", "usage": ModelUsage(calls=1)},
            "budget.warning": {"figure": BudgetFigure(kind=BudgetKind.COST, used=0.8, limit=1)},
            "budget.exhausted": {
                "figure": BudgetFigure(kind=BudgetKind.TOKENS, used=90, limit=100),
                "reason": "r",
                "action": OnBudget.PAUSE,
            },
            "task.approved": {"add_cost_usd": 1.0},
        }[event_type]
        event = cls(task_id="tsk_1", **fields)
        wire = event.model_dump_json()
        again = parse_event(wire)
        assert type(again) is cls
        assert again == event
        assert json.loads(wire)["schema_version"] == 1
        assert event.event_id.startswith("evt_")


def test_unknown_fields_are_ignored_so_old_readers_accept_new_writers() -> None:
    data = TaskSubmitted(task_id="tsk_1", goal="g").model_dump(mode="json")
    data["added_in_v2"] = {"anything": 1}
    assert parse_event(data).goal == "g"  # type: ignore[attr-defined]


def test_parse_event_rejects_unknown_type_and_missing_fields() -> None:
    with pytest.raises(ValidationError):
        parse_event({"type": "task.exploded", "task_id": "t"})
    with pytest.raises(ValidationError):
        parse_event({"type": "task.submitted", "task_id": "t"})
    with pytest.raises(ValidationError):
        parse_event(b"{not json")


def test_plan_rejects_cycles_unknown_deps_and_duplicates() -> None:
    assert len(Plan(steps=[step("a"), step("b", "a")]).steps) == 2
    with pytest.raises(ValidationError, match="cycle"):
        Plan(steps=[step("a", "b"), step("b", "a")])
    with pytest.raises(ValidationError, match="unknown steps: zz"):
        Plan(steps=[step("a", "zz")])
    with pytest.raises(ValidationError, match="duplicate step ids: a"):
        Plan(steps=[step("a"), step("a")])
    with pytest.raises(ValidationError):
        Plan(steps=[])


def test_usage_adds_per_model() -> None:
    a = Usage.of("m1", ModelUsage(prompt_tokens=10, completion_tokens=5, calls=1, cost_usd=0.5))
    b = Usage.of("m1", ModelUsage(prompt_tokens=1, calls=1)) + Usage.of("m2", ModelUsage(calls=1))
    total = a + b
    assert total.by_model["m1"].prompt_tokens == 11
    assert total.by_model["m1"].calls == 2
    assert total.total.calls == 3
    assert total.total.total_tokens == 16
    assert total.total.cost_usd == pytest.approx(0.5)


def test_derived_event_ids_are_stable_and_distinct() -> None:
    assert derived_event_id("t", "ready", "s1", 1) == derived_event_id("t", "ready", "s1", 1)
    assert derived_event_id("t", "ready", "s1", 1) != derived_event_id("t", "ready", "s1", 2)
    assert derived_event_id("t", "ready", "s1", 1) != derived_event_id("u", "ready", "s1", 1)


def test_budget_defaults_and_limits() -> None:
    assert Budget().max_steps == 12
    with pytest.raises(ValidationError):
        Budget(max_cost_usd=0)
    completed = StepCompleted(task_id="t", step_id="s1", output="x")
    assert completed.usage.total.calls == 0


def test_validation_errors_read_the_same_everywhere() -> None:
    from pydantic import ValidationError

    from agentbus.contracts import PlanStep, describe_validation

    with pytest.raises(ValidationError) as bad:
        PlanStep.model_validate({"id": "s1", "depends_on": [7]})
    text = describe_validation(bad.value)
    assert text.startswith(f"{bad.value.error_count()} problem(s): ")
    assert "title: Field required" in text
    assert "depends_on.0:" in text
    with pytest.raises(ValidationError) as root:
        PlanStep.model_validate("not an object")
    assert describe_validation(root.value, root="step").startswith("1 problem(s): step: ")
