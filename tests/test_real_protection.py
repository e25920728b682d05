"""Tier 3: keys, rate limits, body limits, /metrics and SIGTERM on a real `llmserve run`."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess

pytestmark = pytest.mark.real

HELLO = [{"role": "user", "content": "Say hello."}]
MB = 1024 * 1024


def sdk(server: ServerProcess, key: str = "unused", **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=120,
                         **{"max_retries": 0, **kw})  # type: ignore[arg-type]


def rss_bytes(server: ServerProcess) -> int:
    with open(f"/proc/{server.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_key_works_in_either_header_and_nothing_works_without(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--api-key", "sk-one", "--api-key", "sk-two")
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(server, "sk-wrong").models.list()
    assert refused.value.code == "invalid_api_key"
    reply = sdk(server, "sk-two").chat.completions.create(model="x", messages=HELLO,
                                                          max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    r = httpx.post(server.url + "/v1/completions", headers={"x-api-key": "sk-one"},
                   json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


def test_rate_limit_gives_the_burst_then_429_and_the_sdk_waits_it_out(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--rate-limit", "60/minute", "--rate-burst", "10")
    with httpx.Client(base_url=server.url) as client:
        answers = [client.get("/v1/models") for _ in range(20)]
    assert [r.status_code for r in answers] == [200] * 10 + [429] * 10
    assert all(r.headers["retry-after"] == "1" for r in answers[10:])
    assert answers[10].json()["error"]["code"] == "rate_limit_exceeded"
    assert answers[9].headers["x-ratelimit-remaining"] == "0"

    statuses: list[int] = []
    http = httpx.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]})
    started = time.monotonic()
    models = sdk(server, max_retries=2, http_client=http).models.list()
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert statuses == [429, 200]
    assert time.monotonic() - started >= 0.9  # it slept for Retry-After before retrying


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50mb_body_gets_413_without_the_server_holding_it(
    start_server: Callable[..., ServerProcess], chunked: bool
) -> None:
    server = start_server("--max-body-size", "4MB")
    before = rss_bytes(server)
    piece = b"x" * MB

    def fifty_mb() -> Iterator[bytes]:
        for _ in range(50):
            yield piece

    content = fifty_mb() if chunked else piece * 50
    r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert rss_bytes(server) - before < 20 * MB
    # and the server goes on serving
    assert httpx.get(server.url + "/v1/models").status_code == 200


def test_metrics_parse_and_match_the_requests_sent(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--api-key", "sk", "--metrics-public")
    client = sdk(server, "sk")
    usages = [client.completions.create(model="x", prompt="Once upon a time", max_tokens=3,
                                        stream=stream, stream_options={"include_usage": True}
                                        if stream else None)
              for stream in (False, True, False)]
    prompt = completion = 0
    for reply in usages:
        if isinstance(reply, openai.Stream):
            usage = next(c.usage for c in reply if c.usage)
        else:
            usage = reply.usage
        assert usage is not None
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
    assert httpx.get(server.url + "/v1/models").status_code == 401

    text = httpx.get(server.url + "/metrics").text
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    model = (("model", "SmolLM2-135M-Instruct.Q4_1"),)
    assert values[("llmserve_requests_total",
                   (("route", "/v1/completions"), ("status", "200")))] == 3
    assert values[("llmserve_requests_total", (("route", "/v1/models"), ("status", "401")))] == 1
    assert values[("llmserve_rejections_total", (("reason", "auth"),))] == 1
    assert values[("llmserve_prompt_tokens_total", model)] == prompt
    assert values[("llmserve_completion_tokens_total", model)] == completion
    assert values[("llmserve_time_to_first_token_seconds_count", model)] == 3
    assert values[("llmserve_loaded_models", ())] == 1
    assert values[("llmserve_model_load_seconds", model)] > 0


def _stream_into(server: ServerProcess, lines: list[str], first: threading.Event,
                 max_tokens: int) -> None:
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first.set()
    except httpx.HTTPError as exc:  # the tests look for [DONE]; a cut stream has none
        lines.append(f"broken: {exc!r}")


def wait_until_draining(server: ServerProcess) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/v1/models", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "the server never started refusing"
        time.sleep(0.02)


@pytest.mark.parametrize(("timeout", "max_tokens", "ends_with_error"),
                         [("120", 32, False), ("3", 1500, True)],
                         ids=["streams-finish", "timeout-ends-streams"])
def test_sigterm_drains_running_streams_then_exits_0(
    start_server: Callable[..., ServerProcess], timeout: str, max_tokens: int,
    ends_with_error: bool,
) -> None:
    server = start_server("--parallel", "2", "--shutdown-timeout", timeout)
    outputs: list[list[str]] = [[], []]
    firsts = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=_stream_into, args=(server, out, first, max_tokens))
               for out, first in zip(outputs, firsts, strict=True)]
    for t in threads:
        t.start()
    assert all(first.wait(60) for first in firsts)
    server.proc.send_signal(signal.SIGTERM)
    wait_until_draining(server)
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert all(t.is_alive() for t in threads)  # refused while both streams still ran
    for t in threads:
        t.join(90)
    assert server.proc.wait(60) == 0
    for out in outputs:
        assert out[-1] == "[DONE]"
        last = json.loads(out[-2])
        if ends_with_error:
            assert last["error"]["code"] == "shutting_down"
        else:
            assert last["choices"][0]["finish_reason"] in ("stop", "length")
            assert not any("error" in json.loads(line) for line in out[:-1])
    log = server.stop()
    assert "Traceback" not in log


def test_a_second_ctrl_c_quits_at_once(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--shutdown-timeout", "600")
    lines: list[str] = []
    first = threading.Event()
    streaming = threading.Thread(target=_stream_into, args=(server, lines, first, 1500),
                                 daemon=True)
    streaming.start()
    assert first.wait(60)
    server.proc.send_signal(signal.SIGINT)
    wait_until_draining(server)
    assert server.proc.poll() is None and streaming.is_alive()  # draining: the stream goes on
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 130
    streaming.join(10)
    assert lines[-1].startswith("broken")  # cut off, not finished


def test_beyond_loopback_without_a_key_warns_and_rate_limits_by_default(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--host", "0.0.0.0")
    with httpx.Client(base_url=server.url) as client:
        codes = [client.get("/v1/models").status_code for _ in range(11)]
    assert codes == [200] * 10 + [429]
    log = server.stop()
    assert "without an API key" in log and "60 requests per 60 s, burst 10" in log
