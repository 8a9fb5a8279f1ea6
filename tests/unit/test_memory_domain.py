"""Memory's domain without any server: reading events off the bus, projecting tasks."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from agentbus.contracts import (
    BudgetExhausted,
    BudgetFigure,
    BudgetKind,
    BudgetWarning,
    Event,
    LLMCalled,
    ModelUsage,
    OnBudget,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepStatus,
    StepToolCalled,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskPaused,
    TaskResumed,
    TaskStatus,
    TaskSubmitted,
    Usage,
)
from agentbus.memory import domain
from agentbus.memory.domain import InvalidEvent, TaskProjection, apply, read_event

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
TASK = "tsk_unit"
S1 = PlanStep(id="s1", title="first", instructions="do one")
S2 = PlanStep(id="s2", title="second", instructions="do two", depends_on=["s1"])


FIGURE = BudgetFigure(kind=BudgetKind.COST, used=0.9, limit=1.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def spend(calls: int, cost: float, model: str = "m") -> Usage:
    return Usage.of(model, ModelUsage(prompt_tokens=10 * calls, calls=calls, cost_usd=cost))


def fold(*events: Event) -> TaskProjection:
    """Apply events in the order given, numbering them 1, 2, ... as their stream seqs."""
    projection: TaskProjection | None = None
    for seq, event in enumerate(events, start=1):
        projection = apply(projection, event, seq)
    assert projection is not None
    return projection


def lifecycle() -> list[Event]:
    return [
        TaskSubmitted(task_id=TASK, goal="the goal", tenant="acme", occurred_at=at(0)),
        PlanCreated(task_id=TASK, steps=[S1], usage=spend(1, 0.01), occurred_at=at(1)),
        StepReady(task_id=TASK, step=S1, goal="the goal", occurred_at=at(2)),
        StepToolCalled(task_id=TASK, step_id="s1", tool="run_python", occurred_at=at(3)),
        StepCompleted(
            task_id=TASK, step_id="s1", output="out 1", usage=spend(2, 0.02), occurred_at=at(4)
        ),
        TaskCompleted(task_id=TASK, answer="the answer", usage=spend(4, 0.05), occurred_at=at(5)),
    ]


# --- reading events ------------------------------------------------------------------


def read(
    body: bytes | Mapping[str, object],
    *,
    subject: str = f"agentbus.tasks.{TASK}.x",
    msg_id: str | None = None,
) -> domain.Incoming:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return read_event(raw, subject=subject, stream_seq=7, received_at=T0, msg_id=msg_id)


def test_a_known_event_is_parsed_and_stored_as_published() -> None:
    event = TaskSubmitted(task_id=TASK, goal="g", occurred_at=at(1))
    payload = {**event.model_dump(mode="json"), "added_by_a_newer_writer": True}
    incoming = read(payload, subject=event.subject)
    assert incoming.event == event
    record = incoming.record
    assert (record.event_id, record.task_id, record.type) == (event.event_id, TASK, event.type)
    assert (record.subject, record.stream_seq, record.schema_version) == (event.subject, 7, 1)
    assert record.occurred_at == at(1)
    assert record.payload == payload  # extra fields are kept, not dropped by the model


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{this is not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[1, 2]", "not an object: list"),
        (b'{"task_id": "tsk_1"}', "no 'type' field"),
        (b'{"type": 3, "task_id": "tsk_1"}', "no 'type' field"),
    ],
)
def test_unreadable_messages_are_invalid(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        read(body)


def test_an_invalid_known_event_is_invalid_with_the_problems_named() -> None:
    bad = {"type": "task.submitted", "task_id": TASK, "budget": {"max_steps": -1}}
    with pytest.raises(InvalidEvent) as info:
        read(bad)
    reason = str(info.value)
    assert reason.startswith("invalid task.submitted event: 2 problem(s)")
    assert "goal: Field required" in reason
    assert "budget.max_steps" in reason


def test_an_unknown_type_is_kept_raw_with_its_own_ids() -> None:
    payload = {
        "type": "task.annotated",
        "event_id": "evt_new",
        "task_id": "tsk_other",
        "schema_version": 9,
        "occurred_at": "2026-11-02T10:00:00+00:00",
    }
    incoming = read(payload)
    assert not incoming.known and incoming.event is None
    record = incoming.record
    assert (record.event_id, record.task_id, record.type) == (
        "evt_new",
        "tsk_other",
        "task.annotated",
    )
    assert record.schema_version == 9
    assert record.occurred_at == datetime(2026, 11, 2, 10, tzinfo=UTC)
    assert record.payload == payload


def test_an_unknown_type_without_ids_falls_back_to_the_message() -> None:
    incoming = read({"type": "task.mystery"}, subject="agentbus.tasks.tsk_9.task.mystery")
    record = incoming.record
    assert record.task_id == "tsk_9"  # from the subject
    assert record.occurred_at == T0  # when JetStream stored it
    assert record.schema_version is None
    assert record.event_id == "seq-7"
    assert read({"type": "task.mystery"}, msg_id="m-1").record.event_id == "m-1"


def test_nul_characters_are_replaced_so_postgres_can_store_them() -> None:
    event = StepCompleted(task_id=TASK, step_id="s1", output="a\x00b")
    incoming = read(event.model_dump(mode="json"))
    assert isinstance(incoming.event, StepCompleted)
    assert incoming.event.output == "a\ufffdb"
    assert incoming.record.payload["output"] == "a\ufffdb"


# --- projecting tasks ----------------------------------------------------------------


def test_a_task_runs_from_submitted_to_completed() -> None:
    events = lifecycle()
    steps: list[TaskStatus] = []
    projection: TaskProjection | None = None
    for seq, event in enumerate(events, start=1):
        projection = apply(projection, event, seq)
        assert projection is not None
        steps.append(projection.status)
    assert steps == [
        TaskStatus.SUBMITTED,
        TaskStatus.PLANNED,
        TaskStatus.RUNNING,
        TaskStatus.RUNNING,
        TaskStatus.RUNNING,
        TaskStatus.COMPLETED,
    ]
    assert projection is not None
    assert projection.goal == "the goal"
    assert projection.answer == "the answer"
    assert projection.usage == spend(4, 0.05)  # the task's total, as TaskCompleted reports it
    assert projection.plan == (S1,) and projection.plan_revision == 1
    (step,) = projection.steps
    assert (step.status, step.output, step.attempt, step.title) == (
        StepStatus.COMPLETED,
        "out 1",
        1,
        "first",
    )
    assert (projection.created_at, projection.updated_at) == (at(0), at(5))
    assert projection.last_seq == 6


def test_usage_adds_up_while_the_task_runs() -> None:
    events = lifecycle()
    projection = fold(*events[:5])
    assert projection.usage == spend(1, 0.01) + spend(2, 0.02)
    assert projection.steps[0].status is StepStatus.COMPLETED


def test_a_plan_lists_its_steps_as_pending() -> None:
    submitted = TaskSubmitted(task_id=TASK, goal="g")
    projection = fold(submitted, PlanCreated(task_id=TASK, steps=[S1, S2]))
    assert [(s.id, s.title, s.status) for s in projection.steps] == [
        ("s1", "first", StepStatus.PENDING),
        ("s2", "second", StepStatus.PENDING),
    ]


def test_a_progress_event_alone_makes_no_projection() -> None:
    assert apply(None, StepToolCalled(task_id=TASK, step_id="s1", tool="t"), 1) is None


@pytest.mark.parametrize("count", [6, 5], ids=["ended", "running"])
def test_the_projection_is_the_same_whatever_order_the_events_arrive_in(count: int) -> None:
    events = lifecycle()[:count]
    expected = fold(*events)
    for order in itertools.permutations(range(len(events))):
        projection: TaskProjection | None = None
        for index in order:
            projection = apply(projection, events[index], index + 1)
        assert projection == expected, [events[i].event_type for i in order]


@pytest.mark.parametrize(
    "late",
    [
        TaskSubmitted(task_id=TASK, goal="the goal"),
        PlanCreated(task_id=TASK, steps=[S1], usage=spend(1, 0.01)),
        StepReady(task_id=TASK, step=S1, goal="the goal", attempt=2),
        StepFailed(task_id=TASK, step_id="s1", error="late", usage=spend(1, 0.01), attempt=2),
        TaskCancelRequested(task_id=TASK),
        TaskCancelled(task_id=TASK, reason="too late", usage=spend(9, 9)),
        TaskFailed(task_id=TASK, reason="too late", usage=spend(9, 9)),
        StepPaused(task_id=TASK, step_id="s1", reason="budget", usage=spend(1, 1), attempt=2),
        TaskPaused(task_id=TASK, reason="late"),
        TaskResumed(task_id=TASK),
    ],
)
def test_a_terminal_task_does_not_go_back_nor_count_spend_twice(late: Event) -> None:
    done = fold(*lifecycle())
    after = apply(done, late, 99)
    assert after is not None
    assert after.status is TaskStatus.COMPLETED
    assert after.answer == "the answer" and after.error is None
    assert after.usage == done.usage


def test_a_failed_task_keeps_its_reason_and_total() -> None:
    failed = TaskFailed(task_id=TASK, reason="step s1 failed: boom", usage=spend(3, 0.03))
    projection = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        PlanCreated(task_id=TASK, steps=[S1], usage=spend(1, 0.01)),
        StepFailed(task_id=TASK, step_id="s1", error="boom", usage=spend(2, 0.02)),
        failed,
    )
    assert projection.status is TaskStatus.FAILED
    assert projection.error == "step s1 failed: boom"
    assert projection.usage == spend(3, 0.03)
    assert (projection.steps[0].status, projection.steps[0].error) == (StepStatus.FAILED, "boom")


def test_a_cancel_request_holds_until_the_task_is_cancelled() -> None:
    submitted = TaskSubmitted(task_id=TASK, goal="g")
    requested = fold(
        submitted,
        PlanCreated(task_id=TASK, steps=[S1, S2]),
        TaskCancelRequested(task_id=TASK),
        StepReady(task_id=TASK, step=S1, goal="g"),  # already on its way when cancelled
    )
    assert requested.status is TaskStatus.CANCEL_REQUESTED
    assert requested.steps[0].status is StepStatus.RUNNING
    cancelled = apply(requested, TaskCancelled(task_id=TASK, reason="by user"), 5)
    assert cancelled is not None
    assert (cancelled.status, cancelled.error) == (TaskStatus.CANCELLED, "by user")


def test_a_stale_attempt_does_not_overwrite_a_newer_one() -> None:
    projection = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        PlanCreated(task_id=TASK, steps=[S1]),
        StepReady(task_id=TASK, step=S1, goal="g", attempt=2),
        StepFailed(task_id=TASK, step_id="s1", error="old", usage=spend(1, 0.01), attempt=1),
    )
    step = projection.steps[0]
    assert (step.status, step.attempt, step.error) == (StepStatus.RUNNING, 2, None)
    assert projection.usage == spend(1, 0.01)  # its spend was real all the same


def test_a_replan_starts_the_steps_afresh_and_an_older_plan_changes_nothing() -> None:
    s3 = PlanStep(id="s3", title="third", instructions="do three")
    first = PlanCreated(task_id=TASK, steps=[S1], usage=spend(1, 0.01))
    second = PlanCreated(task_id=TASK, steps=[S1, s3], revision=2, usage=spend(1, 0.01))
    projection = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        first,
        StepReady(task_id=TASK, step=S1, goal="g"),
        StepFailed(task_id=TASK, step_id="s1", error="boom"),
        second,
    )
    assert projection.status is TaskStatus.PLANNED
    assert projection.plan_revision == 2
    assert [(s.id, s.status, s.attempt) for s in projection.steps] == [
        ("s1", StepStatus.PENDING, 0),
        ("s3", StepStatus.PENDING, 0),
    ]
    again = apply(projection, first, 10)  # rev 1 seen again (a different stream copy)
    assert again is not None
    assert again.plan_revision == 2 and len(again.steps) == 2


def test_replay_folds_a_history_and_in_order_tells_when_to_use_it() -> None:
    events = lifecycle()
    history = list(enumerate(events, start=1))
    assert domain.replay(history) == fold(*events)
    assert domain.replay([]) is None
    projection = fold(*events[:3])
    assert domain.in_order(None, 1)
    assert domain.in_order(projection, 4)
    assert not domain.in_order(projection, 2)


def test_a_projection_survives_its_row() -> None:
    projection = fold(*lifecycle())
    row = json.loads(json.dumps(projection.to_row(), default=str))  # as jsonb gives it back
    row["created_at"], row["updated_at"] = projection.created_at, projection.updated_at
    assert TaskProjection.from_row(row) == projection
    assert row["tenant"] == "acme"


def test_the_tenant_is_the_one_task_submitted_names_whenever_it_arrives() -> None:
    submitted, *rest = lifecycle()
    before = fold(*rest)  # TaskSubmitted not seen yet: no tenant known
    assert before.tenant == ""
    after = apply(before, submitted, 99)
    assert after is not None
    assert after.tenant == "acme"
    assert after.status is TaskStatus.COMPLETED  # only the goal and the tenant filled in
    assert fold(*lifecycle()).tenant == "acme"
    local = fold(TaskSubmitted(task_id=TASK, goal="g"))  # on the bus directly: none
    assert local.tenant == ""


def test_the_summary_is_what_task_history_answers_with() -> None:
    summary = fold(*lifecycle()).summary()
    assert summary.task_id == TASK
    assert summary.status is TaskStatus.COMPLETED
    assert summary.answer == "the answer"
    assert summary.usage.total.calls == 4
    assert (summary.created_at, summary.updated_at) == (at(0), at(5))


# --- budget pauses and approvals -----------------------------------------------------


def exhausted(
    round_: int = 0, action: OnBudget = OnBudget.PAUSE, seconds: float = 0
) -> BudgetExhausted:
    return BudgetExhausted(
        task_id=TASK,
        figure=FIGURE,
        reason="cost budget exhausted",
        action=action,
        step_id="s1",
        round=round_,
        occurred_at=at(seconds),
    )


def paused(round_: int = 0, seconds: float = 0) -> TaskPaused:
    """The planner's decision after a pausing ``BudgetExhausted`` of that round."""
    return TaskPaused(
        task_id=TASK, reason="cost budget exhausted", round=round_, occurred_at=at(seconds)
    )


