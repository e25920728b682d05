"""FakeEngine: scripted tokens, per-token delay, failure at token N, records calls and cancels,
a worker that can be killed. FakeClock: the registry's clock, advanced by hand.

FakeEngine honours the engine contract (EngineProtocol) with a worker thread per stream, so the
server code under test sees events arrive from another thread exactly as with llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp

from llmserve.engine.fim import FimTokens
from llmserve.engine.grammar_bound import check_can_end
from llmserve.engine.sampling import VocabFacts, compile_params
from llmserve.engine.types import (
    Finish,
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    SamplingParams,
    SlotState,
    Timings,
    TokenEvent,
    check_choices,
)
from llmserve.errors import InvalidRequest, ModelFailed

# what a stream of a killed FakeEngine ends with (the real scheduler's wording)
WORKER_DIED = "the model's engine stopped unexpectedly"


@dataclass
class Script:
    """What the next generation does."""

    tokens: Sequence[str] = ("Hello", ",", " world", "!")
    delay: float = 0.0
    fail_at: int | None = None


@dataclass
class FakeEngine:
    model_id: str = "fake-model"
    n_ctx: int = 256
    parallel: int = 1
    script: Script = field(default_factory=Script)
    requests: list[GenerationRequest] = field(default_factory=list)
    cancelled: list[GenerationRequest] = field(default_factory=list)
    started: list[GenerationRequest] = field(default_factory=list)
    closed: bool = False
    chats: list[list[dict[str, Any]]] = field(default_factory=list)
    running: list[GenerationRequest] = field(default_factory=list)
    # one entry per token event sent, naming its request (tests wait for output this way)
    emitted: list[GenerationRequest] = field(default_factory=list)
    # the vocabulary's fill-in-the-middle tokens (None: a model without them, as SmolLM2)
    fim: FimTokens | None = None

    def __post_init__(self) -> None:
        self._sem = threading.Semaphore(self.parallel)
        self._failure: BaseException | None = None
        self._info = ModelInfo(
            id=self.model_id, path=f"/models/{self.model_id}.gguf", n_ctx=self.n_ctx,
            n_ctx_train=self.n_ctx * 2, n_parallel=self.parallel, n_layer=4, n_gpu_layers=0,
            gpu_offload_supported=False, chat_template="{{ messages }}", created=1,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def kill(self, cause: BaseException | None = None) -> None:
        """Let the "worker" die as the real one does when an exception escapes it: streams
        in progress or waiting end with an error at their next step, new ones are refused."""
        self._failure = cause or RuntimeError("llama_decode: GGML_ASSERT(scripted) failed")

    def format_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        self.chats.append(messages)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        # one token per character keeps context arithmetic easy to predict in tests
        return [ord(c) for c in text]

    def detokenize(self, tokens: Sequence[int]) -> str:
        if any(t < 0 for t in tokens):
            raise InvalidRequest("bad token", param="tokens")
        return "".join(chr(t) for t in tokens)

    def token_bytes(self, token: int) -> bytes:
        return chr(token).encode()

    def fim_tokens(self) -> FimTokens | None:
        return self.fim

    def prepare_sampling(self, params: SamplingParams) -> SamplingParams:
        # The real model-free checks (sampler names, token ids, JSON schema); grammar text is
        # only parsed by the real engine. Token ids are characters here.
        return compile_params(params, VocabFacts(n_vocab=0x110000, n_ctx=self.n_ctx))

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self._failure is not None:
            raise ModelFailed(f"{WORKER_DIED}; retry shortly", retry_after=5.0)
        check_can_end(request)  # the engine contract: refused before anything is generated
        self.requests.append(request)
        stream = GenerationStream(request, asyncio.get_running_loop())
        threading.Thread(target=self._run, args=(stream, self.script), daemon=True).start()
        return stream

    def submit_choices(self, requests: Sequence[GenerationRequest]) -> list[GenerationStream]:
        check_choices(requests, self.parallel)
        return [self.submit(r) for r in requests]

    def slot_states(self) -> list[SlotState]:
        busy = list(self.running)
        return [
            SlotState(id=i, n_ctx=self.n_ctx, n_cached=0,
                      request=busy[i] if i < len(busy) else None)
            for i in range(self.parallel)
        ]

    def _run(self, stream: GenerationStream, script: Script) -> None:
        req = stream.request
        n_prompt = len(req.prompt_tokens)
        while not self._sem.acquire(timeout=0.01):  # queued: wait for a slot
            if self._failure is not None:
                stream.push(Finish("error", n_prompt, 0, error=WORKER_DIED))
                return
            if stream.cancelled:
                self.cancelled.append(req)
                stream.push(Finish("cancelled", n_prompt, 0))
                return
        try:
            self.started.append(req)
            self.running.append(req)
            n = 0
            for i, text in enumerate(script.tokens):
                if n >= req.max_tokens:
                    stream.push(Finish("length", n_prompt, n))
                    return
                if script.delay:
                    time.sleep(script.delay)
                if self._failure is not None:
                    stream.push(Finish("error", n_prompt, n, error=WORKER_DIED))
                    return
                if stream.cancelled:
                    self.cancelled.append(req)
                    stream.push(Finish("cancelled", n_prompt, n))
                    return
                if script.fail_at is not None and i == script.fail_at:
                    stream.push(Finish("error", n_prompt, n, error="scripted failure"))
                    return
                if text in req.stop:  # a whole-token stop string: held back, as the engine does
                    stream.push(Finish("stop", n_prompt, n, stop_word=text))
                    return
                n += 1
                self.emitted.append(req)
                if req.n_probs:
                    # scripted probabilities: the token itself at -0.5, then runners-up
                    top = tuple((i + k * 1000, -0.5 - k) for k in range(req.n_probs))
                    stream.push(TokenEvent(i, text, -0.5, top))
                else:
                    stream.push(TokenEvent(i, text))
            stream.push(Finish("stop", n_prompt, n, timings=Timings(predicted_n=n)))
        finally:
            if req in self.running:
                self.running.remove(req)
            self._sem.release()

    def close(self) -> None:
        self.closed = True


class _FakeTimer:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """The registry's Clock with time that moves only when a test calls ``advance``; timers
    run then, on the caller's (event loop) thread, in the order they fall due."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall_offset = wall - start
        self._timers: list[_FakeTimer] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], object]) -> _FakeTimer:
        timer = _FakeTimer(self.now + delay, callback)
        self._timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [t for t in self._timers if t.when <= self.now and not t.cancelled]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self._timers.remove(timer)
            timer.callback()
        self._timers = [t for t in self._timers if not t.cancelled]


async def drive_asgi(app: ASGIApp, body: dict[str, Any], *, disconnect_after: int | None,
                     disconnect_event: asyncio.Event | None = None,
                     path: str = "/v1/chat/completions") -> list[bytes]:
    """POST ``body`` to the raw ASGI app and disconnect after N body chunks (or when the event
    is set). TestClient and httpx's ASGITransport buffer the whole body, so disconnects are
    tested here."""
    chunks: list[bytes] = []
    got_enough = disconnect_event or asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await got_enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if disconnect_after is not None and len(chunks) >= disconnect_after:
                got_enough.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": b"",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return chunks
