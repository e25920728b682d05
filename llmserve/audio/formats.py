"""A transcript and its renderings in OpenAI's ``response_format``s. Pure code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = ("json", "text", "srt", "vtt", "verbose_json")


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    segments: tuple[Segment, ...] = ()
    # whether the request asked for word timestamps (verbose_json then lists ``words``)
    word_timestamps: bool = False
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", "".join(s.text for s in self.segments).strip())


def timestamp(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SRT, ``decimal=","``) or ``HH:MM:SS.mmm`` (WebVTT)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _srt(t: Transcript) -> str:
    return "".join(
        f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(t.segments, start=1)
    )


def _vtt(t: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n\n"
        for s in t.segments
    )


def verbose(t: Transcript) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": t.task,
        "language": t.language,
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [{
            "id": s.id, "seek": 0, "start": round(s.start, 3), "end": round(s.end, 3),
            "text": s.text, "tokens": list(s.tokens), "temperature": s.temperature,
            "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob,
        } for s in t.segments],
    }
    if t.word_timestamps:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3),
                          "end": round(w.end, 3)} for s in t.segments for w in s.words]
    return body


# The formats answered as text/plain (as OpenAI does); json and verbose_json are JSON.
TEXT_FORMATS: dict[ResponseFormat, Callable[[Transcript], str]] = {
    "text": lambda t: t.text + "\n",
    "srt": _srt,
    "vtt": _vtt,
}