def resumed(round_: int = 0, seconds: float = 0) -> TaskResumed:
    """The planner's decision after the approval that answers the pause of ``round_``."""
    return TaskResumed(task_id=TASK, round=round_, occurred_at=at(seconds))


def paused_lifecycle() -> list[Event]:
    """A step stops for lack of budget, the task is approved, the step resumes and ends."""
    return [
        TaskSubmitted(task_id=TASK, goal="the goal", occurred_at=at(0)),
        PlanCreated(task_id=TASK, steps=[S1], usage=spend(1, 0.25), occurred_at=at(1)),
        StepReady(task_id=TASK, step=S1, goal="the goal", occurred_at=at(2)),
        paused(seconds=3),
        StepPaused(
            task_id=TASK, step_id="s1", reason="paused", usage=spend(2, 0.5), occurred_at=at(4)
        ),
        resumed(seconds=5),
        StepReady(task_id=TASK, step=S1, goal="the goal", attempt=2, occurred_at=at(6)),
        StepCompleted(
            task_id=TASK,
            step_id="s1",
            output="out 1",
            usage=spend(1, 0.125),
            attempt=2,
            occurred_at=at(7),
        ),
    ]


def test_a_budget_pause_awaits_approval_and_the_paused_step_resumes() -> None:
    statuses: list[tuple[TaskStatus, StepStatus]] = []
    projection: TaskProjection | None = None
    for seq, event in enumerate(paused_lifecycle(), start=1):
        projection = apply(projection, event, seq)
        assert projection is not None
        step = projection.step("s1")
        statuses.append((projection.status, step.status if step else StepStatus.PENDING))
    assert statuses == [
        (TaskStatus.SUBMITTED, StepStatus.PENDING),
        (TaskStatus.PLANNED, StepStatus.PENDING),
        (TaskStatus.RUNNING, StepStatus.RUNNING),
        (TaskStatus.AWAITING_APPROVAL, StepStatus.RUNNING),
        (TaskStatus.AWAITING_APPROVAL, StepStatus.PAUSED),  # its result does not end the wait
        (TaskStatus.RUNNING, StepStatus.PAUSED),
        (TaskStatus.RUNNING, StepStatus.RUNNING),
        (TaskStatus.RUNNING, StepStatus.COMPLETED),
    ]
    assert projection is not None
    (step,) = projection.steps
    assert (step.attempt, step.output, step.error) == (2, "out 1", None)
    assert step.usage == spend(2, 0.5) + spend(1, 0.125)  # both attempts
    assert projection.usage == spend(1, 0.25) + spend(2, 0.5) + spend(1, 0.125)


