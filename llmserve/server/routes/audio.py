"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's multipart upload
(``file``, ``model``, ``language``, ``prompt``, ``temperature``, ``response_format``,
``timestamp_granularities[]``) → a transcript on a Whisper model (llmserve/audio/).

Without the audio extra the routes answer 400 missing_extra naming it; a body over
--max-body-size is refused with 413 by the Guard middleware before it is read.
"""

from __future__ import annotations

from typing import Literal

import anyio.to_thread
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llmserve.audio.formats import TEXT_FORMATS, Transcript, verbose
from llmserve.errors import InvalidRequest, UnsupportedMediaType
from llmserve.protocol.audio import TranscriptionForm
from llmserve.server.requests import validate
from llmserve.server.state import AppState

# the most form fields a request may carry (OpenAI's are 7, granularities repeat)
MAX_FIELDS = 32


async def _speech(request: Request, task: Literal["transcribe", "translate"]) -> Response:
    from llmserve.audio.whisper import check_extra

    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType("expected a multipart/form-data upload with the audio in "
                                   f"'file', got {content_type or 'no Content-Type'!r}")
    await anyio.to_thread.run_sync(check_extra)  # the first import of faster_whisper is slow
    async with request.form(max_files=1, max_fields=MAX_FIELDS) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the audio file is missing: send it as the 'file' part",
                                 param="file")
        audio = await upload.read()
        fields: dict[str, object] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        granularities = [*form.getlist("timestamp_granularities[]"),
                         *form.getlist("timestamp_granularities")]
    if granularities:
        fields["timestamp_granularities"] = granularities
    req = validate(TranscriptionForm, fields)
    if not audio:
        raise InvalidRequest("the audio file is empty", param="file")
    speech = AppState.of(request).speech
    transcript: Transcript = await speech.transcribe(
        speech.resolve(req.model),
        lambda model: model.transcribe(
            audio, task=task, language=req.language, prompt=req.prompt,
            temperature=req.temperature, words="word" in req.timestamp_granularities))
    if req.response_format == "json":
        return JSONResponse({"text": transcript.text})
    if req.response_format == "verbose_json":
        return JSONResponse(verbose(transcript))
    return PlainTextResponse(TEXT_FORMATS[req.response_format](transcript))


async def transcriptions(request: Request) -> Response:
    return await _speech(request, "transcribe")


async def translations(request: Request) -> Response:
    return await _speech(request, "translate")


routes = [
    Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
    Route("/v1/audio/translations", translations, methods=["POST"]),
]
