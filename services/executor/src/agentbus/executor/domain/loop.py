"""One step as an LLM tool-use loop. Plain Python: the LLM provider, the workspace and
the progress callback are passed in."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from agentbus.contracts import PlanStep, ToolOutcome, Usage, describe_validation
from agentbus.core.budget import BudgetRefused
from agentbus.core.llm import ChatRequest, LLMError, LLMProvider, Message, ToolCall

from .tools import (
    TOOLS,
    ExecResult,
    FinishStep,
    ListFiles,
    Memory,
    ReadFile,
    RunPython,
    RunShell,
    SaveMemory,
    SearchMemory,
    Workspace,
    WriteFile,
    tool_specs,
)

SYSTEM = """You are an executor agent of agentbus. You carry out ONE step of a larger task.
Use the tools to do the work: run_python and run_shell run code in a sandbox (no network)
whose working directory is the task's workspace, shared by all steps; write_file, read_file
and list_files work in that workspace; search_memory and save_memory reach long-term memory.
Check results rather than assuming them. When the step is done, call finish_step with what
it produced (values, file names)."""

MEMORY_SUMMARY_CHARS = 800  # about 200 tokens: inside all-MiniLM-L6-v2's 256-token window
WORKSPACE_TOOLS = frozenset({"run_python", "run_shell", "write_file"})


@dataclass(frozen=True)
class ToolEvent:
    tool: str
    summary: str
    output: str
    outcome: ToolOutcome
    duration_ms: float


@dataclass
class StepResult:
    ok: bool
    output: str = ""
    error: str = ""
    usage: Usage = field(default_factory=Usage)
    iterations: int = 0
    touched_workspace: bool = False
    paused: bool = False  # the budget ran out: resume from ``checkpoint`` after approval
    cancelled: bool = False  # the task ended (cancelled): report nothing
    checkpoint: list[Message] = field(default_factory=list)


Progress = Callable[[ToolEvent], Awaitable[None]]


def clip(text: str, limit: int) -> str:
    """Keep head and tail of a long text and say how much was cut."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def step_prompt(
    goal: str, step: PlanStep, inputs: dict[str, str], memories: list[str] | None = None
) -> str:
    parts = [
        f"Task: {goal}",
        f"Your step: {step.id} - {step.title}",
        f"Instructions: {step.instructions}",
    ]
    if step.expected_output:
        parts.append(f"Expected output: {step.expected_output}")
    if inputs:
        parts.append("Results of earlier steps:")
        parts += [f"[{k}] {v}" for k, v in inputs.items()]
    if memories:
        parts.append("Possibly relevant memories from earlier work:")
        parts += [f"- {m}" for m in memories]
    return "\n".join(parts)


def describe_call(call: ToolCall) -> str:
    """What a person following the task wants to see of a tool call: the code or command
    run, the path touched; the raw arguments otherwise."""
    args = call.arguments
    for key in ("code", "command"):
        if isinstance(args.get(key), str):
            return str(args[key])
    if isinstance(args.get("path"), str):
        size = f" ({len(args['content'])} chars)" if isinstance(args.get("content"), str) else ""
        return f"{args['path']}{size}"
    return json.dumps(args, ensure_ascii=False)


