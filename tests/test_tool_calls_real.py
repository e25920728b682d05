"""Tool calls and reasoning on the real demo model, through the official openai SDK: SmolLM2
with a Hermes/Qwen 2.5-style tool template (tests/fixtures/hermes_tools.jinja), and with a
Qwen3-style reasoning template (tests/fixtures/qwen3_thinking.jinja)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import ServerProcess

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

FIXTURES = Path(__file__).parent / "fixtures"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                      "parameters": {"type": "object", "properties": {}}}},
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def think_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--threads", "1", "--chat-template",
                        str(FIXTURES / "qwen3_thinking.jinja"))


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                         max_retries=0, timeout=120)


def _check_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id
        args = json.loads(call.function.arguments)
        schema = next(t["function"]["parameters"] for t in TOOLS
                      if t["function"]["name"] == call.function.name)
        jsonschema.validate(args, schema)
        out.append((call.function.name, args))
    return out


def test_required_calls_always_parse_and_validate(tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    for _ in range(20):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=120,
                                           parallel_tool_calls=False)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        _check_calls(choice.message.tool_calls)


def _reassemble(stream: Any) -> tuple[list[tuple[str, str]], str | None, str]:
    calls: dict[int, list[str]] = {}
    content, reason = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.id is not None:
                assert tc.index not in calls and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.function.name, ""]
            calls[tc.index][1] += tc.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return [(n, a) for n, a in calls.values()], reason, content


def test_streamed_calls_reassemble_into_the_same_calls(tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    kwargs: dict[str, Any] = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                  max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, reason, content = _reassemble(client.chat.completions.create(**kwargs, stream=True))
    assert reason == "tool_calls" == whole.finish_reason
    assert content == ""  # nothing of the call leaks into content
    assert calls == [(c.function.name, c.function.arguments)
                     for c in whole.message.tool_calls or []]


def test_named_tool_choice_calls_exactly_that_function(tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    for name in ("get_time", "get_weather", "get_time"):
        r = client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": name}})
        calls = _check_calls(r.choices[0].message.tool_calls)
        assert calls and {n for n, _ in calls} == {name}


def test_two_turn_tool_loop(tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    first = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=120,
                                           parallel_tool_calls=False)
    message = first.choices[0].message
    assert message.tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    messages: list[Any] = [*ASK, message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id,
                            "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    final = client.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=40, temperature=0)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls
    # the tool's result reached the prompt through the template
    prompt = httpx.post(f"http://127.0.0.1:{tool_server.port}/apply-template",
                        json={"messages": messages}, timeout=30).json()["prompt"]
    assert "<tool_response>" in prompt and call.function.name in prompt


class GetWeather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]


def test_sdk_parse_with_pydantic_function_tool(tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    r = client.chat.completions.parse(
        model="m", messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
        # greedy: at the default temperature the model may spin a string argument out until
        # the token limit, which parse() reports as LengthFinishReasonError
        tool_choice="required", max_tokens=200, temperature=0)
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_auto_with_the_lazy_grammar_answers_or_calls_validly(tool_server: ServerProcess) -> None:
    client = _client(tool_server)
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=80,
                                           seed=seed, temperature=1.0)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls)
        else:
            assert "<tool_call>" not in (choice.message.content or "")


# -- reasoning ------------------------------------------------------------------------------

# The prompt opens <think>; the grammar makes the model close it and answer, so the split is
# on real output (SmolLM2 never thinks by itself).
THINK_GRAMMAR = 'root ::= [a-z ]{4,16} "</think>" [a-z ]{4,16}'


def test_reasoning_content_is_split_streamed_and_not(think_server: ServerProcess) -> None:
    client = _client(think_server)
    kwargs: dict[str, Any] = dict(model="m", messages=ASK, max_tokens=60, temperature=0)
    grammar = {"grammar": THINK_GRAMMAR}
    message = client.chat.completions.create(**kwargs, extra_body=grammar).choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning and message.content
    assert "think>" not in reasoning and "think>" not in message.content
    streamed_reasoning, streamed_content = "", ""
    for chunk in client.chat.completions.create(**kwargs, extra_body=grammar, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            streamed_content += delta.content or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    # reasoning_format none leaves the block in content
    raw = client.chat.completions.create(**kwargs, extra_body={**grammar,
                                                                "reasoning_format": "none"})
    assert "</think>" in (raw.choices[0].message.content or "")


def test_chat_template_kwargs_change_the_rendered_prompt(think_server: ServerProcess) -> None:
    url = f"http://127.0.0.1:{think_server.port}/apply-template"
    thinking = httpx.post(url, json={"messages": ASK}, timeout=30).json()["prompt"]
    off = httpx.post(url, json={"messages": ASK, "chat_template_kwargs": {
        "enable_thinking": False}}, timeout=30).json()["prompt"]
    assert thinking.endswith("<think>\n") and off.endswith("<think>\n\n</think>\n\n")
    # and on chat: with thinking off the answer is all content
    r = _client(think_server).chat.completions.create(
        model="m", messages=ASK, max_tokens=8, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content
    assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")


def test_lazy_grammar_starts_at_its_trigger_or_gives_up_without_crashing(
    demo_model: Path,
) -> None:
    """In-process: the sampler's trigger watch on the real vocabulary. Text the grammar refuses
    after the trigger must not reach llama.cpp's grammar (it would throw through ctypes and
    abort the server)."""
    from llmserve.engine.model import LoadedModel, init_backend
    from llmserve.engine.sampler import Sampler
    from llmserve.engine.sampling import compile_json_schema
    from llmserve.engine.types import SamplingParams
    from llmserve.tool_calls import ToolChoice, call_grammar, call_schema, grammar_plan, parse_tools

    init_backend()
    model = LoadedModel(demo_model, n_ctx=256, n_gpu_layers=0, n_threads=1, n_parallel=1)
    try:
        tools, choice = parse_tools(TOOLS), ToolChoice("auto")
        plan = grammar_plan("hermes", choice, True)
        assert plan is not None
        params = SamplingParams(temperature=0, grammar_triggers=plan.triggers, grammar=call_grammar(
            plan, compile_json_schema(call_schema(tools, choice, "hermes"))))
        good = Sampler(params, model)
        tokens = model.tokenize("Let me look. <tool_call>", add_special=False)
        for token in tokens[:-1]:
            good._watch(token)
            assert good._grammar is None  # free text before the marker
        good._watch(tokens[-1])
        assert good._grammar is not None  # constrained from the marker on
        newline, word = (model.tokenize(t, add_special=False)[0] for t in ("\n", "Hello"))
        assert list(good._allowed(np.array([newline, word], dtype=np.int32))) == [True, False]
        bad = Sampler(params, model)
        bad._generated = 'Sure <tool_call>{"na'  # no newline after the marker: refused
        bad._watch(model.tokenize("me", add_special=False)[0])
        assert bad._grammar is None and not bad._triggers  # given up: parsed as it is
        good.free()
        bad.free()
    finally:
        model.close()