def test_a_paused_step_shows_paused_until_its_next_attempt() -> None:
    events = paused_lifecycle()
    paused = fold(*events[:5])
    assert paused.steps[0].status is StepStatus.PAUSED
    late_ready = apply(paused, events[2], 9)  # attempt 1's StepReady again: still paused
    assert late_ready is not None and late_ready.steps[0].status is StepStatus.PAUSED


def test_results_of_steps_in_flight_do_not_end_the_wait() -> None:
    waiting = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        PlanCreated(task_id=TASK, steps=[S1, S2]),
        StepReady(task_id=TASK, step=S1, goal="g"),
        paused(),
        StepCompleted(task_id=TASK, step_id="s1", output="done anyway"),
    )
    assert waiting.status is TaskStatus.AWAITING_APPROVAL
    assert waiting.steps[0].status is StepStatus.COMPLETED


@pytest.mark.parametrize("count", [8, 5], ids=["approved", "waiting"])
def test_a_pause_gives_the_same_projection_whatever_order_its_events_arrive_in(
    count: int,
) -> None:
    events = paused_lifecycle()[1:count]  # without TaskSubmitted: 7! orders, not 8!
    expected = fold(*events)
    assert expected.status is (TaskStatus.RUNNING if count == 8 else TaskStatus.AWAITING_APPROVAL)
    for order in itertools.permutations(range(len(events))):
        projection: TaskProjection | None = None
        for index in order:
            projection = apply(projection, events[index], index + 1)
        assert projection == expected, [events[i].event_type for i in order]


