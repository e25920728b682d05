"""The HTTP client every client command shares (ask, chat, ps, unload, ...): where the server is
(``--url`` / ``LLMSERVE_URL``), its key (``--api-key`` / ``LLMSERVE_API_KEY``), JSON requests,
server-sent events, and the one mapping of failures onto ``errors.ClientError`` (whose
``exit_code`` ends the command).

Built on ``http.client``, not httpx: a shell loop runs ``llmserve ask`` hundreds of times, and
importing httpx (plus anyio, h11, certifi) costs more than the whole request to a warm server.
Nothing here imports the server, pydantic or llama_cpp; ``local.py`` plugs the in-process
server in through the same ``Transport`` interface.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmserve.errors import ClientError, ModelUnavailable, ServerError, ServerUnreachable

DEFAULT_URL = "http://127.0.0.1:8080"
CONNECT_TIMEOUT = 5.0
# The longest silence between two body bytes: a long prompt is read before the first token.
READ_TIMEOUT = 600.0
START_HINT = ("Start one with `llmserve run [MODEL.gguf]`, point --url / LLMSERVE_URL at yours, "
              "or answer in-process with `--local --model MODEL.gguf`.")
# Server error codes that mean "this model cannot be had" rather than "the request failed".
_MODEL_CODES = frozenset({"model_not_found", "model_load_failed"})


class RawResponse(Protocol):
    status: int

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives."""
        ...

    def close(self) -> None:
        """Stop reading; a generation behind the body is cancelled by the server."""
        ...


# A request body: bytes, or pieces sent one after another (a file streamed from disk).
Body = bytes | Iterable[bytes]


class Transport(Protocol):
    """How requests reach a server: over HTTP (``HttpTransport``) or in-process
    (``local.LocalTransport``)."""

    description: str

    def open(self, method: str, path: str, body: Body | None,
             headers: Mapping[str, str]) -> RawResponse:
        """Send a request and return once the status is known; raise ServerUnreachable."""
        ...

    def close(self) -> None: ...


class _HttpResponse:
    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._resp = resp
        self.status = resp.status

    def chunks(self) -> Iterator[bytes]:
        try:
            while chunk := self._resp.read1(65536):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"the connection to the server broke: {exc}") from None

    def close(self) -> None:
        self._conn.close()


