"""The real engine: a LoadedModel, its chat template and the Scheduler's worker thread."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from llmserve.engine import sampler
from llmserve.engine.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.engine.fim import FimTokens
from llmserve.engine.grammar_bound import check_can_end
from llmserve.engine.model import LoadedModel, check_parallel, supports_gpu_offload
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.types import (
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    SamplingParams,
    SlotState,
    check_choices,
)
from llmserve.errors import InvalidRequest


class Engine:
    """Thread-safety: ``submit`` belongs to the event loop; ``format_chat``, ``tokenize``,
    ``detokenize`` and ``prepare_sampling`` may run in any thread (routes call them off the
    loop); ``close`` blocks until the worker has stopped and the model is freed."""

    def __init__(self, model: LoadedModel, model_id: str, chat_template: str | None) -> None:
        self.model = model
        self._gguf_template = model.meta("tokenizer.chat_template")
        source = chat_template or self._gguf_template or CHATML_TEMPLATE
        self.template = ChatTemplate(
            source,
            bos_token=model.token_text(model.bos_id) if model.bos_id >= 0 else "",
            eos_token=model.token_text(model.eos_id) if model.eos_id >= 0 else "",
        )
        self._info = ModelInfo(
            id=model_id,
            path=str(model.path),
            n_ctx=model.n_ctx,
            n_ctx_train=model.n_ctx_train,
            n_parallel=model.n_parallel,
            n_layer=model.n_layer,
            n_gpu_layers=model.n_gpu_layers,
            gpu_offload_supported=supports_gpu_offload(),
            chat_template=source,
            description=model.description(),
            size_bytes=model.size_bytes,
            n_params=model.n_params,
            created=int(time.time()),
            n_threads=model.n_threads,
            flash_attn=model.flash_attn,
        )
        model.eog_tokens  # noqa: B018 - computed once here rather than by a request
        self.scheduler = Scheduler(model)

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
        chat_template: str | None = None,
        progress: Callable[[float], None] | None = None,
        flash_attn: bool | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        rope_scaling: str | None = None,
        rope_freq_base: float | None = None,
        rope_freq_scale: float | None = None,
    ) -> Engine:
        """Load a GGUF (blocking). Raises ModelLoadError for anything wrong with the file.

        ``n_gpu_layers=None`` offloads every layer when this llama.cpp build can, else none.
        ``flash_attn=None`` lets llama.cpp decide; the rope options override the GGUF's.
        """
        if n_gpu_layers is None:
            n_gpu_layers = -1 if supports_gpu_offload() else 0
        if n_ctx > 0:  # else the model's trained context, known once loaded: LoadedModel checks
            check_parallel(n_parallel, n_ctx)
        started = time.monotonic()
        model = LoadedModel(
            path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            n_parallel=n_parallel,
            progress=progress,
            flash_attn=flash_attn,
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
            rope_scaling=rope_scaling,
            rope_freq_base=rope_freq_base,
            rope_freq_scale=rope_freq_scale,
        )
        try:
            engine = cls(model, model_id or model.path.stem, chat_template)
        except BaseException:
            model.close()
            raise
        engine._info = dataclasses.replace(engine._info,
                                           load_seconds=time.monotonic() - started)
        return engine

    @property
    def info(self) -> ModelInfo:
        return self._info

    def format_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        return self.template.render(messages, **template_kwargs)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        tokens = self.model.tokenize(text, add_special=add_special, parse_special=True)
        # A template that writes the BOS itself plus add_special would give two.
        bos = self.model.bos_id
        if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            del tokens[0]
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        bad = [t for t in tokens if not self.model.is_valid_token(t)]
        if bad:
            raise InvalidRequest(
                f"token ids out of range 0..{self.model.n_vocab - 1}: {bad[:5]}", param="tokens"
            )
        return self.model.detokenize(tokens)

    def token_bytes(self, token: int) -> bytes:
        # special tokens by their text: an alternative "<|im_end|>" must not show as ""
        return self.model.token_to_piece(token, special=True)

    def prepare_sampling(self, params: SamplingParams) -> SamplingParams:
        return sampler.prepare(params, self.model)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        return self.submit_choices([request])[0]

    def submit_choices(self, requests: Sequence[GenerationRequest]) -> list[GenerationStream]:
        check_choices(requests, self.model.n_parallel)
        for request in requests:
            check_can_end(request)  # a grammar that ignore_eos makes a dead end: 400 first
        loop = asyncio.get_running_loop()
        first, *forks = [GenerationStream(r, loop) for r in requests]
        first.forks = tuple(forks)
        self.scheduler.submit(first)
        return [first, *forks]

    def fim_tokens(self) -> FimTokens | None:
        return self.model.fim_tokens()

    def slot_states(self) -> list[SlotState]:
        return self.scheduler.slot_states()

    @property
    def failure(self) -> BaseException | None:
        return self.scheduler.failure

    @property
    def busy_slots(self) -> int:
        return self.scheduler.busy_slots

    def close(self) -> None:
        self.scheduler.stop()
        self.model.close()
