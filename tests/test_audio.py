"""Tiers 1-2: speech to text without running Whisper — the response formats, which model a
request gets, and the refusals that come before any transcription: no extra installed (400
naming it), not multipart (415), a body over the limit (413), no file, bad fields."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.audio import host as audio_host
from llmserve.audio.formats import TEXT_FORMATS, Segment, Transcript, Word, timestamp, verbose
from llmserve.audio.host import SpeechHost
from llmserve.config import Settings, WhisperSpec, resolve_settings
from llmserve.errors import ModelNotFound
from llmserve.server.options import ServerOptions
from tests.fakes import FakeEngine

WAV = Path(__file__).parent / "data" / "hello_testing.wav"

TRANSCRIPT = Transcript(
    task="transcribe", language="en", duration=3725.5, word_timestamps=True,
    segments=(
        Segment(0, 0.0, 1.25, " Hello world.", words=(Word(" Hello", 0.0, 0.5),
                                                       Word(" world.", 0.5, 1.25))),
        Segment(1, 3723.0, 3725.5, " Testing one two three."),
    ),
)


@pytest.mark.parametrize("seconds, srt, vtt", [
    (0.0, "00:00:00,000", "00:00:00.000"),
    (1.2345, "00:00:01,234", "00:00:01.234"),  # round half to even on the millisecond
    (3725.5, "01:02:05,500", "01:02:05.500"),
    (-0.01, "00:00:00,000", "00:00:00.000"),
])
def test_timestamps(seconds: float, srt: str, vtt: str) -> None:
    assert timestamp(seconds, ",") == srt
    assert timestamp(seconds, ".") == vtt


def test_text_formats() -> None:
    assert TRANSCRIPT.text == "Hello world. Testing one two three."
    assert TEXT_FORMATS["text"](TRANSCRIPT) == "Hello world. Testing one two three.\n"
    assert TEXT_FORMATS["srt"](TRANSCRIPT) == (
        "1\n00:00:00,000 --> 00:00:01,250\nHello world.\n\n"
        "2\n01:02:03,000 --> 01:02:05,500\nTesting one two three.\n\n")
    assert TEXT_FORMATS["vtt"](TRANSCRIPT) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello world.\n\n"
        "01:02:03.000 --> 01:02:05.500\nTesting one two three.\n\n")


def test_verbose_json_lists_words_only_when_asked() -> None:
    body = verbose(TRANSCRIPT)
    assert body["text"] == TRANSCRIPT.text and body["duration"] == 3725.5
    assert [s["id"] for s in body["segments"]] == [0, 1]
    assert body["words"] == [{"word": "Hello", "start": 0.0, "end": 0.5},
                             {"word": "world.", "start": 0.5, "end": 1.25}]
    plain = Transcript(task="translate", language="en", duration=1.0,
                       segments=TRANSCRIPT.segments)
    assert "words" not in verbose(plain)


def test_which_model_a_request_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    one = SpeechHost([WhisperSpec("small", Path("/m/small"))], max_queue=1)
    assert one.resolve("whisper-1").id == "small"  # one model: any name
    two = SpeechHost([WhisperSpec("a", Path("/a")), WhisperSpec("b", Path("/b"))], max_queue=1)
    assert two.resolve("b").id == "b"
    with pytest.raises(ModelNotFound, match="known: a, b"):
        two.resolve("whisper-1")
    monkeypatch.setattr(audio_host, "default_whisper_model", lambda: None)
    with pytest.raises(ModelNotFound, match="--whisper-model"):
        SpeechHost([], max_queue=1).resolve("whisper-1")


def test_the_test_model_is_the_default_when_installed() -> None:
    default = audio_host.default_whisper_model()
    assert default is not None and (default.path / "model.bin").is_file()
    assert SpeechHost([], max_queue=1).resolve("whisper-1") == default


def test_whisper_models_from_the_flag_and_the_config(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.chat]\npath = "chat.gguf"\n'
                    '[models.ears]\nkind = "whisper"\npath = "whisper-small"\n')
    values = {**Settings().model_dump(exclude={"models", "sampling", "whisper_models"}),
              "config": path, "whisper_model": tmp_path / "tiny"}
    settings = resolve_settings(values, {"whisper_model"})
    assert [m.id for m in settings.models] == ["chat"]
    assert settings.whisper_models == [
        WhisperSpec("tiny", (tmp_path / "tiny").resolve()),
        WhisperSpec("ears", (tmp_path / "whisper-small").resolve()),
    ]


@pytest.fixture
def audio_client(make_app: Callable[..., Starlette], engine: FakeEngine) -> Iterator[TestClient]:
    app = make_app(engine, options=ServerOptions(max_body_size=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _upload(client: TestClient, data: bytes = b"", path: str = "/v1/audio/transcriptions",
            **fields: str) -> object:
    return client.post(path, files={"file": ("a.wav", data or WAV.read_bytes(), "audio/wav")},
                       data=fields)


def test_without_the_extra_the_routes_name_it(audio_client: TestClient,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # as if not installed
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        r = _upload(audio_client, path=path, model="whisper-1")
        assert r.status_code == 400, r.text  # type: ignore[attr-defined]
        error = r.json()["error"]  # type: ignore[attr-defined]
        assert error["code"] == "missing_extra"
        assert "pip install 'llmserve[audio]'" in error["message"]


def test_refusals_before_transcribing(audio_client: TestClient) -> None:
    r = audio_client.post("/v1/audio/transcriptions", json={"file": "x"})
    assert r.status_code == 415
    big = audio_client.post("/v1/audio/transcriptions",
                            files={"file": ("a.wav", b"\0" * 100_000, "audio/wav")})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    r = audio_client.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                          files={"other": ("a.txt", b"x", "text/plain")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    for field, value in (("response_format", "mp3"), ("temperature", "hot"),
                         ("timestamp_granularities[]", "sentence")):
        r = _upload(audio_client, **{field: value})  # type: ignore[arg-type]
        assert r.status_code == 400, (field, r.text)  # type: ignore[attr-defined]
        assert r.json()["error"]["param"].startswith(field.rstrip("[]"))  # type: ignore[attr-defined]
