"""Tier 3, loopback only: real llmserve replicas behind LiteLLM's Router (configured by
`llmserve router-config`), and the demo model served with its layers on a llama.cpp RPC server
(`llmserve rpc-server`) that is then killed."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai
import pytest
import yaml

from llmserve.loadgen import same_llmserve_env
from tests.conftest import ServerProcess, free_port
from tests.polling import wait_until

pytestmark = pytest.mark.real

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 4, "temperature": 0}


def router_config_text(*urls: str) -> str:
    """`llmserve router-config` run as a user would: its stdout."""
    args = [a for url in urls for a in ("--replica", url)]
    done = subprocess.run([sys.executable, "-m", "llmserve", "router-config", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **same_llmserve_env()}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def router_config(*urls: str) -> dict[str, Any]:
    """`llmserve router-config`'s stdout parsed as the proxy would."""
    config: dict[str, Any] = yaml.safe_load(router_config_text(*urls))
    return config


def make_router(config: dict[str, Any]) -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    import litellm

    litellm.telemetry = False
    return litellm.Router(model_list=config["model_list"], **config["router_settings"])


async def ask(router: Any, model: str, stream: bool) -> str:
    if not stream:
        response = await router.acompletion(model=model, stream=False, **CHAT)
        assert response.choices[0].finish_reason in ("stop", "length")
        return str(response.choices[0].message.content)
    text = ""
    async for chunk in await router.acompletion(model=model, stream=True, **CHAT):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


# litellm leaves a coroutine of a failed attempt un-awaited when it retries elsewhere
ROUTER_WARNINGS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# long enough that a stream is still being delivered when its replica is killed
STORY: dict[str, Any] = {"messages": [{"role": "user", "content": "Write a story about a cat."}],
                         "max_tokens": 32, "temperature": 0}


class Front(Protocol):
    """LiteLLM in front of the replicas: its Router in-process, or its proxy through the openai
    SDK."""

    async def stream(self) -> tuple[str, AsyncIterator[Any]]:
        """STORY streamed: the api_base of the replica it landed on, and its chunks."""

    async def once(self) -> tuple[str | None, str | None]:
        """CHAT answered whole: its text and finish reason."""


class RouterFront:
    def __init__(self, router: Any, model: str) -> None:
        self.router, self.model = router, model

    async def stream(self) -> tuple[str, AsyncIterator[Any]]:
        response = await self.router.acompletion(model=self.model, stream=True, **STORY)
        return str((response._hidden_params or {}).get("api_base") or ""), response

    async def once(self) -> tuple[str | None, str | None]:
        response = await self.router.acompletion(model=self.model, stream=False, **CHAT)
        return response.choices[0].message.content, response.choices[0].finish_reason


class ProxyFront:
    def __init__(self, client: openai.AsyncOpenAI, model: str) -> None:
        self.client, self.model = client, model

    async def stream(self) -> tuple[str, AsyncIterator[Any]]:
        raw = await self.client.chat.completions.with_raw_response.create(
            model=self.model, stream=True, **STORY)
        return raw.headers.get("x-litellm-model-api-base", ""), raw.parse()

    async def once(self) -> tuple[str | None, str | None]:
        response = await self.client.chat.completions.create(model=self.model, **CHAT)
        return response.choices[0].message.content, response.choices[0].finish_reason


def hundred_requests_with_a_replica_killed(front: Front, victim: ServerProcess) -> None:
    """100 requests (every other one streamed), 4 at a time; once half are answered, the first
    stream that is being delivered by ``victim`` SIGKILLs it (no drain: connections just drop),
    so a stream is surely cut mid-way. Every request must be answered whole, none asked again:
    retries cover what had not started, LiteLLM's mid-stream continuation (`router-config` turns
    it on) the cut streams."""
    cut: list[str] = []  # what the cut stream had received by then, then its whole answer

    async def run() -> list[tuple[str | None, str | None]]:
        done = 0
        gate = asyncio.Semaphore(4)

        async def stream() -> tuple[str, str | None]:
            api_base, chunks = await front.stream()
            text, finish, cutter = "", None, False
            async for chunk in chunks:
                if not chunk.choices:
                    continue
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
                if (done >= 50 and not cut and text and finish is None
                        and api_base.startswith(victim.url)):
                    cut.append(text)
                    cutter = True
                    victim.proc.kill()
            if cutter:
                cut.append(text)
            return text, finish

        async def one(i: int) -> tuple[str | None, str | None]:
            nonlocal done
            async with gate:
                answer = await (stream() if i % 2 else front.once())
            done += 1
            return answer

        return await asyncio.gather(*(one(i) for i in range(100)))

    answers = asyncio.run(asyncio.wait_for(run(), 540))
    assert cut, "no stream was being delivered by the victim after the 50th answer"
    assert victim.proc.wait(10) is not None
    assert len(answers) == 100
    for i, (text, finish) in enumerate(answers):
        assert text and finish in ("stop", "length"), (i, text, finish)
    # the cut stream went on past what it had when its replica died (or ended there, said so)
    assert len(cut) == 2 and (len(cut[1]) > len(cut[0]) or (cut[1], "stop") in answers), cut


