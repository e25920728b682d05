"""Tier 3: models.toml, JIT switching, failed loads, idle TTL and the info commands on the demo
model, through a real `llmserve` process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

HELLO = [{"role": "user", "content": "Say hello."}]


def llmserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmserve", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def server_with(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for s in servers:
        s.stop()


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def _chat(c: httpx.Client, model: str) -> httpx.Response:
    return c.post("/v1/chat/completions",
                  json={"model": model, "messages": HELLO, "max_tokens": 4, "temperature": 0})


def _states(c: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["state"] for m in c.get("/v1/models").json()["data"]}


@pytest.mark.real
def test_config_two_ids_and_a_corrupt_file(tmp_path: Path, demo_model: Path,
                                           server_with: list[ServerProcess]) -> None:
    (tmp_path / "broken.gguf").write_bytes(demo_model.read_bytes()[:300_000])
    config = _config(tmp_path, f"""
[server]
max_loaded_models = 1
[models.first]
path = "{demo_model}"
[models.second]
path = "{demo_model}"
aliases = ["gpt-4o-mini"]
[models.broken]
path = "broken.gguf"
""")
    server = ServerProcess(["--config", str(config), "--ctx-size", "512"])
    server_with.append(server)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        models = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["state"]) for m in models] == [
            ("first", "loaded"), ("second", "not-loaded"), ("broken", "not-loaded")]
        first = models[0]
        assert (first["arch"], first["quantization"], first["n_ctx_train"]) == ("llama", "Q4_1",
                                                                                8192)
        assert first["size_bytes"] == demo_model.stat().st_size and first["n_ctx"] == 512
        assert "truncated" in models[2]["error"]

        r = _chat(c, "gpt-4o-mini")  # the second id, by its alias
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "second" and r.json()["choices"][0]["message"]["content"]
        assert _states(c) == {"first": "not-loaded", "second": "loaded", "broken": "not-loaded"}

        r = _chat(c, "broken")
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "model_load_failed" and "truncated" in error["message"]
        assert _chat(c, "second").status_code == 200

        # a GGUF whose header is fine but names an architecture llama.cpp does not know: the
        # load fails inside llama.cpp, after "second" was unloaded for it; it comes back
        alien = tmp_path / "alien.gguf"
        raw = demo_model.read_bytes()
        key = b"general.architecture" + (8).to_bytes(4, "little") + (5).to_bytes(8, "little")
        assert raw.count(key + b"llama") == 1
        alien.write_bytes(raw.replace(key + b"llama", key + b"zzzzz"))
        r = c.post("/v1/models/load", json={"model": str(alien)})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "model_load_failed" and "could not load" in error["message"]
        assert "zzzzz" in error["message"]
        assert _states(c) == {"first": "not-loaded", "second": "loaded", "broken": "not-loaded"}
        assert _chat(c, "second").status_code == 200
        assert c.get("/health").json()["status"] == "ok"

        r = _chat(c, "nope")
        assert r.status_code == 404 and "first, second, broken" in r.json()["error"]["message"]

        lm = {m["id"]: m for m in c.get("/api/v0/models").json()["data"]}
        for field in ("id", "object", "type", "publisher", "arch", "compatibility_type",
                      "quantization", "state", "max_context_length"):
            assert field in lm["first"], field
        assert (lm["second"]["state"], lm["second"]["arch"], lm["second"]["quantization"],
                lm["second"]["max_context_length"], lm["second"]["loaded_context_length"]) == (
            "loaded", "llama", "Q4_1", 8192, 512)
        assert lm["first"]["state"] == "not-loaded" and lm["first"]["type"] == "llm"
        assert c.get("/api/v0/models/first").json()["id"] == "first"

        info = c.get("/system/info").json()
        assert {"os", "cpu", "ram", "gpus", "versions", "llama_cpp"} <= set(info)
        assert info["versions"]["llama_cpp_python"].startswith("0.3")
        assert {"gpu_offload", "backends", "devices", "system_info"} <= set(info["llama_cpp"])

        ps = c.get("/api/ps").json()["models"]
        assert [(m["name"], m["details"]["quantization_level"]) for m in ps] == [("second",
                                                                                  "Q4_1")]


@pytest.mark.real
def test_ttl_unloads_after_idle_and_the_next_request_reloads(
    tmp_path: Path, demo_model: Path, server_with: list[ServerProcess]
) -> None:
    # the engine options reach llama.cpp (a quantised V cache needs flash attention)
    config = _config(tmp_path, f"""
[models.demo]
path = "{demo_model}"
ttl = 2
flash_attn = true
cache_type_k = "q8_0"
cache_type_v = "q8_0"
""")
    server = ServerProcess(["--config", str(config), "--ctx-size", "512"])
    server_with.append(server)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert _chat(c, "demo").status_code == 200
        idle_since = time.monotonic()
        while _states(c)["demo"] == "loaded" and time.monotonic() - idle_since < 10:
            time.sleep(0.1)
        idle = time.monotonic() - idle_since
        assert _states(c)["demo"] == "not-loaded"
        assert 1.5 < idle < 5, idle
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "no_model"
        assert _chat(c, "anything").status_code == 200  # one model known: any name, reloaded
        assert _states(c)["demo"] == "loaded"


@pytest.mark.real
def test_info_on_the_demo_model(demo_model: Path) -> None:
    result = llmserve("info", str(demo_model))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0] + " " + line.split()[1]: line for line in result.stdout.splitlines()
             if len(line.split()) > 1}
    assert "llama" in lines["architecture llama"]
    assert "Q4_1" in lines["quantization Q4_1"]
    assert "8192" in lines["trained context"]
    assert lines["chat template"].split()[-1] == "yes"
    data = json.loads(llmserve("info", str(demo_model), "--json").stdout)
    assert (data["architecture"], data["quantization"], data["context_length"],
            data["has_chat_template"]) == ("llama", "Q4_1", 8192, True)
    assert data["file_size"] == demo_model.stat().st_size


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing.gguf", "not found"),
    (lambda d: d, "is a directory"),
    (lambda d: (d / "notes.gguf", (d / "notes.gguf").write_text("hi"))[0], "not a GGUF"),
], ids=["missing", "directory", "not-gguf"])
def test_info_on_bad_files_is_one_line(tmp_path: Path, make: object, fragment: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    result = llmserve("info", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.real
def test_models_lists_a_folder(tmp_path: Path, demo_model: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "smol.gguf").symlink_to(demo_model)
    (tmp_path / "sub" / "tiny-00001-of-00001.gguf").symlink_to(demo_model)
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    result = llmserve("models", "--models-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"smol", "tiny", "junk"}
    assert rows["smol"]["architecture"] == "llama" and rows["tiny"]["quantization"] == "Q4_1"
    assert "not a GGUF" in rows["junk"]["error"]
    table = llmserve("models", "--models-dir", str(tmp_path))
    assert table.returncode == 0
    assert "smol" in table.stdout and "Q4_1" in table.stdout and "junk" in table.stdout


def test_run_with_a_bad_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.gguf").write_text("hello")
    result = llmserve("run", str(tmp_path / "notes.gguf"))
    assert result.returncode == 1
    assert "not a GGUF" in result.stderr and "Traceback" not in result.stderr
