"""Tools, reasoning and chat_template_kwargs on /v1/chat/completions and /apply-template, with
the FakeEngine (its template speaks no tool format: the generic one applies)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import resolve_settings
from llmserve.server.chat_plan import ChatDefaults
from llmserve.server.options import ServerOptions
from tests.conftest import requires_llama_cpp
from tests.fakes import FakeEngine, Script

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
GENERIC_CALL = ('{"tool_calls": [', '{"name": "get_', 'weather", "argu', 'ments": {"ci',
                'ty": "Paris"}}', "]}")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(n_ctx=4096)  # one token per character: the tool prompt is long


def _events(r: Any) -> list[dict[str, Any]]:
    out = []
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_a_call_in_the_generic_format(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the generic tool prompt went into a system message, naming the tool
    system = engine.chats[-1][0]
    assert system["role"] == "system" and "get_weather" in system["content"]
    assert engine.requests[-1].sampling.grammar is None  # auto, generic: parsed after


def test_streamed_call_deltas(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = client.post("/v1/chat/completions",
                    json={"messages": ASK, "tools": [WEATHER], "stream": True})
    assert r.status_code == 200
    events = _events(r)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first, rest = calls[0], calls[1:]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] == "get_weather"
    assert rest and all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
                        for c in rest)
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert not any(d.get("content") for d in deltas)  # no marker/JSON text as content
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_plain_answer_with_tools_offered(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER]})
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert choice["finish_reason"] == "stop"


def test_tool_choice_none_renders_no_tools(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(tokens=GENERIC_CALL)
    r = client.post("/v1/chat/completions",
                    json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none"})
    assert r.json()["choices"][0]["message"]["content"] == "".join(GENERIC_CALL)
    assert engine.chats[-1] == ASK


def test_reasoning_split(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(tokens=("<thi", "nk>Let me", " think.</th", "ink>\n\nHi", "!"))
    body = {"messages": ASK, "reasoning_format": "deepseek"}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hi!", "reasoning_content": "Let me think."}
    deltas = [e["choices"][0]["delta"] for e in _events(
        client.post("/v1/chat/completions", json={**body, "stream": True})) if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
    assert "".join(d.get("content") or "" for d in deltas) == "Hi!"
    # auto: this template knows no <think>, so nothing is split
    plain = client.post("/v1/chat/completions", json={"messages": ASK}).json()
    assert plain["choices"][0]["message"]["content"].startswith("<think>")


@pytest.mark.parametrize(("body", "param"), [
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": 3}}}}}]},
        "tools[0].function.parameters", id="bad-schema"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                      "function": {"name": "nope"}}},
                 "tool_choice", id="unknown-function"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="required-without-tools"),
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                 "tool_choice", id="named-without-tools"),
    pytest.param({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x",
                                      "content": "sunny"}]},
                 "messages[1].tool_call_id", id="unknown-tool-call-id"),
    pytest.param({"parallel_tool_calls": "yes"}, "parallel_tool_calls", id="parallel-not-bool"),
    pytest.param({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs",
                 id="kwargs-not-object"),
    pytest.param({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs",
                 id="kwargs-reserved"),
    pytest.param({"reasoning_format": "hidden"}, "reasoning_format", id="bad-reasoning-format"),
])
def test_bad_input_is_400_naming_the_field_before_any_token(
    client: TestClient, engine: FakeEngine, body: dict[str, Any], param: str
) -> None:
    r = client.post("/v1/chat/completions", json={"messages": ASK, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not engine.requests


def test_tools_are_refused_on_text_completions(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "x", "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_apply_template_takes_tools_and_kwargs(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/apply-template", json={"messages": ASK, "tools": [WEATHER],
                                             "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200
    assert "get_weather" in r.json()["prompt"]  # the generic prompt, as chat would render it


@pytest.fixture
def hermes_client(make_app: Callable[..., Starlette], engine: FakeEngine
                  ) -> Iterator[TestClient]:
    options = ServerOptions(chat=ChatDefaults(tool_parser="hermes",
                                              chat_template_kwargs={"enable_thinking": False}))
    with TestClient(make_app(engine, options=options), raise_server_exceptions=False) as c:
        yield c


@requires_llama_cpp
def test_forced_and_lazy_grammars(hermes_client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(tokens=("<tool_call>\n", '{"name": "get_weather", "arguments": ',
                                   '{"city": "Paris"}}', "\n</tool_call>"))
    for choice, lazy in (("required", False), ("auto", True)):
        r = hermes_client.post("/v1/chat/completions",
                               json={"messages": ASK, "tools": [WEATHER], "tool_choice": choice})
        assert r.json()["choices"][0]["finish_reason"] == "tool_calls", r.text
        sampling = engine.requests[-1].sampling
        assert sampling.grammar is not None and "<tool_call>" in sampling.grammar
        assert sampling.grammar_triggers == (("<tool_call>",) if lazy else ())
    r = hermes_client.post("/v1/chat/completions", json={
        "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


@requires_llama_cpp
def test_strict_tool_arguments_are_checked(hermes_client: TestClient, engine: FakeEngine) -> None:
    # the fake ignores the grammar, so it can break the schema as a model cannot
    engine.script = Script(tokens=('<tool_call>\n{"name": "get_weather", "arguments": '
                                   '{"town": "Paris"}}\n</tool_call>',))
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    r = hermes_client.post("/v1/chat/completions", json={"messages": ASK, "tools": [strict]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "invalid_tool_call"


def test_server_default_template_kwargs_reach_the_template(
    hermes_client: TestClient, engine: FakeEngine
) -> None:
    seen: list[dict[str, Any]] = []
    original = engine.format_chat

    def spy(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        seen.append(kwargs)
        return original(messages, **kwargs)

    engine.format_chat = spy  # type: ignore[method-assign]
    hermes_client.post("/v1/chat/completions", json={"messages": ASK})
    hermes_client.post("/v1/chat/completions", json={
        "messages": ASK, "chat_template_kwargs": {"enable_thinking": True, "x": 1}})
    assert seen == [{"enable_thinking": False}, {"enable_thinking": True, "x": 1}]


def test_server_defaults_from_flags_and_config(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[server]\ntool_parser = "llama3"\nreasoning_format = "none"\n'
                      "chat_template_kwargs = { enable_thinking = false }\n")
    settings = resolve_settings({"config": config}, set())
    assert ServerOptions.from_settings(settings).chat == ChatDefaults(
        "llama3", {"enable_thinking": False}, "none")
    # a flag (JSON text) wins over the file
    flagged = resolve_settings({"config": config, "chat_template_kwargs": '{"x": 1}'},
                               {"chat_template_kwargs"})
    assert flagged.chat_template_kwargs == {"x": 1}
    with pytest.raises(ValueError, match="must be a JSON object"):
        resolve_settings({"chat_template_kwargs": "[1]"}, {"chat_template_kwargs"})
    with pytest.raises(ValueError, match="tool_parser"):
        resolve_settings({"tool_parser": "qwen"}, {"tool_parser"})
