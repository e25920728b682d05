"""Tier 2: the Responses API with a FakeEngine, driven by the official openai SDK (its typed
events, its exception classes), on a store in a temporary data dir."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.conftest import OpenSdk, requires_llama_cpp
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until


@pytest.fixture
def sdk(open_sdk: OpenSdk, engine: FakeEngine) -> OpenAI:
    return open_sdk(engine)[1]


def test_create_answers_a_response_object_and_stores_it(sdk: OpenAI, engine: FakeEngine) -> None:
    r = sdk.responses.create(model="fake-model", input="Hi", instructions="Be brief.",
                             metadata={"k": "v"})
    assert r.id.startswith("resp_")
    assert r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello, world!"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage is not None and r.usage.output_tokens == 4
    assert r.usage.total_tokens == r.usage.input_tokens + 4
    assert r.metadata == {"k": "v"} and r.instructions == "Be brief."
    assert engine.chats[-1] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}]
    assert sdk.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_previous_response_id_prepends_the_stored_conversation(
        sdk: OpenAI, engine: FakeEngine) -> None:
    first = sdk.responses.create(model="fake-model", input="One", instructions="Sys.")
    second = sdk.responses.create(
        model="fake-model", previous_response_id=first.id,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Two"}]}])
    assert second.previous_response_id == first.id
    # instructions are not carried over (OpenAI's rule); the earlier turns are
    assert engine.chats[-1] == [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Hello, world!"},
        {"role": "user", "content": "Two"},
    ]
    third = sdk.responses.create(model="fake-model", previous_response_id=second.id,
                                 input="Three")
    assert [m["content"] for m in engine.chats[-1]] == [
        "One", "Hello, world!", "Two", "Hello, world!", "Three"]
    assert third.status == "completed"


@requires_llama_cpp  # the JSON-schema converter
def test_text_format_json_schema_takes_the_grammar_path(sdk: OpenAI, engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = sdk.responses.create(model="fake-model", input="x", text={"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    sampling = engine.requests[-1].sampling
    assert sampling.grammar  # the schema compiled to a grammar, as chat's response_format
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"


@requires_llama_cpp
def test_a_bad_schema_is_a_400_naming_text_format(sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model="fake-model", input="x", text={"format": {
            "type": "json_schema", "name": "t", "schema": {"type": "no-such-type"}}})
    assert info.value.body["param"] == "text.format"  # type: ignore[index]


def test_stream_yields_typed_events_in_order_and_the_same_response(
        sdk: OpenAI) -> None:
    with sdk.responses.stream(model="fake-model", input="Hi", temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 4,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        "Hello, world!"
    plain = sdk.responses.create(model="fake-model", input="Hi", temperature=0)
    assert final.output_text == plain.output_text
    assert final.status == plain.status
    stored = sdk.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.status == "completed"


def test_a_failure_mid_stream_is_a_response_failed_event(
        open_sdk: OpenSdk) -> None:
    engine = FakeEngine(script=Script(fail_at=2))
    tc, _sdk = open_sdk(engine)
    with tc.stream("POST", "/v1/responses", json={"input": "Hi", "stream": True}) as r:
        text = r.read().decode()
    assert "event: response.failed" in text
    assert '"status":"failed"' in text


def test_max_output_tokens_makes_an_incomplete_response(sdk: OpenAI) -> None:
    r = sdk.responses.create(model="fake-model", input="Hi", max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "Hello,"


def test_input_items_delete_and_unknown_ids(sdk: OpenAI) -> None:
    r = sdk.responses.create(model="fake-model", input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}])
    items = list(sdk.responses.input_items.list(r.id, order="asc"))
    assert [i.content[0].text for i in items] == ["a", "b", "c"]  # type: ignore[union-attr]
    newest_first = list(sdk.responses.input_items.list(r.id))
    assert [i.id for i in newest_first] == [i.id for i in reversed(items)]
    sdk.responses.delete(r.id)
    for call in (lambda: sdk.responses.retrieve(r.id),
                 lambda: sdk.responses.delete(r.id),
                 lambda: sdk.responses.input_items.list(r.id),
                 lambda: sdk.responses.cancel(r.id),
                 lambda: sdk.responses.create(model="m", input="x",
                                              previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "not_found"  # type: ignore[index]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]},
     "input[0].call_id"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "background": True, "stream": True}, "stream"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({}, "input"),
], ids=["web-search-tool", "tool_choice", "image", "function_call_output", "temperature",
        "background-stream", "background-unstored", "no-input"])
def test_refused_requests_are_400s_naming_the_field(
        open_sdk: OpenSdk, engine: FakeEngine, body: dict[str, Any], param: str) -> None:
    tc, _sdk = open_sdk(engine)
    r = tc.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_choice_auto_without_tools_is_accepted(sdk: OpenAI) -> None:
    assert sdk.responses.create(model="m", input="x", tool_choice="auto").status == "completed"


def test_store_false_keeps_nothing(sdk: OpenAI) -> None:
    r = sdk.responses.create(model="fake-model", input="Hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(r.id)


def test_no_store_answers_but_keeps_nothing(open_sdk: OpenSdk,
                                            engine: FakeEngine) -> None:
    _tc, sdk = open_sdk(engine, store=False)
    r = sdk.responses.create(model="fake-model", input="Hi")
    assert r.output_text == "Hello, world!" and r.store is False
    for call in (lambda: sdk.responses.retrieve(r.id),
                 lambda: sdk.responses.create(model="m", input="x", previous_response_id=r.id),
                 lambda: sdk.responses.create(model="m", input="x", background=True)):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["code"] == "store_disabled"  # type: ignore[index]


def test_background_runs_detached_and_is_polled(sdk: OpenAI) -> None:
    r = sdk.responses.create(model="fake-model", input="Hi", background=True)
    assert r.status == "queued" and r.background is True

    def done() -> bool:
        return sdk.responses.retrieve(r.id).status == "completed"

    wait_until(done, timeout=10, what="the background response")
    assert sdk.responses.retrieve(r.id).output_text == "Hello, world!"


def test_background_cancel(open_sdk: OpenSdk) -> None:
    engine = FakeEngine(script=Script(tokens=["x"] * 200, delay=0.02))
    _tc, sdk = open_sdk(engine)
    r = sdk.responses.create(model="fake-model", input="Hi", background=True)
    wait_until(lambda: engine.emitted, timeout=10, what="the first token")
    cancelled = sdk.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    wait_until(lambda: engine.cancelled, timeout=5, what="the engine to see the cancel")
    assert sdk.responses.retrieve(r.id).status == "cancelled"
    plain = sdk.responses.create(model="fake-model", input="Hi", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(plain.id)


def test_stored_responses_survive_a_new_app_on_the_same_dir(
        open_sdk: OpenSdk, engine: FakeEngine) -> None:
    _tc, first = open_sdk(engine)
    r = first.responses.create(model="fake-model", input="Hi")
    _tc2, second = open_sdk(FakeEngine())
    again = second.responses.retrieve(r.id)
    assert again.output_text == "Hello, world!"
    follow = second.responses.create(model="fake-model", input="more",
                                     previous_response_id=r.id)
    assert follow.status == "completed"
