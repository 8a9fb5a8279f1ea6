"""A scripted model behind a real OpenAI-compatible HTTP server on loopback, for tests
and benchmarks that run the real services.

The script plays the agentbus roles from what each request says, so parallel steps on
several executor replicas need no ordering:

* the planner's plan request gets a plan of ``steps`` independent steps;
* an executor's step runs ``code`` with ``run_python`` and then calls ``finish_step``
  with the tool's output (so a resumed dialogue finishes without running again);
* the answer request gets ``answer:`` and the steps' results.

Every reply reports usage as ``usage_ratio`` of the worst case the request allows (its
UTF-8 size as prompt tokens, its ``max_tokens`` as output), so budgets run out in a few
calls. ``hooks`` can delay, fail (429 with Retry-After) or record any request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.fake_llm import Scripted, loopback_server

MODEL = "gpt-4o-mini"


@dataclass
class Seen:
    """One request as the server saw it."""

    at: float  # time.monotonic()
    role: str  # plan | step | answer | replan
    body: dict[str, Any]
    status: int = 200
    auth: str = ""

    @property
    def step_prompt(self) -> str:
        return next(
            (m.get("content") or "" for m in self.body["messages"] if m["role"] == "user"), ""
        )

    @property
    def turns_done(self) -> int:
        return sum(1 for m in self.body["messages"] if m["role"] == "assistant")


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class ScriptedLLM:
    steps: int = 1
    code: str = "print(6 * 7)"
    usage_ratio: float = 0.2
    hook: Callable[[Seen], Reply | None] | None = None
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, role: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if role is None or s.role == role)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        role = classify(body)
        messages = body["messages"]
        if role == "plan":
            plan = {
                "steps": [
                    {"id": f"s{i}", "title": f"part {i}", "instructions": f"compute part {i}"}
                    for i in range(1, self.steps + 1)
                ]
            }
            return self._reply(body, content=json.dumps(plan))
        if role == "replan":
            return self._reply(body, content=json.dumps({"steps": []}))
        if role == "answer":
            return self._reply(body, content="answer: every part is done")
        last = messages[-1]
        if last["role"] == "tool":
            output = (last.get("content") or "").strip()
            return self._reply(
                body, call=("finish_step", {"result": f"ran it: {output[-200:]}", "success": True})
            )
        return self._reply(body, call=("run_python", {"code": self.code, "timeout_s": 60}))

    def _reply(
        self,
        body: dict[str, Any],
        *,
        content: str | None = None,
        call: tuple[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        size = len(json.dumps(body["messages"]).encode())
        usage = {
            "prompt_tokens": int(size * self.usage_ratio),
            "completion_tokens": int(body.get("max_tokens", 256) * self.usage_ratio),
        }
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if call is not None:
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.seen)}",
                    "type": "function",
                    "function": {"name": call[0], "arguments": json.dumps(call[1])},
                }
            ]
        return {
            "model": MODEL,
            "choices": [{"message": message, "finish_reason": "stop"}],
            "usage": usage,
        }


def classify(body: dict[str, Any]) -> str:
    system = next((m.get("content") or "" for m in body["messages"] if m["role"] == "system"), "")
    if body.get("tools"):
        return "step"
    if "Break the user's task" in system:
        return "plan"
    if "A step of the user's task failed" in system:
        return "replan"
    return "answer"


@contextmanager
def scripted_llm(script: ScriptedLLM) -> Iterator[ScriptedLLM]:
    """Serve ``script`` on a free loopback port; ``script.url`` is the base URL (…/v1)."""

    def answer(path: str, headers: dict[str, str], body: dict[str, Any]) -> Scripted:
        seen = Seen(
            at=time.monotonic(),
            role=classify(body),
            body=body,
            auth=headers.get("authorization", ""),
        )
        reply = (script.hook(seen) if script.hook else None) or Reply()
        seen.status = reply.status
        with script._lock:
            script.seen.append(seen)
        if reply.status != 200:
            error = {"error": {"message": "scripted error"}}
            return Scripted(reply.status, error, reply.headers, reply.delay_s)
        return Scripted(200, script.answer(body), reply.headers, reply.delay_s)

    with loopback_server(answer) as url:
        script.url = url
        yield script


def llm_env(script: ScriptedLLM, **extra: str) -> dict[str, str]:
    """Environment for services that talk to ``script``."""
    return {
        "AGENTBUS_LLM_PROVIDER": "openai",
        "AGENTBUS_LLM_BASE_URL": script.url,
        "AGENTBUS_LLM_MODEL": MODEL,
        "AGENTBUS_LLM_API_KEY": "sk-scripted",
        "AGENTBUS_LLM_MAX_TOKENS": "256",
        "AGENTBUS_PLANNER_SWEEP_INTERVAL_S": "0.2",
        "AGENTBUS_EXECUTOR_USE_MEMORY": "false",
        **extra,
    }
