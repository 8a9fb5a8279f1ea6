"""Per-test timeouts that leave a trail: when a test runs past its limit (pytest-timeout,
``timeout`` in pyproject.toml), the stacks of every asyncio task are written out as well
as every thread's, and the test fails; the run goes on with the next test.

pytest-timeout's own signal handler dumps threads only, and an asyncio test that hangs
shows nothing but the event loop's ``select`` in its thread. Loaded by tests/conftest.py
(``pytest_plugins``); ``-p tests.timeouts`` loads it elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import signal
import threading
from types import FrameType
from typing import Any

import pytest
import pytest_timeout


def format_tasks(loop: asyncio.AbstractEventLoop) -> str:
    """Every unfinished task of ``loop`` with the stack it is suspended in."""
    out = io.StringIO()
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"--- asyncio task {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=30, file=out)
    return out.getvalue()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own thread method: it dumps threads and exits

    def on_timeout(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        loop = asyncio._get_running_loop()
        if loop is not None:
            terminal = item.config.get_terminal_writer()
            terminal.sep("+", title="asyncio tasks at the timeout")
            terminal.write(format_tasks(loop))
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # read by pytest-timeout
    signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
