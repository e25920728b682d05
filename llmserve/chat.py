"""Conversations from the shell: one chat turn over ``client.Client`` (streamed or whole, with
its statistics), shared by ``llmserve ask`` and ``llmserve chat``, and chat's REPL.

The REPL is plain ``input()`` with readline (line editing, history kept across sessions in the
user data dir) and rich for the answer: markdown rendered live as it streams, reasoning dimmed
and collapsed to one line once the answer starts. Ctrl-C while an answer streams closes the
request (the server stops the generation and frees its slot) and keeps the session.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmserve.errors import ClientError, LlmserveError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from llmserve.client import Client

CHAT_PATH = "/v1/chat/completions"


@dataclass
class Turn:
    """One answer and what it cost; ``usage`` and ``timings`` are the server's."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    ttft: float | None = None
    seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or self.timings.get("predicted_n") or 0)

    @property
    def cached_tokens(self) -> int:
        details = self.usage.get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or self.timings.get("cache_n") or 0)

    @property
    def tokens_per_second(self) -> float:
        rate = self.timings.get("predicted_per_second")
        if rate:
            return float(rate)
        generating = self.seconds - (self.ttft or 0.0)
        return self.completion_tokens / generating if generating > 0 else 0.0

    def stats(self) -> str:
        ttft = f"{self.ttft * 1000:.0f} ms" if self.ttft is not None else "-"
        return (f"{self.completion_tokens} tokens, {self.tokens_per_second:.1f} tokens/s, "
                f"TTFT {ttft}, {self.cached_tokens} cached prompt tokens, "
                f"{self.seconds:.2f} s, finish {self.finish_reason or '-'}")


def stream_turn(client: Client, body: dict[str, Any],
                on_delta: Callable[[str, str], None]) -> Turn:
    """Stream one chat completion; ``on_delta(kind, text)`` sees each piece as it arrives,
    ``kind`` being "content" or "reasoning". KeyboardInterrupt closes the request."""
    turn = Turn()
    started = time.perf_counter()
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream(CHAT_PATH, request) as events:
        for event in events:
            turn.usage = event.get("usage") or turn.usage
            turn.timings = event.get("timings") or turn.timings
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                for key, kind in (("reasoning_content", "reasoning"), ("content", "content")):
                    piece = delta.get(key)
                    if not piece:
                        continue
                    if turn.ttft is None:
                        turn.ttft = time.perf_counter() - started
                    if kind == "content":
                        turn.text += piece
                    else:
                        turn.reasoning += piece
                    on_delta(kind, piece)
                turn.finish_reason = choice.get("finish_reason") or turn.finish_reason
    turn.seconds = time.perf_counter() - started
    return turn


def complete_turn(client: Client, body: dict[str, Any]) -> tuple[Turn, dict[str, Any]]:
    """One chat completion, not streamed: the turn and the server's whole response object."""
    started = time.perf_counter()
    response = client.post(CHAT_PATH, {**body, "stream": False})
    seconds = time.perf_counter() - started
    if not isinstance(response, dict) or not response.get("choices"):
        raise ClientError(f"the server's answer has no choices: {str(response)[:200]}")
    choice = response["choices"][0]
    message = choice.get("message") or {}
    turn = Turn(text=message.get("content") or "",
                reasoning=message.get("reasoning_content") or "",
                finish_reason=choice.get("finish_reason"), usage=response.get("usage") or {},
                timings=response.get("timings") or {}, seconds=seconds)
    return turn, response


def load_schema(value: str) -> dict[str, Any]:
    """``--json-schema``: the schema's JSON text, or the path of a file holding it."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ClientError(f"--json-schema: neither JSON nor a readable file: {exc}") from None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ClientError(f"--json-schema: not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ClientError("--json-schema: a JSON schema is an object")
    return schema


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def parse_value(text: str) -> Any:
    """``/set NAME VALUE``: JSON when it parses (0.3, 40, true, ["a"]), else the text (also
    NaN and Infinity, which JSON does not have: the server refuses them as text)."""

    def not_json(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=not_json)
    except ValueError:
        return text


def read_messages(path: Path) -> list[dict[str, Any]]:
    """A conversation saved by ``/save``: a JSON list of {"role", "content"} objects."""
    try:
        data = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot load {path}: {exc}") from None
    if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in data):
        raise ClientError(f"{path}: expected a JSON list of {{\"role\", \"content\"}} objects")
    return data


HELP = """\
/system TEXT      set the system prompt (/system alone shows it; /system - clears it)
/set NAME VALUE   set a request field: temperature, top_p, top_k, min_p, max_tokens, seed,
                  stop, repeat_penalty, ... (any sampler the server knows; /set alone lists
                  them, /set NAME alone removes one)
