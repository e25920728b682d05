"""Tier 2: Ollama's API over a FakeEngine — shapes, every option on the engine request, errors
in Ollama's shape — partly through the official ``ollama`` Python library."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import ModelSpec
from tests.conftest import requires_llama_cpp
from tests.fakes import FakeEngine, Script
from tests.test_gguf_info import LLAMA_META, write_gguf

CHAT = [{"role": "user", "content": "Hi"}]
PROMPT_LEN = len("<user>Hi<assistant>")  # FakeEngine: one token per character


def lines(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def post_chat(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/api/chat", json={"model": "fake-model", "messages": CHAT,
                                          "stream": False, **body})


# -- /api/chat and /api/generate ----------------------------------------------------------------


def test_chat_whole(client: TestClient, engine: FakeEngine) -> None:
    r = post_chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake-model"
    assert body["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["prompt_eval_count"] == PROMPT_LEN
    assert body["eval_count"] == 4
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(body[key], int) and body[key] >= 0
    assert body["total_duration"] > 0
    assert body["created_at"].endswith("Z")
    assert engine.chats == [CHAT]


def test_chat_streams_ndjson_by_default(client: TestClient) -> None:
    r = client.post("/api/chat", json={"model": "fake-model", "messages": CHAT})
    assert r.status_code == 200
    objs = lines(r)
    assert [o["message"]["content"] for o in objs] == ["Hello", ",", " world", "!", ""]
    assert all(o["done"] is False for o in objs[:-1])
    last = objs[-1]
    assert last["done"] is True and last["done_reason"] == "stop" and last["eval_count"] == 4
    assert "total_duration" not in objs[0]


def test_generate_templates_the_prompt_and_returns_context(client: TestClient,
                                                           engine: FakeEngine) -> None:
    r = client.post("/api/generate", json={"model": "fake-model", "prompt": "Hi",
                                           "system": "Be brief.", "stream": False})
    body = r.json()
    assert body["response"] == "Hello, world!" and body["done_reason"] == "stop"
    assert engine.chats == [[{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"}]]
    prompt = list(engine.requests[0].prompt_tokens)
    assert body["context"] == [*prompt, 0, 1, 2, 3]  # the fake's token ids are 0, 1, ...
    # the context carries the conversation into the next request
    again = client.post("/api/generate", json={"model": "fake-model", "prompt": "More",
                                               "context": body["context"], "stream": False})
    assert again.status_code == 200
    assert list(engine.requests[1].prompt_tokens[:len(body["context"])]) == body["context"]


def test_generate_raw_skips_the_template_and_the_context(client: TestClient,
                                                         engine: FakeEngine) -> None:
    objs = lines(client.post("/api/generate", json={"model": "fake-model", "prompt": "[x]",
                                                    "raw": True}))
    assert "".join(o["response"] for o in objs) == "Hello, world!"
    assert engine.chats == []
    assert list(engine.requests[0].prompt_tokens) == [ord(c) for c in "[x]"]
    assert "context" not in objs[-1]


def test_length_and_stop_reasons(client: TestClient, engine: FakeEngine) -> None:
    r = post_chat(client, options={"num_predict": 2})
    assert r.json()["done_reason"] == "length" and r.json()["eval_count"] == 2
    assert r.json()["message"]["content"] == "Hello,"


def test_mid_stream_failure_is_an_error_line(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(fail_at=2)
    objs = lines(client.post("/api/chat", json={"model": "m", "messages": CHAT}))
    assert [o.get("message", {}).get("content") for o in objs[:2]] == ["Hello", ","]
    assert set(objs[-1]) == {"error"} and "generation failed" in objs[-1]["error"]


def test_empty_messages_load_and_keep_alive_0_unloads(client: TestClient,
                                                      engine: FakeEngine) -> None:
    r = client.post("/api/chat", json={"model": "fake-model", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["done"] is True
    assert r.json()["message"] == {"role": "assistant", "content": ""}
    r = client.post("/api/generate", json={"model": "fake-model", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["response"] == ""
    assert client.get("/api/ps").json() == {"models": []}
    assert engine.closed
    assert engine.requests == []


def test_keep_alive_sets_the_models_expiry(client: TestClient) -> None:
    assert post_chat(client, keep_alive="-1").status_code == 200
    assert client.get("/api/ps").json()["models"][0]["expires_at"].startswith("9999")
    assert post_chat(client, keep_alive="5m").status_code == 200
    assert not client.get("/api/ps").json()["models"][0]["expires_at"].startswith("9999")
    bad = post_chat(client, keep_alive="soon")
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


@requires_llama_cpp  # the JSON-schema-to-grammar converter
def test_format_json_and_schema_take_the_grammar_path(client: TestClient,
                                                      engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert post_chat(client, format=schema).status_code == 200
    assert post_chat(client, format="json").status_code == 200
    assert post_chat(client, format="").status_code == 200
    first, second, third = (r.sampling for r in engine.requests)
    assert first.grammar and "ok" in first.grammar
    assert second.grammar and second.grammar != first.grammar
    assert third.grammar is None
    bad = post_chat(client, format="yaml")
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    assert "format" in bad.json()["error"]


# -- options ------------------------------------------------------------------------------------

# (option, value, SamplingParams field, what the engine gets)
SAMPLING_OPTIONS = [
    ("temperature", 0.3, "temperature", 0.3),
    ("top_k", 7, "top_k", 7),
    ("top_p", 0.5, "top_p", 0.5),
    ("min_p", 0.2, "min_p", 0.2),
    ("typical_p", 0.6, "typical_p", 0.6),
    ("repeat_penalty", 1.3, "repeat_penalty", 1.3),
    ("repeat_last_n", 12, "repeat_last_n", 12),
    ("presence_penalty", 0.4, "presence_penalty", 0.4),
    ("frequency_penalty", -0.4, "frequency_penalty", -0.4),
    ("mirostat", 2, "mirostat", 2),
    ("mirostat_tau", 3.5, "mirostat_tau", 3.5),
    ("mirostat_eta", 0.2, "mirostat_eta", 0.2),
    ("seed", 42, "seed", 42),
]


@pytest.mark.parametrize(("option", "value", "field", "expected"), SAMPLING_OPTIONS,
                         ids=[o[0] for o in SAMPLING_OPTIONS])
def test_every_sampling_option_reaches_the_engine(client: TestClient, engine: FakeEngine,
                                                  option: str, value: Any, field: str,
                                                  expected: Any) -> None:
    r = post_chat(client, options={option: value})
    assert r.status_code == 200, r.text
    assert getattr(engine.requests[0].sampling, field) == expected


def test_stop_num_predict_and_num_ctx_reach_the_engine(client: TestClient,
                                                       engine: FakeEngine) -> None:
    assert post_chat(client, options={"stop": ["!", "x"], "num_predict": 3}).status_code == 200
    assert list(engine.requests[0].stop) == ["!", "x"] and engine.requests[0].max_tokens == 3
    # a smaller context window than the model's bounds what may be generated
    assert post_chat(client, options={"num_ctx": PROMPT_LEN + 2}).status_code == 200
    assert engine.requests[1].max_tokens == 2
    for fill in (-1, -2):  # both mean "until the context is full"
        assert post_chat(client, options={"num_predict": fill}).status_code == 200
        assert engine.requests[-1].max_tokens == engine.n_ctx - PROMPT_LEN


def test_options_mean_the_same_as_on_the_openai_route(client: TestClient,
                                                      engine: FakeEngine) -> None:
    post_chat(client, options={"temperature": 0, "num_predict": 8, "seed": 1})
    client.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0,
                                              "max_tokens": 8, "seed": 1})
    ours, openai = engine.requests
    assert ours.sampling == openai.sampling and ours.max_tokens == openai.max_tokens
    assert list(ours.prompt_tokens) == list(openai.prompt_tokens)


def test_load_time_options_are_accepted(client: TestClient, engine: FakeEngine) -> None:
    opts = {"num_gpu": 99, "num_thread": 8, "num_batch": 512, "use_mmap": True,
            "use_mlock": False, "main_gpu": 0, "num_keep": 5, "low_vram": False, "numa": False,
            "tfs_z": 1.0, "penalize_newline": True}
    assert post_chat(client, options=opts).status_code == 200


@pytest.mark.parametrize(("options", "param", "says"), [
    ({"temprature": 0.5}, "options.temprature", "unknown option"),
    ({"temperature": "hot"}, "options.temperature", "valid number"),
    ({"temperature": -1}, "options.temperature", "at least 0"),
    ({"top_p": 1.5}, "options.top_p", "between 0 and 1"),
    ({"top_k": 2.5}, "options.top_k", "integer"),
    ({"mirostat": 3}, "options.mirostat", "between 0 and 2"),
    ({"repeat_penalty": 0}, "options.repeat_penalty", "greater than 0"),
    ({"num_predict": -3}, "options.num_predict", "between -1 and"),
    ({"num_ctx": 0}, "options.num_ctx", "between 1 and"),
    ({"num_ctx": 100_000}, "options.num_ctx", "--ctx-size 100000"),
    ({"stop": 5}, "options.stop", "string or a list of strings"),
    ({"tfs_z": 0.9}, "options.tfs_z", "tail-free"),
    ({"penalize_newline": False}, "options.penalize_newline", "every token"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("options.") else None)
def test_bad_options_are_400s_naming_the_option(client: TestClient, engine: FakeEngine,
                                                options: dict[str, Any], param: str,
                                                says: str) -> None:
    for path, extra in (("/api/chat", {"messages": CHAT}), ("/api/generate", {"prompt": "Hi"})):
        r = client.post(path, json={"model": "m", "stream": False, "options": options, **extra})
        assert r.status_code == 400, r.text
        error = r.json()
        assert set(error) == {"error"}, error
        assert param in error["error"] and says in error["error"], error
    assert engine.requests == []


@pytest.mark.parametrize(("body", "says"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "'tools"),
    ({"messages": [{"role": "tool", "content": "22C"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "messages[0].tool_calls[0]"),
    ({"logprobs": True}, "'logprobs'"),
    ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": ""}, "'model'"),
])
def test_unsupported_and_invalid_chat_fields(client: TestClient, body: dict[str, Any],
                                             says: str) -> None:
    r = post_chat(client, **body)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]


def test_think_false_turns_a_templates_thinking_off(client: TestClient,
                                                    engine: FakeEngine) -> None:
    seen: list[dict[str, Any]] = []
    fmt = engine.format_chat

    def format_chat(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        seen.append(kwargs)
        return fmt(messages)

    engine.format_chat = format_chat  # type: ignore[method-assign]
    assert post_chat(client, think=False).status_code == 200
    assert post_chat(client).status_code == 200
    assert seen == [{"enable_thinking": False}, {}]


WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}}
GENERIC_CALL = ('{"tool_calls": [', '{"name": "get_', 'weather", "argu', 'ments": {"ci',
                'ty": "Paris"}}', "]}")
THINKING = ("<thi", "nk>Let me", " think.</th", "ink>\n\nHi", "!")


def roomy(make_app: Callable[..., Starlette], *tokens: str) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine(n_ctx=4096, script=Script(tokens=tokens))  # the tool prompt is long
    return TestClient(make_app(engine), raise_server_exceptions=False), engine


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_back_whole_with_arguments_as_an_object(
    make_app: Callable[..., Starlette], stream: bool,
) -> None:
    client, _ = roomy(make_app, *GENERIC_CALL)
    r = post_chat(client, tools=[WEATHER], stream=stream,
                  messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert r.status_code == 200, r.text
    objects = lines(r) if stream else [r.json()]
    calls = [c for o in objects for c in o["message"].get("tool_calls", [])]
    assert calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert "".join(o["message"]["content"] for o in objects) == ""
    assert objects[-1]["done"] is True and objects[-1]["done_reason"] == "stop"


def test_a_tool_loop_renders_calls_and_results_for_the_template(
    make_app: Callable[..., Starlette],
) -> None:
    client, engine = roomy(make_app, "It", " is", " 22C.")
    seen: list[list[dict[str, Any]]] = []
    fmt = engine.format_chat

    def format_chat(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        seen.append(messages)
        return fmt(messages)

    engine.format_chat = format_chat  # type: ignore[method-assign]
    r = post_chat(client, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22C", "tool_name": "get_weather"},
    ])
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == "It is 22C."
    call, result = seen[0][-2], seen[0][-1]
    assert call["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert result["content"] == "22C"


@pytest.mark.parametrize("stream", [False, True])
def test_think_true_returns_the_thinking_apart(make_app: Callable[..., Starlette],
                                               stream: bool) -> None:
    client, _ = roomy(make_app, *THINKING)
    r = post_chat(client, think=True, stream=stream)
    assert r.status_code == 200, r.text
    objects = lines(r) if stream else [r.json()]
    assert "".join(o["message"].get("thinking", "") for o in objects) == "Let me think."
    assert "".join(o["message"]["content"] for o in objects) == "Hi!"
    r = client.post("/api/generate", json={"model": "m", "prompt": "Hi", "think": "high",
                                           "stream": stream})
    objects = lines(r) if stream else [r.json()]
    assert "".join(o.get("thinking", "") for o in objects) == "Let me think."
    assert "".join(o["response"] for o in objects) == "Hi!"
    # without think the text stays as the model wrote it, as Ollama does
    r = post_chat(client)
    assert r.json()["message"]["content"] == "".join(THINKING)


@pytest.mark.parametrize(("body", "param"), [
    ({"suffix": "end"}, "'suffix'"),
    ({"template": "{{ .Prompt }}"}, "'template'"),
    ({"images": ["aGk="]}, "'images'"),
    ({"context": [-5]}, "'context'"),
])
def test_unsupported_and_invalid_generate_fields(client: TestClient, body: dict[str, Any],
                                                 param: str) -> None:
    r = client.post("/api/generate", json={"model": "m", "prompt": "Hi", "stream": False,
                                           **body})
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]


# -- models ------------------------------------------------------------------------------------


@pytest.fixture
def gguf_engine(tmp_path: Path) -> FakeEngine:
    """A FakeEngine whose model file is a real (tiny) GGUF, so listings can read its header."""
    path = write_gguf(tmp_path / "tiny.gguf",
                      {**LLAMA_META, "general.license": "apache-2.0",
                       "tokenizer.chat_template": "{{ messages }}"},
                      [("token_embd.weight", (64, 32), 12)])
    engine = FakeEngine(model_id="tiny")
    engine._info = dataclasses.replace(engine.info, path=str(path))
    return engine


@pytest.fixture
def gguf_client(make_app: Callable[..., Starlette], gguf_engine: FakeEngine,
                tmp_path: Path) -> Iterator[TestClient]:
    other = ModelSpec(id="other", path=tmp_path / "tiny.gguf", ctx_size=1024,
                      sampling={"temperature": 0.5})

    def loader(spec: ModelSpec) -> FakeEngine:
        engine = FakeEngine(model_id=spec.id)
        engine._info = dataclasses.replace(engine.info, load_seconds=1.5)
        return engine

    app = make_app(gguf_engine, specs=[other], loader=loader, max_loaded_models=2)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_tags_lists_every_known_model(gguf_client: TestClient) -> None:
    models = gguf_client.get("/api/tags").json()["models"]
    assert [m["name"] for m in models] == ["other", "tiny"]
    tiny = models[1]
    assert tiny["model"] == "tiny" and tiny["size"] > 0 and len(tiny["digest"]) == 64
    assert tiny["details"] == {"parent_model": "", "format": "gguf", "family": "llama",
                               "families": ["llama"], "parameter_size": "2K",
                               "quantization_level": "Q4_K_M"}
    assert tiny["modified_at"].endswith("Z")
    ps = gguf_client.get("/api/ps").json()["models"]
    assert [m["digest"] for m in ps] == [tiny["digest"]]  # the same model, the same digest


def test_show(gguf_client: TestClient) -> None:
    body = gguf_client.post("/api/show", json={"model": "other"}).json()
    assert body["template"] == "{{ messages }}"
    assert body["model_info"]["general.architecture"] == "llama"
    assert body["model_info"]["llama.context_length"] == 2048
    assert body["model_info"]["general.parameter_count"] == 64 * 32
    assert "tokenizer.chat_template" not in body["model_info"]
    assert body["details"]["family"] == "llama" and body["license"] == "apache-2.0"
    assert body["parameters"].split("\n") == [f"{'temperature':<30} 0.5",
                                              f"{'num_ctx':<30} 1024"]
    assert "FROM " in body["modelfile"] and body["capabilities"] == ["completion"]
    assert gguf_client.post("/api/show", json={"name": "tiny:latest"}).status_code == 200
    missing = gguf_client.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_latest_tag_and_unknown_models(gguf_client: TestClient) -> None:
    r = gguf_client.post("/api/chat", json={"model": "tiny:latest", "messages": CHAT,
                                            "stream": False})
    assert r.status_code == 200 and r.json()["model"] == "tiny:latest"
    r = gguf_client.post("/api/chat", json={"model": "llama3", "messages": CHAT})
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_generate_jit_loads_and_reports_the_load(gguf_client: TestClient) -> None:
    r = gguf_client.post("/api/generate", json={"model": "other", "prompt": "Hi",
                                                "stream": False})
    assert r.status_code == 200
    assert r.json()["load_duration"] == 1_500_000_000  # this request loaded it
    again = gguf_client.post("/api/generate", json={"model": "other", "prompt": "Hi",
                                                    "stream": False})
    assert again.json()["load_duration"] == 0
    loaded = {m["name"] for m in gguf_client.get("/api/ps").json()["models"]}
    assert loaded == {"tiny", "other"}


def test_version_and_head(client: TestClient) -> None:
    assert client.get("/api/version").json()["version"].count(".") == 2
    assert client.head("/").status_code == 200
    assert client.head("/api/tags").status_code == 200


@pytest.mark.parametrize(("method", "path", "body", "says"), [
    ("POST", "/api/pull", {"model": "llama3.2"}, "cannot pull 'llama3.2'"),
    ("POST", "/api/push", {"model": "me/llama3.2"}, "cannot push 'me/llama3.2'"),
    ("POST", "/api/create", {"model": "mine", "from": "llama3.2"}, "cannot create 'mine'"),
    ("POST", "/api/copy", {"source": "llama3.2", "destination": "x"}, "cannot copy 'llama3.2'"),
    ("DELETE", "/api/delete", {"model": "llama3.2"}, "cannot delete 'llama3.2'"),
    ("POST", "/api/pull", None, "cannot pull models"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("/") else None)
def test_model_management_is_refused_clearly(client: TestClient, method: str, path: str,
                                             body: dict[str, Any] | None, says: str) -> None:
    r = client.request(method, path, json=body)
    assert r.status_code == 501
    assert set(r.json()) == {"error"}
    assert says in r.json()["error"] and "local GGUF files" in r.json()["error"]


# -- the official client ------------------------------------------------------------------------


async def test_the_ollama_library_reads_every_answer(
    make_app: Callable[..., Starlette], gguf_engine: FakeEngine,
) -> None:
    app = make_app(gguf_engine)
    c = ollama.AsyncClient(host="http://llmserve", transport=httpx.ASGITransport(app=app))
    listed = await c.list()
    assert [m.model for m in listed.models] == ["tiny"]
    assert listed.models[0].details is not None
    assert listed.models[0].details.quantization_level == "Q4_K_M"
    shown = await c.show("tiny")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert [m.model for m in (await c.ps()).models] == ["tiny"]
    answer = await c.chat(model="tiny", messages=CHAT, options={"num_predict": 3})
    assert answer.message.content == "Hello, world"
    assert answer.done_reason == "length" and answer.eval_count == 3
    parts = [p async for p in await c.chat(model="tiny", messages=CHAT, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "Hello, world!"
    assert parts[-1].done and parts[-1].eval_count == 4
    generated = await c.generate(model="tiny", prompt="Hi")
    assert generated.response == "Hello, world!" and generated.context
    assert (await c.generate(model="tiny", prompt="")).done_reason == "load"
    with pytest.raises(ollama.ResponseError) as bad:
        await c.chat(model="tiny", messages=CHAT, options={"temperature": -1})
    assert bad.value.status_code == 400 and "options.temperature" in bad.value.error
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as refused:
            pulled = await c.pull("llama3.2", stream=stream)
            if stream:
                [p async for p in pulled]  # type: ignore[union-attr]
        assert refused.value.status_code == 501 and "GGUF" in refused.value.error
    with pytest.raises(ollama.ResponseError) as gone:
        await c.delete("tiny")
    assert gone.value.status_code == 501


@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_timings_never_reach_the_wire(make_app: Callable[..., Starlette],
                                                 stream: bool) -> None:
    from tests.test_hostile_input import NanEngine

    with TestClient(make_app(NanEngine()), raise_server_exceptions=False) as c:
        r = c.post("/api/chat", json={"model": "m", "messages": CHAT, "stream": stream})
    last = json.loads(r.text.splitlines()[-1], parse_constant=lambda name: pytest.fail(name))
    assert set(last) == {"error"}
    assert r.status_code == (200 if stream else 500)


def test_the_guards_refusals_are_in_ollamas_shape(make_app: Callable[..., Starlette],
                                                  engine: FakeEngine) -> None:
    from llmserve.server.options import ServerOptions

    app = make_app(engine, options=ServerOptions(api_keys=("k",)))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/chat", json={"model": "m", "messages": CHAT})
        assert r.status_code == 401 and set(r.json()) == {"error"}
        assert isinstance(r.json()["error"], str)
        assert c.get("/api/tags").json().keys() == {"error"}
        assert c.post("/v1/chat/completions", json={"messages": CHAT}).json()["error"]["code"] \
            == "invalid_api_key"
        # the seed's routes keep their own shape too
        assert c.post("/generate", json={"prompt": "hi"}).json().keys() == {"detail"}
