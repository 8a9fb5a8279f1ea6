from __future__ import annotations

import json

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from agentbus.core.logging import configure_logging, get_logger
from agentbus.core.settings import LogSettings


def test_json_lines_carry_service_task_and_trace_ids_and_hide_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("planner", LogSettings(format="json", level="INFO"))
    tracer = TracerProvider().get_tracer("test")
    log = get_logger("test")
    with (
        tracer.start_as_current_span("handler") as span,
        structlog.contextvars.bound_contextvars(task_id="tsk_1", step_id="s1"),
    ):
        log.info("calling the model", api_key="sk-live-123", authorization="Bearer sk-live-123")
        log.debug("the whole prompt", prompt="secret plans")
    structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    (line,) = lines  # the debug line is not written at INFO
    ctx = span.get_span_context()
    assert line["service"] == "planner"
    assert (line["task_id"], line["step_id"]) == ("tsk_1", "s1")
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")
    assert "sk-live-123" not in json.dumps(line)
    assert line["api_key"] == "***"
