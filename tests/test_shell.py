"""The shell client (issue 14), in-process: ``client.Client`` over ``local.LocalTransport`` serving
the app with a FakeEngine, and ``llmserve ask`` / ``ps`` / ``unload`` through the CLI runner.
The same commands against a real server: test_shell_real.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from typer.testing import CliRunner

from llmserve import ask, cli, entry
from llmserve.chat import _finished_blocks, parse_value, read_messages, stream_turn
from llmserve.client import Client, HttpTransport
from llmserve.errors import ModelUnavailable, ServerError, ServerUnreachable
from llmserve.local import LocalTransport
from tests.conftest import free_port, requires_llama_cpp
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local(make_app: Callable[..., Starlette], engine: FakeEngine) -> Iterator[Client]:
    client = Client(LocalTransport(make_app(engine)))
    yield client
    client.close()


@pytest.fixture
def served(local: Client, monkeypatch: pytest.MonkeyPatch) -> Client:
    """Every client command reaches the in-process app instead of a URL."""
    monkeypatch.setattr(Client, "connect", classmethod(lambda cls, url=None, api_key=None: local))
    monkeypatch.setattr(local, "close", lambda: None)  # the fixture closes it
    return local


def _body(text: str = "hi", **fields: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **fields}


# -- client and local transport ------------------------------------------------------------------


def test_stream_turn_reads_the_answer_usage_and_timings(local: Client) -> None:
    pieces: list[str] = []
    turn = stream_turn(local, _body(), lambda kind, text: pieces.append(text))
    assert pieces == ["Hello", ",", " world", "!"]
    assert turn.text == "Hello, world!"
    assert turn.finish_reason == "stop"
    assert turn.usage["completion_tokens"] == 4
    assert turn.timings["predicted_n"] == 4
    assert turn.ttft is not None and turn.ttft <= turn.seconds


def test_get_and_post_json(local: Client) -> None:
    assert [m["id"] for m in local.get("/v1/models")["data"]] == ["fake-model"]
    answer = local.post("/v1/chat/completions", _body(max_tokens=2))
    assert answer["choices"][0]["message"]["content"] == "Hello,"


@pytest.mark.parametrize(("path", "body", "error", "exit_code"), [
    ("/v1/chat/completions", {"messages": "nope"}, ServerError, 3),
    ("/v1/chat/completions", {**_body(), "temperature": -1}, ServerError, 3),
    ("/v1/models/load", {"model": "nosuch"}, ModelUnavailable, 2),
], ids=["schema", "bound", "unknown-model"])
def test_an_error_answer_becomes_its_exit_code(
    local: Client, path: str, body: dict[str, object], error: type[Exception], exit_code: int,
) -> None:
    with pytest.raises(error) as info:
        local.post(path, body)
    assert info.value.exit_code == exit_code  # type: ignore[attr-defined]
    assert "the server answered" in str(info.value) or isinstance(info.value, ModelUnavailable)


def test_an_error_event_mid_stream_is_a_server_error(local: Client, engine: FakeEngine) -> None:
    engine.script = Script(fail_at=2)
    with pytest.raises(ServerError, match="stopped the answer"):
        stream_turn(local, _body(), lambda kind, text: None)


def test_closing_a_stream_cancels_the_generation(local: Client, engine: FakeEngine) -> None:
    engine.script = Script(tokens=["x"] * 1000, delay=0.01)
    with local.stream("/v1/chat/completions", {**_body(), "stream": True}) as events:
        next(iter(events))
    wait_until(lambda: engine.cancelled, 5, "the generation to be cancelled")
    wait_until(lambda: not engine.running, 5, "the slot to be free")


def test_server_down_is_unreachable_with_a_hint() -> None:
    client = Client(HttpTransport(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ServerUnreachable, match="llmserve run") as info:
        client.get("/v1/models")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("url", ["ftp://x", "http://"])
def test_a_bad_url_is_a_usage_error(url: str) -> None:
    r = runner.invoke(cli.app, ["ask", "--url", url, "hi"])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: --url")


# -- llmserve ask --------------------------------------------------------------------------------


def test_ask_prints_only_the_answer(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "hi"], input="")
    assert r.exit_code == 0, r.output
    assert r.stdout == "Hello, world!\n"
    assert r.stderr == ""


def test_ask_puts_the_arguments_then_stdin_in_the_prompt(served: Client,
                                                         engine: FakeEngine) -> None:
    r = runner.invoke(cli.app, ["ask", "--system", "be brief", "summarise", "this"],
                      input="line one\nline two\n")
    assert r.exit_code == 0, r.output
    prompt = "summarise this\n\nline one\nline two\n"
    assert engine.chats[-1] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": prompt}]


def test_ask_takes_stdin_alone(served: Client, engine: FakeEngine) -> None:
    r = runner.invoke(cli.app, ["ask"], input="The capital of France is")
    assert r.exit_code == 0, r.output
    assert engine.chats[-1][-1]["content"] == "The capital of France is"


def test_ask_without_a_prompt_is_a_usage_error(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask"], input="  \n")
    assert r.exit_code == 1
    assert "no prompt" in r.stderr


def test_ask_sends_the_sampling_options(served: Client, engine: FakeEngine) -> None:
    r = runner.invoke(cli.app, ["ask", "--max-tokens", "3", "--temperature", "0", "--seed", "7",
                                "--stop", "!", "--stop", "?", "hi"], input="")
    assert r.exit_code == 0, r.output
    req = engine.requests[-1]
    assert (req.max_tokens, req.sampling.temperature, req.sampling.seed) == (3, 0.0, 7)
    assert set(req.stop) == {"!", "?"}
    assert r.stdout == "Hello, world\n"


def test_ask_json_is_the_response_object(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "--json", "hi"], input="")
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello, world!"
    assert body["usage"]["completion_tokens"] == 4


def test_ask_no_stream_prints_the_whole_answer(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "--no-stream", "hi"], input="")
    assert (r.exit_code, r.stdout) == (0, "Hello, world!\n")


@requires_llama_cpp  # the schema is compiled by llama_cpp's converter
def test_ask_json_schema_reaches_the_engine_as_a_grammar(served: Client, engine: FakeEngine,
                                                        tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}')
    r = runner.invoke(cli.app, ["ask", "--json-schema", str(schema), "pick"], input="")
    assert r.exit_code == 0, r.output
    grammar = engine.requests[-1].sampling.grammar  # the schema, compiled
    assert grammar is not None and 'n-kv ::= "\\"n\\""' in grammar


@pytest.mark.parametrize("value", ["{not json", "/no/such/file.json", "[1]"])
def test_ask_bad_json_schema_is_a_usage_error(served: Client, value: str) -> None:
    r = runner.invoke(cli.app, ["ask", "--json-schema", value, "pick"], input="")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: --json-schema")


def test_ask_server_error_exits_3(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "--temperature", "-1", "hi"], input="")
    assert r.exit_code == 3
    assert "temperature" in r.stderr and r.stdout.strip() == ""


def test_ask_fail_on_length_exits_4(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "--max-tokens", "2", "--fail-on-length", "hi"], input="")
    assert r.exit_code == 4
    assert r.stdout == "Hello,\n"
    r = runner.invoke(cli.app, ["ask", "--max-tokens", "2", "hi"], input="")
    assert r.exit_code == 0


def test_ask_verbose_puts_statistics_on_stderr(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "-v", "hi"], input="")
    assert r.exit_code == 0
    assert r.stdout == "Hello, world!\n"
    assert "4 tokens" in r.stderr and "TTFT" in r.stderr and "cached" in r.stderr


def test_ask_with_the_server_down_exits_2_and_says_how_to_start_one() -> None:
    r = runner.invoke(cli.app, ["ask", "--url", f"http://127.0.0.1:{free_port()}", "hi"],
                      input="")
    assert r.exit_code == 2
    assert "llmserve run" in r.stderr and r.stdout == ""


def test_ask_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLMSERVE_API_KEY", "k1 k2")
    client = Client.connect()
    assert client.transport.description == "http://127.0.0.1:9"
    assert client.api_key == "k1"
    assert Client.connect("http://127.0.0.1:10", "other").api_key == "other"


def test_usage_errors_exit_1() -> None:
    r = subprocess.run([sys.executable, "-m", "llmserve", "ask", "--no-such-flag", "hi"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       cwd=ROOT)
    assert r.returncode == 1
    assert "no-such-flag" in r.stderr


def test_client_commands_do_not_import_the_server_stack() -> None:
    """Item 5: `ask` to a server imports neither llama_cpp, numpy nor the server, and (the
    executable's fast path) not even Typer, pydantic or rich."""
    code = (
        "import json, sys\n"
        "from llmserve import entry\n"
        f"sys.argv = ['llmserve', 'ask', '--url', 'http://127.0.0.1:{free_port()}', '-n', '3',"
        " 'hi']\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 2, exc.code\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    modules = json.loads(r.stdout)
    heavy = [m for m in modules if m.split(".")[0] in
             ("llama_cpp", "numpy", "starlette", "uvicorn", "httpx", "anyio", "jinja2",
              "typer", "click", "pydantic", "rich")
             or m.startswith(("llmserve.server", "llmserve.engine", "llmserve.registry",
                              "llmserve.config", "llmserve.params"))
             or m == "llmserve.cli"]
    assert heavy == []


def test_the_fast_parser_declares_the_typer_commands_options() -> None:
    """``ask.OPTIONS`` (the executable's own parser) and the Typer command (help, errors) name
    the same options, with the same kinds of value."""
    import typing

    import typer.main

    command = typer.main.get_command(cli.app).commands["ask"]  # type: ignore[attr-defined]
    hints = typing.get_type_hints(cli.ask)
    declared: dict[str, tuple[str, object]] = {}
    for param in command.params:
        if param.param_type_name != "option":
            continue
        (kind,) = {t for t in typing.get_args(hints[param.name]) if t is not type(None)} \
            or {hints[param.name]}
        if typing.get_origin(kind) is list:
            (kind,) = typing.get_args(kind)
        for flag in param.opts:
            declared[flag] = (param.name, None if kind is bool else kind)
    assert declared == ask.OPTIONS


@pytest.mark.parametrize(("args", "expected"), [
    (["hi", "there"], ask.AskOptions(prompt=["hi", "there"])),
    (["-n", "3", "--temperature=0.5", "--stop", "!", "--stop", "?", "-v", "q"],
     ask.AskOptions(prompt=["q"], max_tokens=3, temperature=0.5, stop=["!", "?"],
                    verbose=True)),
    (["--", "-n", "3"], ask.AskOptions(prompt=["-n", "3"])),
    (["--system", "-be brief-", "--json", "q"],
     ask.AskOptions(prompt=["q"], system="-be brief-", json_output=True)),
])
def test_the_fast_parser_reads_plain_command_lines(args: list[str],
                                                   expected: ask.AskOptions) -> None:
    assert ask.parse(args) == expected


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--no-such-flag"], ["-n", "zero"], ["-n", "0"], ["-n3"], ["--json=1"],
    ["--temperature"], ["-vn", "3"],
])
def test_the_fast_parser_leaves_anything_else_to_typer(args: list[str]) -> None:
    assert ask.parse(args) is None


