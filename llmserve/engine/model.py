"""Load and free a GGUF model and its llama.cpp context; tokenize; read metadata.

Only the worker thread decodes on a LoadedModel's context. Tokenizing and detokenizing read the
vocabulary only and are safe from other threads (llama-server tokenizes on its HTTP threads too).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from llmserve.engine import rpc
from llmserve.engine.fim import FimTokens
from llmserve.engine.lora import LoraTable
from llmserve.errors import InvalidRequest, ModelLoadError

log = logging.getLogger("llmserve.llama")  # llama.cpp's own log lines
engine_log = logging.getLogger("llmserve.engine")

GGUF_MAGIC = b"GGUF"

# The context is shared by all slots (unified KV cache), but N requests at once each need room
# for a chat template, a prompt and an answer. Below this many tokens per slot, --parallel N
# would mostly produce context-full errors, so it is refused at startup.
MIN_CTX_PER_SLOT = 256

# llama.cpp reports why a load failed only through its log. Keep the last lines so an error can
# say more than "failed to load"; they are shown to the user, never parsed.
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
_log_levels = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
# Where llama.cpp put each layer: it says so only in a debug log line per layer, on the thread
# that loads the model, which is where a load collects them.
_LAYER_LINE = re.compile(r"layer\s+\d+ assigned to device (\S+?),")
_loading = threading.local()


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace").rstrip()
    if not message:
        return
    layers: collections.Counter[str] | None = getattr(_loading, "layers", None)
    if layers is not None and (match := _LAYER_LINE.search(message)):
        layers[match.group(1)] += 1
    py_level = _log_levels.get(level, logging.DEBUG)
    if py_level >= logging.ERROR:
        _recent_errors.append(message)
    log.log(py_level if py_level >= logging.WARNING else logging.DEBUG, "%s", message)


_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def supports_gpu_offload() -> bool:
    init_backend()
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    init_backend()
    raw: bytes = llama_cpp.llama_print_system_info()
    return raw.decode("utf-8", errors="replace").strip()


def build_info() -> dict[str, object]:
    """What this llama.cpp build can do: GPU offload, its backends and devices (with free and
    total memory), mmap/mlock support and llama.cpp's system-info line."""
    init_backend()
    return {
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "mmap": bool(llama_cpp.llama_supports_mmap()),
        "mlock": bool(llama_cpp.llama_supports_mlock()),
        "rpc": bool(llama_cpp.llama_supports_rpc()),
        "backends": _ggml.backends(),
        "devices": _ggml.devices(),
        "system_info": system_info(),
    }


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


class _GgmlRegistry:
    """ggml's backend registry, read through libggml (llama-cpp-python binds no ggml_backend_*
    functions). Absent or different symbols give empty lists, never an error."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        try:
            lib = rpc.open_library("ggml")
            for fn, res, args in [
                ("ggml_backend_reg_count", ctypes.c_size_t, []),
                ("ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
                ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
                ("ggml_backend_dev_count", ctypes.c_size_t, []),
                ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
                ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
                ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
                ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
                ("ggml_backend_dev_memory", None,
                 [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                  ctypes.POINTER(ctypes.c_size_t)]),
            ]:
                getattr(lib, fn).restype = res
                getattr(lib, fn).argtypes = args
            self._lib = lib
        except (OSError, AttributeError):
            self._lib = None

    def backends(self) -> list[str]:
        lib = self._lib
        if lib is None:
            return []
        return [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
                for i in range(lib.ggml_backend_reg_count())]

    def devices(self) -> list[dict[str, object]]:
        lib = self._lib
        if lib is None:
            return []
        out: list[dict[str, object]] = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            out.append({
                "name": lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                "type": _DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                "memory_free": free.value,
                "memory_total": total.value,
            })
        return out


_ggml = _GgmlRegistry()

_FLASH_ATTN = {
    None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
_ROPE_SCALING = {
    "none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
    "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
    "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
}


def _cache_type(name: str) -> int:
    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if not isinstance(value, int):
        raise ModelLoadError(f"unknown KV cache type {name!r}", param="cache_type")
    return value


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """Fail early, with a clear message, on anything that is not a readable GGUF file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}", param="model")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a directory, not a .gguf model file", param="model")
    try:
        with p.open("rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {p}: {exc.strerror}", param="model") from exc
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{p} is not a GGUF file (it does not start with the GGUF magic bytes)", param="model"
        )
    if len(head) < 24:
        raise ModelLoadError(f"{p} is truncated: the GGUF header is incomplete", param="model")
    return p


