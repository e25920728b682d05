"""The HTTP calls of `llmserve batch submit|status|results`: upload a JSONL file, create a
batch, poll it, fetch its output. Against ``--url`` / ``LLMSERVE_URL`` with ``--api-key`` /
``LLMSERVE_API_KEY`` (its first key). A failure raises BatchClientError with one line to print.

(Written beside the shared ``client.py`` another change introduces; the two are to be merged.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llmserve.defaults import DEFAULT_PORT

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
FINAL = ("completed", "failed", "cancelled", "expired")
DEFAULT_ENDPOINT = "/v1/chat/completions"


class BatchClientError(Exception):
    """One line for the user; the command exits with status 1."""


def base_url(url: str | None) -> str:
    return (url or os.environ.get("LLMSERVE_URL") or DEFAULT_URL).rstrip("/").removesuffix("/v1")


def first_key(api_key: str | None) -> str | None:
    keys = (api_key if api_key is not None else os.environ.get("LLMSERVE_API_KEY", "")).split()
    return keys[0] if keys else None


def endpoint_of(path: Path) -> str:
    """The ``url`` of the file's first request line (what --endpoint defaults to)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    return DEFAULT_ENDPOINT  # the server names the bad line
                return url if isinstance(url, str) else DEFAULT_ENDPOINT
    return DEFAULT_ENDPOINT


@dataclass
class BatchClient:
    http: httpx.Client

    @classmethod
    def connect(cls, url: str | None, api_key: str | None, timeout: float = 60.0
                ) -> BatchClient:
        key = first_key(api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return cls(httpx.Client(base_url=base_url(url), headers=headers, timeout=timeout))

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BatchClientError(f"cannot reach {self.http.base_url}: {exc}. Start a server "
                                   "with `llmserve run` or set --url / LLMSERVE_URL.") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text.strip() or r.reason_phrase
            raise BatchClientError(f"{method} {path}: {r.status_code}: {message}")
        return r

    def submit(self, path: Path, endpoint: str) -> dict[str, Any]:
        """Upload ``path`` (streamed from disk) and create a batch of it."""
        with open(path, "rb") as f:
            upload = self._call("POST", "/v1/files", data={"purpose": "batch"},
                                files={"file": (path.name, f, "application/jsonl")}).json()
        batch: dict[str, Any] = self._call("POST", "/v1/batches", json={
            "input_file_id": upload["id"], "endpoint": endpoint,
            "completion_window": "24h"}).json()
        return batch

    def batch(self, batch_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("GET", f"/v1/batches/{batch_id}").json()
        return found

    def results(self, batch: dict[str, Any]) -> Iterator[str]:
        """The output file's lines, then the error file's (each a JSON line)."""
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                with self.http.stream("GET", f"/v1/files/{batch[key]}/content") as r:
                    if r.status_code >= 400:
                        raise BatchClientError(f"GET the {key}: {r.status_code}")
                    yield from (line for line in r.iter_lines() if line.strip())
