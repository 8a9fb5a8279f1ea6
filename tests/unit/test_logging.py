from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from agentbus.core.logging import configure_logging, get_logger
from agentbus.core.settings import LogSettings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging sets process-wide state; put it back for the tests after this."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_service_task_and_trace_ids_and_hide_secrets() -> None:
    out = io.StringIO()
    configure_logging("planner", LogSettings(format="json", level="INFO"), stream=out)
    tracer = TracerProvider().get_tracer("test")
    log = get_logger("test")
    with (
        tracer.start_as_current_span("handler") as span,
        structlog.contextvars.bound_contextvars(task_id="tsk_1", step_id="s1"),
    ):
        log.info("calling the model", api_key="sk-live-123", authorization="Bearer sk-live-123")
        log.debug("the whole prompt", prompt="secret plans")
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line]
    (line,) = lines  # the debug line is not written at INFO
    ctx = span.get_span_context()
    assert line["service"] == "planner"
    assert (line["task_id"], line["step_id"]) == ("tsk_1", "s1")
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")
    assert "sk-live-123" not in json.dumps(line)
    assert line["api_key"] == "***"
