"""Memory's logic, free of I/O: reading an event off the bus and projecting a task.

Two jobs, both pure functions:

* ``read_event`` turns a message body into the row the event log stores and, for a
  known event type, the parsed event. Input that can never be stored raises
  ``InvalidEvent``; a well-formed event of a type this version does not know is kept
  as it is (a newer writer may be ahead of us) with no parsed event.
* ``apply`` folds one event into a task's projection (the row ``task_history``
  answers with). The adapter calls it in stream order: incrementally while events
  arrive in order, or through ``replay`` of the whole stored history when one arrives
  late, so the projection is always the fold of the stream. ``apply`` is still safe
  against events a producer sent out of logical order: a terminal status is final,
  stale step attempts do not overwrite newer ones, and a budget pause is matched to
  its approval by the approval round, not by which arrived first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from agentbus.contracts import (
    EVENT_TYPES,
    TERMINAL_STATUSES,
    BudgetExhausted,
    BudgetWarning,
    Event,
    LLMCalled,
    ModelUsage,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepStatus,
    StepToolCalled,
    TaskApproved,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskCost,
    TaskFailed,
    TaskPaused,
    TaskResumed,
    TaskStatus,
    TaskSubmitted,
    TaskSummary,
    Usage,
    describe_validation,
    parse_event,
    subjects,
)

# Events that change nothing in a task's projection: progress for people following
# along (StepToolCalled, BudgetWarning), spend records (LLMCalled, which memory keeps
# in a table of its own), and budget facts and requests the planner decides on
# (BudgetExhausted, TaskApproved): its decisions (TaskPaused, TaskResumed, TaskFailed)
# are what the projection records.
UNPROJECTED: tuple[type[Event], ...] = (
    StepToolCalled,
    LLMCalled,
    BudgetWarning,
    BudgetExhausted,
    TaskApproved,
)
PROJECTED_TYPES = frozenset(
    name for name, cls in EVENT_TYPES.items() if not issubclass(cls, UNPROJECTED)
)

# --- reading events ------------------------------------------------------------------


class InvalidEvent(ValueError):
    """The message can never be stored: not JSON, no type, or an invalid known event."""


@dataclass(frozen=True)
class EventRecord:
    """One row of the event log, exactly as it will be stored."""

    event_id: str
    task_id: str
    type: str
    subject: str
    stream_seq: int
    schema_version: int | None
    occurred_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True)
class Incoming:
    """What ``read_event`` made of a message: the row, and the event if its type is known."""

    record: EventRecord
    event: Event | None

    @property
    def known(self) -> bool:
        return self.event is not None


def read_event(
    body: bytes,
    *,
    subject: str,
    stream_seq: int,
    received_at: datetime,
    msg_id: str | None = None,
) -> Incoming:
    """Parse a message from the events stream into what the event log stores.

    ``received_at`` (when JetStream stored it) and ``msg_id`` (its ``Nats-Msg-Id``) stand
    in for ``occurred_at`` and ``event_id`` when an event of an unknown type lacks them.
    """
    data = _json_object(body)
    event_type = data.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidEvent("event has no 'type' field")
    if event_type not in EVENT_TYPES:
        raw = _raw_record(
            data,
            event_type=event_type,
            subject=subject,
            stream_seq=stream_seq,
            received_at=received_at,
            msg_id=msg_id,
        )
        return Incoming(raw, None)
    try:
        event = parse_event(data)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid {event_type} event: {describe_validation(exc)}") from exc
    record = EventRecord(
        event_id=event.event_id,
        task_id=event.task_id,
        type=event_type,
        subject=subject,
        stream_seq=stream_seq,
        schema_version=event.schema_version,
        occurred_at=event.occurred_at,
        payload=data,  # as published: keeps fields newer writers added
    )
    return Incoming(record, event)


def scrub(value: Any) -> Any:
    """Replace NUL characters, which Postgres text and jsonb cannot hold, with U+FFFD.

    A step's output is whatever a program printed, so NULs are possible; refusing such
    an event would retry it forever and then dead-letter it.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidEvent(f"body is JSON but not an object: {type(data).__name__}")
    cleaned: dict[str, Any] = scrub(data)
    return cleaned


def _raw_record(
    data: dict[str, Any],
    *,
    event_type: str,
    subject: str,
    stream_seq: int,
    received_at: datetime,
    msg_id: str | None,
) -> EventRecord:
    event_id = data.get("event_id")
    task_id = data.get("task_id")
    version = data.get("schema_version")
    return EventRecord(
        event_id=event_id
        if isinstance(event_id, str) and event_id
        else msg_id or f"seq-{stream_seq}",
        task_id=task_id if isinstance(task_id, str) and task_id else task_of_subject(subject),
        type=event_type,
        subject=subject,
        stream_seq=stream_seq,
        schema_version=version if isinstance(version, int) else None,
        occurred_at=_timestamp(data.get("occurred_at")) or received_at,
        payload=data,
    )


