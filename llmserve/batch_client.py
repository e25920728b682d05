"""What `llmserve batch submit|status|results` ask the server, over the shared client
(``llmserve.client``: --url / LLMSERVE_URL, --api-key / LLMSERVE_API_KEY, its exit codes): upload
a JSONL file, create a batch of it, read a batch, stream its output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve.client import Client

FINAL = ("completed", "failed", "cancelled", "expired")
DEFAULT_ENDPOINT = "/v1/chat/completions"


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


def submit(client: Client, path: Path, endpoint: str) -> dict[str, Any]:
    """Upload ``path`` (streamed from disk) and create a batch of it."""
    upload = client.upload("/v1/files", path, {"purpose": "batch"})
    batch: dict[str, Any] = client.post("/v1/batches", {
        "input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h"})
    return batch


def results(client: Client, batch: dict[str, Any]) -> Iterator[str]:
    """The output file's lines, then the error file's (each a JSON line)."""
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            for line in client.lines(f"/v1/files/{batch[key]}/content"):
                yield line.decode()
