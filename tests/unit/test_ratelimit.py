"""The shared rate limiter's decisions, as plain code over a simulated clock: RPM and TPM
hold in every window, a provider's Retry-After holds everyone, old calls leave the
window, and a task with a backlog cannot starve the others."""

from __future__ import annotations

import re

import pytest

from agentbus.core.llm.ratelimit import (
    WAITING_TTL_S,
    Decision,
    Limits,
    WindowState,
    corrected,
    decide,
    limiter_scope,
    prune,
    throttled,
)

T0 = 1_700_000_000.0  # a whole second, like any epoch time


class Clock:
    """One limiter's state and a simulated clock; each ``ask`` saves what decide says."""

    def __init__(self, limits: Limits, now: float = T0) -> None:
        self.limits = limits
        self.now = now
        self.state = WindowState()
        self.granted: list[tuple[float, str]] = []

    def ask(self, task: str | None = "a", tokens: int = 0, call: str | None = None) -> Decision:
        decision = decide(
            self.state, self.limits, now=self.now, task_id=task, tokens=tokens, call_id=call
        )
        self.state = decision.state
        if decision.granted:
            self.granted.append((self.now, task or "-"))
        return decision


def most_in_any_window(times: list[float], window: float) -> int:
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_rpm_holds_in_every_window_and_the_room_is_used() -> None:
    clock = Clock(Limits(rpm=5))
    # A caller that asks every 0.1 s for 10 simulated minutes.
    for _ in range(6000):
        clock.ask()
        clock.now += 0.1
    times = [t for t, _ in clock.granted]
    assert most_in_any_window(times, 60.0) <= 5
    # Not a limiter that refuses everything: about 5 calls a minute went through.
    assert len(times) >= 5 * 9


def test_a_full_window_says_rpm_and_how_long_nothing_can_change_it() -> None:
    clock = Clock(Limits(rpm=3))
    assert [clock.ask().granted for _ in range(3)] == [True, True, True]
    clock.now += 10
    refused = clock.ask()
    assert not refused.granted
    assert refused.limit == "rpm"
    # The first calls leave 61 s after the start of their second (one slice late).
    assert refused.wait_s == pytest.approx(51.0)
    assert refused.certain_wait_s == pytest.approx(51.0)
    clock.now += refused.wait_s - 0.01
    assert not clock.ask().granted
    clock.now += 0.02
    assert clock.ask().granted


def test_tpm_holds_and_one_oversized_call_runs_alone() -> None:
    clock = Clock(Limits(tpm=1000))
    assert [clock.ask(tokens=300).granted for _ in range(4)] == [True, True, True, False]
    refused = clock.ask(tokens=300)
    assert refused.limit == "tpm"
    assert refused.certain_wait_s == 0  # settling may free tokens sooner
    assert clock.state.tokens() == 900

    big = Clock(Limits(tpm=1000))
    # Larger than the whole limit: allowed into an empty window, else it never runs...
    assert big.ask(tokens=5000).granted
    # ...and then nothing else runs until it has left the window.
    big.now += 30
    assert not big.ask(tokens=1).granted
    big.now += 31.5
    assert big.ask(tokens=1).granted


def test_without_an_rpm_only_tokens_count() -> None:
    clock = Clock(Limits(tpm=10_000))
    assert all(clock.ask(tokens=10).granted for _ in range(500))


def test_settling_to_the_real_tokens_frees_room() -> None:
    clock = Clock(Limits(tpm=1000))
    first = clock.ask(tokens=800)
    assert not clock.ask(tokens=300).granted
    settled = corrected(clock.state, index=first.slice, task="a", delta=100 - 800)
    assert settled is not None
    clock.state = settled
    assert clock.ask(tokens=300).granted
    # Once the slice has left the window there is nothing to correct.
    assert (
        corrected(prune(clock.state, clock.limits, T0 + 120), index=first.slice, task="a", delta=5)
        is None
    )


def test_retry_after_holds_every_task_until_it_ends() -> None:
    clock = Clock(Limits(rpm=100))
    blocked = throttled(clock.state, T0 + 2.0)
    assert blocked is not None
    clock.state = blocked
    # A shorter Retry-After never shortens a longer one.
    assert throttled(clock.state, T0 + 1.0) is None
    for task in ("a", "b", None):
        refused = clock.ask(task)
        assert not refused.granted
        assert refused.limit == "retry-after"
        assert refused.certain_wait_s == pytest.approx(2.0)
    clock.now += 2.0
    assert clock.ask("b").granted