def task_of_subject(subject: str) -> str:
    """The task token of ``agentbus.tasks.<task_id>.<type>``, or the whole subject."""
    prefix = f"{subjects.EVENTS_ROOT}."
    if subject.startswith(prefix):
        return subject.removeprefix(prefix).split(".", 1)[0]
    return subject


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


# --- the task projection -------------------------------------------------------------


# The attempt these statuses describe is over: the same attempt's StepReady, arriving
# late, must not make the step running again.
_ATTEMPT_OVER = frozenset({StepStatus.PAUSED, StepStatus.COMPLETED, StepStatus.FAILED})


@dataclass(frozen=True)
class StepView:
    """Where one step of the current plan stands."""

    id: str
    title: str = ""
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    output: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status.value,
            "attempt": self.attempt,
            "output": self.output,
            "error": self.error,
            "usage": self.usage.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepView:
        return cls(
            id=data["id"],
            title=data.get("title", ""),
            status=StepStatus(data.get("status", StepStatus.PENDING)),
            attempt=data.get("attempt", 0),
            output=data.get("output"),
            error=data.get("error"),
            usage=Usage.model_validate(data.get("usage") or {}),
        )


@dataclass(frozen=True)
class TaskProjection:
    """A task as its events so far describe it; ``last_seq`` is the newest event applied.

    Pauses are the planner's decisions, numbered by approval round: ``paused_round`` is
    the round of the latest ``TaskPaused`` (None: never paused); ``approvals`` is one
    more than the round of the latest ``TaskResumed`` (every pause up to it answered).
    The task awaits approval while its latest pause is unanswered. ``tenant`` is the
    one ``TaskSubmitted`` names; "" (no tenant) until that event is applied.
    """

    task_id: str
    status: TaskStatus
    created_at: datetime
    updated_at: datetime
    last_seq: int = 0
    goal: str = ""
    plan_revision: int = 0
    plan: tuple[PlanStep, ...] = ()
    steps: tuple[StepView, ...] = ()
    answer: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    approvals: int = 0
    paused_round: int | None = None
    tenant: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def unanswered_pause(self) -> bool:
        """A pause the planner has not resumed yet: the pause of round n (n approvals
        before it) is answered by the ``TaskResumed`` of round n."""
        return self.paused_round is not None and self.paused_round >= self.approvals

    def step(self, step_id: str) -> StepView | None:
        return next((s for s in self.steps if s.id == step_id), None)

    def summary(self) -> TaskSummary:
        return TaskSummary(
            task_id=self.task_id,
            goal=self.goal,
            status=self.status,
            answer=self.answer,
            error=self.error,
            usage=self.usage,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskProjection:
        """Rebuild from a stored row (column names as in ``to_row``, JSON already decoded)."""
        plan = row["plan"] or {}
        return cls(
            task_id=row["task_id"],
            status=TaskStatus(row["status"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            last_seq=row["last_seq"],
            goal=row["goal"] or "",
            plan_revision=plan.get("revision", 0),
            plan=tuple(PlanStep.model_validate(s) for s in plan.get("steps", [])),
            steps=tuple(StepView.from_json(s) for s in row["steps"] or []),
            answer=row["answer"],
            error=row["error"],
            usage=Usage.model_validate(row["usage"] or {}),
            approvals=row.get("approvals") or 0,
            paused_round=row.get("paused_round"),
            tenant=row.get("tenant") or "",
        )

    def to_row(self) -> dict[str, Any]:
        """Column values of the ``tasks`` table; JSON columns as plain dicts and lists."""
        return {
            "task_id": self.task_id,
            "goal": self.goal,
            "status": self.status.value,
            "plan": {
                "revision": self.plan_revision,
                "steps": [s.model_dump(mode="json") for s in self.plan],
            },
            "steps": [s.to_json() for s in self.steps],
            "answer": self.answer,
            "error": self.error,
            "usage": self.usage.model_dump(mode="json"),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_seq": self.last_seq,
            "approvals": self.approvals,
            "paused_round": self.paused_round,
            "tenant": self.tenant,
        }


def apply(current: TaskProjection | None, event: Event, seq: int) -> TaskProjection | None:
    """The projection after ``event`` (stream sequence ``seq``); None while nothing is known."""
    if not changes_projection(event):
        return current
    p = current or TaskProjection(
        task_id=event.task_id,
        status=TaskStatus.SUBMITTED,
        created_at=event.occurred_at,
        updated_at=event.occurred_at,
    )
    p = replace(
        p,
        last_seq=max(p.last_seq, seq),
        created_at=min(p.created_at, event.occurred_at),
        updated_at=max(p.updated_at, event.occurred_at),
    )
    return _approval_status(_transition(p, event))


def replay(history: Iterable[tuple[int, Event]]) -> TaskProjection | None:
    """Fold a task's stored events, ``(stream_seq, event)`` in stream order."""
    projection: TaskProjection | None = None
    for seq, event in history:
        projection = apply(projection, event, seq)
    return projection


def in_order(current: TaskProjection | None, seq: int) -> bool:
    """True if an event at ``seq`` can be applied on top of ``current`` (else: replay)."""
    return current is None or seq > current.last_seq


def changes_projection(event: Event) -> bool:
    """False for the events ``apply`` passes over (see ``UNPROJECTED``)."""
    return not isinstance(event, UNPROJECTED)


def _transition(p: TaskProjection, event: Event) -> TaskProjection:
    match event:
        case TaskSubmitted():
            # The first event of a task; if it is applied late, it only fills in the goal
            # and the tenant.
            return replace(p, goal=event.goal, tenant=event.tenant)
        case PlanCreated():
            return _planned(p, event)
        case StepReady():
            return _step_ready(p, event)
        case StepCompleted():
            done = StepStatus.COMPLETED
            return _step_result(p, event, status=done, output=event.output, error=None)
        case StepFailed():
            view = p.step(event.step_id)
            output = view.output if view is not None else None
            return _step_result(
                p, event, status=StepStatus.FAILED, output=output, error=event.error
            )
        case StepPaused():
            # Not a failure: the attempt's spend counts, the step resumes after approval.
            view = p.step(event.step_id)
            output = view.output if view is not None else None
            return _step_result(p, event, status=StepStatus.PAUSED, output=output, error=None)
        case TaskPaused() | TaskResumed():
            return _pause_rounds(p, event)
        case TaskCompleted():
            return _ended(p, TaskStatus.COMPLETED, event.usage, answer=event.answer)
        case TaskFailed():
            return _ended(p, TaskStatus.FAILED, event.usage, error=event.reason)
        case TaskCancelled():
            return _ended(p, TaskStatus.CANCELLED, event.usage, error=event.reason)
        case TaskCancelRequested():
            return replace(p, status=_moved(p.status, TaskStatus.CANCEL_REQUESTED))
        case _:
            return p


def _pause_rounds(p: TaskProjection, event: TaskPaused | TaskResumed) -> TaskProjection:
    """Record the planner's pause or resumption; ``_approval_status`` reads the rounds."""
    if isinstance(event, TaskPaused):
        return replace(p, paused_round=max(event.round, p.paused_round or 0))
    return replace(p, approvals=max(event.round + 1, p.approvals))


def _approval_status(p: TaskProjection) -> TaskProjection:
    """Awaiting approval while a budget pause is unanswered; running once it is.

    Worked out from the rounds after every event, so a pause and its resumption give
    the same status whichever is applied first. A terminal state or a cancel request wins.
    """
    if p.terminal or p.status is TaskStatus.CANCEL_REQUESTED:
        return p
    if p.unanswered_pause:
        return replace(p, status=TaskStatus.AWAITING_APPROVAL)
    if p.status is TaskStatus.AWAITING_APPROVAL:
        return replace(p, status=TaskStatus.RUNNING)
    return p


def _moved(current: TaskStatus, target: TaskStatus) -> TaskStatus:
    """Terminal states are final; a cancel request yields only to the end of the task."""
    if current in TERMINAL_STATUSES:
        return current
    if current is TaskStatus.CANCEL_REQUESTED and target not in TERMINAL_STATUSES:
        return current
    return target


def _spent(p: TaskProjection, usage: Usage) -> Usage:
    # Once the task has ended its usage is the total its terminal event reported;
    # a late step event must not count its spend a second time.
    return p.usage if p.terminal else p.usage + usage


def _planned(p: TaskProjection, event: PlanCreated) -> TaskProjection:
    usage = _spent(p, event.usage)
    if event.revision <= p.plan_revision:  # an older plan: only its spend counts
        return replace(p, usage=usage)
    # Step events seen before the first plan (out of order) keep their progress; a
    # re-plan starts every step afresh, as the planner does.
    known = {s.id: s for s in p.steps} if p.plan_revision == 0 else {}
    steps = tuple(
        replace(known[s.id], title=s.title) if s.id in known else StepView(id=s.id, title=s.title)
        for s in event.steps
    )
    late_first_plan = p.plan_revision == 0 and p.status is not TaskStatus.SUBMITTED
    status = p.status if late_first_plan else _moved(p.status, TaskStatus.PLANNED)
    return replace(
        p,
        plan_revision=event.revision,
        plan=tuple(event.steps),
        steps=steps,
        status=status,
        usage=usage,
    )


def _step_ready(p: TaskProjection, event: StepReady) -> TaskProjection:
    view = p.step(event.step.id) or StepView(id=event.step.id, title=event.step.title)
    if view.attempt > event.attempt:
        return p  # a newer attempt is already under way
    if view.attempt == event.attempt and view.status in _ATTEMPT_OVER:
        return p  # this attempt's result is already in
    view = replace(view, title=event.step.title, status=StepStatus.RUNNING, attempt=event.attempt)
    return replace(_with_step(p, view), status=_moved(p.status, TaskStatus.RUNNING))


def _step_result(
    p: TaskProjection,
    event: StepCompleted | StepFailed | StepPaused,
    *,
    status: StepStatus,
    output: str | None,
    error: str | None,
) -> TaskProjection:
    spent = _spent(p, event.usage)  # a stale attempt's spend is real all the same
    view = p.step(event.step_id) or StepView(id=event.step_id)
    view = replace(view, usage=view.usage + event.usage)
    if view.attempt > event.attempt:
        # A newer attempt's result must not be overwritten; its spend still counts.
        return replace(_with_step(p, view), usage=spent)
    view = replace(view, status=status, attempt=event.attempt, output=output, error=error)
    p = _with_step(p, view)
    return replace(p, status=_moved(p.status, TaskStatus.RUNNING), usage=spent)


def _with_step(p: TaskProjection, view: StepView) -> TaskProjection:
    if p.step(view.id) is None:
        return replace(p, steps=(*p.steps, view))
    return replace(p, steps=tuple(view if s.id == view.id else s for s in p.steps))


def _ended(
    p: TaskProjection,
    status: TaskStatus,
    total: Usage,
    *,
    answer: str | None = None,
    error: str | None = None,
) -> TaskProjection:
    if p.terminal:  # the first end wins; a second one is a late duplicate or a bug upstream
        return p
    return replace(p, status=status, usage=total, answer=answer, error=error)


# --- semantic memory -----------------------------------------------------------------


def content_hash(text: str) -> bytes:
    """The embedding cache key of a text (with the model name): SHA-256 of its UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class TextTooLarge(ValueError):
    """A text is over the service's size limit; the message gives both sizes."""


def check_size(text: str, limit: int, what: str = "text") -> str:
    """Return ``text`` if it is at most ``limit`` characters; else raise, never truncate."""
    if len(text) > limit:
        raise TextTooLarge(
            f"{what} is {len(text)} characters; memory accepts at most {limit} and does "
            "not truncate: split it into smaller pieces"
        )
    return text


@dataclass(frozen=True)
class NewMemory:
    """A memory about to be stored (its embedding travels beside it)."""

    memory_id: str
    text: str
    kind: str
    metadata: dict[str, Any]
    task_id: str | None
    source: str


@dataclass(frozen=True)
class MemoryQuery:
    """What to look for besides the query text: how many, and the filters."""

    k: int
    kind: str | None = None
    task_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    min_score: float = -1.0


@dataclass(frozen=True)
class Found:
    """One search hit; ``score`` is the cosine similarity, -1..1."""

    memory_id: str
    text: str
    kind: str
    score: float
    task_id: str | None
    metadata: dict[str, Any]


# --- cost reports --------------------------------------------------------------------


@dataclass(frozen=True)
class CostReport:
    """Spend over a time range: task count, per-model sums (ModelUsage fields), top tasks.

    A task's spend is the sum of its recorded LLM calls (``LLMCalled``: every call of
    the planner and the executors, as soon as it is made); a task without any recorded
    call (stored before memory kept them) counts the usage its lifecycle events reported.
    """

    tasks: int
    by_model: dict[str, dict[str, Any]]
    costliest: list[TaskCost]

    def model_usage(self) -> dict[str, ModelUsage]:
        return {
            model: ModelUsage(
                prompt_tokens=int(sums.get("prompt_tokens") or 0),
                completion_tokens=int(sums.get("completion_tokens") or 0),
                cached_tokens=int(sums.get("cached_tokens") or 0),
                calls=int(sums.get("calls") or 0),
                cost_usd=float(sums.get("cost_usd") or 0.0),
            )
            for model, sums in self.by_model.items()
        }

    def total(self) -> ModelUsage:
        return Usage(by_model=self.model_usage()).total
