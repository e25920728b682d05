"""Tier 3: logprobs, ``n`` choices and fill-in-the-middle on the real demo model, through the
official openai SDK (whose own types parse every response)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.fim_model import FIM_IDS, write_fim_copy

pytestmark = pytest.mark.real

COLOR: Any = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def three_slots(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--parallel", "3")


@pytest.fixture(scope="module")
def fim_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[ServerProcess]:
    model = write_fim_copy(demo_model, tmp_path_factory.mktemp("fim") / "fim-smollm2.gguf")
    server = ServerProcess([str(model), "--ctx-size", "1024"])
    yield server
    server.stop()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _check_alternatives(logprob: float, token: str, tops: list[tuple[str, float]],
                        count: int) -> None:
    assert len(tops) == count
    values = [lp for _t, lp in tops]
    assert values == sorted(values, reverse=True)
    assert all(lp <= 0.0 and math.isfinite(lp) for lp in values)
    assert logprob <= 0.0
    # at temperature 0 the sampled token is the most likely one
    assert tops[0][0] == token and tops[0][1] == pytest.approx(logprob)


# -- logprobs -----------------------------------------------------------------------------------


def test_chat_logprobs_with_top_5_streamed_and_not(three_slots: ServerProcess) -> None:
    client = sdk(three_slots)
    full = client.chat.completions.create(model="x", messages=COLOR, temperature=0,
                                          max_tokens=8, logprobs=True, top_logprobs=5)
    choice = full.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert full.usage is not None and len(content) == full.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes is not None and bytes(t.bytes).decode() == t.token
        _check_alternatives(t.logprob, t.token,
                            [(a.token, a.logprob) for a in t.top_logprobs], 5)

    stream = client.chat.completions.create(model="x", messages=COLOR, temperature=0,
                                            max_tokens=8, logprobs=True, top_logprobs=5,
                                            stream=True)
    streamed = [t for chunk in stream for c in chunk.choices
                if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(len(t.top_logprobs) == 5 for t in streamed)


def test_completions_logprobs_5_streamed_and_not(three_slots: ServerProcess) -> None:
    client = sdk(three_slots)
    prompt = "The capital of France is"
    full = client.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=6,
                                     logprobs=5, echo=True)
    lp = full.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.text_offset
    assert lp.top_logprobs is not None
    assert len(lp.tokens) == 6
    assert full.choices[0].text == prompt + "".join(lp.tokens)
    assert lp.text_offset[0] == len(prompt)
    for i, token in enumerate(lp.tokens):
        if i:
            assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
        tops = sorted(lp.top_logprobs[i].items(), key=lambda kv: -kv[1])
        assert len(tops) <= 5  # alternatives that render alike share a key
        assert tops[0][0] == token and tops[0][1] == pytest.approx(lp.token_logprobs[i])

    parts = [c.choices[0].logprobs for c in client.completions.create(
        model="x", prompt=prompt, temperature=0, max_tokens=6, logprobs=5, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in (p.tokens or [])] == lp.tokens
    assert [o for p in parts for o in (p.text_offset or [])] == [
        o - len(prompt) for o in lp.text_offset]


def test_logprobs_are_before_temperature(three_slots: ServerProcess) -> None:
    """The first token's alternatives are the model's own distribution: the same at
    temperature 0 and 2 (a log-softmax after the temperature would halve them)."""
    client = sdk(three_slots)
    tops = []
    for temperature in (0.0, 2.0):
        r = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Count to three."}],
            temperature=temperature, seed=1, max_tokens=1, logprobs=True, top_logprobs=3)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content
        first = r.choices[0].logprobs.content[0]
        tops.append({a.token: a.logprob for a in first.top_logprobs})
    cold, hot = tops
    assert cold.keys() == hot.keys()
    for token, value in cold.items():
        assert hot[token] == pytest.approx(value, abs=0.05)
    assert math.fsum(math.exp(v) for v in cold.values()) <= 1.0 + 1e-6


# -- n ----------------------------------------------------------------------------------------


def _assert_three_equal(texts: list[str], streamed: list[str], usages: list[Any]) -> None:
    assert texts[0] and texts == [texts[0]] * 3
    assert streamed == texts
    assert all(u is not None and u.completion_tokens == 3 * 8 for u in usages)
    assert usages[0].prompt_tokens == usages[1].prompt_tokens


def test_chat_n_3_at_temperature_0_gives_three_equal_choices(three_slots: ServerProcess
                                                             ) -> None:
    client = sdk(three_slots)
    messages: Any = [{"role": "user", "content": "Name a fruit."}]
    full = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                          max_tokens=8, n=3)
    assert [c.index for c in full.choices] == [0, 1, 2]
    chunks = list(client.chat.completions.create(
        model="x", messages=messages, temperature=0, max_tokens=8, n=3, stream=True,
        stream_options={"include_usage": True}))
    streamed = ["".join(c.delta.content or "" for ch in chunks for c in ch.choices
                        if c.index == k) for k in range(3)]
    _assert_three_equal([c.message.content or "" for c in full.choices], streamed,
                        [full.usage, chunks[-1].usage])


def test_completions_n_3_at_temperature_0_gives_three_equal_choices(
        three_slots: ServerProcess) -> None:
    client = sdk(three_slots)
    prompt = "My favourite fruit is"
    full = client.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=8,
                                     n=3)
    assert [c.index for c in full.choices] == [0, 1, 2]
    chunks = list(client.completions.create(
        model="x", prompt=prompt, temperature=0, max_tokens=8, n=3, stream=True,
        stream_options={"include_usage": True}))
    streamed = ["".join(c.text for ch in chunks for c in ch.choices if c.index == k)
                for k in range(3)]
    _assert_three_equal([c.text for c in full.choices], streamed,
                        [full.usage, chunks[-1].usage])


def test_n_3_with_a_seed_is_reproducible(three_slots: ServerProcess) -> None:
    client = sdk(three_slots)
    messages: Any = [{"role": "user", "content": "Write a word."}]

    def once(stream: bool) -> list[str]:
        if not stream:
            r = client.chat.completions.create(model="x", messages=messages,
                                               temperature=1.0, seed=42, max_tokens=8, n=3)
            return [c.message.content or "" for c in r.choices]
        out = ["", "", ""]
        for chunk in client.chat.completions.create(
                model="x", messages=messages, temperature=1.0, seed=42,
                max_tokens=8, n=3, stream=True):
            for c in chunk.choices:
                out[c.index] += c.delta.content or ""
        return out

    first = once(False)
    assert len(set(first)) > 1  # seed, seed + 1, seed + 2: the choices differ
    assert once(False) == first
    assert once(True) == first


def test_n_above_parallel_and_bad_top_logprobs_are_400(three_slots: ServerProcess) -> None:
    client = sdk(three_slots)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=COLOR, n=4)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=COLOR,
                                       logprobs=True, top_logprobs=21)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "top_logprobs"


# -- fill-in-the-middle ---------------------------------------------------------------------


def test_fim_on_the_demo_model_is_400_saying_why(three_slots: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk(three_slots).completions.create(model="x", prompt="def f(", suffix="return 1")
    assert err.value.code == "fim_not_supported"
    assert "FIM tokens" in err.value.message
    r = httpx.post(three_slots.url + "/infill", json={"input_prefix": "a", "input_suffix": "b"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "fim_not_supported"


def test_infill_and_suffix_on_a_fim_model(fim_server: ServerProcess) -> None:
    prefix, suffix = "def add(a, b):\n", "\n    return c\n"
    # the prompt llama.cpp's vocabulary gives the copy: REP is SmolLM2's <reponame>, which
    # llama.cpp recognises by its text; PRE, SUF and MID are the ids the fixture wrote
    tokens = httpx.post(fim_server.url + "/tokenize", json={
        "content": "<reponame>myproject\n<jupyter_start>" + prefix + "<jupyter_text>" + suffix
                   + "<jupyter_code>", "with_pieces": False}, timeout=60).json()["tokens"]
    assert set(FIM_IDS.values()) <= set(tokens)

    r = httpx.post(fim_server.url + "/infill", json={
        "input_prefix": prefix, "input_suffix": suffix, "n_predict": 4, "temperature": 0,
    }, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens_evaluated"] == len(tokens)
    assert body["tokens_predicted"] >= 1 and isinstance(body["content"], str)

    done = sdk(fim_server).completions.create(model="x", prompt=prefix, suffix=suffix,
                                              max_tokens=4, temperature=0)
    assert done.usage is not None and done.usage.prompt_tokens == len(tokens)
    assert done.choices[0].text == body["content"]


def test_openai_logprobs_and_n_probs_are_one_path(three_slots: ServerProcess) -> None:
    """/v1/completions' logprobs and llama.cpp's /completion n_probs report the same numbers
    for the same prompt (up to the tiny drift of a cached prompt's last token being re-read)."""
    prompt = "Once upon a time"
    openai_lp = sdk(three_slots).completions.create(
        model="x", prompt=prompt, temperature=0, max_tokens=1, logprobs=3).choices[0].logprobs
    native = httpx.post(three_slots.url + "/completion", json={
        "prompt": prompt, "temperature": 0, "n_predict": 1, "n_probs": 3}, timeout=120).json()
    first = native["completion_probabilities"][0]
    assert openai_lp is not None and openai_lp.tokens == [first["token"]]
    assert openai_lp.token_logprobs == [pytest.approx(first["logprob"], abs=0.05)]
    assert openai_lp.top_logprobs is not None
    assert openai_lp.top_logprobs[0] == {
        t["token"]: pytest.approx(t["logprob"], abs=0.05) for t in first["top_logprobs"]}
