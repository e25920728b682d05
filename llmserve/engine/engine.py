"""The real engine: a LoadedModel, its chat template and the Scheduler's worker thread."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmserve.engine import rpc, sampler
from llmserve.engine.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.engine.fim import FimTokens
from llmserve.engine.grammar_bound import check_can_end
from llmserve.engine.lora import prove_adapter
from llmserve.engine.model import LoadedModel, check_parallel, supports_gpu_offload
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.types import (
    GenerationRequest,
    GenerationStream,
    LoraAdapter,
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
            layer_devices=tuple(
                (_device_label(device), n) for device, n in model.layer_devices.items()),
            rpc_servers=model.rpc_servers,
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
        rpc_servers: Sequence[str] = (),
        tensor_split: Sequence[float] | None = None,
        lora: Sequence[tuple[Path, float]] = (),
    ) -> Engine:
        """Load a GGUF (blocking). Raises ModelLoadError for anything wrong with the file.

        ``n_gpu_layers=None`` offloads every layer when this llama.cpp build can, else none.
        ``flash_attn=None`` lets llama.cpp decide; the rope options override the GGUF's.
        ``lora``: (path, global scale) of adapters loaded with the model, each proven in a
        child process first (before the model loads here, so the two never hold it at once).
        """
        if n_gpu_layers is None:
            n_gpu_layers = -1 if supports_gpu_offload() else 0
        if n_ctx > 0:  # else the model's trained context, known once loaded: LoadedModel checks
            check_parallel(n_parallel, n_ctx)
        for adapter, _scale in lora:
            prove_adapter(Path(path), adapter, n_gpu_layers=n_gpu_layers)
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
            rpc_servers=rpc_servers,
            tensor_split=tensor_split,
        )
        try:
            for adapter, scale in lora:
                model.lora.load(adapter, scale)
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
        # a request's own adapter scales, resolved against the adapters loaded now
        requests = [r if r.lora is None
                    else dataclasses.replace(r, lora=self.model.lora.request_set(r.lora))
                    for r in requests]
        loop = asyncio.get_running_loop()
        first, *forks = [GenerationStream(r, loop) for r in requests]
        first.forks = tuple(forks)
        self.scheduler.submit(first)
        return [first, *forks]

    def fim_tokens(self) -> FimTokens | None:
        return self.model.fim_tokens()

    def slot_states(self) -> list[SlotState]:
        return self.scheduler.slot_states()

    def lora_adapters(self) -> list[LoraAdapter]:
        return self.model.lora.adapters()

    def set_lora_scales(self, scales: dict[int, float]) -> None:
        self.model.lora.set_scales(scales)

    def load_lora(self, path: str, scale: float) -> LoraAdapter:
        adapter = Path(path).expanduser()
        prove_adapter(self.model.path, adapter, n_gpu_layers=self.model.n_gpu_layers)
        loaded = self.scheduler.call(lambda: self.model.lora.load(adapter, scale)).result()
        assert isinstance(loaded, LoraAdapter)
        return loaded

    def unload_lora(self, adapter_id: int) -> None:
        self.scheduler.call(lambda: self.model.lora.unload(adapter_id)).result()

    @property
    def failure(self) -> BaseException | None:
        return self.scheduler.failure

    @property
    def busy_slots(self) -> int:
        return self.scheduler.busy_slots

    def close(self) -> None:
        if self.scheduler.lost:
            # its worker is parked inside llama.cpp and the context may reach a dead RPC
            # server: freeing it would hang or abort, so it stays allocated until exit
            return
        self.scheduler.stop()
        self.model.close()


def _device_label(device: str) -> str:
    endpoint = rpc.endpoint_of_device(device) if device.startswith("RPC") else None
    return f"{device}[{endpoint}]" if endpoint else device