def test_old_calls_leave_the_window_and_the_record_stays_small() -> None:
    clock = Clock(Limits(rpm=1000, tpm=10**9))
    for _ in range(1000):  # 5 minutes, one call each 0.3 s
        assert clock.ask(tokens=10).granted
        clock.now += 0.3
    # Only the last minute (plus the slice being filled) is kept.
    assert len(clock.state.slices) <= 61
    assert clock.state.requests() <= 61 / 0.3 + 1
    assert prune(clock.state, clock.limits, clock.now + 61).slices == []


def test_a_waiting_task_gets_the_next_free_slots_before_a_backlogged_one() -> None:
    clock = Clock(Limits(rpm=6))
    for _ in range(6):
        assert clock.ask("big").granted  # nobody else waits: big may use it all
    clock.now += 1
    assert not clock.ask("small").granted  # full: small waits
    assert "small" in clock.state.waiting
    clock.now = T0 + 60.5
    assert not clock.ask("small").granted  # still waiting (waiters re-check each second)
    # The window frees up; big asks first and gets one slot (both have used nothing),
    # then is held back until small has had its turn.
    clock.now = T0 + 61
    assert clock.ask("big").granted
    held = clock.ask("big")
    assert not held.granted
    assert held.limit == "fair share"
    assert clock.ask("small").granted
    # Small has nothing more to ask: big gets all the rest of the window.
    assert [clock.ask("big").granted for _ in range(5)] == [True, True, True, True, False]


def test_a_task_with_a_backlog_is_capped_at_its_share_while_others_wait() -> None:
    clock = Clock(Limits(rpm=6))
    # Big has three times as many calls waiting as small, and asks first; both have
    # more calls waiting than their share of the window (3 each).
    for _ in range(1200):  # 10 simulated minutes
        for n in range(12):
            clock.ask("big", call=f"big-{n}")
        for n in range(4):
            clock.ask("small", call=f"small-{n}")
        clock.now += 0.5
    # In the first minute big took what small had not asked for yet; from then on
    # small is always waiting.
    big = [t for t, task in clock.granted if task == "big" and t >= T0 + 61]
    small = [t for t, task in clock.granted if task == "small" and t >= T0 + 61]
    assert most_in_any_window(big + small, 60.0) <= 6
    # Half each, give or take a call per window; without fairness small gets ~1/4.
    assert most_in_any_window(big, 60.0) <= 4
    assert len(small) >= 0.4 * (len(big) + len(small))


def test_a_waiter_that_went_away_stops_holding_others_back() -> None:
    clock = Clock(Limits(rpm=2))
    assert clock.ask("big").granted
    assert clock.ask("big").granted
    clock.now = T0 + 60.5
    assert not clock.ask("small").granted  # small waits, then its process dies
    clock.now = T0 + 61
    assert clock.ask("big").granted
    assert not clock.ask("big").granted  # small still counts as waiting
    clock.now += WAITING_TTL_S
    assert clock.ask("big").granted


def test_tokens_count_towards_the_fair_share_too() -> None:
    clock = Clock(Limits(rpm=100, tpm=1000))
    assert clock.ask("big", tokens=600).granted
    assert not clock.ask("small", tokens=500).granted  # does not fit: small waits
    # Big used 60 % of the tokens, small nothing: big's next small call waits for small.
    held = clock.ask("big", tokens=10)
    assert not held.granted
    assert held.limit == "fair share"


def test_scope_names_the_provider_but_never_contains_the_key() -> None:
    key = "sk-proj-SECRET123"
    scope = limiter_scope("openai", "https://api.openai.com/v1", key)
    assert key not in scope
    assert "SECRET" not in scope
    assert re.fullmatch(r"[A-Za-z0-9_=.-]+", scope)
    assert scope.startswith("openai.")
    assert scope == limiter_scope("openai", "https://api.openai.com/v1/", key)
    assert scope != limiter_scope("openai", "https://api.openai.com/v1", "sk-other")
    assert scope != limiter_scope("openai", "http://localhost:11434/v1", key)
    assert scope != limiter_scope("anthropic", "https://api.openai.com/v1", key)