@ROUTER_WARNINGS
@pytest.mark.timeout(600)
def test_router_survives_a_replica_killed_halfway(
    start_server: Callable[..., ServerProcess],
) -> None:
    # one thread each: two replicas share this machine's cores
    a = start_server("--parallel", "2", "--max-queue", "32", "--threads", "1",
                     "--instance-name", "a")
    b = start_server("--parallel", "2", "--max-queue", "32", "--threads", "1",
                     "--instance-name", "b")
    config = router_config(a.url, b.url)
    model = config["model_list"][0]["model_name"]
    hundred_requests_with_a_replica_killed(RouterFront(make_router(config), model), b)
    # the survivor answered the rest, its samples labelled as --instance-name asked
    metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
    assert 'llmserve_requests_total{replica="a",route="/v1/chat/completions",status="200"}' \
        in metrics


def _proxy_importable() -> None:
    """The proxy needs more than `pip install litellm` (`litellm[proxy]` pins a litellm-proxy
    package some indexes lack; docs/scale-out.md lists what to install by hand)."""
    done = subprocess.run([sys.executable, "-c", "import litellm.proxy.proxy_server"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    if done.returncode != 0:
        missing = (done.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the LiteLLM proxy cannot start here ({missing})")


@pytest.mark.timeout(600)
def test_proxy_survives_a_replica_killed_halfway(
    start_server: Callable[..., ServerProcess], tmp_path: Path,
) -> None:
    """docs/scale-out.md as a user follows it: router-config's file, the `litellm` proxy, the
    openai SDK pointed at it unchanged."""
    _proxy_importable()
    a = start_server("--parallel", "2", "--max-queue", "32", "--threads", "1")
    b = start_server("--parallel", "2", "--max-queue", "32", "--threads", "1")
    config = tmp_path / "litellm.yaml"
    config.write_text(router_config_text(a.url, b.url))
    model = yaml.safe_load(config.read_text())["model_list"][0]["model_name"]
    port = free_port()
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            [str(Path(sys.executable).with_name("litellm")), "--config", str(config),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "LITELLM_MASTER_KEY": "sk-test",
                 "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    try:
        def live() -> bool:
            assert proxy.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/liveliness",
                                 timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(live, timeout=180, what="the LiteLLM proxy to answer")
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test",
                                    max_retries=0, timeout=120)
        hundred_requests_with_a_replica_killed(ProxyFront(client, model), b)
    finally:
        proxy.kill()
        proxy.wait(10)


@ROUTER_WARNINGS
@pytest.mark.timeout(600)
def test_a_full_replica_503s_are_retried_on_the_other(
    start_server: Callable[..., ServerProcess],
) -> None:
    tight = start_server("--parallel", "1", "--max-queue", "0", "--threads", "1")
    roomy = start_server("--parallel", "2", "--max-queue", "32", "--threads", "1")
    config = router_config(tight.url, roomy.url)
    config["router_settings"]["routing_strategy"] = "simple-shuffle"  # both get traffic
    model = config["model_list"][0]["model_name"]
    router = make_router(config)

    async def run() -> list[str]:
        return await asyncio.gather(*(ask(router, model, stream=i % 2 == 0) for i in range(12)))

    answers = asyncio.run(asyncio.wait_for(run(), 540))
    assert len(answers) == 12 and all(answers)
    refused = [line for line in httpx.get(f"{tight.url}/metrics", timeout=10).text.splitlines()
               if line.startswith('llmserve_rejections_total{reason="queue_full"}')]
    assert refused and float(refused[0].split()[-1]) >= 1, "the tight replica never said 503"


# -- RPC -----------------------------------------------------------------------------------------


def _rpc_build() -> None:
    from llmserve.engine import rpc

    if not rpc.supported():
        pytest.skip('llama-cpp-python was built without RPC (CMAKE_ARGS="-DGGML_RPC=on"; '
                    ".ci/run builds it so)")


@pytest.fixture
def rpc_server() -> Iterator[subprocess.Popen[bytes]]:
    _rpc_build()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmserve", "rpc-server", "--port", str(port), "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **same_llmserve_env()})
    proc.args = f"127.0.0.1:{port}"  # type: ignore[misc]

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            assert proc.poll() is None, "rpc-server exited"
            return False

    try:
        wait_until(listening, timeout=60, what="the rpc-server to listen")
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_rpc_holds_the_layers_gives_the_local_answer_and_its_loss_is_a_clear_503(
    rpc_server: subprocess.Popen[bytes], real_server: ServerProcess,
    start_server: Callable[..., ServerProcess],
) -> None:
    endpoint = str(rpc_server.args)
    remote = start_server("--rpc", endpoint)
    body = {"prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0}
    local = httpx.post(f"{real_server.url}/v1/completions", json=body, timeout=120).json()
    over_rpc = httpx.post(f"{remote.url}/v1/completions", json=body, timeout=120).json()
    assert over_rpc["choices"][0]["text"] == local["choices"][0]["text"]

    (model,) = httpx.get(f"{remote.url}/system/info", timeout=30).json()["models"]
    assert model["rpc_servers"] == [endpoint]
    assert model["layers"] == {f"RPC0[{endpoint}]": model["n_layer"] + 1}
    assert model["layers_offloaded"] == model["n_layer"] + 1

    rpc_server.kill()
    rpc_server.wait(10)
    with httpx.Client(base_url=remote.url, timeout=60) as client:
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "model_failed"
        assert f"RPC server {endpoint} stopped answering" in failed.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503
        assert endpoint in health.json()["models"][0]["error"]
        assert client.get("/v1/models").status_code == 200  # the server itself serves on
    log = remote.stop()
    assert f"layers off the CPU: RPC0[{endpoint}] {model['n_layer'] + 1}" in log
