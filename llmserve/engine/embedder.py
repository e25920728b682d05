"""The embedding engine: a context that outputs embeddings (or rank scores), fed by a worker
thread that batches the inputs of every waiting request into shared decodes.

One thread owns the context, as with the generating Scheduler. Requests queue FIFO; each step
the worker takes as many waiting inputs as fit one decode (``pooling.take_batch``: the context's
n_batch tokens, llama.cpp's sequence limit), across requests, so 32 clients with one short text
each cost about one decode, and one request with 256 texts a few. Every input is its own
sequence, starting at position 0; the KV cache (causal models) is cleared before each decode,
and encoder-only models (BERT and kin: no KV cache) run through ``llama_encode``.

Thread-safety: ``embed`` belongs to the event loop; ``tokenize``, ``detokenize`` and
``rerank_tokens`` read the vocabulary only and may run in any thread; ``close`` blocks until
the worker has stopped and the model is freed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import llama_cpp
import numpy as np

from llmserve.engine.fim import FimTokens
from llmserve.engine.model import LoadedModel, supports_gpu_offload
from llmserve.engine.pooling import (
    POOLING_IDS,
    POOLING_NAMES,
    Pooling,
    Vector,
    gguf_pooling,
    has_rank_head,
    rerank_tokens,
    take_batch,
)
from llmserve.engine.types import (
    EmbeddingInfo,
    GenerationRequest,
    GenerationStream,
    LoraAdapter,
    ModelInfo,
    SamplingParams,
    SlotState,
)
from llmserve.errors import EngineError, InvalidRequest, ModelFailed, ModelLoadError, WrongModelKind
from llmserve.gguf_info import read_gguf

log = logging.getLogger("llmserve.engine")

WORKER_DIED = "the embedding model's engine stopped unexpectedly"


@dataclass
class _Job:
    inputs: Sequence[Sequence[int]]
    future: asyncio.Future[list[Vector]]
    loop: asyncio.AbstractEventLoop
    results: list[Vector | None] = field(default_factory=list)
    # index of the next input to decode, and how many have their result
    next: int = 0
    done: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def resolve(self, value: list[Vector] | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(settle)


class Embedder:
    """EngineProtocol for an embedding model, plus ``embed`` and ``rerank_tokens``."""

    def __init__(self, model: LoadedModel, model_id: str, n_parallel: int) -> None:
        self.model = model
        self.pooling: Pooling = POOLING_NAMES[int(llama_cpp.llama_pooling_type(model.ctx))]
        self.n_embd = int(llama_cpp.llama_model_n_embd(model.model))
        self.n_cls_out = int(llama_cpp.llama_model_n_cls_out(model.model))
        self._encoder_only = not model.memory
        template = llama_cpp.llama_model_chat_template(model.model, b"rerank")
        self._rerank_template = template.decode("utf-8") if template else None
        self._info = ModelInfo(
            id=model_id, path=str(model.path), n_ctx=model.n_ctx, n_ctx_train=model.n_ctx_train,
            n_parallel=n_parallel, n_layer=model.n_layer, n_gpu_layers=model.n_gpu_layers,
            gpu_offload_supported=supports_gpu_offload(), chat_template=None,
            description=model.description(), size_bytes=model.size_bytes,
            n_params=model.n_params, created=int(time.time()), n_threads=model.n_threads,
            flash_attn=model.flash_attn,
            embedding=EmbeddingInfo(pooling=self.pooling, n_embd=self.n_embd,
                                    max_tokens=model.n_batch),
        )
        self._pending: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._failure: Exception | None = None
        self._batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self._thread = threading.Thread(target=self._run, name="llmserve-embedder", daemon=True)
        self._thread.start()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        n_gpu_layers: int | None = None,
        n_threads: int | None = None,
        n_parallel: int = 1,
        pooling: Pooling | None = None,
        progress: Callable[[float], None] | None = None,
        flash_attn: bool | None = None,
    ) -> Embedder:
        """Load a GGUF as an embedding model (blocking); ``pooling`` None keeps the GGUF's.
        Raises ModelLoadError for a bad file, and for rank pooling on a model without a rank
        head (llama.cpp would abort the process)."""
        gguf = read_gguf(path)
        wanted = pooling or gguf_pooling(gguf.metadata)
        if wanted == "rank" and not has_rank_head([t.name for t in gguf.tensors]):
            raise ModelLoadError(
                f"{path}: pooling 'rank' needs a rank (classification) head, which this model "
                "does not have (no cls.weight or cls.output.weight tensor); use mean, cls or "
                "last", param="pooling")
        if n_gpu_layers is None:
            n_gpu_layers = -1 if supports_gpu_offload() else 0
        if flash_attn is None:
            # "auto" means off here: with flash attention on, an input's vector moved by ~1%
            # when read beside 59 others (SmolLM2, CPU), so batching would change results.
            # Off, batched = one by one (as in llama-cpp-python's Llama, whose default is off).
            flash_attn = False
        started = time.monotonic()
        model = LoadedModel(
            path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
            progress=progress, flash_attn=flash_attn, embeddings=True,
            pooling_type=None if pooling is None else POOLING_IDS[pooling],
        )
        try:
            engine = cls(model, model_id or model.path.stem, n_parallel)
        except BaseException:
            model.close()
            raise
        engine._info = dataclasses.replace(engine._info,
                                           load_seconds=time.monotonic() - started)
        return engine

    # -- EngineProtocol ----------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        self.check_tokens(tokens, "tokens")
        return self.model.detokenize(tokens)

    def check_tokens(self, tokens: Sequence[int], param: str) -> None:
        bad = [t for t in tokens if not self.model.is_valid_token(t)]
        if bad:
            raise InvalidRequest(
                f"token ids out of range 0..{self.model.n_vocab - 1}: {bad[:5]}", param=param)

    def _not_generating(self) -> NoReturn:
        raise WrongModelKind(
            f"model {self._info.id} is an embedding model: it serves /v1/embeddings"
            f"{' and /v1/rerank' if self.pooling == 'rank' else ''}, not text generation",
            param="model")

    def format_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        self._not_generating()

    def prepare_sampling(self, params: SamplingParams) -> SamplingParams:
        self._not_generating()

    def submit(self, request: GenerationRequest) -> GenerationStream:
        self._not_generating()

    def submit_choices(self, requests: Sequence[GenerationRequest]) -> list[GenerationStream]:
        self._not_generating()

    def fim_tokens(self) -> FimTokens | None:
        self._not_generating()

    def token_bytes(self, token: int) -> bytes:
        return self.model.token_to_piece(token, special=True)

    def slot_states(self) -> list[SlotState]:
        return []

    # LoRA adapters change generation; an embedding model here runs without any
    def lora_adapters(self) -> list[LoraAdapter]:
        return []

    def set_lora_scales(self, scales: dict[int, float]) -> None:
        self._no_adapters()

    def load_lora(self, path: str, scale: float) -> LoraAdapter:
        self._no_adapters()

    def unload_lora(self, adapter_id: int) -> None:
        self._no_adapters()

    def _no_adapters(self) -> NoReturn:
        raise WrongModelKind(f"model {self._info.id} is an embedding model: LoRA adapters "
                             "apply to generating models only", param="model")

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self.model.close()

    # -- embedding ---------------------------------------------------------------------------

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        if self._rerank_template is not None:  # the GGUF's own (Qwen3-Reranker and kin)
            prompt = self._rerank_template.replace("{query}", query)
            return self.tokenize(prompt.replace("{document}", document), add_special=False)
        vocab = self.model.vocab
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        if eos < 0:
            eos = int(llama_cpp.llama_vocab_sep(vocab))
        return rerank_tokens(
            self.tokenize(query, add_special=False), self.tokenize(document, add_special=False),
            bos=self.model.bos_id if llama_cpp.llama_vocab_get_add_bos(vocab) else None,
            eos=eos if llama_cpp.llama_vocab_get_add_eos(vocab) else None,
            sep=(int(llama_cpp.llama_vocab_sep(vocab))
                 if llama_cpp.llama_vocab_get_add_sep(vocab) else None),
        )

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[Vector]:
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop.create_future(), loop, [None] * len(inputs))
        with self._cond:
            if self._failure is not None:
                raise ModelFailed(f"{WORKER_DIED}; retry shortly", retry_after=5.0)
            if self._stopping:
                raise ModelFailed("the embedding model is unloading; retry shortly")
            self._pending.append(job)
            self._cond.notify()
        try:
            return await job.future
        finally:
            job.cancelled.set()  # a no-op once done; else the worker drops what is left

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        taken: list[tuple[_Job, int]] = []
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    taken = self._take()
                    if not taken:
                        self._cond.wait(timeout=0.5)
                        continue
                self._decode(taken)
                taken = []
        except Exception as exc:
            # Recorded, not logged: the registry logs it once when it marks the model failed.
            self._failure = exc
        finally:
            with self._cond:
                self._stopping = True
                # the queue, and the jobs of a decode that did not finish
                pending = list({id(j): j for j in [*self._pending, *(j for j, _ in taken)]
                                }.values())
                self._pending.clear()
            for job in pending:
                job.resolve(ModelFailed(f"{WORKER_DIED}; retry shortly", retry_after=5.0)
                            if self._failure is not None else
                            ModelFailed("the embedding model was unloaded; retry"))

    def _take(self) -> list[tuple[_Job, int]]:
        """The inputs of the next decode, FIFO across jobs (caller holds the lock). A job
        whose inputs are all taken leaves the queue; its results arrive after the decode."""
        while self._pending and self._pending[0].cancelled.is_set():
            self._pending.popleft()
        lengths: list[int] = []
        refs: list[tuple[_Job, int]] = []
        for job in self._pending:
            if job.cancelled.is_set():
                continue
            for index in range(job.next, len(job.inputs)):
                lengths.append(len(job.inputs[index]))
                refs.append((job, index))
                if len(refs) >= self.model.n_seq_max:
                    break
            if len(refs) >= self.model.n_seq_max:
                break
        taken = refs[:take_batch(lengths, self.model.n_batch, self.model.n_seq_max)]
        for job, index in taken:
            job.next = index + 1
        self._pending = collections.deque(
            j for j in self._pending if j.next < len(j.inputs) and not j.cancelled.is_set())
        return taken

    def _decode(self, taken: list[tuple[_Job, int]]) -> None:
        model, b = self.model, self._batch
        n = 0
        for seq, (job, index) in enumerate(taken):
            for pos, token in enumerate(job.inputs[index]):
                b.token[n] = token
                b.pos[n] = pos
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = True  # embeddings pool over every token's output
                n += 1
        b.n_tokens = n
        if self._encoder_only:
            rc = llama_cpp.llama_encode(model.ctx, b)
        else:
            llama_cpp.llama_memory_clear(model.memory, True)
            rc = llama_cpp.llama_decode(model.ctx, b)
        if rc != 0:
            message = f"embedding decode failed (code {rc})"
            log.error("%s", message)
            for job in {id(j): j for j, _ in taken}.values():
                job.cancelled.set()
                job.resolve(EngineError(message))
            return
        for (job, index), vector in zip(taken, self._outputs(taken, n), strict=True):
            job.results[index] = vector
            job.done += 1
            if job.done == len(job.inputs):
                job.resolve([v for v in job.results if v is not None])

    def _outputs(self, taken: list[tuple[_Job, int]], n_tokens: int) -> list[Vector]:
        ctx = self.model.ctx
        if self.pooling == "none":
            ptr = llama_cpp.llama_get_embeddings(ctx)
            rows = np.ctypeslib.as_array(ptr, shape=(n_tokens, self.n_embd))
            out: list[Vector] = []
            start = 0
            for job, index in taken:
                end = start + len(job.inputs[index])
                out.append(rows[start:end].copy())
                start = end
            return out
        width = self.n_cls_out if self.pooling == "rank" else self.n_embd
        return [
            np.ctypeslib.as_array(
                ctypes.cast(llama_cpp.llama_get_embeddings_seq(ctx, seq),
                            ctypes.POINTER(ctypes.c_float)),
                shape=(width,)).copy()
            for seq in range(len(taken))
        ]