class _LoopGuard:
    """Notices a model stuck repeating the same tool calls turn after turn."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.last = ""
        self.count = 0

    def repeated(self, calls: list[ToolCall]) -> str | None:
        """The repeated action, once it has been made ``limit`` times in a row."""
        signature = json.dumps([[c.name, c.arguments] for c in calls], sort_keys=True)
        self.count = self.count + 1 if signature == self.last else 1
        self.last = signature
        if self.count >= self.limit:
            return clip(", ".join(f"{c.name} {describe_call(c)}" for c in calls), 200)
        return None


def unanswered(messages: list[Message]) -> list[ToolCall]:
    """The last turn's tool calls that have no result yet (a step paused between them).
    Results follow their calls in order, so they are matched by position: some
    OpenAI-compatible servers give tool calls no id."""
    results = 0
    for message in reversed(messages):
        if message.role == "tool":
            results += 1
        elif message.role == "assistant":
            return message.tool_calls[results:]
        else:
            return []
    return []


@dataclass
class _Turn:
    """What one run of a step carries from turn to turn."""

    goal: str
    step: PlanStep
    progress: Progress
    usage: Usage
    touched: bool

    def stopped(self, exc: BudgetRefused, iteration: int, checkpoint: list[Message]) -> StepResult:
        """Refused by the budget: paused (resumable from ``checkpoint``), or ended."""
        return StepResult(
            False,
            error=str(exc),
            usage=self.usage,
            iterations=iteration,
            touched_workspace=self.touched,
            paused=not exc.closed,
            cancelled=exc.closed,
            checkpoint=checkpoint,
        )


@dataclass
class StepRunner:
    llm: LLMProvider
    workspace: Workspace
    model: str = ""
    memory: Memory | None = None
    max_iterations: int = 20
    max_repeats: int = 3
    max_tokens: int = 2048
    observation_limit: int = 8000

    async def run(
        self,
        *,
        goal: str,
        step: PlanStep,
        inputs: dict[str, str],
        conversation: str,
        task_id: str,
        progress: Progress,
        resume: list[Message] | None = None,
        touched: bool = False,
    ) -> StepResult:
        """Run the step; ``resume`` is the dialogue of a paused attempt to go on from."""
        messages = list(resume) if resume else await self._opening(goal, step, inputs)
        turn = _Turn(goal, step, progress, usage=Usage(), touched=touched)
        specs = tool_specs()
        loop = _LoopGuard(self.max_repeats)
        done_turns = sum(1 for m in messages if m.role == "assistant")
        # A step paused half-way through a turn's tool calls (the CPU budget refused one)
        # runs the calls still unanswered, and only then asks the model again.
        pending = unanswered(messages)
        if pending:
            ended = await self._act(pending, messages, turn, done_turns)
            if ended is not None:
                return ended
        for iteration in range(done_turns + 1, self.max_iterations + 1):
            try:
                reply = await self.llm.chat(
                    ChatRequest(
                        messages=messages,
                        tools=specs,
                        model=self.model,
                        max_tokens=self.max_tokens,
                        conversation=conversation,
                        task_id=task_id,
                        step_id=step.id,
                    )
                )
            except BudgetRefused as exc:  # resumes before this call
                return turn.stopped(exc, iteration, list(messages))
            except LLMError as exc:
                return StepResult(
                    False, error=f"LLM call failed: {exc}", usage=turn.usage, iterations=iteration
                )
            turn.usage = turn.usage + Usage.of(reply.model, reply.usage)
            messages.append(reply.message)
            if not reply.message.tool_calls:
                # A plain answer with no tool call ends the step with that answer.
                text = (reply.message.content or "").strip()
                if text:
                    return await self._done(turn, text, iteration)
                messages.append(
                    Message(role="user", content="Use a tool, or call finish_step when done.")
                )
                continue
            stuck = loop.repeated(reply.message.tool_calls)
            if stuck:
                return StepResult(
                    False,
                    error=f"stopped: the model repeated the same action {self.max_repeats} "
                    f"times in a row ({stuck})",
                    usage=turn.usage,
                    iterations=iteration,
                    touched_workspace=turn.touched,
                )
            ended = await self._act(reply.message.tool_calls, messages, turn, iteration)
            if ended is not None:
                return ended
        return StepResult(
            False,
            error=f"the step did not finish within {self.max_iterations} LLM turns",
            usage=turn.usage,
            iterations=self.max_iterations,
            touched_workspace=turn.touched,
        )

    async def _act(
        self, calls: list[ToolCall], messages: list[Message], turn: _Turn, iteration: int
    ) -> StepResult | None:
        """Run a turn's tool calls in order, each result appended to ``messages``; the
        step's result if one of them ends it (finish_step, or a budget refusal)."""
        for call in calls:
            if call.name == "finish_step":
                finished = self._finish(call)
                if finished is not None and not finished.success:
                    return StepResult(
                        False,
                        error=finished.result,
                        usage=turn.usage,
                        iterations=iteration,
                        touched_workspace=turn.touched,
                    )
                if finished is not None:
                    return await self._done(turn, finished.result, iteration)
            turn.touched = turn.touched or call.name in WORKSPACE_TOOLS
            try:
                observation = await self._run_tool(call, turn.progress)
            except BudgetRefused as exc:  # the sandbox CPU budget ran out
                # Resumes here: the calls before this one have run and keep their results.
                return turn.stopped(exc, iteration, list(messages))
            messages.append(
                Message(
                    role="tool",
                    tool_call_id=call.id,
                    content=clip(observation, self.observation_limit),
                )
            )
        return None

    async def _opening(self, goal: str, step: PlanStep, inputs: dict[str, str]) -> list[Message]:
        memories = (
            await self.memory.recall(f"{step.title}\n{step.instructions}", 3) if self.memory else []
        )
        return [
            Message(role="system", content=SYSTEM),
            Message(role="user", content=step_prompt(goal, step, inputs, memories)),
        ]

    async def _done(self, turn: _Turn, output: str, iterations: int) -> StepResult:
        """A finished step; its result is saved to long-term memory for later work."""
        if self.memory is not None:
            # Memory refuses texts over its model's window rather than cutting them; a
            # step's result is remembered as a bounded summary (head and tail).
            summary = clip(
                f"{turn.goal} | step '{turn.step.title}': {output}", MEMORY_SUMMARY_CHARS
            )
            await self.memory.save(summary, "step_result")
        return StepResult(
            True,
            output=output,
            usage=turn.usage,
            iterations=iterations,
            touched_workspace=turn.touched,
        )

    async def _memory_call(self, call: Callable[[Memory], Awaitable[ExecResult]]) -> ExecResult:
        if self.memory is None:
            return ExecResult(False, "error: long-term memory is not available to this step")
        return await call(self.memory)

    @staticmethod
    def _finish(call: ToolCall) -> FinishStep | None:
        try:
            return FinishStep.model_validate(call.arguments)
        except ValidationError:
            return None  # _run_tool reports the problem back to the model

    async def _run_tool(self, call: ToolCall, progress: Progress) -> str:
        started = time.monotonic()
        model = TOOLS.get(call.name)
        if model is None:
            result = ExecResult(
                False, f"error: unknown tool {call.name!r}; use one of {', '.join(TOOLS)}"
            )
        else:
            try:
                args = model.model_validate(call.arguments)
            except ValidationError as exc:
                result = ExecResult(
                    False, f"error: bad arguments for {call.name}: {describe_validation(exc)}"
                )
            else:
                result = await self._dispatch(args)
        await progress(
            ToolEvent(
                tool=call.name,
                summary=clip(describe_call(call), 600),
                output=clip(result.text, 600),
                outcome=ToolOutcome.OK if result.ok else ToolOutcome.ERROR,
                duration_ms=(time.monotonic() - started) * 1000,
            )
        )
        return result.text

    async def _dispatch(self, args: object) -> ExecResult:
        ws = self.workspace
        match args:
            case RunPython(code=code, timeout_s=t):
                return await ws.run("python", code, t)
            case RunShell(command=command, timeout_s=t):
                return await ws.run("bash", command, t)
            case WriteFile(path=path, content=content):
                return await ws.write_file(path, content)
            case ReadFile(path=path):
                return await ws.read_file(path)
            case SearchMemory(query=query, k=k):
                return await self._memory_call(lambda m: m.search(query, k))
            case SaveMemory(text=text, kind=kind):
                return await self._memory_call(lambda m: m.save(text, kind))
            case FinishStep():
                return ExecResult(False, "error: finish_step needs a 'result' string")
            case ListFiles():
                return await ws.list_files()
            case _:
                # A tool in TOOL_ARGS without a case here: a bug, never a silent file listing.
                raise TypeError(f"no handler for the tool arguments {type(args).__name__}")
