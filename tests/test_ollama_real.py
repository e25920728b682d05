"""Tier 3: SmolLM2-135M behind a real `llmserve run`, driven by the official ``ollama`` Python
library (Ollama's API) and by plain HTTP for LM Studio's v0 completions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from tests.conftest import ServerProcess

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

SAY = [{"role": "user", "content": "Say hello in one short sentence."}]
GREEDY_8 = {"temperature": 0, "num_predict": 8, "seed": 1}
MODEL = "SmolLM2-135M-Instruct.Q4_1"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def client(real_server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=real_server.url, timeout=300)


def test_list_show_ps_version(client: ollama.Client, real_server: ServerProcess) -> None:
    listed = client.list().models
    assert [m.model for m in listed] == [MODEL]
    assert listed[0].details is not None and listed[0].details.family == "llama"
    assert listed[0].details.quantization_level == "Q4_1"
    assert listed[0].size is not None and listed[0].size > 50_000_000
    shown = client.show(MODEL)
    assert shown.modelinfo is not None
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.template and "im_start" in shown.template
    assert shown.parameters is not None and "num_ctx" in shown.parameters
    running = client.ps().models
    assert [m.model for m in running] == [MODEL] and running[0].context_length == 2048
    assert httpx.get(real_server.url + "/api/version").json()["version"]
    assert httpx.head(real_server.url + "/").status_code == 200


def test_chat_whole_and_streamed_match_the_openai_route(client: ollama.Client,
                                                        real_server: ServerProcess) -> None:
    whole = client.chat(model=MODEL, messages=SAY, options=GREEDY_8)
    text = whole.message.content
    assert text
    # num_predict 8 ran out: eval_count is the 8 tokens generated
    assert whole.done_reason == "length" and whole.eval_count == 8
    assert whole.prompt_eval_count is not None and whole.prompt_eval_count > 10
    assert whole.eval_duration and whole.prompt_eval_duration and whole.total_duration
    assert whole.load_duration == 0  # loaded at start
    assert whole.total_duration >= whole.prompt_eval_duration + whole.eval_duration
    assert whole.total_duration < 300 * 10**9

    parts = list(client.chat(model=MODEL, messages=SAY, options=GREEDY_8, stream=True))
    assert "".join(p.message.content or "" for p in parts) == text
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_count == 8 and len(parts) <= 9

    openai = httpx.post(real_server.url + "/v1/chat/completions", timeout=300, json={
        "messages": SAY, "temperature": 0, "max_tokens": 8, "seed": 1}).json()
    assert openai["choices"][0]["message"]["content"] == text
    assert openai["usage"]["completion_tokens"] == whole.eval_count


def test_generate_raw_matches_the_openai_completion(client: ollama.Client,
                                                    real_server: ServerProcess) -> None:
    prompt = "The capital of France is"
    done = client.generate(model=MODEL, prompt=prompt, raw=True, options=GREEDY_8)
    assert done.response and done.eval_count == 8 and done.done_reason == "length"
    openai = httpx.post(real_server.url + "/v1/completions", timeout=300, json={
        "prompt": prompt, "temperature": 0, "max_tokens": 8, "seed": 1}).json()
    assert openai["choices"][0]["text"] == done.response


def test_chat_format_schema_validates(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"is_sky_blue": {"type": "boolean"}},
              "required": ["is_sky_blue"]}
    r = client.chat(model=MODEL, format=schema, options={"temperature": 0, "num_predict": 32},
                    messages=[{"role": "user", "content": "Is the sky blue? Answer in JSON."}])
    assert r.done_reason == "stop", r
    jsonschema.validate(json.loads(r.message.content or ""), schema)


def test_errors_surface_as_response_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model=MODEL, messages=SAY, options={"num_ctx": 100_000})
    assert bad.value.status_code == 400 and "options.num_ctx" in bad.value.error
    assert "--ctx-size" in bad.value.error
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as refused:
            pulled: Any = client.pull("llama3.2", stream=stream)
            if stream:
                list(pulled)
        assert refused.value.status_code == 501
        assert "local GGUF files" in refused.value.error


def test_lmstudio_v0_stats_streamed_and_not(real_server: ServerProcess) -> None:
    body = {"messages": SAY, "temperature": 0, "max_tokens": 4}
    url = real_server.url + "/api/v0/chat/completions"
    whole = httpx.post(url, json=body, timeout=300).json()
    assert whole["stats"]["tokens_per_second"] > 0
    assert whole["stats"]["stop_reason"] == "maxPredictedTokensReached"
    assert whole["model_info"] == {"arch": "llama", "quant": "Q4_1", "format": "gguf",
                                   "context_length": 2048}
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["stats"]["tokens_per_second"] > 0
    assert last["model_info"]["context_length"] == 2048
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert streamed == whole["choices"][0]["message"]["content"]


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
      city: the city's name
    """
    return "22C"


def test_a_tool_loop_through_the_ollama_library(
    start_server: Callable[..., ServerProcess],
) -> None:
    """The library's own tool plumbing (a Python function as a tool, an assistant message with
    a call, a tool result naming its function) against a tool-capable template."""
    server = start_server("--threads", "1", "--chat-template",
                          str(FIXTURES / "hermes_tools.jinja"))
    client = ollama.Client(host=server.url, timeout=300)
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    call = ollama.Message(role="assistant", content="", tool_calls=[ollama.Message.ToolCall(
        function=ollama.Message.ToolCall.Function(name="get_weather",
                                                  arguments={"city": "Paris"}))])
    result = {"role": "tool", "content": "22C", "tool_name": "get_weather"}
    answer = client.chat(model=MODEL, messages=[ask, call, result], tools=[get_weather],
                         options={"temperature": 0, "num_predict": 16})
    assert answer.done and answer.message.role == "assistant"
    assert answer.message.content or answer.message.tool_calls
    # the call and its result were rendered into the prompt (the template writes both)
    alone = client.chat(model=MODEL, messages=[ask], tools=[get_weather],
                        options={"temperature": 0, "num_predict": 1})
    assert answer.prompt_eval_count > alone.prompt_eval_count + 10
