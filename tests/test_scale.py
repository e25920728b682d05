"""Scale-out without a model (tiers 1 and 2): router-config's output, the --rpc and
--tensor-split settings, and the refusal of --rpc by a build without RPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from llmserve import cli
from llmserve import router_config as rc
from llmserve.config import Settings, resolve_settings
from tests.conftest import free_port, requires_llama_cpp

runner = CliRunner()


def test_replica_urls_are_normalised() -> None:
    assert rc.base_url("http://127.0.0.1:8081/v1/") == "http://127.0.0.1:8081"
    assert rc.base_url(" http://gpu-box:8080 ") == "http://gpu-box:8080"
    for bad in ("127.0.0.1:8081", "ftp://x:1", "http://"):
        with pytest.raises(ValueError, match="is not an http"):
            rc.base_url(bad)


def test_the_model_every_replica_serves_is_chosen() -> None:
    a = rc.Replica("http://a:1", ("x", "smol"))
    b = rc.Replica("http://b:1", ("smol",))
    assert rc.common_model([a, b]) == "smol"
    assert rc.common_model([a, rc.Replica("http://c:1", ("other",))]) is None


def test_litellm_config_is_yaml_that_litellm_router_takes() -> None:
    replicas = [rc.Replica("http://127.0.0.1:8081"), rc.Replica("http://127.0.0.1:8082")]
    text = rc.litellm_config(replicas, model="SmolLM2: 135M", model_name="smol",
                             api_key='k"ey')
    config: dict[str, Any] = yaml.safe_load(text)
    # every replica twice: the group clients ask for, and the group that continues its streams
    assert [(d["model_name"], d["litellm_params"]["api_base"]) for d in config["model_list"]] == [
        ("smol", "http://127.0.0.1:8081/v1"), ("smol", "http://127.0.0.1:8082/v1"),
        ("smol-continue", "http://127.0.0.1:8081/v1"),
        ("smol-continue", "http://127.0.0.1:8082/v1")]
    for deployment in config["model_list"]:
        assert deployment["litellm_params"]["model"] == "openai/SmolLM2: 135M"
        assert deployment["litellm_params"]["api_key"] == 'k"ey'
        assert deployment["model_info"] == {"supports_assistant_prefill": True}
    assert config["router_settings"] == {**rc.ROUTER_SETTINGS,
                                         "fallbacks": [{"smol": ["smol-continue"]}]}
    assert config["router_settings"]["enable_mid_stream_fallback_continuation"] is True
    assert config["general_settings"]["background_health_checks"] is True


def test_nginx_config_lists_each_replica_and_retries_503s() -> None:
    replicas = [rc.Replica("http://127.0.0.1:8081"), rc.Replica("http://10.0.0.2:8080")]
    text = rc.nginx_config(replicas, listen=9000)
    assert "server 127.0.0.1:8081 max_fails=1" in text
    assert "server 10.0.0.2:8080 max_fails=1" in text
    assert "listen 9000;" in text and "proxy_buffering off;" in text
    assert "http_503 non_idempotent" in text and "proxy_next_upstream_tries 2;" in text
    assert text.count("{") == text.count("}")


def test_router_config_without_check_prints_the_config() -> None:
    r = runner.invoke(cli.app, ["router-config", "--no-check", "-r", "http://127.0.0.1:8081",
                                "-r", "http://127.0.0.1:8082/v1", "--model-name", "smol"])
    assert r.exit_code == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    assert [d["litellm_params"]["api_base"] for d in config["model_list"]] == [
        "http://127.0.0.1:8081/v1", "http://127.0.0.1:8082/v1"] * 2
    assert r.stderr == ""


def test_router_config_refuses_an_unreachable_replica() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = runner.invoke(cli.app, ["router-config", "-r", dead])
    assert r.exit_code == 2
    assert r.stdout == ""
    assert f"replica {dead}: not reachable" in r.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [(["--format", "haproxy"], "--format: expected litellm or nginx"),
     (["-r", "localhost:8081"], "is not an http(s) URL")],
)
def test_router_config_bad_usage(args: list[str], fragment: str) -> None:
    r = runner.invoke(cli.app, ["router-config", "--no-check", "-r", "http://a:1", *args])
    assert r.exit_code == 1
    assert fragment in r.stderr


def test_rpc_and_tensor_split_settings() -> None:
    s = Settings(rpc="127.0.0.1:50052, [::1]:50053", tensor_split="3,1")
    assert s.rpc == ["127.0.0.1:50052", "[::1]:50053"]
    assert s.model_options().tensor_split == [3.0, 1.0]
    assert Settings().rpc == [] and Settings().tensor_split is None


@pytest.mark.parametrize(
    "args, fragment",
    [(["--rpc", "box"], "RPC server 'box' is not HOST:PORT"),
     (["--rpc", "box:0"], "is not HOST:PORT"),
     (["--tensor-split", "3,x"], "--tensor-split takes numbers"),
     (["--tensor-split", "0,0"], "at least one above 0")],
)
def test_bad_rpc_flags_are_one_line_errors(args: list[str], fragment: str) -> None:
    r = runner.invoke(cli.app, ["run", "x.gguf", *args])
    assert r.exit_code == 1
    assert fragment in r.stderr


def test_models_toml_takes_rpc_per_model(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.big]\npath = "big.gguf"\nrpc = ["10.0.0.2:50052", '
                    '"10.0.0.3:50052"]\ntensor_split = [1, 1, 2]\n[models.small]\n'
                    'path = "small.gguf"\n')
    values = {**Settings().model_dump(exclude={"models", "sampling"}), "config": path}
    big, small = resolve_settings(values, set()).models
    assert big.rpc == ["10.0.0.2:50052", "10.0.0.3:50052"]
    assert big.tensor_split == [1.0, 1.0, 2.0]
    assert small.rpc == [] and small.tensor_split is None


@requires_llama_cpp
def test_rpc_without_an_rpc_build_says_how_to_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmserve.engine import rpc
    from llmserve.errors import ModelLoadError

    monkeypatch.setattr(rpc, "supported", lambda: False)
    with pytest.raises(ModelLoadError, match='CMAKE_ARGS="-DGGML_RPC=on"') as caught:
        rpc.connect(["127.0.0.1:50052"])
    assert "\n" not in caught.value.message


@requires_llama_cpp
def test_rpc_to_nothing_listening_is_a_clear_load_error() -> None:
    from llmserve.engine import rpc
    from llmserve.errors import ModelLoadError

    if not rpc.supported():
        pytest.skip("this llama-cpp-python has no RPC backend (CI builds it with one)")
    with pytest.raises(ModelLoadError, match="cannot reach the RPC server"):
        rpc.connect([f"127.0.0.1:{free_port()}"])
