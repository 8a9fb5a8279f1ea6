"""Replay a recorded transcript, so demos and tests run with no LLM at all.

A transcript holds one script per *conversation* (``planner/plan``, ``executor/s1``,
``planner/answer``): the replies the model gave, turn by turn. Lookup is stateless (the
turn is the number of assistant messages already in the request), so it works across
processes and for steps running in parallel.

It fails loudly, with :class:`ReplayMismatch`, when the conversation departs from the
recording. It matches only on what is stable: the conversation key, the earlier replies
(tools called and their arguments), the tools offered, and the substrings a turn
``expect``s in the prompt or in the latest tool results; never on ids or timestamps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from agentbus.contracts import ModelUsage

from .base import ChatRequest, ChatResponse, LLMError, Message, ToolCall
from .pricing import PriceTable


class RecordedCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class RecordedUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class RecordedReply(BaseModel):
    content: str | None = None
    tool_calls: list[RecordedCall] = Field(default_factory=list)
    usage: RecordedUsage = Field(default_factory=RecordedUsage)


class Expect(BaseModel):
    prompt_contains: list[str] = Field(
        default_factory=list, description="Substrings that must appear in the request's messages."
    )
    tool_results_contain: list[str] = Field(
        default_factory=list,
        description="Substrings that must appear in the tool results since the last reply.",
    )


class Turn(BaseModel):
    expect: Expect = Field(default_factory=Expect)
    reply: RecordedReply


class Transcript(BaseModel):
    description: str = ""
    goal: str = Field(description="The task the transcript was recorded for.")
    model: str = Field("replay", description="Model name the recording was made with.")
    conversations: dict[str, list[Turn]]

    @classmethod
    def load(cls, path: Path) -> Transcript:
        try:
            return cls.model_validate_json(path.read_text())
        except OSError as exc:
            raise LLMError(f"cannot read replay transcript {path}: {exc}") from exc


class ReplayMismatch(LLMError):
    """The live conversation departed from the recording."""


def _calls(reply: RecordedReply) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, c.arguments) for c in reply.tool_calls]


def _live_calls(message: Message) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, c.arguments) for c in message.tool_calls]


def load_transcripts(path: Path) -> list[Transcript]:
    """One transcript file, or every ``*.json`` / ``*/transcript.json`` under a directory."""
    if not path.is_dir():
        return [Transcript.load(path)]
    files = sorted({*path.glob("*.json"), *path.glob("*/transcript.json")})
    if not files:
        raise LLMError(f"no replay transcripts (*.json, */transcript.json) in {path}")
    return [Transcript.load(f) for f in files]


class ReplayProvider:
    """Plays one transcript, or picks among several the one whose goal the request
    mentions (every agentbus prompt states the task), so one stack can serve a corpus."""

    name = "replay"

    def __init__(self, transcripts: Transcript | list[Transcript], prices: PriceTable) -> None:
        self.transcripts = transcripts if isinstance(transcripts, list) else [transcripts]
        self.prices = prices
        self.model = self.transcripts[0].model if self.transcripts else "replay"

    @classmethod
    def from_file(cls, path: Path, prices: PriceTable) -> ReplayProvider:
        return cls(load_transcripts(path), prices)

    async def aclose(self) -> None:
        return None

    def _transcript_for(self, request: ChatRequest) -> Transcript:
        """The transcript of the task this request is about. Every agentbus prompt states
        its task as a ``Task: <goal>`` line; matching that line (not any mention of a
        goal, which recalled memories of other tasks may contain) picks the right one."""
        if len(self.transcripts) == 1:
            return self.transcripts[0]
        lines = {
            line.strip()
            for m in request.messages
            if m.role == "user"
            for line in (m.content or "").splitlines()
        }
        matches = [t for t in self.transcripts if f"Task: {t.goal}" in lines]
        if len(matches) != 1:
            goals = "; ".join(t.goal[:60] for t in self.transcripts)
            raise ReplayMismatch(
                f"replay: {len(matches) or 'no'} recorded transcripts for this task among "
                f"{len(self.transcripts)} (goals: {goals})"
            )
        return matches[0]

    async def chat(self, request: ChatRequest) -> ChatResponse:
        transcript = self._transcript_for(request)
        key = request.conversation
        script = transcript.conversations.get(key)
        if script is None:
            known = ", ".join(sorted(transcript.conversations)) or "none"
            raise ReplayMismatch(
                f"replay: no recorded conversation {key!r} (recorded: {known}); "
                "the plan or step ids differ from the recording"
            )
        replies = [m for m in request.messages if m.role == "assistant"]
        for index, (live, turn) in enumerate(zip(replies, script, strict=False)):
            if _live_calls(live) != _calls(turn.reply) or (
                not live.tool_calls and (live.content or "") != (turn.reply.content or "")
            ):
                raise ReplayMismatch(
                    f"replay: conversation {key!r} departed at turn {index + 1}: "
                    f"it holds {_live_calls(live) or live.content!r}, "
                    f"the recording has {_calls(turn.reply) or turn.reply.content!r}"
                )
        turn_no = len(replies)
        if turn_no >= len(script):
            raise ReplayMismatch(
                f"replay: conversation {key!r} has {len(script)} recorded turn(s); "
                f"the caller asked for turn {turn_no + 1}"
            )
        turn = script[turn_no]
        self._check_expectations(key, turn_no, turn.expect, request)
        offered = {t.name for t in request.tools}
        for call in turn.reply.tool_calls:
            if call.name not in offered:
                raise ReplayMismatch(
                    f"replay: conversation {key!r} turn {turn_no + 1} calls tool {call.name!r}, "
                    f"which the caller does not offer ({', '.join(sorted(offered)) or 'no tools'})"
                )
        return self._response(transcript.model, key, turn_no, turn.reply)

    def _check_expectations(
        self, key: str, turn_no: int, expect: Expect, request: ChatRequest
    ) -> None:
        prompt = "\n".join(m.content or "" for m in request.messages)
        last_reply = max(
            (i for i, m in enumerate(request.messages) if m.role == "assistant"), default=-1
        )
        results = "\n".join(
            m.content or "" for m in request.messages[last_reply + 1 :] if m.role == "tool"
        )
        for needle in expect.prompt_contains:
            if needle not in prompt:
                raise ReplayMismatch(
                    f"replay: conversation {key!r} turn {turn_no + 1} expects {needle!r} "
                    "in the prompt, and it is not there"
                )
        for needle in expect.tool_results_contain:
            if needle not in results:
                raise ReplayMismatch(
                    f"replay: conversation {key!r} turn {turn_no + 1} expects {needle!r} in the "
                    f"latest tool results, which were: {results[:500]!r}"
                )

    def _response(self, model: str, key: str, turn_no: int, reply: RecordedReply) -> ChatResponse:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", key)
        usage = ModelUsage(
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
            cached_tokens=reply.usage.cached_tokens,
            calls=1,
        )
        usage = usage.model_copy(update={"cost_usd": self.prices.cost(model, usage)})
        message = Message(
            role="assistant",
            content=reply.content,
            tool_calls=[
                ToolCall(id=f"call_{slug}_{turn_no}_{i}", name=c.name, arguments=c.arguments)
                for i, c in enumerate(reply.tool_calls)
            ],
        )
        finish = "tool_calls" if reply.tool_calls else "stop"
        return ChatResponse(message=message, usage=usage, model=model, finish_reason=finish)
