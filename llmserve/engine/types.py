"""Engine-facing types. Nothing here imports llama_cpp, so the server and the test fakes use them.

A route builds a GenerationRequest, hands it to ``Engine.submit`` and iterates the returned
GenerationStream: zero or more TokenEvent, then exactly one Finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from llmserve.engine.fim import FimTokens
from llmserve.errors import InvalidRequest, LlmserveError

FinishReason = Literal["stop", "length", "cancelled", "error"]
# LoRA adapters a generation runs with: (adapter id, scale) pairs, sorted, no zero scales
AdapterSet = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter loaded on a model, as GET /lora-adapters lists it."""

    id: int
    path: str
    scale: float


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler. Defaults are llama.cpp's (llama-server's).

    Field names follow llama.cpp's /completion API; routes map their own aliases onto them.
    """

    temperature: float = 0.8
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    min_keep: int = 0
    seed: int | None = None
    # (token id, bias); a bias of -inf bans the token (llama.cpp's `false`)
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    # sampler order by llama.cpp name; empty = llama.cpp's default order
    samplers: tuple[str, ...] = ()
    grammar: str | None = None
    # regexes that start ``grammar`` (a lazy grammar: free text until one matches, from its
    # first group); empty: the grammar applies from the first token
    grammar_triggers: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    # > 0: every TokenEvent carries the token's log-probability and the top ``n_probs``
    # alternatives (softmax of the raw logits, as llama-server's n_probs); 0 costs nothing.
    n_probs: int = 0
    # the request's own LoRA scales (``lora``), checked by the engine; None: the model's
    # global scales when the generation starts
    lora: AdapterSet | None = None
    # a batch line: waits behind interactive requests and gives its slot up to one (the
    # scheduler preempts it; it resumes where it stopped)
    background: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token. ``text`` is what may be shown now: it can be "" while a multi-byte
    character or a possible stop string is held back."""

    token_id: int
    text: str
    # only when the request asked for n_probs: log p(token) and the top (token id, log p) pairs
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # which of the request's choices (OpenAI ``n``) it belongs to; the server sets it
    choice: int = 0


@dataclass(frozen=True)
class Timings:
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    cache_n: int = 0

    def to_dict(self) -> dict[str, int | float]:
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": _rate(self.prompt_n, self.prompt_ms),
            "predicted_n": self.predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": _rate(self.predicted_n, self.predicted_ms),
        }


def _rate(n: int, ms: float) -> float:
    return round(n * 1000.0 / ms, 3) if ms > 0 else 0.0


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_word: str | None = None
    timings: Timings = field(default_factory=Timings)
    error: str | None = None
    # an error the client should see as it is (a 4xx from the error tree), not as engine_error
    cause: LlmserveError | None = None
    # which of the request's choices (OpenAI ``n``) it ends; the server sets it
    choice: int = 0


Event = TokenEvent | Finish


def check_choices(requests: Sequence[GenerationRequest], n_parallel: int) -> None:
    """Choices of one prompt (OpenAI ``n``) each need a slot of their own at once, and must
    share the prompt they fork from. Raises InvalidRequest naming ``n``."""
    if len(requests) > n_parallel:
        raise InvalidRequest(
            f"invalid 'n': {len(requests)} choices need as many slots at once, and this model "
            f"has {n_parallel} (--parallel); ask for at most {n_parallel}", param="n")
    if any(r.prompt_tokens != requests[0].prompt_tokens for r in requests):
        raise InvalidRequest("invalid 'n': every choice must continue the same prompt",
                             param="n")


@dataclass(frozen=True)
class EmbeddingInfo:
    """What an embedding model outputs: ``n_embd`` floats per input (per token with pooling
    "none"); with pooling "rank" one relevance score per (query, document) pair."""

    pooling: str
    n_embd: int
    # the largest input, in tokens, one sequence may have
    max_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: str
    n_ctx: int
    n_ctx_train: int
    n_parallel: int
    n_layer: int
    n_gpu_layers: int
    gpu_offload_supported: bool
    chat_template: str | None
    description: str = ""
    size_bytes: int = 0
    n_params: int = 0
    created: int = 0
    load_seconds: float = 0.0
    n_threads: int = 0
    # as asked: None = llama.cpp's auto
    flash_attn: bool | None = None
    # set for an embedding model (it embeds or reranks; it does not generate)
    embedding: EmbeddingInfo | None = None

    # where llama.cpp put the layers: (device, layers) in its order, the device named as ggml
    # does ("CPU", "CUDA0", "RPC0[host:port]"); empty when not known (a fake engine)
    layer_devices: tuple[tuple[str, int], ...] = ()
    rpc_servers: tuple[str, ...] = ()

    @property
    def layers_offloaded(self) -> int:
        if self.layer_devices:
            return sum(n for device, n in self.layer_devices if device != "CPU")
        if not self.gpu_offload_supported:
            return 0
        # llama.cpp counts the output layer as one more offloadable layer.
        total = self.n_layer + 1
        return total if self.n_gpu_layers < 0 else min(self.n_gpu_layers, total)


