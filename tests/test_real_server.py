"""Tier 3: SmolLM2-135M behind a real `llmserve run` process, driven by the official openai SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.real

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def sdk(server: ServerProcess, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60, **kw)  # type: ignore[arg-type]


def test_chat_streamed_equals_non_streamed_at_temperature_0(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    full = client.chat.completions.create(model="x", messages=HELLO, temperature=0,
                                          max_tokens=24)
    text = full.choices[0].message.content
    assert text
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage is not None and full.usage.completion_tokens > 0

    stream = client.chat.completions.create(model="x", messages=HELLO, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_text_completion_stream_and_not(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    done = client.completions.create(model="x", prompt="The capital of France is",
                                     temperature=0, max_tokens=8)
    assert done.choices[0].text
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 8
    parts = [c.choices[0].text for c in client.completions.create(
        model="x", prompt="The capital of France is", temperature=0, max_tokens=8, stream=True)
        if c.choices]
    assert "".join(parts) == done.choices[0].text


def test_models_lists_the_demo_model(real_server: ServerProcess) -> None:
    ids = [m.id for m in sdk(real_server).models.list()]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1"]


def test_stop_string_is_never_emitted(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    free = client.completions.create(model="x", prompt="1, 2, 3, 4,", temperature=0,
                                     max_tokens=12).choices[0].text
    assert " 6" in free, free  # the model counts on; stop at its " 6"
    cut = client.completions.create(model="x", prompt="1, 2, 3, 4,", temperature=0,
                                    max_tokens=12, stop=[" 6"])
    assert cut.choices[0].text == free[: free.index(" 6")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=[" 6"],
        stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_second_turn_reuses_the_cached_prefix(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    history = [{"role": "user", "content": "Name three colours. " * 20}]
    first = client.chat.completions.create(model="x", messages=history, temperature=0,
                                           max_tokens=8)
    history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "And one more?"}]
    second = client.chat.completions.create(model="x", messages=history, temperature=0,
                                            max_tokens=8)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= first.usage.prompt_tokens - 2


def test_errors_surface_as_sdk_exceptions(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="x", messages=HELLO, temperature=-1)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="x", messages=HELLO, max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"
    assert "5000" in too_long.value.message and "2048" in too_long.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # and it keeps serving
    assert client.chat.completions.create(model="x", messages=HELLO, max_tokens=2).choices


def test_queue_full_one_runs_one_waits_one_refused(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--parallel", "1", "--max-queue", "1")
    client = sdk(server)
    results: dict[int, object] = {}

    def stream(i: int) -> None:
        try:
            s = client.chat.completions.create(
                model="x", messages=HELLO, max_tokens=48, temperature=0, stream=True,
                stream_options={"include_usage": True})
            chunks = list(s)
            results[i] = chunks[-1].usage
        except openai.APIStatusError as exc:
            results[i] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    t0 = time.monotonic()
    refused_at: list[float] = []
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    errors = [r for r in results.values() if isinstance(r, openai.APIStatusError)]
    done = [r for r in results.values() if not isinstance(r, openai.APIStatusError)]
    assert len(errors) == 1 and len(done) == 2, results
    assert errors[0].status_code == 503
    assert errors[0].response.headers["retry-after"]
    assert errors[0].code == "server_busy"
    refused_at.append(time.monotonic() - t0)
    # neither admitted stream was cut short: both report the same full generation (the second
    # found the first's prompt in the slot's cache, so only cached_tokens differ)
    assert done[0].completion_tokens == done[1].completion_tokens  # type: ignore[attr-defined]


def test_dropped_stream_frees_the_engine(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--parallel", "1", "--max-queue", "2")
    body = {"messages": HELLO, "max_tokens": 2000, "stream": True,
            "stop": [], "temperature": 1.0, "seed": 1}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    n += 1
                if n >= 3:
                    break
        # the stream is closed; the engine must be free for the next request
        t0 = time.monotonic()
        with c.stream("POST", server.url + "/v1/chat/completions",
                      json={"messages": HELLO, "max_tokens": 4, "stream": True}) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break
        first_token = time.monotonic() - t0
    assert first_token < 1.0, first_token


def test_corrupt_gguf_load_fails_cleanly(real_server: ServerProcess, tmp_path: Path,
                                        demo_model: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(demo_model.read_bytes()[:200_000])  # truncated: header fine, data gone
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with httpx.Client(base_url=real_server.url, timeout=60) as c:
        for path, fragment in [(corrupt, "could not load"), (not_gguf, "not a GGUF"),
                               (tmp_path / "missing.gguf", "not found"),
                               (tmp_path, "directory")]:
            r = c.post("/v1/models/load", json={"model": str(path)})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "model_load_failed" and fragment in err["message"]
        r = c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        assert r.status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_load_and_unload(start_server: Callable[..., ServerProcess], demo_model: Path) -> None:
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/models/unload").json()["status"] == "unloaded"
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "no_model"
        r = c.post("/v1/chat/completions", json={"messages": HELLO})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"
        assert r.headers["retry-after"]
        r = c.post("/v1/models/load", json={"model": str(demo_model)})
        assert r.status_code == 200 and r.json()["model"]["id"] == demo_model.stem
        r = c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        assert r.status_code == 200
