"""The gateway's use cases: each HTTP request, for one caller (a tenant), over the ports.

Which tenant a task belongs to is read from its ``TaskSubmitted`` in the events stream
(there from the moment ``POST /v1/tasks`` returns), or from memory once the stream no
longer holds it; summaries, lists and costs come from memory, asked for the caller's
tenant only."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from agentbus.contracts import (
    TERMINAL_EVENT_TYPES,
    Accepted,
    ApproveTask,
    CancelTask,
    CostsReply,
    CostsRequest,
    Reply,
    SubmitTask,
    TaskApproved,
    TaskCancelRequested,
    TaskCreated,
    TaskDetail,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListRequest,
    TaskPage,
    TaskStatus,
    TaskSubmitted,
    TaskSummary,
    new_id,
)
from agentbus.core import semconv

from .domain import (
    Caller,
    KeyCache,
    NotFound,
    Unauthorized,
    Unavailable,
    decode_cursor,
    encode_cursor,
    hash_key,
)
from .ports import Directory, EventLog, Publisher, RpcError, StoredMessage

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _unknown(reply: TaskHistoryReply) -> bool:
    """Memory's answer for a task it does not know (or not for this tenant)."""
    return reply.task is None and (reply.ok or (reply.error or "").startswith("unknown task"))


def _answered(reply: Reply, what: str) -> None:
    if not reply.ok:
        raise Unavailable(f"memory could not {what}: {reply.error}")


@dataclass
class Gateway:
    directory: Directory
    events: EventLog
    publisher: Publisher
    keys: KeyCache = field(default_factory=lambda: KeyCache(ttl_s=30.0))

    # --- who is calling --------------------------------------------------------------

    async def authenticate(self, key: str) -> Caller:
        key_hash = hash_key(key)
        now = time.monotonic()
        known = self.keys.get(key_hash, now)
        if known is not None:
            return known
        try:
            reply = await self.directory.verify_key(key_hash)
        except RpcError as exc:
            raise Unavailable(f"cannot check the API key now: {exc}") from exc
        if reply.refused:
            raise Unauthorized("the API key is unknown or revoked")
        if not reply.ok:
            raise Unavailable(f"cannot check the API key now: {reply.error}")
        caller = Caller(tenant=reply.tenant, key_id=reply.key_id)
        self.keys.put(key_hash, caller, now)
        return caller

    # --- tasks -----------------------------------------------------------------------

    async def submit(self, caller: Caller, body: SubmitTask) -> TaskCreated:
        event = TaskSubmitted(
            task_id=new_id("tsk"),
            goal=body.goal,
            budget=body.budget,
            tenant=caller.tenant,
            submitted_by=f"api:{caller.key_id}",
        )
        await self.publisher.publish(event)
        log.info("task submitted", **{semconv.TASK_ID: event.task_id})
        return TaskCreated(task_id=event.task_id, events_url=f"/v1/tasks/{event.task_id}/events")

    async def task(self, caller: Caller, task_id: str) -> TaskDetail:
        reply = await self._ask(
            self.directory.history(TaskHistoryRequest(task_id=task_id, tenant=caller.tenant)),
            "read the task",
        )
        if reply.ok and reply.task is not None:
            return TaskDetail(task=reply.task, steps=reply.steps)
        if not _unknown(reply):
            raise Unavailable(f"memory could not read the task: {reply.error}")
        # Memory has not stored it yet (just submitted) or does not know it: the stream says.
        submitted = await self._owned(caller, task_id)
        return TaskDetail(
            task=TaskSummary(
                task_id=task_id,
                goal=submitted.goal,
                status=TaskStatus.SUBMITTED,
                created_at=submitted.occurred_at,
                updated_at=submitted.occurred_at,
            )
        )

    async def tasks(
        self, caller: Caller, *, status: TaskStatus | None, cursor: str | None, limit: int
    ) -> TaskPage:
        until = decode_cursor(cursor) if cursor else None
        request = TaskListRequest(tenant=caller.tenant, status=status, until=until, limit=limit)
        reply = await self._ask(self.directory.tasks(request), "list tasks")
        _answered(reply, "list tasks")
        full = len(reply.tasks) == limit
        return TaskPage(
            tasks=reply.tasks,
            next_cursor=encode_cursor(reply.tasks[-1].created_at) if full else None,
        )

    async def cancel(self, caller: Caller, task_id: str, body: CancelTask) -> Accepted:
        await self._owned(caller, task_id)
        event = TaskCancelRequested(task_id=task_id, reason=body.reason)
        await self.publisher.publish(event)
        return Accepted(task_id=task_id, event_id=event.event_id)

    async def approve(self, caller: Caller, task_id: str, body: ApproveTask) -> Accepted:
        await self._owned(caller, task_id)
        event = TaskApproved(
            task_id=task_id, approved_by=f"api:{caller.key_id}", **body.model_dump()
        )
        await self.publisher.publish(event)
        return Accepted(task_id=task_id, event_id=event.event_id)

    async def costs(self, caller: Caller, request: CostsRequest) -> CostsReply:
        scoped = request.model_copy(update={"tenant": caller.tenant})
        reply = await self._ask(self.directory.costs(scoped), "total costs")
        _answered(reply, "total costs")
        return reply

    # --- events ----------------------------------------------------------------------

    async def check_owner(self, caller: Caller, task_id: str) -> None:
        """404 unless the task is the caller's: before an event stream starts."""
        await self._owned(caller, task_id)

    async def follow(self, task_id: str, after: int) -> AsyncIterator[StoredMessage]:
        """The task's events after stream sequence ``after``, live; it ends after the
        task's terminal event (at once, if the client had seen it already)."""
        async for message in self.events.follow(task_id):
            if message.seq > after:
                yield message
            if message.type in TERMINAL_EVENT_TYPES:
                return

    # --- the shared steps ------------------------------------------------------------

    async def _owned(self, caller: Caller, task_id: str) -> TaskSubmitted:
        submitted = await self.events.submitted(task_id)
        if submitted is not None:
            if submitted.tenant != caller.tenant:
                raise NotFound(f"no task {task_id}")
            return submitted
        reply = await self._ask(
            self.directory.history(TaskHistoryRequest(task_id=task_id, tenant=caller.tenant)),
            "read the task",
        )
        if reply.ok and reply.task is not None:
            return TaskSubmitted(
                task_id=task_id,
                goal=reply.task.goal or "(unknown)",
                tenant=caller.tenant,
                occurred_at=reply.task.created_at,
            )
        if not _unknown(reply):
            raise Unavailable(f"memory could not read the task: {reply.error}")
        raise NotFound(f"no task {task_id}")

    async def _ask(self, call: Awaitable[T], what: str) -> T:
        try:
            return await call
        except RpcError as exc:
            raise Unavailable(f"memory could not {what}: {exc}") from exc
