"""Function tools on /v1/responses with the real demo model, through the official openai SDK:
SmolLM2 with a Hermes/Qwen 2.5-style tool template (tests/fixtures/hermes_tools.jinja). A forced
tool choice is a grammar, so the calls parse and validate whatever the model would have said."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.conftest import ServerProcess
from tests.test_tool_calls_real import TOOLS as CHAT_TOOLS
from tests.test_tool_calls_real import _client

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

# the same tools as the chat tests, in the Responses shape (flat: no "function" wrapper)
TOOLS: list[Any] = [{"type": "function", **tool["function"]} for tool in CHAT_TOOLS]
ASK = "What is the weather in Paris?"


def _checked_calls(response: Any) -> list[tuple[str, str]]:
    """Each function_call item's (name, arguments), the arguments checked against its tool."""
    calls = []
    for item in response.output:
        if item.type != "function_call":
            continue
        assert item.id.startswith("fc_") and item.call_id and item.status == "completed"
        schema = next(t["parameters"] for t in TOOLS if t["name"] == item.name)
        jsonschema.validate(json.loads(item.arguments), schema)
        calls.append((item.name, item.arguments))
    return calls


def test_required_call_then_its_output_with_previous_response_id(
        tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    first = client.responses.create(model="m", input=ASK, tools=TOOLS, tool_choice="required",
                                    parallel_tool_calls=False, temperature=0,
                                    max_output_tokens=120)
    assert first.status == "completed", first
    assert len(_checked_calls(first)) == 1
    call = next(i for i in first.output if i.type == "function_call")
    # the agent runs the tool and sends its output back on the stored conversation
    second = client.responses.create(
        model="m", previous_response_id=first.id, tools=TOOLS, tool_choice="none",
        temperature=0, max_output_tokens=30,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"temperature": 21, "sky": "clear"})}])
    assert second.status in ("completed", "incomplete")
    assert [i.type for i in second.output] == ["message"]
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_stream_of_a_named_call_accumulates_into_the_final_response(
        tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    kwargs: dict[str, Any] = dict(
        model="m", input=ASK, tools=TOOLS, temperature=0, max_output_tokens=120,
        parallel_tool_calls=False, tool_choice={"type": "function", "name": "get_weather"})
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    calls = _checked_calls(final)
    assert [name for name, _ in calls] == ["get_weather"]
    streamed = "".join(e.delta for e in events
                       if e.type == "response.function_call_arguments.delta")
    assert streamed == calls[0][1]
    assert _checked_calls(client.responses.create(**kwargs)) == calls
