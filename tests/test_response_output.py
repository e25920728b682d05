"""Tier 1: a Responses answer's output items and stream events from a chat answer's pieces
(llmserve.server.response_output), without a server."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.chat_output import ChatOutput
from llmserve.reasoning import ReasoningSplitter
from llmserve.server.response_output import ResponseOutput, chat_messages
from llmserve.tool_calls import CallArguments, CallStart, Content, ToolParser

HERMES = ("<think>Paris is in France.</think>\n\n<tool_call>\n"
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          "<tool_call>\n"
          '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


def _parser() -> ChatOutput:
    return ChatOutput(ReasoningSplitter(True), ToolParser("hermes", ["get_weather"]))


def _without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


def _build(pieces: list[str]) -> tuple[ResponseOutput, list[dict[str, Any]]]:
    parsed, output, events = _parser(), ResponseOutput(), []
    for piece in pieces:
        events += output.add(parsed.feed(piece))
    events += output.add(parsed.finish())
    events += output.finish("completed")
    return output, events


@pytest.mark.parametrize("size", [1, 3, 7], ids=lambda n: f"{n}-char-pieces")
def test_a_streamed_answer_builds_the_items_of_the_whole_one(size: int) -> None:
    whole, _ = _build([HERMES])
    streamed, events = _build([HERMES[i:i + size] for i in range(0, len(HERMES), size)])
    assert _without_ids(streamed.items()) == _without_ids(whole.items())
    assert [i["type"] for i in whole.items()] == ["reasoning", "function_call", "function_call"]
    # each item is added, then done, before the next one is added
    lifecycle = [(e["type"], e["output_index"]) for e in events
                 if e["type"].startswith("response.output_item.")]
    assert lifecycle == [(f"response.output_item.{kind}", i)
                         for i in range(3) for kind in ("added", "done")]
    # the deltas of each item add up to what its done item carries
    for item in streamed.items():
        deltas = "".join(e["delta"] for e in events
                         if e["type"].endswith(".delta") and e["item_id"] == item["id"])
        final = item["arguments"] if item["type"] == "function_call" else \
            item["content"][0]["text"]
        assert deltas == final


def test_text_after_a_call_in_the_same_update_ends_the_call_first() -> None:
    output = ResponseOutput()
    output.add([CallStart(0, "call_a", "f"), CallArguments(0, '{"a"')])
    events = output.add([Content("done"), CallArguments(0, ": 1}")])
    assert [e["type"] for e in events] == [
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta"]
    output.finish("completed")
    call, message = output.items()
    assert call["arguments"] == '{"a": 1}' and message["content"][0]["text"] == "done"


def test_nothing_generated_is_an_empty_message_and_a_cut_answer_is_incomplete() -> None:
    empty = ResponseOutput()
    empty.finish("completed")
    (message,) = empty.items()
    assert message["type"] == "message" and message["content"][0]["text"] == ""
    cut = ResponseOutput()
    cut.add([Content("Hel")])
    cut.finish("incomplete")
    assert cut.items()[0]["status"] == "incomplete"


def test_items_become_chat_messages() -> None:
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "reasoning", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                              "text": "Let me look."}]},
        {"type": "function_call", "call_id": "call_a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_b", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "1"},
        {"type": "function_call", "call_id": "call_c", "name": "f", "arguments": "{}"},
    ]
    assert chat_messages(items) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "1"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_c", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ]},
    ]
