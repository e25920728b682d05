"""`llmserve ask`: one prompt in, only the answer out, for pipes and scripts (issue 14).

The command's body lives here, away from Typer, pydantic and rich: a shell loop that runs `ask`
a thousand times pays for Python, http.client and one request, nothing else (target: under
0.3 s against a warm server). Two ways in, one body:

- ``llmserve.entry.main`` parses an ordinary command line itself with ``parse`` (the option
  table ``OPTIONS``) and calls ``run``; it never imports the CLI;
- anything ``parse`` does not take plainly (``--help``, an unknown option, a bad number, bundled
  short flags) goes to the Typer command ``cli.ask``, which says what is wrong and calls the same
  ``run``. tests/test_shell.py checks that ``OPTIONS`` and the Typer command declare the same
  options.

Exit codes (README, "From the shell"): 0 done, 1 usage, 2 no server/model, 3 server error,
4 cut by the token limit (with --fail-on-length), 130 Ctrl-C, 141 reader gone."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmserve.errors import ClientError

if TYPE_CHECKING:
    from llmserve.client import Client


@dataclass
class AskOptions:
    prompt: list[str] = field(default_factory=list)
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    local: bool = False
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    json_schema: str | None = None
    json_output: bool = False
    no_stream: bool = False
    verbose: bool = False
    fail_on_length: bool = False


# option → (field of AskOptions, value type; None for a flag). A list field repeats.
OPTIONS: dict[str, tuple[str, type | None]] = {
    "--url": ("url", str),
    "--api-key": ("api_key", str),
    "--model": ("model", str), "-m": ("model", str),
    "--local": ("local", None),
    "--system": ("system", str), "-s": ("system", str),
    "--max-tokens": ("max_tokens", int), "-n": ("max_tokens", int),
    "--temperature": ("temperature", float),
    "--seed": ("seed", int),
    "--stop": ("stop", str),
    "--json-schema": ("json_schema", str),
    "--json": ("json_output", None),
    "--no-stream": ("no_stream", None),
    "--verbose": ("verbose", None), "-v": ("verbose", None),
    "--fail-on-length": ("fail_on_length", None),
}
# the Typer command's bounds, which ``parse`` leaves to Typer to explain
MINIMUM = {"max_tokens": 1}


def parse(args: list[str]) -> AskOptions | None:
    """``ask``'s arguments as options, or None when the command line is anything but plain
    (then Typer parses it and says what is wrong)."""
    opts = AskOptions()
    words: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            words.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            words.append(arg)
            continue
        name, eq, inline = arg.partition("=")
        if name not in OPTIONS or (eq and not name.startswith("--")):
            return None  # --help, an unknown option, -n8 style: Typer's to explain
        dest, kind = OPTIONS[name]
        if kind is None:
            if eq:
                return None
            setattr(opts, dest, True)
            continue
        if eq:
            raw = inline
        elif i < len(args):
            raw = args[i]
            i += 1
        else:
            return None
        try:
            value = kind(raw)
        except ValueError:
            return None
        if dest in MINIMUM and value < MINIMUM[dest]:
            return None
        if isinstance(getattr(opts, dest), list):
            getattr(opts, dest).append(value)
        else:
            setattr(opts, dest, value)
    opts.prompt = words
    return opts


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def error(message: str, code: int) -> int:
    say(f"error: {message}")
    return code


def run(opts: AskOptions, connect: Any = None) -> int:
    """Answer ``opts.prompt`` on standard output; the exit code. ``connect(url, api_key,
    model, local)`` → (Client, model for the body) is ``connect`` below unless given."""
    from llmserve.chat import complete_turn, load_schema, schema_format, stream_turn

    try:
        text = prompt_text(opts.prompt)
        body: dict[str, Any] = {"messages": ([{"role": "system", "content": opts.system}]
                                             if opts.system else [])
                                + [{"role": "user", "content": text}]}
        if opts.json_schema is not None:
            body["response_format"] = schema_format(load_schema(opts.json_schema))
        client, body_model = (connect or _connect)(opts.url, opts.api_key, opts.model,
                                                   opts.local)
    except ClientError as exc:
        return error(exc.message, exc.exit_code)
    options = {"model": body_model, "max_tokens": opts.max_tokens,
               "temperature": opts.temperature, "seed": opts.seed, "stop": opts.stop or None}
    body |= {k: v for k, v in options.items() if v is not None}
    try:
        if opts.json_output or opts.no_stream:
            turn, response = complete_turn(client, body)
            sys.stdout.write((json.dumps(response, indent=2) if opts.json_output
                              else turn.text) + "\n")
        else:
            def write(kind: str, piece: str) -> None:
                if kind == "content":
                    sys.stdout.write(piece)
                    sys.stdout.flush()

            turn = stream_turn(client, body, write)
            sys.stdout.write("\n")
        sys.stdout.flush()
    except ClientError as exc:
        return error(exc.message, exc.exit_code)
    except KeyboardInterrupt:
        # leaving the stream closed the request: the server has stopped generating
        sys.stdout.write("\n")
        say("interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (`| head -1`): stop generating, end as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        client.close()
    if opts.verbose:
        say(turn.stats())
    if opts.fail_on_length and turn.finish_reason == "length":
        return error("the answer was cut at the token limit (finish_reason length)", 4)
    return 0


def prompt_text(words: list[str]) -> str:
    """The arguments, then standard input when it is not a terminal."""
    parts = [" ".join(words)] if words else []
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            parts.append(piped)
    text = "\n\n".join(parts)
    if not text.strip():
        raise ClientError("no prompt: give it as arguments or on standard input "
                          "(llmserve ask \"question\", or … | llmserve ask \"instruction\")")
    return text


def _connect(url: str | None, api_key: str | None, model: str | None,
             local: bool) -> tuple[Client, str | None]:
    """A server at --url; the CLI's ``connect`` (which can load a model in-process, and
    imports what that takes) only when ``--local`` or ``model`` is a GGUF file."""
    from llmserve.client import Client

    if not local and not (model and Path(model).expanduser().is_file()):
        return Client.connect(url, api_key), model
    from llmserve.cli import connect

    return connect(url, api_key, model, local)