class HttpTransport:
    """One connection per request: the server is local, connecting costs well under a
    millisecond, and a closed connection is how a stream is cancelled."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"--url: expected http://HOST:PORT, got {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        # The API root: "http://host:8080/v1" and "http://host:8080" name the same server.
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.description = f"{parts.scheme}://{parts.netloc}"

    def open(self, method: str, path: str, body: Body | None,
             headers: Mapping[str, str]) -> RawResponse:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ServerUnreachable(
                f"no server answers at {self.description} ({reason}). {START_HINT}") from None
        assert conn.sock is not None
        conn.sock.settimeout(READ_TIMEOUT)
        try:
            conn.request(method, self._prefix + path, body=body, headers=dict(headers))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ServerUnreachable(
                f"the server at {self.description} did not answer: {exc}") from None
        except BaseException:  # Ctrl-C before the answer began: the server cancels it
            conn.close()
            raise
        return _HttpResponse(conn, resp)

    def close(self) -> None:
        pass


@dataclass
class Client:
    transport: Transport
    api_key: str | None = None

    @classmethod
    def connect(cls, url: str | None = None, api_key: str | None = None) -> Client:
        """A client for ``url`` (else ``LLMSERVE_URL``, else DEFAULT_URL) with ``api_key``
        (else ``LLMSERVE_API_KEY``'s first key; the server accepts several, space-separated)."""
        keys = (api_key if api_key is not None else os.environ.get("LLMSERVE_API_KEY", "")).split()
        return cls(HttpTransport(url or os.environ.get("LLMSERVE_URL") or DEFAULT_URL),
                   keys[0] if keys else None)

    def _open(self, method: str, path: str, body: object | None) -> RawResponse:
        if body is None:
            return self._send(method, path, None, {})
        try:
            data = json.dumps(body, allow_nan=False).encode()
        except ValueError:
            raise ClientError("a request value is not a finite number (nan or inf)") from None
        return self._send(method, path, data, {"Content-Type": "application/json"})

    def _send(self, method: str, path: str, data: Body | None,
              headers: Mapping[str, str]) -> RawResponse:
        headers = {"Accept": "application/json, text/event-stream", **headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        resp = self.transport.open(method, path, data, headers)
        if resp.status >= 400:
            try:
                raw = b"".join(resp.chunks())
            finally:
                resp.close()
            raise _error(resp.status, raw)
        return resp

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """One JSON request; the decoded JSON answer."""
        return _json(self._open(method, path, body), method, path)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: object | None = None) -> Any:
        return self.request("POST", path, body)

    def stream(self, path: str, body: object) -> EventStream:
        """POST ``body`` and read the answer's server-sent events. Use as a context manager:
        leaving it early (Ctrl-C, ``break``) closes the connection, and the server stops the
        generation and frees its slot."""
        return EventStream(self._open("POST", path, body))

    def upload(self, path: str, file: Path, fields: Mapping[str, str]) -> Any:
        """POST ``file`` (streamed from disk) and ``fields`` as multipart/form-data, as
        ``/v1/files`` takes them; the decoded JSON answer."""
        boundary = f"llmserve-{uuid.uuid4().hex}"
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode() for name, value in fields.items())
        filename = file.name.replace('"', "%22")
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: application/jsonl\r\n\r\n'
                 ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        try:
            size = file.stat().st_size
            f = open(file, "rb")  # noqa: SIM115 (closed below, after the body was sent)
        except OSError as exc:
            raise ClientError(f"cannot read {file}: {exc.strerror or exc}") from None
        with f:
            resp = self._send("POST", path, _pieces(head, f, tail), {
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + size + len(tail))})
        return _json(resp, "POST", path)

    def lines(self, path: str) -> Iterator[bytes]:
        """GET ``path`` and yield its body's non-empty lines as they arrive."""
        resp = self._send("GET", path, None, {})
        try:
            buffer = b""
            for chunk in resp.chunks():
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                yield from (line for line in done if line.strip())
            if buffer.strip():
                yield buffer
        finally:
            resp.close()

    def close(self) -> None:
        self.transport.close()


def _pieces(head: bytes, f: Any, tail: bytes) -> Iterator[bytes]:
    yield head
    yield from iter(lambda: f.read(1 << 16), b"")
    yield tail


class EventStream:
    """The ``data:`` payloads of an SSE body, decoded, up to ``[DONE]``. An error event
    (``{"error": {...}}``) raises ServerError."""

    def __init__(self, resp: RawResponse) -> None:
        self._resp = resp

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._resp.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buffer = b""
        data: list[bytes] = []
        for chunk in self._resp.chunks():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:
                    payload = b"\n".join(data)
                    data = []
                    if payload.strip() == b"[DONE]":
                        return
                    yield _event(payload)
        if data and b"\n".join(data).strip() != b"[DONE]":
            yield _event(b"\n".join(data))


def _json(resp: RawResponse, method: str, path: str) -> Any:
    try:
        raw = b"".join(resp.chunks())
    finally:
        resp.close()
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        raise ServerError(f"the server answered {method} {path} with something that is not "
                          f"JSON: {raw[:200]!r}") from None


def _event(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise ServerError(f"the server sent an event that is not JSON: {payload[:200]!r}") from None
    if not isinstance(event, dict):
        raise ServerError(f"the server sent an event that is not an object: {payload[:200]!r}")
    if "error" in event:
        raise _error(0, payload)
    return event


def _error(status: int, raw: bytes) -> ClientError:
    """The server's error body (OpenAI's envelope, or ``{"detail": ...}``) as a ClientError."""
    message, code = raw.decode(errors="replace").strip()[:500], None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or message)
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error
    if code in _MODEL_CODES:
        return ModelUnavailable(message)
    prefix = f"the server answered {status}" + (f" {code}" if code else "")
    if status == 0:
        prefix = "the server stopped the answer" + (f" ({code})" if code else "")
    return ServerError(f"{prefix}: {message}", http_status=status, error_code=code)


__all__ = ["DEFAULT_URL", "Body", "Client", "EventStream", "HttpTransport", "RawResponse",
           "Transport"]
