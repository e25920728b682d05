"""Tier 1: models.toml parsing and errors, durations, precedence, --models-dir scanning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llmserve import cli
from llmserve.config import (
    DEFAULT_CTX,
    Settings,
    load_config,
    resolve_settings,
    scan_models_dir,
)
from llmserve.errors import ConfigError
from llmserve.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "value, seconds",
    [(300, 300.0), ("90", 90.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("250ms", 0.25), (0, 0.0), ("0", 0.0), (-1, None), ("-1", None), ("-5m", None), (2.5, 2.5)],
    ids=lambda v: repr(v),
)
def test_parse_duration(value: object, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", True, [1], "m5"], ids=repr)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_example_config_is_valid() -> None:
    config, server_keys, model_keys = load_config(ROOT / "models.example.toml")
    assert config.server.max_loaded_models == 1
    assert config.server.ttl == 3600.0
    assert set(config.models) == {"qwen", "smollm", "whisper-small", "smollm-embed"}
    assert config.models["whisper-small"].kind == "whisper"
    assert config.models["smollm-embed"].embedding is True
    assert config.models["smollm-embed"].pooling == "mean"
    qwen = config.models["qwen"]
    assert [a.path.name for a in qwen.lora] == ["qwen-style.gguf"]
    assert qwen.path == (ROOT / "models/Qwen2.5-7B-Instruct-Q4_K_M.gguf").resolve()
    assert qwen.sampling == {"temperature": 0.6, "top_p": 0.9}
    assert config.models["smollm"].ttl is None  # -1 = never
    assert "ttl" in model_keys["smollm"] and "ttl" in server_keys


@pytest.mark.parametrize(
    "toml, fragments",
    [
        ("[server\nport = 1", ["not valid TOML"]),
        ("[server]\nprot = 8080", ["[server] prot", "unknown key"]),
        ("[server]\nport = 'eighty'", ["[server] port", "integer"]),
        ("[server]\nport = 70000", ["[server] port", "65535"]),
        ("[server]\nttl = 'soon'", ["[server] ttl", "expected a duration"]),
        ("[server.sampling]\ntemprature = 1", ["[server] sampling", "unknown sampling",
                                               "temprature"]),
        ("[server.sampling]\ntop_k = 'many'", ["[server] sampling", "top_k"]),
        ("[server.sampling]\ntemperature = -1", ["[server] sampling", "temperature",
                                                  "at least 0"]),
        ("[server.sampling]\nsamplers = ['top_k', 'magic']", ["[server] sampling", "magic"]),
        ("[models.a]\nctx_size = 1", ["[models.a] path", "required key is missing"]),
        ("[models.a]\npath = 'a.gguf'\nctx_size = -1", ["[models.a] ctx_size",
                                                        "greater than or equal to 0"]),
        ("[models.a]\npath = 'a.gguf'\ncache_type_k = 'q3'", ["[models.a] cache_type_k",
                                                             "q8_0"]),
        ("[models.a]\npath = 'a.gguf'\nflash_attn = 'yes please'", ["[models.a] flash_attn"]),
        ("[modles.a]\npath = 'a.gguf'", ["modles", "unknown key"]),
    ],
    ids=["bad-toml", "unknown-server-key", "port-type", "port-range", "ttl", "sampling-name",
         "sampling-type", "sampling-bound", "sampling-sampler", "missing-path", "ctx-negative",
         "cache-type", "flash-attn", "unknown-table"],
)
def test_config_errors_name_file_key_and_expectation(
    tmp_path: Path, toml: str, fragments: list[str]
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.message.startswith(f"{path}:")
    for fragment in fragments:
        assert fragment in exc.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def _resolve(tmp_path: Path, toml: str, explicit: dict[str, Any] | None = None) -> Settings:
    path = tmp_path / "models.toml"
    path.write_text(toml)
    defaults = Settings().model_dump(exclude={"models", "sampling"})
    values = {**defaults, "config": path, **(explicit or {})}
    return resolve_settings(values, set(explicit or {}))


CONFIG = """
[server]
port = 9000
max_queue = 3
ttl = "5m"
[server.sampling]
temperature = 0.5
top_k = 20
[models.a]
path = "a.gguf"
ctx_size = 1024
aliases = ["first"]
[models.a.sampling]
temperature = 0.1
[models.b]
path = "sub/b.gguf"
ttl = 0
"""


def test_config_fills_what_flags_leave_unset(tmp_path: Path) -> None:
    settings = _resolve(tmp_path, CONFIG)
    assert (settings.port, settings.max_queue, settings.ttl) == (9000, 3, 300.0)
    a, b = settings.models
    assert (a.id, a.path, a.ctx_size, a.aliases) == ("a", tmp_path / "a.gguf", 1024, ["first"])
    assert a.sampling == {"temperature": 0.1, "top_k": 20}
    assert a.ttl == 300.0 and b.ttl == 0.0
    assert b.ctx_size == DEFAULT_CTX and b.path == tmp_path / "sub/b.gguf"


@pytest.mark.parametrize(("flag", "value"), [("on", True), ("off", False), ("auto", "auto")])
def test_flash_attn_flag_reaches_every_model(tmp_path: Path, flag: str, value: object) -> None:
    settings = _resolve(tmp_path, CONFIG + 'flash_attn = "on"\n', {"flash_attn": flag})
    assert [m.flash_attn for m in settings.models] == [value, value]


def test_flash_attn_from_the_config_file(tmp_path: Path) -> None:
    settings = _resolve(tmp_path, CONFIG + "flash_attn = false\n")
    assert [m.flash_attn for m in settings.models] == ["auto", False]


def test_explicit_flags_beat_the_config(tmp_path: Path) -> None:
    settings = _resolve(tmp_path, CONFIG, {"port": 8081, "ctx_size": 512})
    assert settings.port == 8081 and settings.max_queue == 3
    assert [m.ctx_size for m in settings.models] == [512, 512]


def test_duplicate_names_are_config_errors(tmp_path: Path) -> None:
    toml = "[models.a]\npath = 'a.gguf'\n[models.b]\npath = 'b.gguf'\naliases = ['a']\n"
    with pytest.raises(ConfigError, match="already names model 'a'"):
        _resolve(tmp_path, toml)


def test_models_dir(tmp_path: Path) -> None:
    for name in ["llama-7b.gguf", "big-00001-of-00003.gguf", "big-00002-of-00003.gguf",
                 "big-00003-of-00003.gguf", "mmproj-llava.gguf", "notes.txt", "x/llama-7b.gguf",
                 "x/y/other.gguf"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = scan_models_dir(tmp_path)
    assert found == [
        ("big", tmp_path / "big-00001-of-00003.gguf"),
        ("llama-7b", tmp_path / "llama-7b.gguf"),
        ("x/llama-7b", tmp_path / "x/llama-7b.gguf"),
        ("other", tmp_path / "x/y/other.gguf"),
    ]
    with pytest.raises(ConfigError, match="not a directory"):
        scan_models_dir(tmp_path / "llama-7b.gguf")


def test_config_models_win_over_models_dir(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    for name in ("a.gguf", "c.gguf"):
        (tmp_path / "m" / name).write_bytes(b"")
    settings = _resolve(tmp_path, "[server]\nmodels_dir = 'm'\n[models.a]\npath = 'm/c.gguf'\n")
    assert [(m.id, m.path.name) for m in settings.models] == [("a", "c.gguf")]


# -- the CLI: which values were given explicitly ------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    seen: list[Settings] = []
    monkeypatch.setattr(cli, "serve", lambda settings, log_level: seen.append(settings))
    return seen


def test_cli_precedence_flag_env_config_default(tmp_path: Path, captured: list[Settings],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[server]\nport = 9000\nmax_queue = 3\nparallel = 2\n")
    monkeypatch.setenv("LLMSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("LLMSERVE_PARALLEL", "4")
    result = CliRunner().invoke(cli.app, ["run", "--config", str(path), "--parallel", "3"])
    assert result.exit_code == 0, result.output
    settings = captured[0]
    assert settings.parallel == 3  # flag > env > config
    assert settings.max_queue == 7  # env > config
    assert settings.port == 9000  # config > default
    assert settings.host == "127.0.0.1"  # default
    # an explicit value equal to the default still beats the config
    result = CliRunner().invoke(cli.app, ["run", "--config", str(path), "--port", "8080"])
    assert captured[1].port == 8080


@pytest.mark.parametrize(
    "args, fragment",
    [(["--config", "{tmp}/nope.toml"], "config file not found"),
     (["--config", "{tmp}/bad.toml"], "[server] port"),
     (["--models-dir", "{tmp}/nope"], "not a directory"),
     (["--ttl", "soon"], "--ttl"),
     (["--max-loaded-models", "0"], "--max-loaded-models")],
    ids=["missing-config", "bad-config", "missing-dir", "bad-ttl", "zero-models"],
)
def test_cli_config_errors_are_one_line(tmp_path: Path, captured: list[Settings],
                                        args: list[str], fragment: str) -> None:
    (tmp_path / "bad.toml").write_text("[server]\nport = 'x'\n")
    result = CliRunner().invoke(cli.app, ["run", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 1
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not captured
