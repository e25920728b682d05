"""Tier 3: slots, samplers and structured output on the real demo model (SmolLM2-135M).

About batched determinism (measured on this CPU build, flash attention on): decoding a sequence
in one batch with other slots' tokens gives bit-identical logits to decoding it alone, as long
as the sequence's KV cells sit in position order. Once a slot's cache has been trimmed for
prefix reuse, llama.cpp refills the freed cells wherever they are, and a sequence whose cells
are out of order gets logits that differ by up to ~1.6 (max |Δlogit| over the vocabulary,
measured over 24 greedy steps): near-ties then flip. llama-server has the same property (its
README warns that cache_prompt can make results non-deterministic). What we can guarantee, and
test: on a fresh server, N concurrent greedy requests return exactly what each returns alone;
and strongly determined continuations never change, concurrent or not, fresh or warm (slots
never mix sequences).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

pytest.importorskip("llama_cpp")  # collected without it too: the whole file is the real tier

from llmserve.engine.model import LoadedModel
from tests.conftest import ServerProcess
from tests.test_sampling_routes import SILLYTAVERN

pytestmark = pytest.mark.real

PROMPTS = ["Once upon a time", "def fib(n):", "The capital of France is", "1, 2, 3, 4,"]
# Continuations the model is sure of: greedy top-2 logit gaps of 3.9 and 2.3 (measured alone),
# above the ~1.6 that the cache layout can move a logit.
SURE = {"10, 20, 30, 40,": " 50", "A, B, C, D, E,": " F"}


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def complete(server: ServerProcess, prompt: str, **kw: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 16, **kw}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def concurrently(fn: Callable[[int], Any], n: int) -> list[Any]:
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=110)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def slots4(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--parallel", "4", "--max-queue", "12")


@pytest.fixture(scope="module")
def vocab(demo_model: Path) -> Iterator[LoadedModel]:
    model = LoadedModel(demo_model, n_ctx=256)
    yield model
    model.close()


def test_concurrent_greedy_equals_alone_on_fresh_servers(
    start_server: Callable[..., ServerProcess],
) -> None:
    alone_server = start_server("--parallel", "4")
    alone = [complete(alone_server, p, max_tokens=24) for p in PROMPTS]
    alone_server.stop()
    together_server = start_server("--parallel", "4")
    together = concurrently(lambda i: complete(together_server, PROMPTS[i], max_tokens=24), 4)
    try:
        for a, t in zip(alone, together, strict=True):
            assert t["choices"][0]["text"] == a["choices"][0]["text"]
            assert t["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
        # warm now: every slot holds a cache, trimmed and refilled from here on
        prompts = list(SURE) * 2
        for _ in range(2):
            warm = concurrently(lambda i: complete(together_server, prompts[i], max_tokens=3), 4)
            for prompt, result in zip(prompts, warm, strict=True):
                assert result["choices"][0]["text"].startswith(SURE[prompt]), result
    finally:
        together_server.stop()


def test_timings_and_cached_tokens_with_parallel_slots(slots4: ServerProcess) -> None:
    prompt = "Tell me about the sea. " * 12
    first = complete(slots4, prompt)
    repeat = complete(slots4, prompt)
    again = concurrently(lambda i: complete(slots4, prompt + f" {i}"), 3)
    for body in [first, repeat, *again]:
        usage, timings = body["usage"], body["timings"]
        assert all(isinstance(timings[k], int) for k in ("prompt_n", "predicted_n", "cache_n"))
        assert timings["predicted_n"] == usage["completion_tokens"]
        assert timings["prompt_n"] + timings["cache_n"] == usage["prompt_tokens"]
        assert timings["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert timings["prompt_ms"] > 0 and timings["predicted_per_second"] > 0
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # the exact repeat found its cache (all but the last token, which is decoded again)
    assert repeat["timings"]["cache_n"] == first["usage"]["prompt_tokens"] - 1


def test_grammar_constrains_the_output(slots4: ServerProcess) -> None:
    client = sdk(slots4)
    for _ in range(2):
        out = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Is the sky green?"}],
            temperature=1.0, max_tokens=8,
            extra_body={"grammar": 'root ::= ("yes" | "no") "."'},
        )
        assert out.choices[0].message.content in ("yes.", "no.")
        assert out.choices[0].finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",
                                                                           "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "strict": True, "schema": SCHEMA}}}, id="response_format"),
        pytest.param({"json_schema": SCHEMA}, id="json_schema"),
        pytest.param({"response_format": {"type": "json_object", "schema": SCHEMA}},
                     id="json_object-with-schema"),
    ],
)
def test_json_schema_output_validates(slots4: ServerProcess, extra: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "Invent a person."}], "temperature": 0.8,
            "seed": 3, "max_tokens": 48, **extra}
    r = httpx.post(slots4.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object_output_parses(slots4: ServerProcess) -> None:
    client = sdk(slots4)
    out = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Give me an empty JSON object."}],
        temperature=0, max_tokens=48, response_format={"type": "json_object"},
    )
    content = out.choices[0].message.content or ""
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still a JSON object under way
        assert content.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        pytest.param({"grammar": 'root ::= "a" | undefined-rule'}, "grammar", id="grammar"),
        pytest.param({"grammar": "root ::= root \"a\""}, "grammar", id="left-recursion"),
        pytest.param({"json_schema": {"type": "nonsense"}}, "json_schema", id="json_schema"),
        pytest.param({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}}},
            "response_format", id="response_format"),
        pytest.param({"logit_bias": {"49152": 1}}, "logit_bias", id="token-past-vocab"),
    ],
)
def test_bad_grammar_is_400_and_every_slot_stays_usable(
    slots4: ServerProcess, extra: dict[str, Any], param: str
) -> None:
    client = sdk(slots4)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, extra_body=extra)
    assert bad.value.param == param
    results = concurrently(lambda i: complete(slots4, PROMPTS[i], max_tokens=3), 4)
    assert all(r["usage"]["completion_tokens"] == 3 for r in results)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sillytavern_payload_is_accepted(slots4: ServerProcess, path: str) -> None:
    body: dict[str, Any] = {**SILLYTAVERN, "max_tokens": 12}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    else:
        body["prompt"] = "Once upon a time"
    for stream in (False, True):
        with httpx.stream("POST", slots4.url + path, json={**body, "stream": stream},
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            text = r.read().decode()
        assert '"finish_reason":"length"' in text or '"finish_reason":"stop"' in text, text


def test_samplers_take_effect_on_the_real_model(
    slots4: ServerProcess, vocab: LoadedModel
) -> None:
    prompt = "The capital of France is"
    free = complete(slots4, prompt, max_tokens=4)["choices"][0]["text"]
    assert free.startswith(" Paris"), free
    paris = vocab.tokenize(" Paris", add_special=False)[0]
    banned = complete(slots4, prompt, max_tokens=4, logit_bias=[[paris, False]])
    assert not banned["choices"][0]["text"].startswith(" Paris")
    # ignore_eos: end-of-generation tokens pushed to the top end the answer at once; with
    # ignore_eos they are banned and generation runs to max_tokens
    eos_first = [[t, 100.0] for t in vocab.eog_tokens]
    short = complete(slots4, prompt, max_tokens=8, logit_bias=eos_first)
    assert short["choices"][0]["finish_reason"] == "stop"
    assert short["usage"]["completion_tokens"] == 0
    forced = complete(slots4, prompt, max_tokens=8, logit_bias=eos_first, ignore_eos=True)
    assert forced["choices"][0]["finish_reason"] == "length"
    assert forced["usage"]["completion_tokens"] == 8
    # at temperature 1.5 the seed decides; top_k 1 leaves no choice, whatever the seed
    hot: dict[str, Any] = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                           "max_tokens": 6}
    drawn = {complete(slots4, "1, 2, 3, 4,", seed=s, **hot)["choices"][0]["text"]
             for s in range(5)}
    assert len(drawn) > 1, drawn
    narrowed = {complete(slots4, "1, 2, 3, 4,", seed=s, **{**hot, "top_k": 1, "max_tokens": 2})
                ["choices"][0]["text"] for s in range(3)}
    assert len(narrowed) == 1 and narrowed.pop().startswith(" 5"), narrowed


def test_twelve_mixed_requests_all_complete(slots4: ServerProcess) -> None:
    client = sdk(slots4)
    prompts = [f"Write a word that rhymes with {w}." for w in
               ("cat", "dog", "sun", "tree", "car", "moon")] * 2

    def one(i: int) -> tuple[str, int]:
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            chunks = list(client.chat.completions.create(
                model="x", messages=messages, max_tokens=12, temperature=0.7, seed=i,
                stream=True, stream_options={"include_usage": True}))  # type: ignore[arg-type]
            usage = chunks[-1].usage
            assert usage is not None
            reason = next(c.choices[0].finish_reason for c in chunks
                          if c.choices and c.choices[0].finish_reason)
            return reason, usage.completion_tokens
        out = client.chat.completions.create(model="x", messages=messages,  # type: ignore[arg-type]
                                             max_tokens=12, temperature=0.7, seed=i)
        assert out.usage is not None
        return out.choices[0].finish_reason, out.usage.completion_tokens

    results = concurrently(one, 12)
    for reason, n in results:
        assert reason in ("stop", "length") and n > 0
        assert n == 12 or reason == "stop"


def test_disconnect_frees_the_slot_for_the_queued_request(slots4: ServerProcess) -> None:
    # 4 x 400 tokens fit the 2048-token context together
    long_body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True,
                 "temperature": 0, "stream": True}
    events: list[str] = []
    started = threading.Barrier(5)
    stop_long = threading.Event()

    def long_stream(i: int) -> None:
        with httpx.stream("POST", slots4.url + "/v1/completions", json=long_body,
                          timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            started.wait()
            if i == 0:
                events.append("disconnect")
                return  # leaving the block closes the connection mid-stream
            for line in lines:
                if stop_long.is_set():
                    break
                if line == "data: [DONE]":
                    events.append(f"long {i} finished")
                    break

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=100)  # all four slots are generating
    try:
        queued = complete(slots4, "The capital of France is", max_tokens=4)
        events.append("queued finished")
        assert queued["usage"]["completion_tokens"] == 4
    finally:
        stop_long.set()
        for t in threads:
            t.join(timeout=60)
    # the queued request ran in the freed slot while the three other streams still ran
    assert events[:2] == ["disconnect", "queued finished"], events


def test_parallel_beyond_the_context_is_refused(demo_model: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "llmserve", "run", str(demo_model), "--parallel", "8",
         "--ctx-size", "1024", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1
    assert "--parallel 8 needs a context of at least 2048 tokens" in run.stderr
