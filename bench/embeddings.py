"""Embeddings throughput (issue 12): inputs/s for N short texts, llmserve over HTTP vs
llama-cpp-python's ``Llama(embedding=True).embed`` in-process, side by side in one run.

Both read the same model with the same pooling (mean), context, batch (n_batch = n_ubatch = the
context), sequences per decode, threads (n_threads = n_threads_batch) and flash attention (off:
llmserve's embedding default, and Llama's), so they run the same decodes and return the same
unit-length vectors (tests/test_embeddings_real.py checks that); what differs is the serving
around them. llmserve is measured two ways: one request carrying every text (/v1/embeddings
with a list), and the texts split over 8 concurrent clients (its worker batches them into shared
decodes). Repetitions are interleaved (the order rotates), one warm-up discarded, medians
reported. Target: llmserve ≥ 0.9× the in-process rate, as the median of per-repetition ratios.

Besides wall time, each pass's CPU time is counted (Linux): this process's for the in-process
side; the server's plus this process's (the HTTP client) for llmserve. On a machine that other
jobs load, wall time swings with their load; CPU time says whether llmserve does more work.
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

import _common as c
import httpx

TOPICS = ("cats", "the weather", "Paris", "a red bicycle", "coffee", "the ocean", "music",
          "mountains")


def texts(n: int) -> list[str]:
    return [f"Short sentence number {i} about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def one_request(url: str, inputs: list[str]) -> None:
    r = httpx.post(url + "/v1/embeddings", json={"input": inputs}, timeout=600)
    r.raise_for_status()
    assert len(r.json()["data"]) == len(inputs)


def concurrent_clients(url: str, inputs: list[str], clients: int) -> None:
    size = -(-len(inputs) // clients)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            responses = await asyncio.gather(*[
                client.post("/v1/embeddings", json={"input": inputs[i:i + size]})
                for i in range(0, len(inputs), size)])
        for r in responses:
            r.raise_for_status()

    asyncio.run(run())


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (Linux's /proc; None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF model (default: the demo model, served with pooling mean)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx-size", type=int, default=512,
                        help="context = batch size of both (default 512, Llama's n_batch)")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import llama_cpp

    model = c.model_path(args.model)
    rid = c.run_id("embeddings")
    inputs = texts(args.texts)
    print("loading llama_cpp.Llama(embedding=True) …", file=sys.stderr, flush=True)
    llama = llama_cpp.Llama(
        str(model), embedding=True, n_ctx=args.ctx_size, n_batch=args.ctx_size,
        n_ubatch=args.ctx_size, n_threads=args.threads, n_threads_batch=args.threads,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, flash_attn=False, n_gpu_layers=0,
        verbose=False)
    server_cmd = c.Contender(
        "llmserve", "llmserve",
        lambda port: c.llmserve_command(model, port, threads=args.threads,
                                        ctx_size=args.ctx_size, max_queue=64,
                                        extra=["--pooling", "mean", "--flash-attn", "off",
                                               "--n-gpu-layers", "0"]),
        env=c.same_llmserve_env())
    names = ("llama-cpp-python in-process", "llmserve, 1 request",
             f"llmserve, {args.clients} clients")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()
    with server_cmd.start(rid) as server:
        server_pid = server.proc.pid
        work = {
            names[0]: lambda: llama.embed(inputs, normalize=True),
            names[1]: lambda: one_request(server.url, inputs),
            names[2]: lambda: concurrent_clients(server.url, inputs, args.clients),
        }
        for rep in range(args.reps + 1):  # rep 0 warms up
            print(f"repetition {rep}/{args.reps}{' (warm-up)' if rep == 0 else ''}",
                  file=sys.stderr, flush=True)
            order = list(names[rep % 3:] + names[:rep % 3])
            for name in order:
                server_cpu0 = cpu_seconds(server_pid)
                cpu0, t0 = time.process_time(), time.perf_counter()
                work[name]()
                took, used = time.perf_counter() - t0, time.process_time() - cpu0
                server_cpu1 = cpu_seconds(server_pid)
                if name != names[0] and server_cpu0 is not None and server_cpu1 is not None:
                    used += server_cpu1 - server_cpu0
                print(f"  {name}: {took:.2f} s, {used:.2f} CPU-s", file=sys.stderr, flush=True)
                if rep:
                    seconds[name].append(took)
                    cpu[name].append(used)
    load_after = os.getloadavg()
    rate = {name: args.texts / statistics.median(s) for name, s in seconds.items()}
    # per repetition (the three ran back to back), so a machine whose speed drifts during the
    # run moves both sides of each ratio alike; the median of those is the figure to quote
    per_rep = {name: statistics.median(b / a for a, b in zip(s, seconds[names[0]], strict=True))
               for name, s in seconds.items()}
    # CPU-seconds of the in-process side over llmserve's: > 1 when llmserve spends less
    cpu_ratio = {name: statistics.median(cpu[names[0]]) / statistics.median(s)
                 for name, s in cpu.items()}
    base = rate[names[0]]
    rows = [[name, c.fmt(rate[name], 1), c.fmt(rate[name] / base, 2, "×"),
             c.fmt(per_rep[name], 2, "×"), c.fmt(statistics.median(cpu[name]), 2),
             c.fmt(cpu_ratio[name], 2, "×")] for name in names]
    ratio = per_rep[names[1]]
    data: dict[str, Any] = {
        "benchmark": "embeddings", "run_id": rid, "machine": c.machine(),
        "config": {"model": str(model), "threads": args.threads, "ctx_size": args.ctx_size,
                   "texts": args.texts, "clients": args.clients, "reps": args.reps},
        "load_average_before": load_before, "load_average_after": load_after,
        "inputs_per_s": rate, "seconds": seconds, "per_repetition_ratio": per_rep,
        "cpu_seconds": cpu, "cpu_ratio": cpu_ratio, "llmserve_vs_in_process": ratio,
    }
    path = c.write_results(rid, data)
    print(c.md_table(["contender", "inputs/s (median)", "ratio of medians",
                      "median of per-repetition ratios", "CPU-s per pass (median)",
                      "CPU-time ratio"], rows))
    print()
    print("load average (1, 5, 15 min): before " + ", ".join(f"{v:.2f}" for v in load_before)
          + "; after " + ", ".join(f"{v:.2f}" for v in load_after))
    print(f"llmserve (1 request) / in-process: {ratio:.2f}× (target ≥ 0.9×: "
          f"{c.verdict(ratio, lambda v: v >= 0.9)})")
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
