"""The budget ledger's rules, without a server: reserve the worst case, wait for other
reservations, pause when a call cannot fit, settle to the truth, warn at 80%."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from agentbus.contracts import Budget, BudgetKind, OnBudget, utcnow
from agentbus.core.budget import Ledger, LedgerStatus, Limits, Spend, Verdict
from agentbus.core.llm import ChatRequest, Message, PriceTable, ToolCall, ToolSpec
from agentbus.core.llm.budgeted import DialogueBounds, Measured, prompt_token_bound, worst_case


def ledger(**limits: float) -> Ledger:
    return Ledger(task_id="tsk_1", limits=Limits.model_validate(limits))


def test_a_call_that_fits_is_granted_and_held() -> None:
    book = ledger(cost_usd=1.0)
    decision = book.try_reserve("r1", Spend(cost_usd=0.4), "s1", now=0, ttl_s=60)
    assert decision.verdict is Verdict.GRANTED
    assert book.reserved.cost_usd == pytest.approx(0.4)


def test_a_call_that_fits_only_after_others_settle_waits() -> None:
    book = ledger(cost_usd=1.0)
    book.try_reserve("r1", Spend(cost_usd=0.6), "s1", now=0, ttl_s=60)
    assert (
        book.try_reserve("r2", Spend(cost_usd=0.6), "s2", now=0, ttl_s=60).verdict is Verdict.WAIT
    )
    book.settle("r1", Spend(cost_usd=0.1))
    assert book.try_reserve("r2", Spend(cost_usd=0.6), "s2", now=0, ttl_s=60).verdict is (
        Verdict.GRANTED
    )


def test_a_call_that_cannot_fit_pauses_the_ledger_once() -> None:
    book = ledger(tokens=1000)
    book.settle("r0", Spend(tokens=900))
    decision = book.try_reserve("r1", Spend(tokens=200), "s1", now=0, ttl_s=60)
    assert decision.verdict is Verdict.EXHAUSTED and decision.flipped
    assert book.status is LedgerStatus.PAUSED
    assert "tokens budget exhausted: 900 tokens spent of 1,000 tokens" in decision.reason
    again = book.try_reserve("r2", Spend(tokens=1), "s2", now=0, ttl_s=60)
    assert again.verdict is Verdict.PAUSED and not again.flipped  # one BudgetExhausted


def test_lapsed_reservations_of_crashed_callers_are_dropped() -> None:
    book = ledger(llm_calls=1)
    book.try_reserve("r1", Spend(llm_calls=1), "s1", now=0, ttl_s=10)
    assert book.try_reserve("r2", Spend(llm_calls=1), "s2", now=5, ttl_s=10).verdict is Verdict.WAIT
    assert book.try_reserve("r2", Spend(llm_calls=1), "s2", now=11, ttl_s=10).verdict is (
        Verdict.GRANTED
    )


def test_settling_warns_once_per_budget_at_80_percent_and_is_idempotent() -> None:
    book = ledger(cost_usd=1.0, tokens=100)
    assert book.settle("r1", Spend(cost_usd=0.5, tokens=10)) == []
    crossed = book.settle("r2", Spend(cost_usd=0.31, tokens=10))
    assert [(f.kind, round(f.used, 2)) for f in crossed] == [(BudgetKind.COST, 0.81)]
    assert book.settle("r3", Spend(cost_usd=0.01)) == []
    assert book.settle("r3", Spend(cost_usd=0.01)) == []  # the same settlement twice
    assert book.spent.cost_usd == pytest.approx(0.82)


def test_approval_adds_budget_once_and_reopens() -> None:
    book = ledger(cost_usd=1.0)
    book.settle("r0", Spend(cost_usd=0.95))
    book.try_reserve("r1", Spend(cost_usd=0.2), "s1", now=0, ttl_s=60)
    assert book.approve("evt_a", Spend(cost_usd=1.0))
    assert not book.approve("evt_a", Spend(cost_usd=1.0))  # redelivered approval
    assert (book.status, book.limits.cost_usd, book.round) == (LedgerStatus.OPEN, 2.0, 1)
    assert book.limits.tokens is None  # unlimited stays unlimited
    assert book.try_reserve("r1", Spend(cost_usd=0.2), "s1", now=0, ttl_s=60).verdict is (
        Verdict.GRANTED
    )


def test_closed_ledger_refuses_everything_and_holds_nothing() -> None:
    book = ledger(cost_usd=1.0)
    book.try_reserve("r1", Spend(cost_usd=0.2), "s1", now=0, ttl_s=60)
    book.close("cancelled")
    assert book.reservations == {}
    decision = book.try_reserve("r2", Spend(), "s1", now=0, ttl_s=60)
    assert decision.verdict is Verdict.CLOSED and decision.reason == "cancelled"
    assert not book.approve("evt_a", Spend(cost_usd=1))


def test_exhausted_event_says_what_ran_out_and_how_to_approve() -> None:
    book = Ledger(
        task_id="tsk_1", limits=Limits.of(Budget(max_cost_usd=0.5)), approval_timeout_s=600
    )
    book.settle("r0", Spend(cost_usd=0.45))
    book.try_reserve("r1", Spend(cost_usd=0.1), "s2", now=0, ttl_s=60)
    now = utcnow()
    event = book.exhausted_event(now)
    assert event.action is OnBudget.PAUSE
    assert event.approval_deadline == now + timedelta(seconds=600)
    assert event.step_id == "s2"
    assert "cost budget exhausted: $0.4500 spent of $0.5000" in event.reason
    assert "agentbus approve tsk_1 --add-cost USD" in event.reason
    assert event.cause.startswith("cost budget exhausted: $0.4500 spent of $0.5000")
    assert "approve" not in event.cause  # what ran out, without how to go on
    assert event.event_id == book.exhausted_event(now).event_id  # deterministic: dedup


def test_worst_case_bounds_the_prompt_by_its_bytes_and_prices_every_output_token() -> None:
    request = ChatRequest(
        messages=[Message(role="system", content="é" * 1000), Message(role="user", content="hi")],
        tools=[ToolSpec(name="t", description="d", parameters={"type": "object"})],
        max_tokens=500,
    )
    bound = prompt_token_bound(request)
    assert bound >= 2000 + 2  # "é" is two UTF-8 bytes; a token is at least one byte
    spend = worst_case(request, "gpt-4o-mini", PriceTable.load())
    assert spend.tokens == bound + 500
    assert spend.cost_usd == pytest.approx((bound * 0.15 + 500 * 0.60) / 1_000_000)
    assert worst_case(request, "unpriced-model", PriceTable.load()).cost_usd == 0


def _dialogue(*turns: str) -> ChatRequest:
    messages = [Message(role="system", content="You run one step. " * 200)]
    for i, text in enumerate(turns):
        messages.append(Message(role="user" if i % 2 == 0 else "assistant", content=text))
    return ChatRequest(
        messages=messages,
        tools=[ToolSpec(name="t", description="d" * 500, parameters={"type": "object"})],
        max_tokens=100,
    )


def test_a_growing_dialogue_is_bounded_by_its_last_bill_plus_what_was_appended() -> None:
    bounds, key = DialogueBounds(), ("tsk_1", "executor/s1")
    first = _dialogue("go")
    measured = Measured.of(first)
    assert bounds.bound(key, measured) == prompt_token_bound(first)  # nothing billed yet
    bounds.learn(key, measured, prompt_tokens=900)  # what the provider said it billed

    second = _dialogue("go", "ran it", "the tool said 42")
    grown = Measured.of(second)
    tight = bounds.bound(key, grown)
    appended = len("ran it") + len("the tool said 42")
    assert 900 + appended <= tight < prompt_token_bound(second) / 3
    assert bounds.bound(("tsk_1", "executor/s2"), grown) == prompt_token_bound(second)


def test_a_changed_earlier_message_or_tool_falls_back_to_the_bytes_bound() -> None:
    bounds, key = DialogueBounds(), ("tsk_1", "executor/s1")
    bounds.learn(key, Measured.of(_dialogue("go", "ran it")), prompt_tokens=900)
    edited = _dialogue("stop", "ran it", "more")
    assert bounds.bound(key, Measured.of(edited)) == prompt_token_bound(edited)
    retooled = _dialogue("go", "ran it", "more").model_copy(update={"tools": []})
    assert bounds.bound(key, Measured.of(retooled)) == prompt_token_bound(retooled)
    shorter = _dialogue("go")
    assert bounds.bound(key, Measured.of(shorter)) == prompt_token_bound(shorter)


def test_tool_arguments_are_measured_as_sent_escaped_with_their_ids() -> None:
    """The adapters send arguments as ASCII-escaped JSON: a CJK character is six bytes
    (\\uXXXX) on the wire, not three, and call ids travel too."""
    text = "日本語" * 100
    call = ToolCall(id="call_" + "x" * 40, name="write_file", arguments={"content": text})
    request = ChatRequest(
        messages=[
            Message(role="assistant", tool_calls=[call]),
            Message(role="tool", tool_call_id=call.id, content="ok"),
        ]
    )
    sent = len(json.dumps(call.arguments)) + 2 * len(call.id) + len("write_file")
    assert len(json.dumps(call.arguments)) >= 6 * len(text)
    assert prompt_token_bound(request) >= sent