/model ID         switch model (a model id or a GGUF path; the server loads it)
/clear            forget the conversation (the system prompt stays)
/save FILE        write the conversation as JSON messages
/load FILE        read a conversation saved with /save
/stats            statistics of the last answer and of the session
/think            show the last answer's reasoning in full
/help             this list
\"\"\" starts a message of several lines; a line \"\"\" ends it.
Ctrl-C stops an answer (the session stays); Ctrl-D quits."""


class Repl:
    """``llmserve chat``. ``run`` returns the exit code."""

    def __init__(self, client: Client, console: Console, *, model: str | None,
                 system: str | None, history: Path | None) -> None:
        self.client = client
        self.console = console
        self.model = model
        self.system = system
        self.history = history
        self.messages: list[dict[str, Any]] = []
        self.params: dict[str, Any] = {}
        self.turns: list[Turn] = []

    # -- input ------------------------------------------------------------------------------

    def _setup_history(self) -> None:
        try:
            import readline
        except ImportError:  # pragma: no cover - Windows without pyreadline
            return
        if self.history is None:
            return
        readline.set_history_length(2000)
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            if self.history.exists():
                readline.read_history_file(self.history)
        except OSError as exc:  # a history we cannot read costs the history, not the chat
            self.console.print(f"[yellow]warning:[/] input history: {_escape(str(exc))}")
            self.history = None

    def _remember(self) -> None:
        if self.history is None:
            return
        try:
            import readline

            readline.write_history_file(self.history)
        except (ImportError, OSError):
            pass

    def _read(self) -> str:
        """One message: a line, or the lines between two \"\"\" lines."""
        line = input(">>> ")
        if line.strip() != '"""':
            return line
        lines: list[str] = []
        while (more := input("... ")).strip() != '"""':
            lines.append(more)
        return "\n".join(lines)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._setup_history()
        while True:
            try:
                text = self._read()
            except KeyboardInterrupt:  # like a shell: drop the line, stay
                self.console.print()
                continue
            except EOFError:
                self.console.print()
                self._remember()
                return 0
            text = text.strip()
            if not text:
                continue
            self._remember()
            try:
                if text.startswith("/"):
                    self.command(text)
                else:
                    self.ask(text)
            except KeyboardInterrupt:  # during a command (/model loading): stop it, stay
                self.console.print("[dim](stopped)[/]")
            except LlmserveError as exc:
                self.console.print(f"[bold red]error:[/] {_escape(exc.message)}",
                                   highlight=False)

    def body(self) -> dict[str, Any]:
        messages = list(self.messages)
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        body: dict[str, Any] = {**self.params, "messages": messages}
        if self.model:
            body["model"] = self.model
        return body

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        view = _AnswerView(self.console)
        try:
            with view:
                turn = stream_turn(self.client, self.body(), view.add)
        except KeyboardInterrupt:
            self.console.print("[dim](stopped)[/]")
            if view.text:
                self.messages.append({"role": "assistant", "content": view.text})
            return
        except LlmserveError:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": turn.text})
        self.turns.append(turn)

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        handler = self._commands().get(name)
        if handler is None:
            raise ClientError(f"unknown command {name}; /help lists them")
        handler(rest)

    def _commands(self) -> dict[str, Callable[[str], None]]:
        return {"/help": self._help, "/system": self._system, "/set": self._set,
                "/model": self._model, "/clear": self._clear, "/save": self._save,
                "/load": self._load, "/stats": self._stats, "/think": self._think}

    def _help(self, _: str) -> None:
        self.console.print(HELP, highlight=False, markup=False)

    def _system(self, text: str) -> None:
        if not text:
            self.console.print(self.system or "(no system prompt)", markup=False)
            return
        self.system = None if text == "-" else text
        self.console.print("[dim]system prompt " + ("cleared" if text == "-" else "set") + "[/]")

    def _set(self, rest: str) -> None:
        name, _, value = rest.partition(" ")
        if not name:
            settings = self.params or {"(none)": "server defaults"}
            for key, val in settings.items():
                self.console.print(f"{key} = {_json(val)}", highlight=False, markup=False)
            return
        if name in ("messages", "model", "stream", "stream_options"):
            raise ClientError(f"/set {name}: not a sampler; use /model, /load or /clear")
        if not value.strip():
            self.params.pop(name, None)
            self.console.print(f"[dim]{_escape(name)} unset[/]")
            return
        self.params[name] = parse_value(value.strip())
        self.console.print(f"[dim]{_escape(name)} = {_escape(_json(self.params[name]))}[/]")

    def _model(self, model: str) -> None:
        if not model:
            self.console.print(self.model or "(the server's default model)", markup=False)
            return
        started = time.perf_counter()
        with self.console.status(f"loading {_escape(model)} …"):
            answer = self.client.post("/v1/models/load", {"model": model})
        loaded = (answer.get("model") or {}).get("id", model) if isinstance(answer, dict) else model
        self.model = loaded
        self.console.print(f"[dim]now chatting with {_escape(loaded)} "
                           f"(ready in {time.perf_counter() - started:.1f} s)[/]")

    def _clear(self, _: str) -> None:
        self.messages = []
        self.console.print("[dim]conversation cleared[/]")

    def _save(self, path: str) -> None:
        if not path:
            raise ClientError("/save FILE")
        messages = self.body()["messages"]
        try:
            Path(path).expanduser().write_text(_json(messages, indent=2) + "\n",
                                               encoding="utf-8")
        except OSError as exc:
            raise ClientError(f"cannot save {path}: {exc}") from None
        self.console.print(f"[dim]saved {len(messages)} messages to {_escape(path)}[/]")

    def _load(self, path: str) -> None:
        if not path:
            raise ClientError("/load FILE")
        messages = read_messages(Path(path))
        systems = [m["content"] for m in messages if m["role"] == "system"]
        self.system = systems[0] if systems else None
        self.messages = [m for m in messages if m["role"] != "system"]
        self.console.print(f"[dim]loaded {len(messages)} messages from {_escape(path)}[/]")

    def _stats(self, _: str) -> None:
        if not self.turns:
            self.console.print("[dim]no answers yet[/]")
            return
        tokens = sum(t.completion_tokens for t in self.turns)
        seconds = sum(t.seconds for t in self.turns)
        self.console.print(f"last answer: {self.turns[-1].stats()}", highlight=False,
                           markup=False)
        self.console.print(f"session: {len(self.turns)} answers, {tokens} tokens in "
                           f"{seconds:.1f} s", highlight=False, markup=False)

    def _think(self, _: str) -> None:
        reasoning = self.turns[-1].reasoning if self.turns else ""
        self.console.print(reasoning or "(the last answer had no reasoning)", style="dim",
                           markup=False)


