"""Tier 2: function tools and reasoning on /v1/responses with a FakeEngine (its template speaks
no tool format, so the generic one applies), driven by the official openai SDK."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import OpenAI

from llmserve.server.chat_plan import ChatDefaults
from llmserve.server.options import ServerOptions
from tests.conftest import OpenSdk, requires_llama_cpp
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until

WEATHER: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}
GENERIC_CALL = ('{"tool_calls": [', '{"name": "get_', 'weather", "argu', 'ments": {"ci',
                'ty": "Paris"}}', "]}")
TWO_CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ',
             '{"name": "get_weather", "arguments": {"city": "Rome"}}]}')
THINKING = ("<thi", "nk>Let me", " think.</th", "ink>\n\nHi", "!")

@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(n_ctx=4096)  # one token per character: the tool prompt is long


@pytest.fixture
def sdk(open_sdk: OpenSdk, engine: FakeEngine) -> OpenAI:
    return open_sdk(engine)[1]


def _calls(response: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(i.name, json.loads(i.arguments)) for i in response.output
            if i.type == "function_call"]


def test_a_call_is_a_function_call_item_and_is_stored(sdk: OpenAI, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = sdk.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    assert r.status == "completed"
    (item,) = r.output
    assert item.type == "function_call"
    assert item.id is not None and item.id.startswith("fc_")
    assert item.call_id.startswith("call_") and item.status == "completed"
    assert item.name == "get_weather" and json.loads(item.arguments) == {"city": "Paris"}
    assert r.output_text == ""  # no call text leaks into a message
    assert r.tools[0].type == "function" and r.tools[0].name == "get_weather"
    assert r.tool_choice == "auto" and r.parallel_tool_calls is True
    # the generic tool prompt went into a system message, naming the tool
    assert "get_weather" in engine.chats[-1][0]["content"]
    assert engine.requests[-1].sampling.grammar is None  # auto, generic: parsed after
    assert sdk.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_stream_sends_the_function_call_events_in_order(sdk: OpenAI, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    with sdk.responses.stream(model="m", input="Weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    n_deltas = kinds.count("response.function_call_arguments.delta")
    assert n_deltas >= 2
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        *["response.function_call_arguments.delta"] * n_deltas,
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[2]
    assert added.type == "response.output_item.added"
    assert added.item.type == "function_call" and added.item.arguments == ""
    assert added.item.status == "in_progress" and added.output_index == 0
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert all(e.item_id == added.item.id and e.output_index == 0 for e in deltas)
    arguments = "".join(e.delta for e in deltas)
    done = events[-3]
    assert done.type == "response.function_call_arguments.done"
    assert done.arguments == arguments and json.loads(arguments) == {"city": "Paris"}
    # the SDK accumulated the events into the same call the final response carries
    (call,) = final.output
    assert call.type == "function_call" and call.arguments == arguments
    assert call.id == added.item.id and call.call_id == added.item.call_id
    stored = sdk.responses.retrieve(final.id).output[0]
    assert stored.model_dump() == call.model_dump(exclude={"parsed_arguments"})
    plain = sdk.responses.create(model="m", input="Weather?", tools=[WEATHER])  # type: ignore[list-item]
    assert _calls(plain) == _calls(final)


def test_parallel_calls_are_items_one_after_another(sdk: OpenAI, engine: FakeEngine) -> None:
    engine.script = Script(tokens=TWO_CALLS)
    r = sdk.responses.create(model="m", input="Paris and Rome?", tools=[WEATHER])  # type: ignore[list-item]
    assert _calls(r) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    with sdk.responses.stream(model="m", input="Paris and Rome?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = [e for e in stream if e.type.startswith("response.output_item.")]
        final = stream.get_final_response()
    assert [(e.type, e.output_index) for e in events] == [
        ("response.output_item.added", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.output_item.done", 1)]
    assert _calls(final) == _calls(r)
    assert len({i.call_id for i in final.output if i.type == "function_call"}) == 2


def test_the_agent_loop_with_previous_response_id(sdk: OpenAI, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    first = sdk.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    call = first.output[0]
    assert call.type == "function_call"
    engine.script = Script()
    second = sdk.responses.create(
        model="m", previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": '{"sky": "clear"}'}])
    assert second.output_text == "Hello, world!" and second.output[0].type == "message"
    conversation = engine.chats[-1][1:]  # after the tool prompt's system message
    assert conversation == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
             "name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "clear"}'},
    ]
    items = list(sdk.responses.input_items.list(second.id))
    assert [i.type for i in items] == ["function_call_output"]
    assert items[0].call_id == call.call_id  # type: ignore[union-attr]


def test_calls_and_outputs_sent_as_input_items(sdk: OpenAI, engine: FakeEngine) -> None:
    r = sdk.responses.create(model="m", tools=[WEATHER], input=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [{"type": "input_text", "text": "rain"}]},
    ])
    assert r.output_text == "Hello, world!"
    chat = engine.chats[-1][1:]
    assert [m["role"] for m in chat] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in chat[1]["tool_calls"]] == ["call_a", "call_b"]
    assert [(m["tool_call_id"], m["content"]) for m in chat[2:]] == [
        ("call_a", "sunny"), ("call_b", "rain")]
    stored = list(sdk.responses.input_items.list(r.id, order="asc"))
    assert [i.type for i in stored] == ["message", "reasoning", "function_call", "function_call",
                                        "function_call_output", "function_call_output"]


def test_a_background_response_calls_too(sdk: OpenAI, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = sdk.responses.create(model="m", input="Weather?", tools=[WEATHER], background=True)  # type: ignore[list-item]
    wait_until(lambda: sdk.responses.retrieve(r.id).status == "completed", timeout=10,
               what="the background response")
    assert _calls(sdk.responses.retrieve(r.id)) == [("get_weather", {"city": "Paris"})]


def test_tool_choice_none_renders_no_tools(sdk: OpenAI, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = sdk.responses.create(model="m", input="Weather?", tools=[WEATHER], tool_choice="none")  # type: ignore[list-item]
    assert r.output_text == "".join(GENERIC_CALL) and not _calls(r)
    assert engine.chats[-1] == [{"role": "user", "content": "Weather?"}]
    assert r.tool_choice == "none"


@requires_llama_cpp  # the JSON-schema converter builds the call grammar
@pytest.mark.parametrize("choice", [
    "required", {"type": "function", "name": "get_weather"}], ids=["required", "named"])
def test_forced_tool_choice_constrains_with_a_grammar(
        sdk: OpenAI, engine: FakeEngine, choice: Any) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = sdk.responses.create(model="m", input="Weather?", tools=[WEATHER], tool_choice=choice)  # type: ignore[list-item]
    assert _calls(r) == [("get_weather", {"city": "Paris"})]
    sampling = engine.requests[-1].sampling
    assert sampling.grammar is not None and "tool_calls" in sampling.grammar
    assert sampling.grammar_triggers == ()  # forced: from the first token


def test_reasoning_is_a_reasoning_item(open_sdk: OpenSdk, engine: FakeEngine) -> None:
    _tc, sdk = open_sdk(engine, ServerOptions(chat=ChatDefaults(reasoning_format="deepseek")))
    engine.script = Script(tokens=THINKING)
    r = sdk.responses.create(model="m", input="Hi")
    assert [i.type for i in r.output] == ["reasoning", "message"]
    reasoning = r.output[0]
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert reasoning.content is not None and reasoning.content[0].text == "Let me think."
    assert r.output_text == "Hi!"
    with sdk.responses.stream(model="m", input="Hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        "Let me think."
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output_text == "Hi!"
    # the next turn's conversation keeps the answer, not the reasoning
    sdk.responses.create(model="m", input="And?", previous_response_id=r.id)
    assert engine.chats[-1] == [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hi!"},
                                {"role": "user", "content": "And?"}]


@pytest.mark.parametrize(("body", "param", "says"), [
    pytest.param({"tools": [{"type": "web_search_preview"}]}, "tools[0]", "web_search_preview",
                 id="web-search"),
    pytest.param({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}]},
                 "tools[1]", "file_search", id="file-search"),
    pytest.param({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0]", "mcp",
                 id="mcp"),
    pytest.param({"tools": [{"type": "computer_use_preview"}]}, "tools[0]",
                 "computer_use_preview", id="computer-use"),
    pytest.param({"tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name", "tools[0].name",
                 id="bad-function-name"),
    pytest.param({"tools": [{**WEATHER, "parameters": {"type": "array"}}]},
                 "tools[0].parameters", "object", id="arguments-not-an-object"),
    pytest.param({"tools": {"type": "function"}}, "tools", "list", id="tools-not-a-list"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}},
                 "tool_choice", "web_search_preview", id="hosted-tool-choice"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
                 "tool_choice", "nope", id="unknown-function"),
    pytest.param({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "required",
                 id="unknown-mode"),
    pytest.param({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice",
                 "no 'tools'", id="named-without-tools"),
    pytest.param({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls",
                 "true or false", id="parallel-not-bool"),
    pytest.param({"input": [{"type": "function_call_output", "call_id": "call_x",
                             "output": "o"}]}, "input[0].call_id", "call_x",
                 id="output-of-no-call"),
    pytest.param({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
                 "input[0].arguments", "required", id="call-without-arguments"),
    pytest.param({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]", "item_reference",
                 id="item-reference"),
])
def test_bad_tools_are_400s_naming_the_field_before_any_token(
        open_sdk: OpenSdk, engine: FakeEngine, body: dict[str, Any], param: str, says: str
) -> None:
    tc, _sdk = open_sdk(engine)
    r = tc.post("/v1/responses", json={"input": "x", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert not engine.requests


def test_a_strict_tool_called_against_its_schema_fails_the_response(
        sdk: OpenAI, engine: FakeEngine) -> None:
    # the fake ignores the grammar, so it can break the schema as a model cannot
    engine.script = Script(tokens=('{"tool_calls": [{"name": "get_weather", "arguments": '
                                   '{"town": "Paris"}}]}',))
    strict = {**WEATHER, "strict": True}
    with pytest.raises(openai.InternalServerError) as info:
        sdk.responses.create(model="m", input="x", tools=[strict])  # type: ignore[list-item]
    assert info.value.body["code"] == "invalid_tool_call"  # type: ignore[index]
    with sdk.responses.stream(model="m", input="x", tools=[strict]) as stream:  # type: ignore[list-item]
        last = list(stream)[-1]
    assert last.type == "response.failed"
    assert last.response.error is not None
    assert last.response.error.code == "invalid_tool_call"  # type: ignore[comparison-overlap]
