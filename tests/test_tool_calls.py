"""Tool-call parsing and reasoning splitting (pure): recorded outputs of each format family,
parsed whole and streamed in every split (two pieces at every character, and one character at
a time), which must reassemble into the whole parse."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from llmserve.chat_output import Answer, ChatOutput, Reasoning
from llmserve.errors import InvalidRequest
from llmserve.reasoning import ReasoningSplitter
from llmserve.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Delta,
    Format,
    ToolChoice,
    ToolParser,
    call_grammar,
    call_schema,
    check_tool_messages,
    detect_format,
    grammar_plan,
    parse_tool_choice,
    parse_tools,
    template_messages,
    validate_arguments,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, "required": ["city"]},
}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}}}}
NAMES = ("get_weather", "get_time")


@dataclass(frozen=True)
class Recorded:
    format: Format
    text: str
    content: str | None
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    reasoning: str | None = None
    starts_open: bool = False
    max_calls: int | None = None


RECORDED = {
    # Qwen 2.5 / Hermes 3
    "hermes": Recorded("hermes", '<tool_call>\n{"name": "get_weather", "arguments": '
                       '{"city": "Paris", "unit": "celsius"}}\n</tool_call>', None,
                       (("get_weather", {"city": "Paris", "unit": "celsius"}),)),
    "hermes-parallel": Recorded(
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None,
        (("get_weather", {"city": "Paris"}), ("get_time", {}))),
    "hermes-parallel-off": Recorded(
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None,
        (("get_weather", {"city": "Paris"}),), max_calls=1),
    "hermes-text-first": Recorded(
        "hermes", 'Let me check that for you.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Zürich, \\"CH\\" {x}"}}\n</tool_call>',
        "Let me check that for you.", (("get_weather", {"city": 'Zürich, "CH" {x}'}),)),
    "hermes-args-before-name": Recorded(
        "hermes", '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n'
        '</tool_call>', None, (("get_weather", {"city": "Oslo"}),)),
    "hermes-plain": Recorded("hermes", "Use a < b, and <tool> tags.",
                             "Use a < b, and <tool> tags."),
    "hermes-unknown-tool": Recorded(
        "hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),
    # Qwen3: reasoning, then a call
    "qwen3-think-call": Recorded(
        "hermes", "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
        (("get_weather", {"city": "Paris"}),), reasoning="The user wants the weather."),
    # DeepSeek-R1 distill: the prompt opened the block
    "r1-open": Recorded("hermes", "Two plus two.\n</think>\n\nIt is 4.", "It is 4.",
                        reasoning="Two plus two.", starts_open=True),
    # Llama 3.1-3.3
    "llama3": Recorded("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                       None, (("get_weather", {"city": "Paris"}),)),
    "llama3-python-tag": Recorded(
        "llama3", '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": '
        '{"city": "Rome"}}; {"name": "get_time", "parameters": {}}', None,
        (("get_weather", {"city": "Rome"}), ("get_time", {}))),
    "llama3-plain": Recorded("llama3", "The weather in Paris is sunny.",
                             "The weather in Paris is sunny."),
    "llama3-json-answer": Recorded("llama3", '{"answer": 42}', '{"answer": 42}'),
    # Mistral / Ministral
    "mistral": Recorded(
        "mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, '
        '"id": "abcDEF123"}, {"name": "get_time", "arguments": {}}]', None,
        (("get_weather", {"city": "Paris"}), ("get_time", {}))),
    "mistral-args-marker": Recorded(
        "mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]get_time[ARGS]{}',
        None, (("get_weather", {"city": "Lyon"}), ("get_time", {}))),
    "mistral-plain": Recorded("mistral", "[1] is a citation.", "[1] is a citation."),
    # llama-server's generic format
    "generic": Recorded("generic", '{"tool_calls": [{"name": "get_weather", "arguments": '
                        '{"city": "Paris"}}, {"name": "get_time", "arguments": {}}]}', None,
                        (("get_weather", {"city": "Paris"}), ("get_time", {}))),
    "generic-one": Recorded("generic", '{"tool_call": {"name": "get_time", "arguments": {}}}',
                            None, (("get_time", {}),)),
    "generic-response": Recorded("generic", '{"response": "Hello there"}', "Hello there"),
    "generic-plain": Recorded("generic", "Hello there", "Hello there"),
}


def _output(rec: Recorded) -> ChatOutput:
    return ChatOutput(ReasoningSplitter(True, rec.starts_open),
                      ToolParser(rec.format, NAMES, max_calls=rec.max_calls))


def _reassemble(pieces: list[Delta | Reasoning]) -> Answer:
    content, reasoning = "", ""
    calls: list[list[str]] = []
    for p in pieces:
        if isinstance(p, Content):
            content += p.text
        elif isinstance(p, Reasoning):
            reasoning += p.text
        elif isinstance(p, CallStart):
            assert p.index == len(calls), "calls start in index order"
            calls.append([p.id, p.name, ""])
        else:
            assert isinstance(p, CallArguments)
            calls[p.index][2] += p.fragment
    from llmserve.chat_output import FunctionCall

    return Answer(content or None, reasoning or None,
                  tuple(FunctionCall(*c) for c in calls))


def _whole(rec: Recorded) -> Answer:
    out = _output(rec)
    out.feed(rec.text)
    out.finish()
    return out.answer()


@pytest.mark.parametrize("rec", RECORDED.values(), ids=RECORDED.keys())
def test_recorded_output_parses(rec: Recorded) -> None:
    answer = _whole(rec)
    assert answer.content == rec.content
    assert answer.reasoning == rec.reasoning
    assert [(c.name, json.loads(c.arguments)) for c in answer.calls] == list(rec.calls)
    for marker in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<think>", "</think>"):
        if rec.calls or rec.reasoning:
            assert marker not in (answer.content or "")


def _same(a: Answer, b: Answer) -> None:
    assert (a.content, a.reasoning) == (b.content, b.reasoning)
    assert [(c.name, c.arguments) for c in a.calls] == [(c.name, c.arguments) for c in b.calls]


@pytest.mark.parametrize("rec", RECORDED.values(), ids=RECORDED.keys())
def test_every_two_piece_split_reassembles(rec: Recorded) -> None:
    whole = _whole(rec)
    for i in range(len(rec.text) + 1):
        out = _output(rec)
        pieces = out.feed(rec.text[:i]) + out.feed(rec.text[i:]) + out.finish()
        _same(_reassemble(pieces), whole)
        _same(out.answer(), whole)


@pytest.mark.parametrize("rec", RECORDED.values(), ids=RECORDED.keys())
def test_one_character_at_a_time_reassembles_and_never_leaks_a_marker(rec: Recorded) -> None:
    whole = _whole(rec)
    out = _output(rec)
    pieces: list[Delta | Reasoning] = []
    for ch in rec.text:
        pieces += out.feed(ch)
    pieces += out.finish()
    _same(_reassemble(pieces), whole)
    if rec.calls:
        streamed = "".join(p.text for p in pieces if isinstance(p, Content))
        assert "<tool" not in streamed and "[TOOL" not in streamed and "{" not in streamed
        # a call's name arrives before any of its arguments
        assert isinstance(next(p for p in pieces if isinstance(p, CallStart | CallArguments)),
                          CallStart)


def test_cut_off_call_keeps_its_partial_arguments_and_no_marker_text() -> None:
    out = ChatOutput(ReasoningSplitter(False), ToolParser("hermes", NAMES))
    out.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    out.finish()
    answer = out.answer()
    assert answer.content is None
    assert [(c.name, c.arguments) for c in answer.calls] == [("get_weather", '{"city": "Pa')]


def test_an_unfinished_marker_at_the_end_is_content() -> None:
    out = ChatOutput(ReasoningSplitter(False), ToolParser("hermes", NAMES))
    assert out.feed("Hello <tool_") == [Content("Hello")]
    out.finish()
    assert out.answer().content == "Hello <tool_"


# -- reasoning ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "template", "prompt", "text", "expected"), [
    pytest.param("auto", "<think>", "<|im_start|>assistant\n", "<think>a</think>b", ("a", "b"),
                 id="auto-template-knows-think"),
    pytest.param("auto", "", "assistant\n", "<think>a</think>b", ("", "<think>a</think>b"),
                 id="auto-template-without-think"),
    pytest.param("deepseek", "", "assistant\n", "<think>a</think>b", ("a", "b"),
                 id="deepseek-any-template"),
    pytest.param("auto", "", "assistant\n<think>\n", "a</think>b", ("a", "b"),
                 id="auto-prompt-opened-it"),
    pytest.param("none", "<think>", "assistant\n<think>\n", "a</think>b", ("", "a</think>b"),
                 id="none"),
    pytest.param("auto", "<think>", "<think>\n\n</think>\n\n", "b", ("", "b"),
                 id="thinking-off-in-the-prompt"),
])
def test_reasoning_format(fmt: Any, template: str, prompt: str, text: str,
                          expected: tuple[str, str]) -> None:
    split = ReasoningSplitter.plan(fmt, template, prompt).split(text, final=True)
    assert (split.reasoning, split.content) == expected


# -- request checks -------------------------------------------------------------------------


@pytest.mark.parametrize(("tools", "param"), [
    pytest.param({"type": "function"}, "tools", id="not-a-list"),
    pytest.param([{"type": "retrieval"}], "tools[0]", id="not-a-function"),
    pytest.param([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name",
                 id="bad-name"),
    pytest.param([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}],
        "tools[0].function.parameters", id="schema-unknown-type"),
    pytest.param([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": "x"}}}], "tools[0].function.parameters",
        id="schema-required-not-a-list"),
    pytest.param([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}], "tools[0].function.parameters", id="schema-not-an-object"),
    pytest.param([WEATHER, WEATHER], "tools[1].function.name", id="duplicate"),
])
def test_bad_tools_name_the_field(tools: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_tools(tools)
    assert info.value.param == param and param in info.value.message


@pytest.mark.parametrize(("choice", "tools", "fragment"), [
    pytest.param("required", [], "needs 'tools'", id="required-without-tools"),
    pytest.param({"type": "function", "function": {"name": "get_weather"}}, [],
                 "no 'tools'", id="named-without-tools"),
    pytest.param({"type": "function", "function": {"name": "nope"}}, [WEATHER],
                 "no tool named 'nope'", id="unknown-function"),
    pytest.param("always", [WEATHER], "must be none, auto, required", id="unknown-mode"),
])
def test_bad_tool_choice(choice: Any, tools: list[Any], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_tool_choice(choice, parse_tools(tools))
    assert info.value.param == "tool_choice" and fragment in info.value.message


def test_tool_choice_none_and_auto_without_tools_mean_nothing() -> None:
    assert parse_tool_choice("auto", ()) == ToolChoice("none")
    assert parse_tool_choice(None, parse_tools([WEATHER])) == ToolChoice("auto")


def test_tool_message_must_answer_an_earlier_call() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    good = [{"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    check_tool_messages(good)
    with pytest.raises(InvalidRequest) as info:
        check_tool_messages([*good[:2], {**good[2], "tool_call_id": "call_2"}])
    assert info.value.param == "messages[2].tool_call_id"
    # templates get the arguments as an object (they write them with tojson)
    rendered = template_messages(good)[1]["tool_calls"][0]
    assert rendered["function"]["arguments"] == {"city": "Paris"}
    assert rendered["name"] == "get_weather"


@pytest.mark.parametrize(("template", "fmt"), [
    ("{{ '<tool_call>' }}", "hermes"),
    ("[TOOL_CALLS] {{ tools }}", "mistral"),
    ("<|start_header_id|>ipython {% if tools %}{% endif %}", "llama3"),
    ("<|python_tag|>", "llama3"),
    ("{{ messages }}", "generic"),
])
def test_format_detection(template: str, fmt: str) -> None:
    assert detect_format(template) == fmt


def test_strict_arguments_are_validated() -> None:
    tool = parse_tools([WEATHER])[0]
    assert validate_arguments(tool, '{"city": "Paris"}') is None
    assert "required" in (validate_arguments(tool, '{"unit": "celsius"}') or "")
    assert "JSON" in (validate_arguments(tool, '{"city": ') or "")


def test_grammar_plans() -> None:
    tools = parse_tools([WEATHER, TIME])
    forced = grammar_plan("hermes", ToolChoice("required"), True)
    assert forced is not None and forced.triggers == ()
    lazy = grammar_plan("hermes", ToolChoice("auto"), True)
    assert lazy is not None and lazy.triggers == ("<tool_call>",)
    assert grammar_plan("generic", ToolChoice("auto"), True) is None  # no marker to wait for
    assert grammar_plan("hermes", ToolChoice("none"), True) is None
    named = call_schema(tools, ToolChoice("function", "get_time"), "hermes")
    assert named["properties"]["name"] == {"const": "get_time"}
    assert list(named["properties"]) == ["name", "arguments"]  # the name streams first
    single = grammar_plan("hermes", ToolChoice("required"), False)
    assert single is not None and "{0,0}" in single.root
    gbnf = call_grammar(forced, 'root ::= "{" x "}"\nx ::= "a"')
    assert gbnf.startswith("root ::= hermes-call") and 'tool-call ::= "{" x "}"' in gbnf
