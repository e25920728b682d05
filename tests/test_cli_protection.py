"""The protection flags of `llmserve run`: listed in --help, bad values are one error line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmserve import cli

runner = CliRunner()

FLAGS = ("--api-key", "--api-key-file", "--metrics-public", "--rate-limit", "--rate-burst",
         "--max-body-size", "--cors-origin", "--log-format", "--log-prompts",
         "--shutdown-timeout")


def test_run_help_lists_the_protection_flags() -> None:
    r = runner.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in FLAGS:
        assert flag in r.stdout, flag


@pytest.mark.parametrize(("args", "fragment"), [
    (["--rate-limit", "lots"], "--rate-limit"),
    (["--rate-burst", "0"], "--rate-burst"),
    (["--max-body-size", "huge"], "--max-body-size"),
    (["--log-format", "xml"], "--log-format"),
    (["--api-key", "has space"], "--api-key"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
], ids=["rate-limit", "rate-burst", "body-size", "log-format", "api-key", "shutdown-timeout"])
def test_bad_protection_values_are_one_line(args: list[str], fragment: str) -> None:
    r = runner.invoke(cli.app, ["run", "x.gguf", *args])
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_unreadable_api_key_file_is_one_line(tmp_path: Path) -> None:
    r = runner.invoke(cli.app, ["run", "x.gguf", "--api-key-file", str(tmp_path / "none")])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: --api-key-file: cannot read")
    assert "Traceback" not in r.output


def test_api_key_env_var_holds_several_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "serve", lambda settings, **_: seen.append(settings))
    r = runner.invoke(cli.app, ["run", "x.gguf"], env={"LLMSERVE_API_KEY": "sk-a sk-b"})
    assert r.exit_code == 0, r.output
    assert seen[0].all_api_keys() == ("sk-a", "sk-b")
