"""`llmserve router-config`: the configuration that puts LiteLLM (its proxy or its Python Router)
or nginx in front of several llmserve replicas, after checking that each replica answers.

We write no load balancer of our own: LiteLLM and nginx route, retry and cool replicas down.
What llmserve gives them is the signals (``/health`` 503 while loading, draining or failed; 503 +
Retry-After on a full queue before any work, which is always safe to retry elsewhere) and this
config. The YAML is written by hand (the structure is fixed and small) so that printing it
needs no YAML library; ``yaml.safe_load`` reads it back (the tests do).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

Format = Literal["litellm", "nginx"]

# LiteLLM's router settings for a fleet of equal replicas: send each request to the replica
# with the fewest in flight, retry a failed call (a 503 from a full or draining replica, a
# refused connection from a dead one) on another, and leave a failing replica alone for a while.
# Retries only cover a call until its first chunk; a stream cut after that (its replica died)
# is continued instead: see litellm_config.
ROUTER_SETTINGS: dict[str, object] = {
    "routing_strategy": "least-busy",
    "num_retries": 3,
    "allowed_fails": 1,
    "cooldown_time": 30,
    "retry_after": 0,
    "timeout": 600,
    "enable_mid_stream_fallback_continuation": True,
}


def continuation_group(model_name: str) -> str:
    """The model group that continues ``model_name``'s cut streams: the same replicas."""
    return f"{model_name}-continue"


@dataclass(frozen=True)
class Replica:
    url: str  # base URL, no trailing slash, no /v1
    models: tuple[str, ...] = ()
    healthy: bool = True
    problem: str = ""


def base_url(url: str) -> str:
    """``http://host:port`` from what a user may paste (a trailing slash or /v1)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"replica {url!r} is not an http(s) URL like http://127.0.0.1:8081")
    return url


def check(url: str, *, api_key: str | None) -> Replica:
    """Ask the replica for /v1/models and /health (through the client every command shares)."""
    from llmserve.client import Client
    from llmserve.errors import ClientError, ServerError, ServerUnreachable

    client = Client.connect(url, api_key)
    try:
        listed = client.get("/v1/models")
    except ServerUnreachable as exc:
        return Replica(url, healthy=False, problem=f"not reachable: {exc.message}")
    except ServerError as exc:
        hint = "; pass --api-key" if exc.http_status == 401 else ""
        return Replica(url, healthy=False, problem=exc.message + hint)
    except ClientError as exc:
        return Replica(url, healthy=False, problem=exc.message)
    models = tuple(m["id"] for m in (listed or {}).get("data", []) if "id" in m)
    try:
        client.get("/health")
    except ClientError as exc:
        status = exc.http_status if isinstance(exc, ServerError) else "no answer"
        return Replica(url, models, healthy=False,
                       problem=f"not ready (/health: {status}; loading, draining or failed)")
    return Replica(url, models)


def common_model(replicas: list[Replica]) -> str | None:
    """The first model every replica lists (the one a fleet serves)."""
    if not replicas or not replicas[0].models:
        return None
    for model in replicas[0].models:
        if all(model in r.models for r in replicas[1:]):
            return model
    return None


def litellm_config(replicas: list[Replica], *, model: str, model_name: str,
                   api_key: str | None) -> str:
    """The LiteLLM proxy's config.yaml; its ``model_list`` and ``router_settings`` are also
    exactly what ``litellm.Router(**...)`` takes.

    A stream whose replica dies after it sent some text cannot be retried (the client has the
    text). With ``enable_mid_stream_fallback_continuation`` LiteLLM's Router continues it: it
    sends a fallback deployment the messages plus the text so far as a trailing assistant
    message with ``prefix: true`` (llmserve continues it: ``chat_plan.split_prefill``) and
    splices the rest onto the client's stream. It does so only on a deployment whose
    ``model_info`` says ``supports_assistant_prefill`` (its price list does not know our
    models) and only through ``fallbacks``, which must name another group: a group listed as
    its own fallback is not used (checked with litellm 1.110). So every replica appears twice,
    the second time under ``continuation_group``.
    """
    continuation = continuation_group(model_name)
    lines = [
        f"# LiteLLM in front of {len(replicas)} llmserve replica(s) (llmserve router-config)",
        "# proxy: LITELLM_MASTER_KEY=sk-your-key litellm --config this.yaml --port 4000",
        "# Python: litellm.Router(model_list=cfg['model_list'], **cfg['router_settings'])",
        "model_list:",
    ]
    for group in (model_name, continuation):
        for replica in replicas:
            lines += [
                f"  - model_name: {_scalar(group)}",
                "    litellm_params:",
                # openai/ = an OpenAI-compatible server; the part after it is sent as `model`
                f"      model: {_scalar('openai/' + model)}",
                f"      api_base: {_scalar(replica.url + '/v1')}",
                f"      api_key: {_scalar(api_key or 'none')}",
                "    model_info:",
                "      supports_assistant_prefill: true",
            ]
    lines.append("router_settings:")
    lines += [f"  {key}: {_scalar(value)}" for key, value in ROUTER_SETTINGS.items()]
    lines += [
        "  # a stream cut after its first words goes on on the same replicas' -continue group",
        # a JSON list is a YAML flow sequence
        f"  fallbacks: {json.dumps([{model_name: [continuation]}], allow_nan=False)}",
        "general_settings:",
        "  # the key clients of the proxy send (the proxy refuses to start without one)",
        '  master_key: "os.environ/LITELLM_MASTER_KEY"',
        "  # the proxy polls each replica; llmserve's /health is 503 while loading or draining",
        "  background_health_checks: true",
        "  health_check_interval: 30",
    ]
    return "\n".join(lines) + "\n"


def nginx_config(replicas: list[Replica], *, listen: int) -> str:
    servers = "\n".join(
        f"    server {urlsplit(r.url).netloc} max_fails=1 fail_timeout=30s;" for r in replicas)
    return f"""# nginx in front of {len(replicas)} llmserve replica(s) (llmserve router-config)
upstream llmserve {{
    least_conn;
{servers}
    keepalive 32;
}}

server {{
    listen {listen};
    location / {{
        proxy_pass http://llmserve;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        # tokens must reach the client as they are generated
        proxy_buffering off;
        proxy_read_timeout 600s;
        # a 503 (queue full, loading, draining) comes before any work: safe to resend, POSTs too
        proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        proxy_next_upstream_tries {len(replicas)};
    }}
}}
"""


def _scalar(value: object) -> str:
    """A YAML scalar: numbers as they are, strings JSON-quoted (JSON strings are YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value), allow_nan=False)
