"""A test that never finishes is stopped by the per-test timeout, with the stacks of
the asyncio tasks it was waiting in, and the run goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HANGING = """
import asyncio

import pytest


async def wait_for_a_reply_that_never_comes() -> None:
    await asyncio.Event().wait()


@pytest.mark.timeout(2)
async def test_hangs_forever() -> None:
    await asyncio.gather(asyncio.create_task(wait_for_a_reply_that_never_comes(), name="stuck"))


def test_after_it_still_runs() -> None:
    assert True
"""


def test_a_hanging_async_test_is_killed_with_its_task_stacks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makepyfile(test_hang=HANGING)
    result = pytester.runpytest_subprocess("-p", "tests.timeouts", timeout=60)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "Timeout (>2.0s)" in out
    assert "asyncio tasks at the timeout" in out
    assert "asyncio task stuck" in out
    assert "wait_for_a_reply_that_never_comes" in out