def check_parallel(n_parallel: int, n_ctx: int) -> None:
    """Refuse ``--parallel N`` (N > 1) when the context cannot give each slot MIN_CTX_PER_SLOT
    tokens. One slot may use any context (a tiny one is a fine test set-up)."""
    if n_parallel < 1:
        raise InvalidRequest("parallel must be at least 1", param="parallel")
    if n_parallel > 1 and n_ctx < n_parallel * MIN_CTX_PER_SLOT:
        raise InvalidRequest(
            f"--parallel {n_parallel} needs a context of at least "
            f"{n_parallel * MIN_CTX_PER_SLOT} tokens ({MIN_CTX_PER_SLOT} per slot), but the "
            f"context is {n_ctx}: raise --ctx-size or lower --parallel",
            param="parallel",
        )


def _llama_error_detail() -> str:
    """The first error llama.cpp logged since the load began: the cause ("unknown model
    architecture: 'x'"); later lines only say that loading failed."""
    lines = [line for line in _recent_errors if line]
    _recent_errors.clear()
    return lines[0] if lines else ""


class LoadedModel:
    """A llama.cpp model plus one context with a sequence per slot (``n_parallel``), and as
    many spare ones where cells can be shared (``shares_cells``).

    The KV cache is unified: all sequences share ``n_ctx`` cells, so one long chat may use the
    whole context while the other slots are idle.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_parallel: int = 1,
        n_batch: int = 512,
        progress: Callable[[float], None] | None = None,
        flash_attn: bool | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        rope_scaling: str | None = None,
        rope_freq_base: float | None = None,
        rope_freq_scale: float | None = None,
        rpc_servers: Sequence[str] = (),
        tensor_split: Sequence[float] | None = None,
        embeddings: bool = False,
        pooling_type: int | None = None,
    ) -> None:
        """``embeddings``: a context that outputs embeddings (pooled by ``pooling_type``, None
        = the GGUF's) rather than logits; see ``_embedding_shape``."""
        init_backend()
        self.path = check_gguf_file(path)
        self._model: Any = None
        self._ctx: Any = None
        self.rpc_servers = tuple(rpc_servers)

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # kept alive on self for the whole load, as llama.cpp reads them during it
        self._devices = rpc.model_devices(self.rpc_servers)
        if self._devices is not None:
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p).value
        if tensor_split:
            slots = int(llama_cpp.llama_max_devices())
            if len(tensor_split) > slots:
                raise ModelLoadError(f"--tensor-split has {len(tensor_split)} parts; this "
                                     f"llama.cpp takes at most {slots}", param="tensor_split")
            self._split = (ctypes.c_float * slots)(*tensor_split)
            mparams.tensor_split = self._split
        if progress is not None:

            def _on_progress(fraction: float, _data: ctypes.c_void_p) -> bool:
                progress(float(fraction))
                return True

            # Keep the ctypes thunk alive for the whole load.
            self._progress_cb = llama_cpp.llama_progress_callback(_on_progress)
            mparams.progress_callback = self._progress_cb
        _recent_errors.clear()
        _loading.layers = collections.Counter()
        try:
            model = llama_cpp.llama_model_load_from_file(str(self.path).encode("utf-8"),
                                                         mparams)
        finally:
            layers, _loading.layers = _loading.layers, None
        # device name ("CPU", "CUDA0", "RPC0") -> layers it holds, in llama.cpp's order
        self.layer_devices: dict[str, int] = dict(layers)
        if not model:
            detail = _llama_error_detail()
            raise ModelLoadError(
                f"llama.cpp could not load {self.path}"
                + (f": {detail}" if detail else " (corrupt, truncated or unsupported GGUF)"),
                param="model",
            )
        self._model = model
        self.lora = LoraTable(model)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.n_layer = int(llama_cpp.llama_model_n_layer(model))
        self.n_params = int(llama_cpp.llama_model_n_params(model))
        self.size_bytes = int(llama_cpp.llama_model_size(model))
        self.n_gpu_layers = n_gpu_layers

        # Whether a prefix of a sequence's cache is a list of cells other sequences can share
        # (llama_memory_seq_cp adds a sequence id to them). Not so for recurrent and hybrid
        # models (a state, not per-position cells) nor sliding-window ones (cells expire).
        self.shares_cells = not (
            llama_cpp.llama_model_is_recurrent(model)
            or llama_cpp.llama_model_is_hybrid(model)
            or llama_cpp.llama_model_n_swa(model) > 0
        )
        ctx_size = n_ctx if n_ctx > 0 else self.n_ctx_train
        # One sequence per slot and, where cells can be shared, as many spare ones: a batch
        # line that yields its slot to a chat keeps its cells under a spare id (Scheduler
        # ``_park``) instead of reading everything again when it resumes. In the unified KV
        # cache a sequence id costs no memory; only the cells it holds do.
        n_seq_max = 2 * n_parallel if self.shares_cells else n_parallel
        if embeddings:
            ctx_size, n_batch, n_seq_max = self._embedding_shape(ctx_size)
        else:
            try:
                check_parallel(n_parallel, ctx_size)
            except InvalidRequest:
                self.close()
                raise
        threads = n_threads or os.cpu_count() or 1
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = ctx_size
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True
        cparams.embeddings = embeddings
        if pooling_type is not None:
            cparams.pooling_type = pooling_type
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        # flash_attn None = llama.cpp's "auto" (on). On the CPU, off decodes ~14% faster here, but
        # its kernels round differently by batch size, so a prompt re-read from the cache (one
        # token) or batched beside other slots gives other greedy picks than a fresh read; with
        # flash attention each row is computed the same way whatever the batch, which keeps
        # temperature-0 results reproducible (streamed = non-streamed, batched = alone).
        cparams.flash_attn_type = _FLASH_ATTN[flash_attn]
        cparams.type_k = _cache_type(cache_type_k)
        cparams.type_v = _cache_type(cache_type_v)
        if rope_scaling is not None:
            cparams.rope_scaling_type = _ROPE_SCALING[rope_scaling]
        if rope_freq_base is not None:
            cparams.rope_freq_base = rope_freq_base
        if rope_freq_scale is not None:
            cparams.rope_freq_scale = rope_freq_scale
        if cparams.n_ctx > self.n_ctx_train > 0:
            engine_log.warning(
                "%s: ctx_size %d is above the model's trained context of %d tokens; answers "
                "past %d tokens may degrade unless rope scaling is configured",
                self.path.name, cparams.n_ctx, self.n_ctx_train, self.n_ctx_train,
            )
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            detail = _llama_error_detail()
            self.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {self.path}"
                + (f": {detail}" if detail else " (not enough memory?)"),
                param="ctx_size",
            )
        self._ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.n_threads = threads
        self.flash_attn = flash_attn
        self._pieces: dict[int, bytes] = {}
        self.bos_id = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self.vocab))

    def _embedding_shape(self, ctx_size: int) -> tuple[int, int, int]:
        """(n_ctx, n_batch, n_seq_max) of an embedding context. One input must be read in one
        ubatch (llama.cpp pools per ubatch, and bidirectional attention needs the whole
        sequence), so n_batch = n_ubatch = n_ctx; positions past the trained context do not
        exist in a BERT's position table, so n_ctx stops there; as many sequences per decode
        as llama.cpp allows (llama-cpp-python's ``Llama(embedding=True)`` does the same)."""
        if self.n_ctx_train > 0:
            ctx_size = min(ctx_size, self.n_ctx_train)
        return ctx_size, ctx_size, min(ctx_size, int(llama_cpp.llama_max_parallel_sequences()))

    @property
    def model(self) -> Any:
        return self._model

    @property
    def ctx(self) -> Any:
        return self._ctx

    def close(self) -> None:
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # -- metadata ---------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        raw = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    # -- tokens ------------------------------------------------------------------------------

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        return list(buf[:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """A token's bytes; the plain (non-special) rendering is cached: it is on the hot path."""
        if not special:
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self._render_piece(token, special=False)
            return piece
        return self._render_piece(token, special=True)

    def _render_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_to_piece(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (EOS, EOT, ...): what ``ignore_eos`` bans."""
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def fim_tokens(self) -> FimTokens | None:
        """The vocabulary's FIM tokens (from the GGUF's tokenizer.ggml.fim_*_token_id, or
        recognised by llama.cpp from their text); None without PRE, SUF and MID."""
        ids = [int(get(self.vocab)) for get in (
            llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_suf,
            llama_cpp.llama_vocab_fim_mid, llama_cpp.llama_vocab_fim_rep,
            llama_cpp.llama_vocab_fim_sep,
        )]
        pre, suf, mid, rep, sep = (i if i >= 0 else None for i in ids)
        if pre is None or suf is None or mid is None:
            return None
        adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)) and self.bos_id >= 0
        return FimTokens(pre, suf, mid, rep, sep, self.bos_id if adds_bos else None)

    def is_valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab
