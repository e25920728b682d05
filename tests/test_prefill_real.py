"""Tier 3: assistant prefill on the demo model — the model continues the text it is given, as
LiteLLM's mid-stream continuation needs (tests/test_scale_real.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.test_real_server import sdk

pytestmark = pytest.mark.real

STORY = [{"role": "user", "content": "Write a story about a cat."}]
MAX_TOKENS = 24


def test_a_prefill_is_continued_from_its_last_token(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    whole = client.chat.completions.create(model="demo", messages=STORY,  # type: ignore[arg-type]
                                           max_tokens=MAX_TOKENS, temperature=0)
    answer = whole.choices[0].message.content or ""
    # cut the greedy answer at a token boundary, as a stream cut mid-way is
    tokens = httpx.post(f"{real_server.url}/tokenize",
                        json={"content": answer, "add_special": False}, timeout=30).json()["tokens"]
    assert len(tokens) >= 4, answer
    kept = len(tokens) // 2
    prefix = httpx.post(f"{real_server.url}/detokenize", json={"tokens": tokens[:kept]},
                        timeout=30).json()["content"]
    assert answer.startswith(prefix) and prefix

    messages: list[Any] = [*STORY, {"role": "assistant", "content": prefix, "prefix": True}]
    rest = client.chat.completions.create(model="demo", messages=messages,
                                          max_tokens=MAX_TOKENS - kept, temperature=0)
    continuation = rest.choices[0].message.content or ""
    assert continuation and not continuation.startswith(prefix)
    # the prompt is the template's over the earlier messages, then the prefill: exactly what
    # /apply-template shows and /v1/completions evaluates for that text
    rendered = httpx.post(f"{real_server.url}/apply-template", json={"messages": messages},
                          timeout=30).json()["prompt"]
    assert rendered.endswith("assistant\n" + prefix)
    raw = client.completions.create(model="demo", prompt=rendered, temperature=0,
                                    max_tokens=MAX_TOKENS - kept)
    assert rest.usage is not None and raw.usage is not None
    assert rest.usage.prompt_tokens == raw.usage.prompt_tokens
    # greedy: the continuation is the rest of the answer it was cut from (the first words at
    # least: a near tie can tip the other way once the prompt is read in one batch)
    assert answer.startswith(prefix + continuation[:8]), (answer, prefix, continuation)

    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="demo", messages=messages, max_tokens=MAX_TOKENS - kept, temperature=0,
            stream=True)
        if chunk.choices)
    assert streamed == continuation
