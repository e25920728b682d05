"""Tier 2: Files and Batches with a FakeEngine, driven by the official openai SDK; the store
on its own (schema version, leftovers of a cut write, results recorded once)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from llmserve.server.options import ServerOptions
from llmserve.store import SCHEMA_VERSION, Store
from tests.conftest import OpenSdk
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until

CHAT = "/v1/chat/completions"


def chat_line(i: int, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT,
            "body": {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8,
                     **body}}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def close(tc: TestClient) -> None:
    tc.__exit__(None, None, None)


def finished(sdk: OpenAI, batch_id: str, timeout: float = 20) -> Any:
    def done() -> bool:
        return sdk.batches.retrieve(batch_id).status in ("completed", "cancelled", "failed")

    wait_until(done, timeout=timeout, what=f"batch {batch_id}")
    return sdk.batches.retrieve(batch_id)


def output_lines(sdk: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()]


# -- files ------------------------------------------------------------------------------------


def test_files_upload_list_retrieve_content_delete(open_sdk: OpenSdk) -> None:
    _tc, sdk = open_sdk(FakeEngine())
    data = jsonl([chat_line(0)])
    f = sdk.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.filename == "in.jsonl"
    assert sdk.files.retrieve(f.id).model_dump() == f.model_dump()
    assert sdk.files.content(f.id).content == data
    assert [x.id for x in sdk.files.list(purpose="batch")] == [f.id]
    sdk.files.delete(f.id)
    for call in (lambda: sdk.files.retrieve(f.id), lambda: sdk.files.content(f.id),
                 lambda: sdk.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_an_oversize_file_is_a_413_and_leaves_nothing(open_sdk: OpenSdk, tmp_path: Path) -> None:
    tc, sdk = open_sdk(FakeEngine(), ServerOptions(max_file_size=1000))
    with pytest.raises(openai.APIStatusError) as info:
        sdk.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    assert info.value.status_code == 413
    assert "--max-file-size" in info.value.message
    # framing-sized bodies get past the header check; the parsed size is checked too
    r = tc.post("/v1/files", files={"file": ("b", b"y" * 1500)}, data={"purpose": "batch"})
    assert r.status_code == 413, r.text
    assert sdk.files.list().data == []
    assert [p.name for p in (tmp_path / "files").iterdir()] == []


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"files": {"file": ("a", b"1")}}, "purpose"),
    ({"files": {"file": ("a", b"1")}, "data": {"purpose": "nope"}}, "purpose"),
    ({"data": {"purpose": "batch", "file": "text, not a file"}}, "file"),
    ({"json": {"purpose": "batch"}}, None),
], ids=["no-purpose", "bad-purpose", "not-a-file", "json"])
def test_bad_uploads_are_400s(open_sdk: OpenSdk, kwargs: dict[str, Any],
                              param: str | None) -> None:
    tc, _sdk = open_sdk(FakeEngine())
    if "data" in kwargs and "files" not in kwargs:
        # a multipart body without a file part
        kwargs = {"files": {"purpose": (None, "batch"), "file": (None, "text")}}
    r = tc.post("/v1/files", **kwargs)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- batches ----------------------------------------------------------------------------------


def test_a_batch_runs_every_line_into_openai_line_format(open_sdk: OpenSdk) -> None:
    _tc, sdk = open_sdk(FakeEngine(parallel=2))
    lines = [chat_line(i) for i in range(6)]
    lines[3]["body"] = {"messages": []}  # the endpoint refuses it: a failed line
    f = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                               metadata={"run": "1"})
    assert batch.id.startswith("batch_") and batch.metadata == {"run": "1"}
    batch = finished(sdk, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (6, 5, 1)
    out = output_lines(sdk, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["req-0", "req-1", "req-2", "req-4", "req-5"]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["choices"][0]["message"]["content"] == "Hello, world!"
    errors = output_lines(sdk, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-3"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "messages"
    assert [b.id for b in sdk.batches.list()] == [batch.id]


def test_a_responses_batch(open_sdk: OpenSdk) -> None:
    _tc, sdk = open_sdk(FakeEngine())
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"input": f"q{i}"}} for i in range(2)]
    f = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = finished(sdk, sdk.batches.create(input_file_id=f.id, endpoint="/v1/responses",
                                             completion_window="24h").id)
    out = output_lines(sdk, batch.output_file_id)
    assert [o["response"]["body"]["output"][0]["content"][0]["text"] for o in out] == \
        ["Hello, world!"] * 2


@pytest.mark.parametrize(("content", "says"), [
    (b"{not json\n", "line 1: not valid JSON"),
    (jsonl([chat_line(0), [1]]), "line 2: not a JSON object"),
    (jsonl([chat_line(0), chat_line(0)]), "line 2: custom_id 'req-0' is used more than once"),
    (jsonl([{**chat_line(0), "url": "/v1/completions"}]), "line 1: 'url' must be"),
    (jsonl([{**chat_line(0), "method": "GET"}]), "line 1: 'method' must be"),
    (jsonl([{**chat_line(0), "body": "x"}]), "line 1: 'body' must be a JSON object"),
    (jsonl([{**chat_line(0), "custom_id": ""}]), "line 1: 'custom_id' must be"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
     b'"body": {"temperature": NaN}}\n', "line 1: not valid JSON"),
    (b"\n\n", "holds no requests"),
], ids=["json", "array", "duplicate", "url", "method", "body", "custom_id", "nan", "empty"])
def test_malformed_input_is_a_400_naming_the_line(open_sdk: OpenSdk, content: bytes,
                                                  says: str) -> None:
    _tc, sdk = open_sdk(FakeEngine())
    f = sdk.files.create(file=("in.jsonl", content), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert says in info.value.message
    assert info.value.body["param"] == "input_file_id"  # type: ignore[index]
    assert sdk.batches.list().data == []


def test_unknown_endpoints_files_and_ids(open_sdk: OpenSdk) -> None:
    tc, sdk = open_sdk(FakeEngine())
    f = sdk.files.create(file=("in.jsonl", jsonl([chat_line(0)])), purpose="batch")
    for endpoint in ("/v1/nope", "/v1/moderations"):
        r = tc.post("/v1/batches", json={"input_file_id": f.id, "endpoint": endpoint,
                                         "completion_window": "24h"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "endpoint", r.text
    r = tc.post("/v1/batches", json={"input_file_id": f.id, "endpoint": CHAT,
                                     "completion_window": "1h"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.cancel("batch_nope")


def test_cancel_stops_the_lines_and_keeps_what_finished(open_sdk: OpenSdk) -> None:
    engine = FakeEngine(script=Script(tokens=["x"] * 50, delay=0.01))
    _tc, sdk = open_sdk(engine)
    f = sdk.files.create(file=("in.jsonl", jsonl([chat_line(i, max_tokens=50)
                                                  for i in range(20)])), purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    wait_until(lambda: sdk.batches.retrieve(batch.id).request_counts.completed >= 1,  # type: ignore[union-attr]
               timeout=20, what="a first finished line")
    assert sdk.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = finished(sdk, batch.id)
    assert batch.status == "cancelled"
    done = batch.request_counts.completed  # type: ignore[union-attr]
    assert 1 <= done < 20
    assert len(output_lines(sdk, batch.output_file_id)) == done
    with pytest.raises(openai.BadRequestError):
        sdk.batches.cancel(batch.id)


def test_a_batch_stopped_halfway_resumes_on_the_same_dir_without_repeats(
        open_sdk: OpenSdk) -> None:
    slow = FakeEngine(script=Script(tokens=["x"] * 20, delay=0.01))
    tc, sdk = open_sdk(slow)
    f = sdk.files.create(file=("in.jsonl", jsonl([chat_line(i) for i in range(12)])),
                         purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    wait_until(lambda: sdk.batches.retrieve(batch.id).request_counts.completed >= 3,  # type: ignore[union-attr]
               timeout=20, what="three finished lines")
    close(tc)  # the server stops: lines in flight are dropped unrecorded
    first_run = len(slow.requests)
    engine = FakeEngine()
    _tc2, sdk2 = open_sdk(engine)
    batch = finished(sdk2, batch.id)
    assert batch.status == "completed"
    out = output_lines(sdk2, batch.output_file_id)
    ids = [o["custom_id"] for o in out]
    assert sorted(ids, key=lambda c: int(c.split("-")[1])) == [f"req-{i}" for i in range(12)]
    assert len(set(ids)) == 12
    # the second server ran only what had not finished
    assert len(engine.requests) <= 12 - 3
    assert first_run >= 3


# -- the store on its own ---------------------------------------------------------------------


def test_store_schema_leftovers_and_lines_recorded_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.schema_version == SCHEMA_VERSION
    (tmp_path / "files" / ".tmp-file-x").write_bytes(b"half")
    (tmp_path / "files" / "file-orphan").write_bytes(b"no row")
    batch = {"id": "batch_1", "created_at": 1, "status": "in_progress",
             "request_counts": {"total": 2, "completed": 0, "failed": 0}}
    store.put_batch(batch, [(1, "a", {}), (2, "b", {})])
    store.record_line(batch, 1, True, {"custom_id": "a"})
    with pytest.raises(sqlite3.IntegrityError):
        store.record_line(batch, 1, True, {"custom_id": "a"})
    store.close()
    again = Store(tmp_path)
    assert list((tmp_path / "files").iterdir()) == []
    assert [cid for _n, cid, _b in again.unfinished_lines("batch_1")] == ["b"]
    assert again.result_counts("batch_1") == (1, 0)
    again.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "llmserve.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path)
