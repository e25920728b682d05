"""Replicas behind LiteLLM's Router, side by side in one run:

1. aggregate throughput: one llmserve replica (all the threads) against two replicas (half the
   threads each) behind ``litellm.Router``, the same streamed requests from the same number of
   concurrent clients;
2. the router's added latency to the first token: the same streamed requests sent one at a time
   straight to a replica and through the Router (p50, p95, and the difference).

On a machine with one CPU and no GPU, two replicas split the same cores: expect no throughput
gain (the figure shows what the router costs, not what a second GPU would bring). The figure that
carries over to a real fleet is the added time to first token.

    python bench/router.py [--requests 64] [--clients 8] [--max-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

PROMPT = "Write one sentence about the sea."


async def _stream(router: Any, client: Any, model: str, max_tokens: int
                  ) -> tuple[float, int]:
    """(seconds to the first content token, tokens counted by the server's usage)."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    kwargs: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = await (router.acompletion(**kwargs) if router is not None
                    else client.chat.completions.create(**kwargs))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        usage = getattr(chunk, "usage", None)
        if usage is not None and usage.completion_tokens:
            tokens = usage.completion_tokens
    return (first if first is not None else time.perf_counter() - started), tokens


async def _load(router: Any, client: Any, model: str, *, requests: int, clients: int,
                max_tokens: int) -> dict[str, float]:
    gate = asyncio.Semaphore(clients)

    async def one() -> tuple[float, int]:
        async with gate:
            return await _stream(router, client, model, max_tokens)

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(requests)))
    wall = time.perf_counter() - started
    tokens = sum(t for _, t in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


async def _ttft(router: Any, client: Any, model: str, n: int) -> list[float]:
    return [(await _stream(router, client, model, 4))[0] for _ in range(n)]


def _router(urls: list[str], model: str) -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    from llmserve import router_config as rc

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    import yaml

    config = yaml.safe_load(rc.litellm_config([rc.Replica(u) for u in urls], model=model,
                                              model_name=model, api_key=None))
    return litellm.Router(model_list=config["model_list"], **config["router_settings"])


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(parser)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4, help="slots per replica")
    parser.add_argument("--ttft-requests", type=int, default=40)
    args = parser.parse_args()
    model_path = c.model_path(args.model)
    from openai import AsyncOpenAI

    rid = c.run_id("router")
    half = max(1, args.threads // 2)
    one = c.llmserve(model_path, threads=args.threads, ctx_size=args.ctx_size,
                     parallel=args.parallel, flash_attn=args.flash_attn,
                     n_gpu_layers=args.n_gpu_layers, name="1 replica")
    twins = [c.llmserve(model_path, threads=half, ctx_size=args.ctx_size,
                        parallel=args.parallel, flash_attn=args.flash_attn,
                        n_gpu_layers=args.n_gpu_layers, name=f"replica {i}") for i in (1, 2)]
    results: dict[str, Any] = {"machine": c.machine(), "args": {
        k: str(v) for k, v in vars(args).items()}}
    load = {"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens}

    async def one_replica(url: str) -> tuple[dict[str, float], list[float], list[float]]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
        await _stream(None, client, "model", 4)  # warm-up
        load_result = await _load(None, client, "model", **load)
        direct = await _ttft(None, client, "model", args.ttft_requests)
        router = _router([url], "model")
        await _stream(router, None, "model", 4)
        routed = await _ttft(router, None, "model", args.ttft_requests)
        await client.close()
        return load_result, direct, routed

    async def two_replicas(urls: list[str]) -> dict[str, float]:
        router = _router(urls, "model")
        await _stream(router, None, "model", 4)
        return await _load(router, None, "model", **load)

    with c.started([one], rid) as servers:
        results["one_replica"], direct, routed = asyncio.run(
            one_replica(servers["1 replica"].url))
    with c.started(twins, rid) as servers:
        results["two_replicas_router"] = asyncio.run(
            two_replicas([s.url for s in servers.values()]))

    results["ttft_direct_s"] = {"p50": _pct(direct, 50), "p95": _pct(direct, 95)}
    results["ttft_router_s"] = {"p50": _pct(routed, 50), "p95": _pct(routed, 95)}
    added = {q: results["ttft_router_s"][q] - results["ttft_direct_s"][q] for q in ("p50", "p95")}
    results["router_added_ttft_s"] = added
    ratio = c.ratio(results["two_replicas_router"]["tokens_per_s"],
                    results["one_replica"]["tokens_per_s"])
    path = c.write_results(rid, results)

    print(c.md_table(["set-up", "tokens/s", "wall s"], [
        ["1 replica, direct", c.fmt(results["one_replica"]["tokens_per_s"]),
         c.fmt(results["one_replica"]["wall_s"])],
        ["2 replicas behind litellm.Router", c.fmt(results["two_replicas_router"]["tokens_per_s"]),
         c.fmt(results["two_replicas_router"]["wall_s"])],
        ["ratio 2 routed / 1 direct", c.fmt(ratio, 2), ""],
    ]))
    print()
    print(c.md_table(["time to first token", "p50 ms", "p95 ms"], [
        ["direct to the replica", c.fmt(results["ttft_direct_s"]["p50"] * 1000),
         c.fmt(results["ttft_direct_s"]["p95"] * 1000)],
        ["through litellm.Router", c.fmt(results["ttft_router_s"]["p50"] * 1000),
         c.fmt(results["ttft_router_s"]["p95"] * 1000)],
        ["added by the router", c.fmt(added["p50"] * 1000), c.fmt(added["p95"] * 1000)],
    ]))
    print(f"\nresults: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
