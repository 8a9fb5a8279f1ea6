from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentbus.contracts import ModelUsage, PlanStep
from agentbus.core.budget import BudgetRefused
from agentbus.core.llm import (
    ChatRequest,
    ChatResponse,
    Message,
    PriceTable,
    RecordingProvider,
    ReplayMismatch,
    ReplayProvider,
    ToolCall,
    ToolSpec,
    Transcript,
    build_transcript,
)
from agentbus.executor.domain import ExecResult, StepRunner, ToolEvent, clip, tool_specs
from agentbus.executor.domain.loop import unanswered

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def transcript(conversations: dict[str, list[dict[str, object]]]) -> ReplayProvider:
    data = {"goal": "g", "model": "gpt-4o-mini", "conversations": conversations}
    return ReplayProvider(Transcript.model_validate(data), PriceTable.load())


TOOLS = [ToolSpec(name="run_python", description="", parameters={"type": "object"})]
CALL = {"tool_calls": [{"name": "run_python", "arguments": {"code": "print(1)"}}]}


async def test_replay_plays_turns_in_order_and_prices_usage() -> None:
    provider = transcript(
        {
            "c": [
                {"reply": {**CALL, "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}},
                {"expect": {"tool_results_contain": ["1"]}, "reply": {"content": "done"}},
            ]
        }
    )
    first = await provider.chat(
        ChatRequest(messages=[Message(role="user", content="hi")], tools=TOOLS, conversation="c")
    )
    assert first.message.tool_calls[0].name == "run_python"
    assert first.usage.cost_usd == pytest.approx((1000 * 0.15 + 100 * 0.6) / 1e6)
    history = [
        Message(role="user", content="hi"),
        first.message,
        Message(role="tool", tool_call_id=first.message.tool_calls[0].id, content="1\n"),
    ]
    second = await provider.chat(ChatRequest(messages=history, tools=TOOLS, conversation="c"))
    assert second.message.content == "done"


async def test_replay_fails_loudly_when_the_conversation_departs() -> None:
    provider = transcript(
        {
            "c": [
                {"reply": CALL},
                {"expect": {"tool_results_contain": ["42"]}, "reply": {"content": "x"}},
            ]
        }
    )
    with pytest.raises(ReplayMismatch, match="no recorded conversation 'other'"):
        await provider.chat(ChatRequest(messages=[], tools=TOOLS, conversation="other"))
    first = await provider.chat(ChatRequest(messages=[], tools=TOOLS, conversation="c"))
    wrong_result = [first.message, Message(role="tool", tool_call_id="x", content="41")]
    with pytest.raises(ReplayMismatch, match="expects '42'"):
        await provider.chat(ChatRequest(messages=wrong_result, tools=TOOLS, conversation="c"))
    other_call = Message(
        role="assistant",
        tool_calls=[{"id": "z", "name": "run_python", "arguments": {"code": "print(2)"}}],
    )  # type: ignore[list-item]
    with pytest.raises(ReplayMismatch, match="departed at turn 1"):
        await provider.chat(ChatRequest(messages=[other_call], tools=TOOLS, conversation="c"))
    with pytest.raises(ReplayMismatch, match="does not offer"):
        await provider.chat(ChatRequest(messages=[], tools=[], conversation="c"))
    done = [
        first.message,
        Message(role="tool", content="42"),
        Message(role="assistant", content="x"),
    ]
    with pytest.raises(ReplayMismatch, match="has 2 recorded turn"):
        await provider.chat(ChatRequest(messages=done, tools=TOOLS, conversation="c"))


class FakeWorkspace:
    """In-memory stand-in for the sandbox, for the loop's own logic only."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.runs: list[tuple[str, str]] = []

    async def run(self, language: str, code: str, timeout_s: float) -> ExecResult:
        self.runs.append((language, code))
        return ExecResult(True, "exit code: 0\nstdout:\n" + "x" * 20_000)

    async def write_file(self, path: str, content: str) -> ExecResult:
        self.files[path] = content
        return ExecResult(True, f"wrote {len(content)} bytes to {path}")

    async def read_file(self, path: str) -> ExecResult:
        if path not in self.files:
            return ExecResult(False, f"error: no such file {path}")
        return ExecResult(True, self.files[path])

    async def list_files(self) -> ExecResult:
        return ExecResult(True, "\n".join(self.files))

    async def file_names(self) -> list[str]:
        return list(self.files)


STEP = PlanStep(id="s1", title="t", instructions="do the thing")


def calls(*pairs: tuple[str, dict[str, object]]) -> dict[str, object]:
    return {"reply": {"tool_calls": [{"name": n, "arguments": a} for n, a in pairs]}}


async def run_step(
    provider: ReplayProvider, ws: FakeWorkspace, **kw: int
) -> tuple[object, list[ToolEvent]]:
    seen: list[ToolEvent] = []

    async def progress(event: ToolEvent) -> None:
        seen.append(event)

    runner = StepRunner(llm=provider, workspace=ws, **kw)
    result = await runner.run(
        goal="g",
        step=STEP,
        inputs={"s0": "earlier"},
        conversation="executor/s1",
        task_id="t",
        progress=progress,
    )
    return result, seen


async def test_tool_loop_runs_tools_reports_errors_and_finishes() -> None:
    provider = transcript(
        {
            "executor/s1": [
                {
                    "expect": {"prompt_contains": ["do the thing", "[s0] earlier"]},
                    **calls(("write_file", {"path": "a.txt", "content": "hello"})),
                },
                {**calls(("read_file", {"path": "missing.txt"}), ("run_python", {"code": 5}))},
                {
                    "expect": {
                        "tool_results_contain": [
                            "no such file missing.txt",
                            "bad arguments for run_python",
                        ]
                    },
                    **calls(("run_python", {"code": "print(1)"})),
                },
                {
                    "expect": {"tool_results_contain": ["characters cut"]},
                    **calls(("finish_step", {"result": "made a.txt"})),
                },
            ]
        }
    )
    ws = FakeWorkspace()
    result, seen = await run_step(provider, ws)
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert result.output == "made a.txt"  # type: ignore[attr-defined]
    assert ws.files == {"a.txt": "hello"}
    assert [e.tool for e in seen] == ["write_file", "read_file", "run_python", "run_python"]
    assert [e.outcome.value for e in seen] == ["ok", "error", "error", "ok"]
    assert result.usage.total.calls == 4  # type: ignore[attr-defined]


class ScriptedLLM:
    """Replies with fixed messages, whatever it is asked (for cases replay rightly refuses)."""

    name = "scripted"

    def __init__(self, *replies: Message) -> None:
        self.replies = list(replies)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return ChatResponse(message=self.replies.pop(0), usage=ModelUsage(calls=1), model="m")

    async def aclose(self) -> None:
        return None


async def test_unknown_tool_goes_back_to_the_model_as_an_observation() -> None:
    llm = ScriptedLLM(
        Message(
            role="assistant", tool_calls=[ToolCall(id="1", name="launch_rockets", arguments={})]
        ),
        Message(role="assistant", content="I could not do it, here is why."),
    )
    seen: list[ToolEvent] = []

    async def progress(event: ToolEvent) -> None:
        seen.append(event)

    result = await StepRunner(llm=llm, workspace=FakeWorkspace()).run(
        goal="g", step=STEP, inputs={}, conversation="c", task_id="t", progress=progress
    )
    assert "unknown tool 'launch_rockets'" in seen[0].output
    assert result.ok and result.output == "I could not do it, here is why."


async def test_tool_loop_stops_at_iteration_limit() -> None:
    turn = calls(("list_files", {}))
    provider = transcript({"executor/s1": [turn, turn, turn]})
    result, _ = await run_step(provider, FakeWorkspace(), max_iterations=2)
    assert not result.ok  # type: ignore[attr-defined]
    assert "did not finish within 2 LLM turns" in result.error  # type: ignore[attr-defined]


async def test_llm_failure_fails_the_step_with_the_reason() -> None:
    result, _ = await run_step(transcript({}), FakeWorkspace())
    assert not result.ok  # type: ignore[attr-defined]
    assert "no recorded conversation 'executor/s1'" in result.error  # type: ignore[attr-defined]


def test_tool_schemas_come_from_pydantic_models() -> None:
    specs = {s.name: s for s in tool_specs()}
    assert set(specs) >= {"run_python", "write_file", "read_file", "finish_step"}
    assert specs["run_python"].parameters["required"] == ["code"]
    assert specs["finish_step"].parameters["properties"]["result"]["type"] == "string"
    assert "sandbox" in specs["run_python"].description


def test_clip_keeps_head_and_tail() -> None:
    text = "a" * 100 + "b" * 100
    out = clip(text, 50)
    assert out.startswith("a" * 25) and out.endswith("b" * 25)
    assert "150 characters cut" in out
    assert clip("short", 50) == "short"


def test_bundled_examples_are_valid_transcripts() -> None:
    found = sorted(EXAMPLES.glob("*/transcript.json"))
    assert found
    for path in found:
        t = Transcript.model_validate(json.loads(path.read_text()))
        assert "planner/plan" in t.conversations and "planner/answer" in t.conversations


async def test_a_recorded_run_replays_identically(tmp_path: Path) -> None:
    source = transcript(
        {
            "executor/s1": [
                calls(("write_file", {"path": "a.txt", "content": "hi"})),
                calls(("finish_step", {"result": "wrote a.txt"})),
            ]
        }
    )
    recorder = RecordingProvider(source, tmp_path)
    first, _ = await run_step(recorder, FakeWorkspace())  # type: ignore[arg-type]
    recorded = build_transcript(tmp_path / "t", goal="g")
    assert list(recorded.conversations) == ["executor/s1"]
    again, _ = await run_step(ReplayProvider(recorded, PriceTable.load()), FakeWorkspace())
    assert first.output == again.output == "wrote a.txt"  # type: ignore[attr-defined]


async def test_a_model_repeating_itself_is_stopped() -> None:
    same = calls(("run_python", {"code": "print(1)"}))
    other = calls(("list_files", {}))
    provider = transcript({"executor/s1": [same, other, same, same, same, same]})
    ws = FakeWorkspace()
    result, _ = await run_step(provider, ws)
    assert not result.ok  # type: ignore[attr-defined]
    assert "repeated the same action 3 times in a row (run_python print(1))" in result.error  # type: ignore[attr-defined]
    assert len(ws.runs) == 3  # one before list_files, two after; the third repeat never ran


class FakeMemory:
    def __init__(self) -> None:
        self.saved: list[tuple[str, str]] = []

    async def search(self, query: str, k: int) -> ExecResult:
        return ExecResult(True, f"[0.90] about {query}")

    async def save(self, text: str, kind: str) -> ExecResult:
        self.saved.append((text, kind))
        return ExecResult(True, "saved as mem_1")

    async def recall(self, query: str, k: int) -> list[str]:
        return ["the user likes tab-separated files"]


async def test_memories_are_recalled_at_step_start_and_results_saved_at_the_end() -> None:
    provider = transcript(
        {
            "executor/s1": [
                {
                    "expect": {"prompt_contains": ["- the user likes tab-separated files"]},
                    **calls(("search_memory", {"query": "format"}), ("save_memory", {"text": "x"})),
                },
                {
                    "expect": {"tool_results_contain": ["[0.90] about format", "saved as mem_1"]},
                    **calls(("finish_step", {"result": "done"})),
                },
            ]
        }
    )
    memory = FakeMemory()
    runner = StepRunner(llm=provider, workspace=FakeWorkspace(), memory=memory)

    async def progress(event: ToolEvent) -> None:
        return None

    result = await runner.run(
        goal="g", step=STEP, inputs={}, conversation="executor/s1", task_id="t", progress=progress
    )
    assert result.ok, result.error
    assert not result.touched_workspace
    assert memory.saved == [("x", "fact"), ("g | step 't': done", "step_result")]


async def test_a_library_picks_the_transcript_by_the_task_line_not_by_mentions() -> None:
    def one(goal: str, answer: str) -> Transcript:
        return Transcript.model_validate(
            {"goal": goal, "conversations": {"c": [{"reply": {"content": answer}}]}}
        )

    library = ReplayProvider([one("sum things", "A"), one("count things", "B")], PriceTable.load())
    prompt = "Task: count things\nPossibly relevant memories:\n- sum things | step: 42"
    reply = await library.chat(
        ChatRequest(messages=[Message(role="user", content=prompt)], conversation="c")
    )
    assert reply.message.content == "B"
    with pytest.raises(ReplayMismatch, match="no recorded transcripts for this task among 2"):
        await library.chat(
            ChatRequest(messages=[Message(role="user", content="Task: other")], conversation="c")
        )


class CpuBudgetWorkspace(FakeWorkspace):
    """Refuses the runs listed in ``refuse`` (by their order) as the CPU budget would."""

    def __init__(self, refuse: set[int]) -> None:
        super().__init__()
        self.refuse = refuse
        self.asked = 0

    async def run(self, language: str, code: str, timeout_s: float) -> ExecResult:
        self.asked += 1
        if self.asked in self.refuse:
            raise BudgetRefused("sandbox_cpu_seconds budget exhausted")
        self.runs.append((language, code))
        return ExecResult(True, f"ran {code}")


async def test_a_step_paused_between_tool_calls_resumes_with_the_calls_left() -> None:
    """The CPU budget refuses the second of a turn's three runs: the first has run and
    keeps its result; after approval the second and third run, once each, and only
    then is the model asked again. The turn is not asked again."""
    turn = Message(
        role="assistant",
        tool_calls=[
            ToolCall(id=f"c{i}", name="run_python", arguments={"code": f"print({i})"})
            for i in (1, 2, 3)
        ],
    )
    asked: list[list[Message]] = []

    class Model(ScriptedLLM):
        async def chat(self, request: ChatRequest) -> ChatResponse:
            asked.append(list(request.messages))
            return await super().chat(request)

    async def progress(event: ToolEvent) -> None:
        return None

    ws = CpuBudgetWorkspace(refuse={2})
    first = await StepRunner(llm=Model(turn), workspace=ws).run(
        goal="g", step=STEP, inputs={}, conversation="c", task_id="t", progress=progress
    )
    assert first.paused and not first.ok
    assert ws.runs == [("python", "print(1)")]
    assert [m.tool_call_id for m in first.checkpoint if m.role == "tool"] == ["c1"]

    done = Message(role="assistant", content="all three ran")
    resumed = await StepRunner(llm=Model(done), workspace=ws).run(
        goal="g",
        step=STEP,
        inputs={},
        conversation="c",
        task_id="t",
        progress=progress,
        resume=first.checkpoint,
    )
    assert resumed.ok and resumed.output == "all three ran"
    assert ws.runs == [("python", f"print({i})") for i in (1, 2, 3)]
    assert len(asked) == 2  # the turn itself, then the call after all three results
    assert [m.tool_call_id for m in asked[1] if m.role == "tool"] == ["c1", "c2", "c3"]


def test_unanswered_calls_are_matched_by_position_not_id() -> None:
    """Some OpenAI-compatible servers give tool calls no id: results still pair with the
    calls in order."""
    calls = [ToolCall(id="", name="run_python", arguments={"code": str(i)}) for i in range(3)]
    history = [
        Message(role="user", content="go"),
        Message(role="assistant", tool_calls=calls),
        Message(role="tool", tool_call_id="", content="0"),
    ]
    assert unanswered(history) == calls[1:]
    assert unanswered([*history[:2]]) == calls
    assert unanswered([*history, Message(role="user", content="more")]) == []


async def test_a_tool_without_a_dispatch_case_is_an_error_not_a_file_listing() -> None:
    from agentbus.executor.domain.tools import ToolArgs

    class Unhandled(ToolArgs):
        pass

    ws = FakeWorkspace()
    ws.files["secret.txt"] = "x"
    runner = StepRunner(llm=ReplayProvider([], PriceTable.load()), workspace=ws)
    with pytest.raises(TypeError, match="no handler for the tool arguments Unhandled"):
        await runner._dispatch(Unhandled())
