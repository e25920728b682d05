"""The only importer of faster_whisper: load a CTranslate2 Whisper folder, transcribe bytes.

Everything here blocks; ``host.py`` runs it on its own worker thread.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any, Literal

from llmserve.audio.formats import Segment, Transcript, Word
from llmserve.errors import InvalidRequest, MissingExtra, ModelLoadError

EXTRA = "pip install 'llmserve[audio]'"


def _faster_whisper() -> Any:
    try:
        import faster_whisper
    except ImportError:
        raise MissingExtra(f"speech to text needs the audio extra: {EXTRA}") from None
    return faster_whisper


def check_extra() -> None:
    """Raise MissingExtra (400, naming the extra) when faster-whisper, or python-multipart
    that reads the upload, is not installed."""
    _faster_whisper()
    if importlib.util.find_spec("python_multipart") is None:
        raise MissingExtra(f"speech to text needs the audio extra: {EXTRA}")


class WhisperModel:
    def __init__(self, folder: Path, threads: int | None = None) -> None:
        fw = _faster_whisper()
        if not (folder / "model.bin").is_file():
            raise ModelLoadError(f"{folder} is not a CTranslate2 Whisper model folder (no "
                                 "model.bin)", param="model")
        try:
            self._model = fw.WhisperModel(str(folder), device="auto", compute_type="default",
                                          cpu_threads=threads or os.cpu_count() or 1)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"could not load the Whisper model in {folder}: {exc}",
                                 param="model") from None

    def transcribe(
        self, audio: bytes, *, task: Literal["transcribe", "translate"],
        language: str | None, prompt: str | None, temperature: float | None, words: bool,
    ) -> Transcript:
        fw = _faster_whisper()
        try:
            samples = fw.decode_audio(io.BytesIO(audio))
        except Exception as exc:  # PyAV's errors for data it cannot read take many forms
            raise InvalidRequest(f"could not decode the audio file: {exc}",
                                 param="file") from None
        if not len(samples):
            raise InvalidRequest("the audio file holds no sound", param="file")
        options: dict[str, Any] = {}
        if temperature is not None:
            options["temperature"] = temperature
        try:
            segments, info = self._model.transcribe(
                samples, task=task, language=language,
                initial_prompt=prompt, word_timestamps=words, **options)
            segments = list(segments)  # a generator: the work happens here
        except ValueError as exc:  # an unknown language code
            raise InvalidRequest(str(exc), param="language") from None
        return Transcript(
            task=task, language=info.language, duration=float(info.duration),
            word_timestamps=words,
            segments=tuple(
                Segment(
                    id=s.id, start=float(s.start), end=float(s.end), text=s.text,
                    tokens=tuple(s.tokens), temperature=float(s.temperature or 0.0),
                    avg_logprob=float(s.avg_logprob),
                    compression_ratio=float(s.compression_ratio),
                    no_speech_prob=float(s.no_speech_prob),
                    words=tuple(Word(w.word, float(w.start), float(w.end))
                                for w in (s.words or ())),
                )
                for s in segments
            ),
        )
