"""The gateway's HTTP routes (``/v1``): each parses, finds the caller, calls one use case.

Every route needs ``Authorization: Bearer <key>``; errors are RFC 9457 problem details
(``main.problem_handlers``). The events route streams Server-Sent Events whose ids are
JetStream stream sequences, so ``Last-Event-ID`` resumes on any replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent

from agentbus.contracts import (
    Accepted,
    ApproveTask,
    CancelTask,
    CostsReply,
    CostsRequest,
    Problem,
    SubmitTask,
    TaskCreated,
    TaskDetail,
    TaskPage,
    TaskStatus,
)

from .domain import Caller, bearer_key, last_event_id
from .usecases import Gateway

_bearer = HTTPBearer(auto_error=False, description="An API key: `agentbus keys create`.")
TaskId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="A task id.")]
_PROBLEMS = {
    code: {"model": Problem, "content": {"application/problem+json": {}}}
    for code in (400, 401, 404, 413, 422, 503)
}


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway  # built by main.py's lifespan
    return gateway


Uses = Annotated[Gateway, Depends(_gateway)]


async def _caller(
    uses: Uses, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> Caller:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    return await uses.authenticate(bearer_key(header))


Calling = Annotated[Caller, Depends(_caller)]


def _resume_after(
    last_event: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this id.")
    ] = None,
) -> int:
    return last_event_id(last_event)  # a bad id is a 400 before the stream starts


async def _owned_stream(task_id: TaskId, caller: Calling, uses: Uses) -> str:
    await uses.check_owner(caller, task_id)  # 404 before the stream starts
    return task_id


def build_api() -> APIRouter:
    api = APIRouter(prefix="/v1", responses=_PROBLEMS)  # type: ignore[arg-type]

    @api.post("/tasks", status_code=201, tags=["tasks"])
    async def submit_task(body: SubmitTask, caller: Calling, uses: Uses) -> TaskCreated:
        """Submit a task; its events stream from ``events_url``."""
        return await uses.submit(caller, body)

    @api.get("/tasks", tags=["tasks"])
    async def list_tasks(
        caller: Calling,
        uses: Uses,
        status: Annotated[TaskStatus | None, Query(description="Only this status.")] = None,
        cursor: Annotated[str | None, Query(description="From a page's next_cursor.")] = None,
        limit: Annotated[int, Query(ge=1, le=200, description="Tasks per page.")] = 50,
    ) -> TaskPage:
        """The caller's tasks, newest first."""
        return await uses.tasks(caller, status=status, cursor=cursor, limit=limit)

    @api.get("/tasks/{task_id}", tags=["tasks"])
    async def get_task(task_id: TaskId, caller: Calling, uses: Uses) -> TaskDetail:
        """Status, plan steps, answer or error, and cost."""
        return await uses.task(caller, task_id)

    @api.post("/tasks/{task_id}/cancel", status_code=202, tags=["tasks"])
    async def cancel_task(
        task_id: TaskId, caller: Calling, uses: Uses, body: CancelTask | None = None
    ) -> Accepted:
        """Stop the task: running steps stop at once, nothing new starts."""
        return await uses.cancel(caller, task_id, body or CancelTask())

    @api.post("/tasks/{task_id}/approve", status_code=202, tags=["tasks"])
    async def approve_task(
        task_id: TaskId, body: ApproveTask, caller: Calling, uses: Uses
    ) -> Accepted:
        """Add budget to a task paused for approval; it resumes where it stopped."""
        return await uses.approve(caller, task_id, body)

    @api.get("/costs", tags=["costs"])
    async def costs(
        caller: Calling,
        uses: Uses,
        since: Annotated[datetime | None, Query(description="Submitted at or after.")] = None,
        until: Annotated[datetime | None, Query(description="Submitted before.")] = None,
        top: Annotated[int, Query(ge=0, le=1000, description="Costliest tasks listed.")] = 20,
    ) -> CostsReply:
        """LLM spend of the caller's tasks, by model and by task."""
        return await uses.costs(caller, CostsRequest(since=since, until=until, top_tasks=top))

    @api.get("/tasks/{task_id}/events", response_class=EventSourceResponse, tags=["events"])
    async def task_events(
        task_id: Annotated[str, Depends(_owned_stream)],
        after: Annotated[int, Depends(_resume_after)],
        uses: Uses,
    ) -> AsyncIterator[ServerSentEvent]:
        """The task's events as they happen (``event``: the type, ``data``: the event as
        published, ``id``: its stream sequence), from the first or after
        ``Last-Event-ID``; the stream ends after the task's terminal event."""
        async for message in uses.follow(task_id, after):
            yield ServerSentEvent(
                raw_data=message.body.decode(), event=message.type, id=str(message.seq)
            )

    return api