def test_a_resumption_answers_the_pause_of_its_round_even_if_it_comes_first() -> None:
    running = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        PlanCreated(task_id=TASK, steps=[S1]),
        StepReady(task_id=TASK, step=S1, goal="g"),
        resumed(round_=0),  # stored before the pause it answers
        paused(round_=0),
    )
    assert running.status is TaskStatus.RUNNING
    again = apply(running, paused(round_=1), 6)  # the budget ran out again after it
    assert again is not None and again.status is TaskStatus.AWAITING_APPROVAL
    going = apply(again, resumed(round_=1), 7)
    assert going is not None and going.status is TaskStatus.RUNNING


def test_a_pause_right_after_a_resumption_keeps_the_task_waiting_in_any_order() -> None:
    # The planner answered round 0 and paused again in round 1 (the ledger ran out
    # again once reopened): waiting, however the three decisions are stored.
    decisions = [paused(round_=0), resumed(round_=0), paused(round_=1)]
    for order in itertools.permutations(decisions):
        projection = fold(TaskSubmitted(task_id=TASK, goal="g"), *order)
        assert projection.status is TaskStatus.AWAITING_APPROVAL


def test_a_pause_during_planning_runs_again_after_approval() -> None:
    projection = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        paused(),
    )
    assert projection.status is TaskStatus.AWAITING_APPROVAL
    approved = apply(projection, resumed(), 3)
    assert approved is not None and approved.status is TaskStatus.RUNNING
    planned = apply(approved, PlanCreated(task_id=TASK, steps=[S1]), 4)
    assert planned is not None and [s.id for s in planned.steps] == ["s1"]


