"""The gateway's HTTP routes and use cases, in process (httpx on the ASGI app), on fakes
for memory and the events stream. tests/integration/test_gateway.py proves the same
against a real nats-server, Postgres and the services."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from agentbus.contracts import (
    TaskApproved,
    TaskCancelRequested,
    TaskStatus,
    TaskSubmitted,
    TaskSummary,
)
from agentbus.gateway.domain import KeyCache
from agentbus.gateway.main import api_app
from agentbus.gateway.usecases import Gateway
from tests.fakes import DirectoryInMemory, EventsInMemory, RecordingPublisher

KEY, OTHER_KEY = "agb_mine", "agb_theirs"


@dataclass
class Rig:
    http: httpx.AsyncClient
    directory: DirectoryInMemory
    events: EventsInMemory
    published: RecordingPublisher

    def own(
        self,
        task_id: str,
        tenant: str = "acme",
        status: TaskStatus = TaskStatus.RUNNING,
        at: datetime | None = None,
    ) -> None:
        when = at or datetime.now(UTC)
        self.events.submissions[task_id] = TaskSubmitted(task_id=task_id, goal="g", tenant=tenant)
        self.directory.known[task_id] = (
            tenant,
            TaskSummary(task_id=task_id, goal="g", status=status, created_at=when, updated_at=when),
        )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    directory, events, published = DirectoryInMemory(), EventsInMemory(), RecordingPublisher()
    directory.add_key(KEY, "acme", "key_a")
    directory.add_key(OTHER_KEY, "globex", "key_g")
    app = api_app(max_body_bytes=4096, lifespan=None)
    app.state.gateway = Gateway(directory, events, published, keys=KeyCache(ttl_s=60))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gw", headers={"Authorization": f"Bearer {KEY}"}
    ) as http:
        yield Rig(http, directory, events, published)


def problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    return body


async def test_a_submitted_task_carries_the_callers_tenant(rig: Rig) -> None:
    response = await rig.http.post("/v1/tasks", json={"goal": "count primes"})
    assert response.status_code == 201
    created = response.json()
    (event,) = rig.published.of(TaskSubmitted)
    assert (event.task_id, event.tenant, event.submitted_by) == (
        created["task_id"],
        "acme",
        "api:key_a",
    )
    assert created["events_url"] == f"/v1/tasks/{event.task_id}/events"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "send your API key"),
        ({"Authorization": "Bearer agb_nope"}, "unknown or revoked"),
        ({"Authorization": "Basic abc"}, "send your API key"),
    ],
)
async def test_a_request_without_a_valid_key_is_401(
    rig: Rig, headers: dict[str, str], detail: str
) -> None:
    rig.http.headers.pop("Authorization")
    response = await rig.http.get("/v1/tasks", headers=headers)
    assert detail in str(problem(response, 401)["detail"])
    assert rig.published.events == []


async def test_a_key_is_checked_once_then_cached(rig: Rig) -> None:
    for _ in range(3):
        assert (await rig.http.get("/v1/tasks")).status_code == 200
    assert rig.directory.verified == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body.goal"),
        ({"goal": ""}, "body.goal"),
        ({"goal": "g", "budget": {"max_steps": 0}}, "body.budget.max_steps"),
    ],
)
async def test_bad_input_is_a_problem_naming_the_field(
    rig: Rig, body: dict[str, object], field: str
) -> None:
    response = await rig.http.post("/v1/tasks", json=body)
    errors = problem(response, 422)["errors"]
    assert field in [e["field"] for e in errors]  # type: ignore[attr-defined, index]
    assert rig.published.events == []


async def test_an_oversized_body_is_413(rig: Rig) -> None:
    response = await rig.http.post("/v1/tasks", json={"goal": "x" * 10_000})
    problem(response, 413)
    assert rig.published.events == []


async def test_another_tenants_task_is_404_on_every_route(rig: Rig) -> None:
    rig.own("tsk_theirs", tenant="globex")
    for method, path in [
        ("GET", "/v1/tasks/tsk_theirs"),
        ("POST", "/v1/tasks/tsk_theirs/cancel"),
        ("POST", "/v1/tasks/tsk_theirs/approve"),
        ("GET", "/v1/tasks/tsk_theirs/events"),
    ]:
        body = {} if path.endswith("approve") else None
        response = await rig.http.request(method, path, json=body)
        assert problem(response, 404)["detail"] == "no task tsk_theirs", path
    assert rig.published.events == []
    assert [t["task_id"] for t in (await rig.http.get("/v1/tasks")).json()["tasks"]] == []


async def test_a_task_just_submitted_is_found_before_memory_has_it(rig: Rig) -> None:
    rig.events.submissions["tsk_new"] = TaskSubmitted(task_id="tsk_new", goal="g", tenant="acme")
    detail = (await rig.http.get("/v1/tasks/tsk_new")).json()
    assert (detail["task"]["status"], detail["task"]["goal"]) == ("submitted", "g")


async def test_cancel_and_approve_publish_the_cli_events(rig: Rig) -> None:
    rig.own("tsk_1")
    cancel = await rig.http.post("/v1/tasks/tsk_1/cancel", json={"reason": "enough"})
    approve = await rig.http.post("/v1/tasks/tsk_1/approve", json={"add_cost_usd": 1.5})
    assert (cancel.status_code, approve.status_code) == (202, 202)
    (cancelled,) = rig.published.of(TaskCancelRequested)
    (approved,) = rig.published.of(TaskApproved)
    assert (cancelled.reason, approved.add_cost_usd, approved.approved_by) == (
        "enough",
        1.5,
        "api:key_a",
    )
    assert approve.json()["event_id"] == approved.event_id


async def test_pages_follow_the_cursor_to_the_end(rig: Rig) -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    for i in range(5):
        rig.own(f"tsk_{i}", at=start + timedelta(minutes=i))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await rig.http.get("/v1/tasks", params=params)).json()
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"tsk_{i}" for i in (4, 3, 2, 1, 0)]
    bad = await rig.http.get("/v1/tasks", params={"cursor": "not-a-cursor"})
    assert problem(bad, 400)["errors"][0]["field"] == "query.cursor"  # type: ignore[index]


async def test_costs_are_only_the_callers(rig: Rig) -> None:
    rig.own("tsk_1")
    rig.own("tsk_2", tenant="globex")
    reply = (await rig.http.get("/v1/costs")).json()
    assert reply["tasks"] == 1
    assert rig.directory.costs_asked[0].tenant == "acme"


async def test_a_key_memory_cannot_check_is_503_not_401(rig: Rig) -> None:
    rig.directory.down = True
    response = await rig.http.get("/v1/tasks")
    assert "cannot check the API key now" in str(problem(response, 503)["detail"])


async def test_memory_away_is_503_not_500(rig: Rig) -> None:
    await rig.http.get("/v1/tasks")  # the key is cached now
    rig.directory.down = True
    assert "memory could not list tasks" in str(
        problem(await rig.http.get("/v1/tasks"), 503)["detail"]
    )


def sse(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "id" in fields:
            frames.append(fields)
    return frames


async def test_events_resume_after_last_event_id_and_end_after_the_terminal_one(rig: Rig) -> None:
    rig.own("tsk_1")
    for kind in ("task.submitted", "task.plan_created", "step.ready", "step.completed"):
        rig.events.add("tsk_1", kind, json.dumps({"type": kind}).encode())
    rig.events.add("tsk_1", "task.completed", b'{"type": "task.completed"}')

    response = await rig.http.get("/v1/tasks/tsk_1/events", headers={"Last-Event-ID": "2"})
    frames = sse(response.text)
    assert [(f["id"], f["event"]) for f in frames] == [
        ("3", "step.ready"),
        ("4", "step.completed"),
        ("5", "task.completed"),
    ]
    assert json.loads(frames[-1]["data"]) == {"type": "task.completed"}
    assert rig.events.followers == 0  # the stream ended and let go of the consumer


async def test_a_live_stream_delivers_events_as_they_come(rig: Rig) -> None:
    rig.own("tsk_1")
    rig.events.add("tsk_1", "task.submitted")

    async def later() -> None:
        await asyncio.sleep(0.05)
        rig.events.add("tsk_1", "step.ready")
        rig.events.add("tsk_1", "task.failed")

    pusher = asyncio.create_task(later())
    async with asyncio.timeout(10):
        response = await rig.http.get("/v1/tasks/tsk_1/events")
    await pusher
    assert [f["event"] for f in sse(response.text)] == [
        "task.submitted",
        "step.ready",
        "task.failed",
    ]


async def test_a_bad_last_event_id_is_400_before_the_stream(rig: Rig) -> None:
    rig.own("tsk_1")
    response = await rig.http.get("/v1/tasks/tsk_1/events", headers={"Last-Event-ID": "x"})
    assert problem(response, 400)["errors"][0]["field"] == "header.Last-Event-ID"  # type: ignore[index]


async def test_the_openapi_document_names_the_contract_models(rig: Rig) -> None:
    schemas = (await rig.http.get("/openapi.json")).json()["components"]["schemas"]
    assert {"SubmitTask", "TaskCreated", "TaskDetail", "TaskPage", "Problem", "Budget"} <= set(
        schemas
    )


async def test_a_chunked_body_is_cut_at_the_limit(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"goal": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = await rig.http.post(
        "/v1/tasks", content=chunks(), headers={"Content-Type": "application/json"}
    )
    problem(response, 413)
    assert rig.published.events == []
