"""Assistant prefill: a trailing assistant message is the start of the answer, which the model
continues (llama-server's and Ollama's behaviour; Mistral's and DeepSeek's ``prefix: true``).
Pure tests of the split, then every chat route over a FakeEngine."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from llmserve.errors import InvalidRequest
from llmserve.server.chat_plan import split_prefill
from tests.fakes import FakeEngine

USER = {"role": "user", "content": "Hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(("messages", "rendered", "prefill"), [
    ([USER], [USER], None),
    ([USER, {"role": "assistant", "content": "Hel"}], [USER], "Hel"),
    ([USER, {"role": "assistant", "content": "Hel", "prefix": True}], [USER], "Hel"),
    ([USER, {"role": "assistant", "content": ""}], [USER], ""),
    ([USER, {"role": "assistant", "content": "Hello.", "prefix": False}],
     [USER, {"role": "assistant", "content": "Hello.", "prefix": False}], None),
    ([USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}],
     [USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}], None),
], ids=["no-assistant", "trailing", "prefix-true", "empty", "prefix-false-opts-out",
        "tool-call-turn"])
def test_split_prefill(messages: list[dict[str, Any]], rendered: list[dict[str, Any]],
                       prefill: str | None) -> None:
    assert split_prefill(messages) == (rendered, prefill)


@pytest.mark.parametrize(("messages", "param"), [
    ([{**USER, "prefix": True}], "messages[0].prefix"),
    ([{"role": "assistant", "content": "a", "prefix": True}, USER], "messages[0].prefix"),
    ([USER, {"role": "assistant", "content": "a", "prefix": "yes"}], "messages[1].prefix"),
    ([USER, {"role": "assistant", "content": "", "tool_calls": [CALL], "prefix": True}],
     "messages[1].prefix"),
], ids=["user-prefix", "not-last", "not-a-bool", "with-tool-calls"])
def test_split_prefill_refuses(messages: list[dict[str, Any]], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        split_prefill(messages)
    assert caught.value.param == param


PREFILLED = [USER, {"role": "assistant", "content": "Sure: ", "prefix": True}]


def test_openai_chat_continues_the_prefill(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={"messages": PREFILLED})
    assert r.status_code == 200, r.text
    # the answer is only the new text; the prompt is the template's, then the prefill
    assert r.json()["choices"][0]["message"]["content"] == "Hello, world!"
    assert engine.chats[-1] == [USER]
    assert engine.requests[-1].prompt_tokens == [ord(c) for c in "<user>Hi<assistant>Sure: "]


def test_openai_stream_continues_the_prefill(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={"messages": PREFILLED, "stream": True})
    assert r.status_code == 200, r.text
    assert "Sure" not in r.text and '"finish_reason":"stop"' in r.text.replace(" ", "")
    assert engine.requests[-1].prompt_tokens == [ord(c) for c in "<user>Hi<assistant>Sure: "]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {}),
    ("/api/v0/chat/completions", {}),
    ("/api/chat", {"model": "fake-model", "stream": False}),
], ids=["openai", "lmstudio", "ollama"])
def test_every_chat_route_prefills_a_trailing_assistant_message(
    client: TestClient, engine: FakeEngine, path: str, body: dict[str, Any],
) -> None:
    messages = [USER, {"role": "assistant", "content": "Sure: "}]
    r = client.post(path, json={**body, "messages": messages})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].prompt_tokens == [ord(c) for c in "<user>Hi<assistant>Sure: "]


def test_apply_template_shows_the_prefilled_prompt(client: TestClient) -> None:
    r = client.post("/apply-template", json={"messages": PREFILLED})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "<user>Hi<assistant>Sure: "


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {}),
    ("/api/v0/chat/completions", {}),
    ("/apply-template", {}),
], ids=["openai", "lmstudio", "apply-template"])
@pytest.mark.parametrize(("messages", "param"), [
    ([{**USER, "prefix": True}], "messages[0].prefix"),
    ([USER, {"role": "assistant", "content": "a", "prefix": "yes"}], "messages[1].prefix"),
], ids=["misplaced", "not-a-bool"])
def test_a_bad_prefix_is_a_400_on_every_chat_route(
    client: TestClient, engine: FakeEngine, path: str, body: dict[str, Any],
    messages: list[dict[str, Any]], param: str,
) -> None:
    """The routes whose messages take OpenAI's fields. Ollama's messages have no `prefix` (its
    /api/chat continues a trailing assistant message, as Ollama does)."""
    r = client.post(path, json={**body, "messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert engine.requests == []