def test_a_budget_that_runs_out_with_action_fail_leaves_the_end_to_task_failed() -> None:
    running = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        PlanCreated(task_id=TASK, steps=[S1]),
        StepReady(task_id=TASK, step=S1, goal="g"),
        exhausted(action=OnBudget.FAIL),
    )
    assert running.status is TaskStatus.RUNNING
    failed = apply(running, TaskFailed(task_id=TASK, reason="cost budget exhausted"), 5)
    assert failed is not None
    assert (failed.status, failed.error) == (TaskStatus.FAILED, "cost budget exhausted")


def test_a_cancel_request_outranks_a_pause_and_an_approval() -> None:
    requested = fold(
        TaskSubmitted(task_id=TASK, goal="g"),
        paused(),
        TaskCancelRequested(task_id=TASK),
        resumed(),
        paused(round_=1),
    )
    assert requested.status is TaskStatus.CANCEL_REQUESTED
    cancelled = apply(requested, TaskCancelled(task_id=TASK, reason="by user"), 6)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED


def test_llm_calls_budget_facts_and_approvals_change_no_projection() -> None:
    call = LLMCalled(
        task_id=TASK, role="planner", model="m", usage=ModelUsage(calls=1, cost_usd=0.5)
    )
    warning = BudgetWarning(task_id=TASK, figure=FIGURE)
    assert apply(None, call, 1) is None
    assert apply(None, warning, 1) is None
    submitted = fold(TaskSubmitted(task_id=TASK, goal="g"))
    assert apply(submitted, call, 2) == submitted
    assert apply(submitted, warning, 3) == submitted
    # What ran out and who approved are facts the planner decides on: memory records
    # its decisions (TaskPaused, TaskResumed, TaskFailed), never re-derives them.
    unprojected = {"llm.called", "budget.warning", "step.tool_called"}
    unprojected |= {"budget.exhausted", "task.approved"}
    assert unprojected.isdisjoint(domain.PROJECTED_TYPES)
    assert {"task.paused", "task.resumed", "step.paused"} <= domain.PROJECTED_TYPES


