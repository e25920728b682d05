"""LoRA adapters over a loaded base model: proving, loading, the scale sets slots run with.

An adapter set applies to a whole llama.cpp context (``llama_set_adapters_lora``), so the
scheduler batches together only slots that run with the same set and switches sets between
decode steps (see scheduler.py). A set is an ``AdapterSet``: (adapter id, scale) pairs, sorted,
zero scales left out, so "no adapter" and "every adapter at scale 0" are the same set and share
cached prompt cells.

Proof before use: llama-cpp-python 0.3.36 loads some adapters fine and then segfaults on the
first decode (checked: adapters with I8 or I32 tensors, exit 139 on the CPU; DESIGN.md records
one with F32 tensors, which do work in our build). A segfault cannot be caught in-process, so
every adapter first runs in a throwaway child process (``lora_probe``): the base model and the
adapter loaded, one decode at scale 1. Only when that child exits cleanly does the
adapter join a serving context; a child that dies by a signal or reports an error becomes a 400
``ModelLoadError`` and the serving process never touched the file.

Thread-safety: ``LoraTable`` is read by the event loop (listing, validating a request's ids) and
the worker thread; its lock guards the table. Handles are created, set on the context and freed
only on the worker thread (``Scheduler.call``), so no decode ever runs beside a change.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from llmserve.engine.types import AdapterSet, LoraAdapter
from llmserve.errors import InvalidRequest, ModelLoadError

# Loading the base model a second time dominates; SmolLM2-135M takes ~1 s, a 7B model on a
# slow disk much longer.
PROBE_TIMEOUT_S = 300.0


def prove_adapter(base: Path, adapter: Path, *, n_gpu_layers: int) -> None:
    """Load ``base`` and ``adapter`` in a child process and decode once with the adapter at
    scale 1. Returns when that worked; raises ModelLoadError (400) otherwise, whatever the
    child died of (an error llama.cpp reported, a signal, a timeout)."""
    if not adapter.is_file():
        raise ModelLoadError(f"LoRA adapter not found: {adapter}", param="lora")
    command = [sys.executable, "-m", "llmserve.engine.lora_probe", str(base), str(adapter),
               str(n_gpu_layers)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT_S, check=False, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"LoRA adapter {adapter}: the test decode did not finish within "
                             f"{PROBE_TIMEOUT_S:.0f} s", param="lora") from None
    if done.returncode == 0:
        return
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise ModelLoadError(
            f"LoRA adapter {adapter} crashed llama.cpp ({name}) in a test decode, so it was not "
            "loaded (llama.cpp loads adapters with integer tensors and then crashes on them; "
            "F16 adapters work)", param="lora")
    # the child's last line is its one-line reason (see lora_probe)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit code {done.returncode}"
    raise ModelLoadError(f"LoRA adapter {adapter}: {reason}", param="lora")


@dataclass
class _Entry:
    handle: Any
    path: str
    scale: float


class LoraTable:
    """The adapters loaded on one model, by id (ids count up and are never reused, so a cached
    prompt computed with an unloaded adapter never matches a later one)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        # unloaded but possibly still set on the context or in use by a slot (worker frees)
        self._retired: dict[int, Any] = {}
        self._next_id = 0
        self._applied: AdapterSet = ()

    # -- any thread ---------------------------------------------------------------------------

    def adapters(self) -> list[LoraAdapter]:
        with self._lock:
            return [LoraAdapter(i, e.path, e.scale) for i, e in self._entries.items()]

    def global_set(self) -> AdapterSet:
        with self._lock:
            return adapter_set((i, e.scale) for i, e in self._entries.items())

    def request_set(self, scales: Iterable[tuple[int, float]]) -> AdapterSet:
        """A request's ``lora`` list as a set: listed ids at their scale, the others at 0
        (llama-server's rule). Raises InvalidRequest for an id that is not loaded."""
        pairs = list(scales)
        with self._lock:
            self._check_ids(i for i, _ in pairs)
        return adapter_set(pairs)

    def set_scales(self, scales: Mapping[int, float]) -> None:
        """POST /lora-adapters: the listed adapters get their scale, the others 0."""
        with self._lock:
            self._check_ids(scales)
            for i, entry in self._entries.items():
                entry.scale = float(scales.get(i, 0.0))

    def _check_ids(self, ids: Iterable[int]) -> None:
        for i in ids:
            if i not in self._entries:
                known = ", ".join(str(k) for k in self._entries) or "none"
                raise InvalidRequest(f"no LoRA adapter with id {i} is loaded (loaded: {known})",
                                     param="lora")

    # -- the worker thread (or before it starts) -----------------------------------------------

    def load(self, path: Path, scale: float) -> LoraAdapter:
        """Load an adapter that ``prove_adapter`` has proven (llama.cpp checks the base's
        architecture and the tensor shapes itself and fails cleanly)."""
        handle = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode("utf-8"))
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load LoRA adapter {path} (another "
                                 "base model's adapter, or not a LoRA GGUF)", param="lora")
        with self._lock:
            adapter_id = self._next_id
            self._next_id += 1
            self._entries[adapter_id] = _Entry(handle, str(path.resolve()), scale)
        return LoraAdapter(adapter_id, str(path.resolve()), scale)

    def unload(self, adapter_id: int) -> None:
        """Take the adapter out of the table; its handle is freed by ``free_unused`` once no
        slot runs with it."""
        with self._lock:
            self._check_ids([adapter_id])
            self._retired[adapter_id] = self._entries.pop(adapter_id).handle

    def retired(self) -> set[int]:
        with self._lock:
            return set(self._retired)

    def free_unused(self, in_use: set[int], ctx: Any) -> None:
        with self._lock:
            free = [i for i in self._retired if i not in in_use]
        if not free:
            return
        if any(i in free for i, _ in self._applied):
            self.apply(ctx, ())
        for i in free:
            with self._lock:
                handle = self._retired.pop(i)
            llama_cpp.llama_adapter_lora_free(handle)

    def apply(self, ctx: Any, adapters: AdapterSet) -> None:
        """Make ``adapters`` the context's set (llama.cpp ignores an unchanged one)."""
        if adapters == self._applied:
            return
        with self._lock:
            # an unloaded adapter stays usable by the generations that started with it
            handles = [self._entries[i].handle if i in self._entries else self._retired[i]
                       for i, _ in adapters]
        array = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        scales = (ctypes.c_float * len(adapters))(*(s for _, s in adapters))
        rc = llama_cpp.llama_set_adapters_lora(ctx, array, len(adapters), scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed (code {rc})")
        self._applied = adapters


def adapter_set(pairs: Iterable[tuple[int, float]]) -> AdapterSet:
    return tuple(sorted((i, float(s)) for i, s in pairs if s != 0.0))
