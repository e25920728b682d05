"""Speech to text (OpenAI's /v1/audio/transcriptions and /v1/audio/translations) on Whisper
models run by faster-whisper (CTranslate2), an optional extra: ``pip install 'llmserve[audio]'``.

llama.cpp does not run Whisper. ``whisper.py`` is the only module that imports faster_whisper,
and only when a request needs it, so the server starts and serves everything else without the
extra; ``host.py`` (which model, the bounded queue) and ``formats.py`` (json, text, srt, vtt,
verbose_json) import nothing optional.
"""
