"""The CLI's error paths: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmserve import __version__, cli

runner = CliRunner()


def test_version() -> None:
    r = runner.invoke(cli.app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"llmserve {__version__}"


def test_run_help_lists_every_flag() -> None:
    r = runner.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--host", "--port", "--ctx-size", "--n-gpu-layers", "--threads", "--alias",
                 "--chat-template", "--max-queue", "--parallel", "--max-tokens-limit",
                 "--flash-attn"):
        assert flag in r.stdout


def _bad_files(tmp_path: Path, demo: Path) -> dict[str, tuple[Path, str]]:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(demo.read_bytes()[:300_000])
    text = tmp_path / "notes.gguf"
    text.write_text("not a model at all")
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGUF\x03")
    return {
        "missing": (tmp_path / "nope.gguf", "not found"),
        "directory": (tmp_path, "is a directory"),
        "not-gguf": (text, "not a GGUF file"),
        "header-cut": (tiny, "truncated"),
        "data-cut": (truncated, "truncated"),
    }


@pytest.mark.real  # the bad files are cut from the demo model
@pytest.mark.parametrize("case", ["missing", "directory", "not-gguf", "header-cut", "data-cut"])
def test_bad_model_file_is_one_line_and_exit_1(
    case: str, tmp_path: Path, demo_model: Path
) -> None:
    path, fragment = _bad_files(tmp_path, demo_model)[case]
    r = runner.invoke(cli.app, ["run", str(path), "--port", "1"])
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and fragment in lines[0]
    assert "Traceback" not in r.output


def test_no_model_and_no_demo_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llmserve.config.demo_model_path", lambda: None)
    r = runner.invoke(cli.app, ["run"])
    assert r.exit_code == 1
    assert "no model given" in r.stderr and "llmserve[demo]" in r.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--parallel", "0"], "--parallel"),
        (["--port", "70000"], "--port"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--flash-attn", "maybe"], "--flash-attn: expected auto, on or off"),
    ],
)
def test_bad_flag_values(args: list[str], fragment: str) -> None:
    r = runner.invoke(cli.app, ["run", "x.gguf", *args])
    assert r.exit_code == 1
    assert fragment in r.stderr