@dataclass(frozen=True)
class SlotState:
    """One slot as GET /slots shows it; ``request`` is None while the slot is idle."""

    id: int
    n_ctx: int
    n_cached: int
    request: GenerationRequest | None = None
    n_decoded: int = 0

    @property
    def is_processing(self) -> bool:
        return self.request is not None


class GenerationStream:
    """The consumer's end of one generation; also the producer's handle for the worker thread.

    Thread-safety: ``push`` may be called from any thread (it hops onto the loop with
    ``call_soon_threadsafe``); iteration and ``cancel`` belong to the event loop. ``cancelled`` is
    a plain flag the worker polls every token and from llama.cpp's abort callback.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = False
        # The request's other choices (OpenAI ``n`` > 1), submitted with this one: they start
        # from this stream's prompt once it is read (Scheduler._fork), and end with this one if
        # it ends before that. The worker empties it when it forks them.
        self.forks: tuple[GenerationStream, ...] = ()
        # Called on the loop with each event as the consumer takes it (the server's metrics
        # and access log hook in here, whichever route consumes the stream).
        self.on_event: Callable[[Event], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def push(self, event: Event) -> None:
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    @staticmethod
    def push_all(events: Sequence[tuple[GenerationStream, Event]]) -> None:
        """Push several streams' events (in order) with one wake-up of each event loop, not
        one per event: the worker hands over a whole decode step's tokens at once."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationStream, Event]]] = {}
        for stream, event in events:
            by_loop.setdefault(stream._loop, []).append((stream, event))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.finished:
            event = await self._queue.get()
            if isinstance(event, Finish):
                self.finished = True
            if self.on_event is not None:
                self.on_event(event)
            yield event


def _deliver(batch: list[tuple[GenerationStream, Event]]) -> None:
    for stream, event in batch:
        stream._queue.put_nowait(event)


class EngineProtocol(Protocol):
    """What the server needs from an engine; the real one and tests' FakeEngine both fit it."""

    @property
    def info(self) -> ModelInfo: ...

    def format_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str: ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes, special tokens by their text (part of a multi-byte character
        stays partial). Thread-safe."""
        ...

    def prepare_sampling(self, params: SamplingParams) -> SamplingParams:
        """Validate what needs the model (token ids, sampler names, grammar, JSON schema) and
        compile ``json_schema`` into ``grammar``; raises InvalidRequest. Routes call it off the
        event loop, before submitting, so a bad grammar never reaches the worker thread."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue ``request``. Raises GrammarDeadEnd, before anything is generated, when its
        grammar and ``ignore_eos`` make an end impossible (``grammar_bound.check_can_end``)."""
        ...

    def submit_choices(self, requests: Sequence[GenerationRequest]) -> list[GenerationStream]:
        """Queue several choices of one prompt (OpenAI ``n``; the requests differ at most in
        their sampling): the prompt is read once and its cells shared. One stream per request,
        in order. Raises as ``submit``, and InvalidRequest when there are more than the model
        has slots or the prompts differ."""
        ...

    def fim_tokens(self) -> FimTokens | None:
        """The vocabulary's fill-in-the-middle tokens; None when it has none."""
        ...

    def slot_states(self) -> list[SlotState]: ...

    def lora_adapters(self) -> list[LoraAdapter]: ...

    def set_lora_scales(self, scales: dict[int, float]) -> None:
        """Global scales, llama-server's POST /lora-adapters: unlisted adapters get 0. Raises
        InvalidRequest for an id that is not loaded."""
        ...

    def load_lora(self, path: str, scale: float) -> LoraAdapter:
        """Prove the adapter in a child process, then load it (blocking: call it off the event
        loop). Raises ModelLoadError (400); the model keeps serving."""
        ...

    def unload_lora(self, adapter_id: int) -> None:
        """Remove an adapter (blocking); requests running with it finish first."""
        ...

    @property
    def failure(self) -> BaseException | None:
        """What stopped the engine's worker thread, once it has died; None while it works.
        A dead engine has ended its streams with an error and refuses new ones (ModelFailed);
        the registry marks its model failed and reloads it. Thread-safe (a read)."""
        ...

    def close(self) -> None: ...


class EmbeddingEngine(EngineProtocol, Protocol):
    """An engine whose ``info.embedding`` is set. Generation methods raise WrongModelKind."""

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[Any]:
        """One float32 numpy array per input, in order: shape (n_embd,) when pooled, (n_tokens,
        n_embd) with pooling "none", (1,) holding the score with pooling "rank". Inputs of
        several calls are batched into shared decodes. Cancelling the awaiting task drops the
        inputs not yet decoded. Raises EngineError when the decode fails."""
        ...

    def check_tokens(self, tokens: Sequence[int], param: str) -> None:
        """InvalidRequest (naming ``param``) for a token id outside the vocabulary."""
        ...

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        """The token sequence whose rank output scores ``document`` for ``query``."""
        ...
