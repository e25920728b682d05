"""The ``llmserve`` executable. Commands a shell loop runs many times start here without the
CLI: `llmserve --version`, and `llmserve ask` with an ordinary command line, which
``llmserve.ask`` parses and answers without importing Typer, pydantic or rich (issue 14: `ask`
under 0.3 s against a warm server). Everything else is ``llmserve.cli``."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args == ["--version"]:
        from llmserve import __version__

        sys.stdout.write(f"llmserve {__version__}\n")
        return
    if args[:1] == ["ask"]:
        from llmserve import ask

        opts = ask.parse(args[1:])
        if opts is not None:
            try:
                code = ask.run(opts)
            except KeyboardInterrupt:
                code = 130
            sys.exit(code)
    from llmserve.cli import main as cli_main

    cli_main()