def test_a_paused_projection_survives_its_row() -> None:
    projection = fold(*paused_lifecycle()[:6], paused(round_=1, seconds=9))
    assert (projection.approvals, projection.paused_round) == (1, 1)
    row = json.loads(json.dumps(projection.to_row(), default=str))
    row["created_at"], row["updated_at"] = projection.created_at, projection.updated_at
    assert TaskProjection.from_row(row) == projection


# --- semantic memory and cost reports ------------------------------------------------


def test_the_cache_key_is_the_sha256_of_the_exact_text() -> None:
    assert domain.content_hash("héllo") == hashlib.sha256("héllo".encode()).digest()
    assert domain.content_hash("a") != domain.content_hash("a ")


def test_an_oversize_text_is_refused_with_both_sizes_never_cut() -> None:
    assert domain.check_size("x" * 10, 10) == "x" * 10
    with pytest.raises(domain.TextTooLarge, match=r"query is 11 characters; .* at most 10"):
        domain.check_size("x" * 11, 10, "query")


def test_a_cost_report_totals_its_models() -> None:
    report = domain.CostReport(
        tasks=2,
        by_model={
            "a": {"prompt_tokens": 10, "completion_tokens": 2, "calls": 1, "cost_usd": 0.5},
            "b": {"prompt_tokens": 5, "cached_tokens": None, "calls": 2, "cost_usd": 0.25},
        },
        costliest=[],
    )
    usage = report.model_usage()
    assert usage["b"] == ModelUsage(prompt_tokens=5, calls=2, cost_usd=0.25)
    assert report.total() == ModelUsage(
        prompt_tokens=15, completion_tokens=2, calls=3, cost_usd=0.75
    )
