"""`llmserve ask`, `chat` and `ps` as a user runs them (subprocesses, a pseudo-terminal for chat)
against a real server with the demo model, and `ask --local` with no server."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema
import pexpect
import pytest

from llmserve.loadgen import same_llmserve_env
from tests.conftest import ServerProcess, free_port
from tests.polling import wait_until

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    return {**clean, **same_llmserve_env(), "XDG_DATA_HOME": str(tmp_path / "data"), **extra}


def llmserve(tmp_path: Path, *args: str, stdin: str | None = None, timeout: float = 120,
             **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmserve", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, env=env(tmp_path, **extra), cwd=ROOT,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def slots_idle(url: str) -> bool:
    return not any(s["is_processing"] for s in httpx.get(url + "/slots", timeout=10).json())


def test_ask_from_stdin_prints_the_answer_and_nothing_else(real_server: ServerProcess,
                                                           tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ask", "--url", real_server.url, "--max-tokens", "8",
                 "--temperature", "0", stdin="The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    direct = httpx.post(real_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "The capital of France is"}],
        "max_tokens": 8, "temperature": 0})
    assert r.stdout == direct.json()["choices"][0]["message"]["content"] + "\n"


def test_ask_takes_an_argument_and_stdin_together(real_server: ServerProcess,
                                                  tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ask", "--max-tokens", "6", "-v", "Translate into French:",
                 stdin="Good morning", LLMSERVE_URL=real_server.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert "tokens/s" in r.stderr and "TTFT" in r.stderr


def test_ask_json_schema_prints_json_that_validates(real_server: ServerProcess,
                                                    tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ask", "--url", real_server.url, "--json-schema", json.dumps(SCHEMA),
                 "--max-tokens", "60", "--temperature", "0", "Pick a number")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), SCHEMA)


def test_ask_json_is_the_whole_response(real_server: ServerProcess, tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ask", "--url", real_server.url, "--json", "--max-tokens", "4", "Hi")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["object"] == "chat.completion"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 4
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])
    assert "prompt_tokens_details" in body["usage"] and "timings" in body


def test_ask_with_no_server_exits_2_and_says_how_to_start_one(tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ask", "--max-tokens", "4", stdin="The capital of France is",
                 LLMSERVE_URL=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "llmserve run" in r.stderr and "Traceback" not in r.stderr


def test_ask_with_a_bad_key_exits_3(start_server: Callable[..., ServerProcess],
                                    tmp_path: Path) -> None:
    server = start_server("--api-key", "right-key")
    r = llmserve(tmp_path, "ask", "--url", server.url, "--api-key", "wrong", "Hi")
    assert r.returncode == 3
    assert "401" in r.stderr and r.stdout == ""
    r = llmserve(tmp_path, "ask", "--url", server.url, "--max-tokens", "2", "Hi",
                 LLMSERVE_API_KEY="right-key")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("stop", "code"), [("sigint", 130), ("reader-leaves", 141)])
def test_stopping_ask_mid_answer_frees_the_slot(real_server: ServerProcess, tmp_path: Path,
                                                 stop: str, code: int) -> None:
    """Ctrl-C (SIGINT) exits 130; a reader that goes away (`| head -c 5`) 141, as `yes` does;
    either way the server stops generating."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmserve", "ask", "--url", real_server.url, "--max-tokens",
         "1500", "Write a very long story about a dragon and a knight."],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env(tmp_path), cwd=ROOT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while not select.select([proc.stdout], [], [], 0.1)[0]:  # the answer has started
            assert time.monotonic() < deadline and proc.poll() is None, "no answer came"
        assert not slots_idle(real_server.url)
        if stop == "sigint":
            proc.send_signal(signal.SIGINT)
        else:
            proc.stdout.close()
        assert proc.wait(timeout=30) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: slots_idle(real_server.url), 30, "the server to free the slot")


def test_ask_local_answers_with_no_server(demo_model: Path, tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ask", "--model", str(demo_model), "--local", "--max-tokens", "4",
                 "--temperature", "0", "hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    # a GGUF path and nothing at the URL: the same, in-process
    r = llmserve(tmp_path, "ask", "--model", str(demo_model), "--json-schema",
                 json.dumps(SCHEMA), "--max-tokens", "60", "--temperature", "0",
                 "Pick a number", LLMSERVE_URL=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), SCHEMA)


def test_ps_lists_the_loaded_model(real_server: ServerProcess, tmp_path: Path) -> None:
    r = llmserve(tmp_path, "ps", "--url", real_server.url, "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["id"].startswith("SmolLM2")
    assert row["slots"] == 2 and row["busy_slots"] == 0 and row["size_bytes"] > 0


# -- chat in a pseudo-terminal -------------------------------------------------------------------

PROMPT = ">>> "


def _saved(path: Path) -> list[dict[str, str]]:
    data: list[dict[str, str]] = json.loads(path.read_text())
    return data


@pytest.mark.timeout(400)
def test_chat_session(real_server: ServerProcess, tmp_path: Path) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "llmserve", "chat", "--url", real_server.url],
                          env=env(tmp_path), cwd=str(ROOT), encoding="utf-8", timeout=90,
                          dimensions=(40, 120))
    try:
        child.expect(PROMPT)

        def run(line: str) -> str:
            child.sendline(line)
            child.expect(PROMPT)
            return str(child.before)

        assert "temperature = 0" in run("/set temperature 0")
        assert "max_tokens = 5" in run("/set max_tokens 5")
        assert "system prompt set" in run("/system You are a geography teacher.")
        # a question streams an answer (rendered live: its text lands on the terminal)
        shown = run("What is the capital of France?")
        run(f"/save {tmp_path / 'a.json'}")
        first = _saved(tmp_path / "a.json")
        assert [m["role"] for m in first] == ["system", "user", "assistant"]
        assert first[0]["content"] == "You are a geography teacher."
        answer = first[2]["content"]
        assert answer and answer.split()[0] in shown
        # /set took effect: at temperature 0 the same question gets the same answer, and
        # max_tokens 5 cut it
        assert "finish length" in run("/stats") and "5 tokens" in str(child.before)
        run("/clear")
        run("What is the capital of France?")
        run(f"/save {tmp_path / 'b.json'}")
        assert _saved(tmp_path / "b.json") == first
        # /load restores a saved conversation
        run("/clear")
        run("/system -")
        run(f"/load {tmp_path / 'a.json'}")
        run(f"/save {tmp_path / 'c.json'}")
        assert _saved(tmp_path / "c.json") == first
        # Ctrl-C mid-answer stops it, frees the slot and keeps the session
        run("/set max_tokens 1500")
        child.sendline("Now write a very long essay about the history of Paris.")
        child.expect(r"\x1b\[2K\w")  # the answer's first text is drawn
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect(PROMPT)
        wait_until(lambda: slots_idle(real_server.url), 30, "the server to free the slot")
        assert "unknown command" in run("/nope")
        # Ctrl-D quits with 0
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    history = (tmp_path / "data" / "llmserve" / "chat_history").read_text()
    assert "What is the capital of France?" in history
