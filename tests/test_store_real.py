"""Tier 3: the Responses API, Files and Batches on SmolLM2-135M behind a real `llmserve run`,
driven by the official openai SDK and the `llmserve batch` commands; restarts with SIGTERM and
SIGKILL on the same data dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.polling import wait_until

pytestmark = pytest.mark.real

Start = Callable[..., ServerProcess]


@pytest.fixture
def start(demo_model: Path, tmp_path: Path) -> Iterator[Start]:
    """`llmserve run` on the demo model with its data in ``tmp_path/data`` (restartable)."""
    servers: list[ServerProcess] = []

    def start_(*args: str) -> ServerProcess:
        server = ServerProcess([str(demo_model), "--ctx-size", "2048", "--parallel", "2",
                                "--data-dir", str(tmp_path / "data"), *args])
        servers.append(server)
        return server

    yield start_
    for server in servers:
        server.stop()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def kill(server: ServerProcess, sig: signal.Signals) -> None:
    server.proc.send_signal(sig)
    server.proc.wait(timeout=60)
    server.stop()


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmserve", "batch", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LLMSERVE_URL": server.url})


def batch_file(path: Path, n: int, max_tokens: int = 3) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": {
                                    "messages": [{"role": "user", "content": f"Count to {i}."}],
                                    "max_tokens": max_tokens, "temperature": 0}}) + "\n")
    return path


@pytest.mark.timeout(600)
def test_responses_plain_stream_previous_and_schema(start: Start) -> None:
    client = sdk(start())
    first = client.responses.create(
        model="x", instructions="You are a helpful assistant. Answer briefly.",
        input="My name is Ada. Remember it.", temperature=0, max_output_tokens=12)
    assert first.status in ("completed", "incomplete") and first.output_text
    with client.responses.stream(model="x", input="Say hello.", temperature=0,
                                 max_output_tokens=8) as stream:
        events = list(stream)
    plain = client.responses.create(model="x", input="Say hello.", temperature=0,
                                    max_output_tokens=8)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    # the last event carries the final response (.completed, or .incomplete at the limit; the
    # SDK's get_final_response accepts only the former)
    final = events[-1].response  # type: ignore[union-attr]
    assert kinds[-1] == f"response.{plain.status}"
    assert final.output_text == plain.output_text
    assert final.usage is not None and plain.usage is not None
    assert final.usage.output_tokens == plain.usage.output_tokens

    second = client.responses.create(model="x", previous_response_id=first.id,
                                     input="What is my name?", temperature=0,
                                     max_output_tokens=12)
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]
    # in context: the same answer as a chat that sends the conversation itself (instructions
    # are not carried to the next turn)
    explicit = client.chat.completions.create(model="x", temperature=0, max_tokens=12, messages=[
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.output_text == explicit.choices[0].message.content
    items = list(client.responses.input_items.list(second.id))
    assert [i.content[0].text for i in items] == ["What is my name?"]  # type: ignore[union-attr]

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    r = client.responses.create(model="x", input="What is 2 + 2?", temperature=0,
                                max_output_tokens=24, text={"format": {
                                    "type": "json_schema", "name": "sum", "schema": schema,
                                    "strict": True}})
    assert isinstance(json.loads(r.output_text)["answer"], int)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stored_responses_survive_a_restart(start: Start, sig: signal.Signals) -> None:
    server = start()
    stored = sdk(server).responses.create(model="x", input="Hi", temperature=0,
                                          max_output_tokens=8)
    kill(server, sig)
    again = sdk(start()).responses.retrieve(stored.id)
    assert again.output_text == stored.output_text
    assert again.model_dump() == stored.model_dump()


def test_no_store_writes_no_data_dir(demo_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "nothing"
    server = ServerProcess([str(demo_model), "--ctx-size", "1024", "--data-dir", str(data),
                            "--no-store"])
    try:
        client = sdk(server)
        r = client.responses.create(model="x", input="Hi", max_output_tokens=4)
        with pytest.raises(openai.BadRequestError):
            client.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    finally:
        server.stop()
    assert not data.exists()


@pytest.mark.timeout(1500)  # two server starts and 50 lines on a CPU shared with others
def test_a_batch_killed_halfway_finishes_after_restart_with_no_line_twice(
        start: Start, tmp_path: Path) -> None:
    server = start()
    submitted = cli(server, "submit", str(batch_file(tmp_path / "in.jsonl", 50)))
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    client = sdk(server)

    def done() -> int:
        counts = client.batches.retrieve(batch_id).request_counts
        assert counts is not None
        return counts.completed + counts.failed

    wait_until(lambda: done() >= 15, timeout=600, what="15 finished lines")
    kill(server, signal.SIGKILL)
    server = start()
    client = sdk(server)
    wait_until(lambda: client.batches.retrieve(batch_id).status == "completed", timeout=600,
               what="the batch to finish after the restart")
    results = cli(server, "results", batch_id)
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == 50 and set(ids) == {f"line-{i}" for i in range(50)}
    assert all(line["response"]["status_code"] == 200 for line in lines)
    status = cli(server, "status", batch_id)
    assert "completed  50/50 done, 0 failed" in status.stdout


@pytest.mark.timeout(600)
def test_batch_submit_wait_prints_every_result(start: Start, tmp_path: Path) -> None:
    server = start()
    run = cli(server, "submit", str(batch_file(tmp_path / "in.jsonl", 12)),
              "--wait", "--poll", "0.2")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"line-{i}" for i in range(12))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a"}\n')
    refused = cli(server, "submit", str(bad))
    assert refused.returncode == 3 and "line 1" in refused.stderr  # the server refused it


@pytest.mark.timeout(600)
def test_a_chat_takes_a_slot_from_a_running_batch_line(start: Start, tmp_path: Path) -> None:
    """Both slots run 200-token batch lines; a 4-token chat is answered before either line
    finishes, so it did not wait for a slot: the scheduler preempted a line for it (timings:
    bench/batch_bench.py)."""
    server = start()
    client = sdk(server)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({
        "custom_id": f"long-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": f"Tell story {i}."}],
                 "max_tokens": 200, "ignore_eos": True, "temperature": 0}}) + "\n"
        for i in range(4)))
    batch_id = cli(server, "submit", str(path)).stdout.strip()

    def both_slots_busy() -> bool:
        slots = httpx.get(server.url + "/slots", timeout=10).json()
        return sum(bool(s["is_processing"]) for s in slots) == 2

    wait_until(both_slots_busy, timeout=120, what="two batch lines running")
    chat = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.content is not None
    counts = client.batches.retrieve(batch_id).request_counts
    assert counts is not None and counts.completed + counts.failed == 0
    client.batches.cancel(batch_id)
