"""Tier 3: SillyTavern's request bodies and the seed's native routes against the demo model
behind a real `llmserve run` (tests/conftest.py real_server: 2 slots, context 2048)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests import sillytavern as st
from tests.conftest import ServerProcess

pytestmark = pytest.mark.real

PROMPT = "<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n"
COUNT = "1, 2, 3, 4,"


def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def sse_data(lines: list[str]) -> list[Any]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_connect_lists_the_model(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        data = c.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_llamacpp_completion_stream_equals_non_stream(real_server: ServerProcess) -> None:
    body = st.llamacpp_body(COUNT, max_tokens=8, temperature=0)
    with http(real_server) as c:
        full = c.post("/completion", json=body).json()
        with c.stream("POST", "/completion", json={**body, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_data(list(r.iter_lines()))
    assert full["content"] and full["stop"] is True
    assert full["stop_type"] == "limit" and full["tokens_predicted"] == 8
    assert full["generation_settings"]["n_ctx"] == 2048
    assert "".join(e["content"] for e in events) == full["content"]
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit"
    assert events[-1]["tokens_evaluated"] == full["tokens_evaluated"]


def test_llamacpp_stop_string_is_a_word_stop(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        free = c.post("/completion", json={"prompt": COUNT, "n_predict": 12,
                                           "temperature": 0}).json()["content"]
        assert " 6" in free, free
        cut = c.post("/completion", json=st.llamacpp_body(
            COUNT, max_tokens=12, temperature=0, stop=[" 6"], stopping_strings=[" 6"])).json()
    assert cut["content"] == free[: free.index(" 6")]
    assert cut["stop_type"] == "word" and cut["stopping_word"] == " 6"


def test_llamacpp_probabilities_are_real(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        body = c.post("/completion", json={"prompt": COUNT, "n_predict": 3, "temperature": 0,
                                           "n_probs": 3}).json()
    probs = body["completion_probabilities"]
    assert len(probs) == 3
    for p in probs:
        tops = [t["logprob"] for t in p["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(lp <= 0 for lp in tops)
        # greedy: the chosen token is the most likely one
        assert p["top_logprobs"][0]["id"] == p["id"]
        assert p["logprob"] == pytest.approx(tops[0])
    assert "".join(p["token"] for p in probs) == body["content"]


def test_swipes(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        swipes = c.post("/completion", json=st.llamacpp_body(PROMPT, max_tokens=4, n=2,
                                                             seed=3)).json()
    assert isinstance(swipes, list) and len(swipes) == 2
    assert all(s["content"] for s in swipes)


@pytest.mark.parametrize("make_body", [st.koboldcpp_body, st.generic_body],
                         ids=["koboldcpp", "generic"])
def test_v1_completions_with_sillytavern_bodies(real_server: ServerProcess,
                                                make_body: Any) -> None:
    body = make_body(COUNT, max_tokens=6, temperature=0)
    with http(real_server) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            chunks = sse_data(list(s.iter_lines()))
    assert text
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == text


def test_kobold_generate(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        r = c.post("/api/v1/generate", json=st.kobold_generate_body(COUNT, max_length=6,
                                                                     temperature=0))
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["text"] and result["finish_reason"] == "length"
        assert c.get("/api/v1/model").json() == {"result": "koboldcpp/SmolLM2-135M-Instruct.Q4_1"}
        assert c.get("/api/extra/version").json()["result"] == "KoboldCpp"


def test_token_counts_equal_prompt_tokens(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        tokens = c.post("/tokenize", json={"content": PROMPT}).json()["tokens"]
        plain = c.post("/tokenize", json={"content": PROMPT, "add_special": False}).json()
        kobold = c.post("/api/extra/tokencount", json={"prompt": PROMPT}).json()
        done = c.post("/completion", json={"prompt": PROMPT, "n_predict": 1}).json()
        oai = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()
        back = c.post("/detokenize", json={"tokens": tokens}).json()["content"]
    assert len(tokens) == done["tokens_evaluated"] == oai["usage"]["prompt_tokens"]
    assert plain["tokens"] == tokens  # this GGUF adds no BOS
    assert kobold == {"value": len(tokens), "ids": tokens}
    assert back == PROMPT.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_props_report_template_and_context(real_server: ServerProcess) -> None:
    from llmserve.config import demo_model_path
    from llmserve.engine.model import LoadedModel

    model = LoadedModel(demo_model_path(), n_ctx=64)  # type: ignore[arg-type]
    try:
        template = model.meta("tokenizer.chat_template")
    finally:
        model.close()
    with http(real_server) as c:
        props = c.get("/props").json()
        rendered = c.post("/apply-template", json={"messages": [
            {"role": "user", "content": "Name three fruits."}]}).json()["prompt"]
        slots = c.get("/slots").json()
    assert template and props["chat_template"] == template
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert props["total_slots"] == 2 and len(slots) == 2
    assert props["model_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert rendered.endswith("<|im_start|>assistant\n") and "Name three fruits." in rendered


def _wait_idle(c: httpx.Client, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(s["is_processing"] for s in c.get("/slots").json()):
            return True
        time.sleep(0.05)
    return False


def _wait_decoding(c: httpx.Client, n: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(s["next_token"]["n_decoded"] >= n for s in c.get("/slots").json()):
            return True
        time.sleep(0.05)
    return False


def test_abort_stops_a_generation(real_server: ServerProcess) -> None:
    result: dict[str, Any] = {}
    body = st.kobold_generate_body(PROMPT, max_length=1500, genkey="KCPP-real",
                                   stop_sequence=[], temperature=1.0, sampler_seed=1,
                                   bypass_eos=True)

    def run() -> None:
        with http(real_server) as c:
            result["r"] = c.post("/api/v1/generate", json=body)

    with http(real_server) as c:
        assert _wait_idle(c, 30)
        t = threading.Thread(target=run)
        t.start()
        assert _wait_decoding(c, 3, 30)
        assert c.post("/api/extra/abort", json={"genkey": "KCPP-real"}).json()[
            "success"] == "true"
        t.join(timeout=30)
        assert _wait_idle(c, 5)
    done = result["r"].json()["results"][0]
    assert done["text"]  # what was generated before the abort comes back
    assert 3 <= done["completion_tokens"] < 1500


def test_dropped_connection_stops_generation(real_server: ServerProcess) -> None:
    body = st.llamacpp_body(PROMPT, max_tokens=1500, stream=True, ignore_eos=True,
                            stop=[], stopping_strings=[])
    with http(real_server) as c:
        assert _wait_idle(c, 30)
        with c.stream("POST", "/completion", json=body) as r:
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break
        assert _wait_idle(c, 5), "the slot kept generating after the client left"
        assert c.get("/health").json()["slots_busy"] == 0


def test_batch_of_four_in_order(real_server: ServerProcess) -> None:
    prompts = ["1, 2, 3,", "a, b, c,", "Monday, Tuesday,", "red, green,"]
    opts = {"max_length": 5, "do_sample": False}
    with http(real_server) as c:
        r = c.post("/generate/batch", json={"prompts": prompts, **opts})
        assert r.status_code == 200, r.text
        body = r.json()
        singles = [c.post("/generate", json={"prompt": p, **opts}).json()["response"]
                   for p in prompts]
    assert len(body["responses"]) == 4
    assert body["responses"] == singles
    assert 4 <= body["usage"]["completion_tokens"] <= 20


def test_seed_routes_stream_and_chat(real_server: ServerProcess) -> None:
    with http(real_server) as c:
        full = c.post("/generate", json={"prompt": COUNT, "max_length": 6,
                                         "do_sample": False}).json()
        with c.stream("POST", "/generate", json={"prompt": COUNT, "max_length": 6,
                                                 "do_sample": False, "stream": True}) as r:
            raw = r.read().decode()
        chat = c.post("/chat", json={"messages": [{"role": "user", "content": "Hi"}],
                                     "max_length": 4}).json()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw[: -len("data: [DONE]\n\n")].split("\n\n")
    text = "".join("\n".join(line[6:] for line in e.split("\n")) for e in events if e)
    assert text == full["response"]
    assert 1 <= full["usage"]["completion_tokens"] <= 6
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        pytest.param("/generate", {"prompt": "word " * 3000}, 413, id="too-long"),
        pytest.param("/chat", {"messages": [{"role": "user", "content": "word " * 3000}]}, 413,
                     id="chat-too-long"),
        pytest.param("/generate", {"prompt": "x", "temperature": "hot"}, 400, id="bad-temp"),
        pytest.param("/generate/batch", {"prompts": "x"}, 400, id="batch-not-list"),
    ],
)
def test_seed_route_errors(real_server: ServerProcess, path: str, body: dict[str, Any],
                           status: int) -> None:
    with http(real_server) as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail"}