@pytest.mark.parametrize(("args", "stdin"), [
    (["ask", "hi"], ""),
    (["ask", "-n", "2", "--fail-on-length", "hi"], ""),
    (["ask", "--no-stream", "hi"], ""),
    (["ask", "--temperature", "-1", "hi"], ""),
    (["ask"], "  \n"),
    (["ask", "--system", "be brief", "sum"], "up"),
])
def test_the_fast_path_answers_as_the_typer_command_does(
    served: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: list[str], stdin: str,
) -> None:
    typer_run = runner.invoke(cli.app, args, input=stdin)
    monkeypatch.setattr(sys, "argv", ["llmserve", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as info:
        entry.main()
    out, err = capsys.readouterr()
    assert (info.value.code, out, err) == (typer_run.exit_code, typer_run.stdout,
                                           typer_run.stderr)


# -- ps, unload ----------------------------------------------------------------------------------


def test_ps_lists_the_loaded_model(served: Client) -> None:
    r = runner.invoke(cli.app, ["ps", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["id"] == "fake-model"
    assert (row["slots"], row["busy_slots"], row["n_ctx"]) == (1, 0, 256)
    assert row["ttl_left_s"] is None  # no TTL: never unloaded
    r = runner.invoke(cli.app, ["ps"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "fake-model" in r.stdout and "never" in r.stdout


def test_unload_then_ps_is_empty(served: Client) -> None:
    r = runner.invoke(cli.app, ["unload", "fake-model"])
    assert r.exit_code == 0, r.output
    assert "unloaded fake-model" in r.stderr
    r = runner.invoke(cli.app, ["ps", "--json"])
    assert json.loads(r.stdout) == []
    r = runner.invoke(cli.app, ["unload", "--json"])
    assert json.loads(r.stdout) == {"status": "no_model"}


def test_ps_with_the_server_down_exits_2() -> None:
    r = runner.invoke(cli.app, ["ps", "--url", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and "llmserve run" in r.stderr


# -- chat's pieces -------------------------------------------------------------------------------


def test_saved_messages_must_be_role_content_objects(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    assert read_messages(path) == [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"role": "user"}))
    with pytest.raises(Exception, match="expected a JSON list"):
        read_messages(path)


@pytest.mark.parametrize(("text", "value"), [
    ("0.3", 0.3), ("40", 40), ("true", True), ('["a", "b"]', ["a", "b"]), ("hello", "hello"),
    ("NaN", "NaN"), ("-Infinity", "-Infinity"),
])
def test_set_values_are_json_else_text(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_a_non_finite_option_is_a_usage_error(served: Client) -> None:
    r = runner.invoke(cli.app, ["ask", "--temperature", "nan", "hi"], input="")
    assert r.exit_code == 1
    assert "finite" in r.stderr


@pytest.mark.parametrize(("text", "done"), [
    ("one paragraph, still growing", ""),
    ("first\n\nsecond", "first\n\n"),
    ("a\n\nb\n\nc", "a\n\nb\n\n"),
    ("intro\n\n```python\nx = 1\n\ny = 2", "intro\n\n"),  # inside a fence: not finished
    ("```\nx\n\ny\n```\n\nafter", "```\nx\n\ny\n```\n\n"),
], ids=["none", "one", "two", "open-fence", "closed-fence"])
def test_finished_markdown_blocks(text: str, done: str) -> None:
    assert text[:_finished_blocks(text)] == done


def _repl_session(client: Client, lines: list[str], monkeypatch: pytest.MonkeyPatch,
                  history: Path | None = None) -> tuple[int, str]:
    """Run chat's REPL on ``lines`` (then Ctrl-D) with its output captured as plain text."""
    import io

    from rich.console import Console

    from llmserve.chat import Repl

    feed = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    buffer = io.StringIO()
    repl = Repl(client, Console(file=buffer, highlight=False, width=200), model=None,
                system=None, history=history)
    return repl.run(), buffer.getvalue()


def test_repl_commands(local: Client, engine: FakeEngine, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    saved, again = tmp_path / "a.json", tmp_path / "b.json"
    code, output = _repl_session(local, [
        "/set temperature 0", "/set max_tokens 3", "/system Be brief.", "Hello there",
        "/stats", f"/save {saved}", "/clear", "/system -", f"/load {saved}", f"/save {again}",
        "/set", "/set max_tokens", "/nope", "/help", '"""', "two", "lines", '"""',
    ], monkeypatch, history=tmp_path / "data" / "chat_history")
    assert code == 0
    assert "Hello, world\n" in output  # the answer, cut at 3 tokens
    assert "last answer: 3 tokens" in output and "finish length" in output
    assert json.loads(saved.read_text()) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hello, world"}]
    assert again.read_text() == saved.read_text()
    assert "temperature = 0\nmax_tokens = 3" in output
    assert "max_tokens unset" in output and "unknown command /nope" in output
    assert "/system TEXT" in output
    first, last = engine.requests[0], engine.requests[-1]
    assert (first.sampling.temperature, first.max_tokens) == (0.0, 3)
    assert last.max_tokens > 3  # after /set max_tokens (unset)
    assert engine.chats[-1][-1] == {"role": "user", "content": "two\nlines"}
    assert (tmp_path / "data" / "chat_history").exists()  # its lines: test_shell_real


def test_repl_reports_errors_and_keeps_going(local: Client, engine: FakeEngine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = _repl_session(local, ["/set temperature -1", "Hi", "/set temperature",
                                         "Hi", "/model nosuch", "/load /no/such.json"],
                                 monkeypatch)
    assert code == 0
    assert output.count("error:") == 3
    assert "temperature" in output and "Hello, world!" in output
    assert len(engine.requests) == 1  # the refused turn was not sent on


# -- llmserve batch (over the same client) -------------------------------------------------------


@pytest.fixture
def served_store(make_app: Callable[..., Starlette], engine: FakeEngine, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """Every client command reaches an in-process app that has a data dir (Files, Batches)."""
    from llmserve.store import Store

    client = Client(LocalTransport(make_app(engine, store=Store(tmp_path / "data"))))
    monkeypatch.setattr(Client, "connect", classmethod(lambda cls, url=None, api_key=None: client))
    monkeypatch.setattr(client, "close", lambda: None)
    yield client
    client.transport.close()


def test_batch_submit_wait_uploads_the_file_and_prints_every_result(
    served_store: Client, tmp_path: Path,
) -> None:
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2}}
             for i in range(5)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = runner.invoke(cli.app, ["batch", "submit", str(path), "--wait", "--poll", "0.05"])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"q{i}" for i in range(5)]
    assert all(o["response"]["status_code"] == 200 for o in out)
    batch_id = out[0]["id"] and served_store.get("/v1/batches")["data"][0]["id"]
    r = runner.invoke(cli.app, ["batch", "status", batch_id])
    assert r.exit_code == 0 and "completed" in r.stdout and "5/5 done" in r.stdout
    r = runner.invoke(cli.app, ["batch", "results", batch_id])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 5


def test_batch_errors_are_the_clients_exit_codes(served_store: Client, tmp_path: Path) -> None:
    r = runner.invoke(cli.app, ["batch", "status", "batch_nope"])
    assert r.exit_code == 3 and "batch_nope" in r.stderr  # the server's 404
    r = runner.invoke(cli.app, ["batch", "status", "a b/../c"])  # quoted into one path segment
    assert r.exit_code == 3 and "404" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    r = runner.invoke(cli.app, ["batch", "submit", str(bad)])
    assert r.exit_code == 3 and "line 1" in r.stderr
    r = runner.invoke(cli.app, ["batch", "submit", str(tmp_path / "missing.jsonl")])
    assert r.exit_code != 0


def test_batch_with_the_server_down_exits_2() -> None:
    r = runner.invoke(cli.app, ["batch", "status", "batch_x", "--url",
                                f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and "llmserve run" in r.stderr
