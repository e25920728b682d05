"""A minimal streaming client for the single-stream benchmark: one keep-alive socket, HTTP/1.1,
chunked transfer and server-sent events decoded by hand.

On a 2-core machine the client shares the CPU with the server under test. httpx's async
streaming costs ~170 µs of CPU per token here, which llama.cpp's threads lose and which the
in-process contender never pays; this reader costs a fraction of that, so the benchmark measures
the server rather than the client. Both HTTP contenders (llmserve, llama-server) use it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from llmserve.loadgen import RequestResult

# uvicorn and llama-server close a keep-alive connection after 5 s idle
IDLE_REOPEN_S = 3.0


class ProtocolError(Exception):
    pass


class RawSSEClient:
    def __init__(self, base_url: str, timeout: float = 120.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._last_used = 0.0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._buf = b""
            self._last_used = 0.0
        return self._sock

    def _recv(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise ProtocolError("connection closed")
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            self._buf += self._recv()
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += self._recv()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _body(self, headers: dict[str, str]) -> Iterator[tuple[bytes, float]]:
        """The response body in pieces as they arrive, each with its arrival time."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")  # trailers end
                    return
                data = self._read_exact(size)
                now = time.perf_counter()
                self._read_exact(2)
                yield data, now
        elif "content-length" in headers:
            yield self._read_exact(int(headers["content-length"])), time.perf_counter()
        else:  # until the server closes
            data = self._buf
            self._buf = b""
            while True:
                if data:
                    yield data, time.perf_counter()
                try:
                    data = self._recv()
                except ProtocolError:
                    self.close()
                    return

    def stream(self, path: str, body: Mapping[str, Any]) -> RequestResult:
        payload = json.dumps(body).encode()
        result = RequestResult(index=0, requested=int(body.get("max_tokens", 0)),
                               started=time.perf_counter())
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        try:
            head = self._send(request, result)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            result.status = int(status_line.split()[1])
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            events = b""
            for data, now in self._body(headers):
                if result.status != 200:
                    continue
                events += data
                while b"\n\n" in events:
                    event, _, events = events.partition(b"\n\n")
                    self._event(event, now, result)
            if result.status != 200:
                result.error = str(result.status)
            if headers.get("connection", "").lower() == "close":
                self.close()
        except (OSError, ProtocolError, ValueError) as exc:
            self.close()
            result.error = result.error or type(exc).__name__
        result.finished = time.perf_counter()
        self._last_used = time.monotonic()
        return result

    def _send(self, request: bytes, result: RequestResult) -> bytes:
        """Send ``request``; return the response head. An idle keep-alive connection the server
        has since closed (llama-server and uvicorn close them after 5 s) is reopened once."""
        if self._sock is not None and time.monotonic() - self._last_used > IDLE_REOPEN_S:
            self.close()  # reopen before the clock starts rather than meet a closed one
        sock = self._connect()
        reused = self._last_used > 0
        try:
            result.started = time.perf_counter()
            sock.sendall(request)
            return self._read_until(b"\r\n\r\n")
        except (OSError, ProtocolError):
            if not reused:
                raise
            self.close()
            sock = self._connect()
            result.started = time.perf_counter()
            sock.sendall(request)
            return self._read_until(b"\r\n\r\n")

    @staticmethod
    def _event(event: bytes, now: float, result: RequestResult) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = "stream_error"
                return
            choices = chunk.get("choices") or []
            text = choices[0].get("text") if choices else None
            if text is None and choices:
                text = (choices[0].get("delta") or {}).get("content")
            if text:
                result.tokens += 1
                if result.first_token is None:
                    result.first_token = now
                result.last_token = now
