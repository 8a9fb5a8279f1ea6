"""Record real LLM calls in the replay format, so a run can be replayed later.

Each call is written as one small JSON file, ``<dir>/<task_id>/<conversation>-<turn>.json``,
so the planner and executor processes never write the same file; ``build_transcript``
gathers one task's files into a :class:`Transcript`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import ChatRequest, ChatResponse, LLMProvider
from .replay import RecordedCall, RecordedReply, RecordedUsage, Transcript, Turn


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text) or "default"


class RecordingProvider:
    def __init__(self, inner: LLMProvider, directory: Path) -> None:
        self.inner = inner
        self.directory = directory
        self.name = f"recording({inner.name})"

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def chat(self, request: ChatRequest) -> ChatResponse:
        response = await self.inner.chat(request)
        turn = sum(1 for m in request.messages if m.role == "assistant")
        reply = RecordedReply(
            content=response.message.content,
            tool_calls=[
                RecordedCall(name=c.name, arguments=c.arguments)
                for c in response.message.tool_calls
            ],
            usage=RecordedUsage(
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
                cached_tokens=response.usage.cached_tokens,
            ),
        )
        folder = self.directory / _slug(request.task_id or "no-task")
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "conversation": request.conversation,
            "turn": turn,
            "model": response.model,
            "reply": reply.model_dump(),
        }
        path = folder / f"{_slug(request.conversation)}-{turn:03d}.json"
        path.write_text(json.dumps(record, indent=1))
        return response


def build_transcript(task_dir: Path, goal: str, description: str = "") -> Transcript:
    """One task's recorded calls as a transcript (turns in order per conversation)."""
    records = [json.loads(p.read_text()) for p in sorted(task_dir.glob("*.json"))]
    if not records:
        raise FileNotFoundError(f"no recorded LLM calls in {task_dir}")
    conversations: dict[str, list[Turn]] = {}
    for record in sorted(records, key=lambda r: (r["conversation"], r["turn"])):
        turns = conversations.setdefault(record["conversation"], [])
        turns.append(Turn(reply=RecordedReply.model_validate(record["reply"])))
    return Transcript(
        description=description or "Recorded with agentbus run --record.",
        goal=goal,
        model=records[0]["model"],
        conversations=conversations,
    )