class _AnswerView:
    """An answer as it streams. On a terminal: markdown rendered by rich; finished blocks
    (up to a blank line outside a code fence) are printed for good, and only the block being
    written is redrawn live, so a long answer scrolls instead of being redrawn whole. Reasoning
    streams dimmed, then collapses to one line when the answer starts (``/think`` shows it).
    Plain text when the output is not a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.text = ""
        self.reasoning = ""
        self._done = 0  # how much of ``text`` is printed for good
        self._live: Any = None

    def __enter__(self) -> _AnswerView:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=8, transient=False,
                              vertical_overflow="visible")
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(None, None, None)
        elif self.text:
            self.console.file.write("\n")
            self.console.file.flush()

    def add(self, kind: str, piece: str) -> None:
        if kind == "reasoning":
            self.reasoning += piece
        else:
            if not self.text and self.reasoning and self._live is not None:
                words = len(self.reasoning.split())
                self._live.console.print(f"▸ reasoning, {words} words (/think shows it)",
                                         style="dim", markup=False)
            self.text += piece
        if self._live is None:
            if kind == "content":
                self.console.file.write(piece)
                self.console.file.flush()
            return
        finished = _finished_blocks(self.text[self._done:])
        if finished:
            from rich.markdown import Markdown

            self._live.console.print(Markdown(self.text[self._done:self._done + finished]))
            self._done += finished
        self._live.update(self._render())

    def _render(self) -> RenderableType:
        from rich.markdown import Markdown
        from rich.text import Text

        if not self.text:
            return Text(self.reasoning, style="dim")
        return Markdown(self.text[self._done:])


def _finished_blocks(text: str) -> int:
    """How much of ``text`` is whole markdown blocks: up to its last blank line that is not
    inside a code fence (0: none yet)."""
    end = 0
    fenced = False
    position = 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not line.strip() and not fenced and position < len(text):
            end = position
    return end


def _json(value: object, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, allow_nan=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def history_file() -> Path:
    """Where chat keeps its input history: the user data dir (platformdirs), as the store."""
    import platformdirs

    return Path(platformdirs.user_data_dir("llmserve", appauthor=False)) / "chat_history"
