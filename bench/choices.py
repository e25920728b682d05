"""``n`` choices (issue 11): one request with ``n: 4`` against 4 separate concurrent requests
of the same prompt, llmserve --parallel 4 over HTTP, in one run.

Both ask /v1/completions for 4 completions of one prompt (~--prompt-sentences long, unique per
repetition so no cache carries over), --max-tokens tokens each (ignore_eos, so every choice
runs to the end), temperature 1 with a seed. ``n: 4`` reads the prompt once and forks the
choices from its cells (llama_memory_seq_cp); the 4 separate requests each read it (they arrive
together, so none finds it cached yet). Aggregate tokens/s = 4 x max_tokens / wall time from
sending to the last choice's end; the two alternate within a repetition (order reversed every
other one) and the ratio is the median of the per-repetition ratios. Target: n:4 >= 1.0x.

    python bench/choices.py                            # 3 repetitions, ~2-4 min on 2 cores
    python bench/choices.py --reps 1 --max-tokens 8    # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import _common as c
import httpx
from prompt_cache import history_text

LLMSERVE = "llmserve -np 4"
CHOICES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(parser)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens per choice (default 64)")
    parser.add_argument("--prompt-sentences", type=int, default=24,
                        help="prompt length (default 24 ≈ 600 tokens on SmolLM2)")
    args = parser.parse_args()

    model = c.model_path(args.model)
    rid = c.run_id("choices")
    spec = c.llmserve(model, threads=args.threads, ctx_size=args.ctx_size, parallel=CHOICES,
                      flash_attn=args.flash_attn, n_gpu_layers=args.n_gpu_layers,
                      name=LLMSERVE)
    runs: list[dict[str, Any]] = []
    with c.started([spec], rid) as servers:
        if LLMSERVE not in servers:
            raise SystemExit("llmserve did not start")
        url = servers[LLMSERVE].url + "/v1/completions"
        for rep in range(args.reps):
            c.note(f"repetition {rep + 1}/{args.reps}")
            order = ("n", "separate") if rep % 2 == 0 else ("separate", "n")
            run: dict[str, Any] = {}
            for i, how in enumerate(order):
                prompt = history_text(3000 + rep * 10 + i, args.prompt_sentences)
                run[how] = asyncio.run(measure(url, prompt, how, args.max_tokens))
            runs.append(run)
            c.note(f"n:4 {run['n']['tokens_per_s']:.1f} tokens/s, separate "
                   f"{run['separate']['tokens_per_s']:.1f} tokens/s")
    summary = summarise(runs)
    data = {"benchmark": "choices", "run_id": rid, "machine": c.machine(),
            "config": {"model": str(model), "threads": args.threads, "ctx_size": args.ctx_size,
                       "flash_attn": args.flash_attn, "n_gpu_layers": args.n_gpu_layers,
                       "reps": args.reps, "max_tokens": args.max_tokens,
                       "prompt_sentences": args.prompt_sentences},
            "summary": summary, "runs": runs}
    path = c.write_results(rid, data)
    print(render(summary))
    print(f"\nresults: {path}")


async def measure(url: str, prompt: str, how: str, max_tokens: int) -> dict[str, Any]:
    """Wall time and tokens of 4 completions of ``prompt``: one ``n: 4`` request, or 4
    concurrent ones. Raises when a choice comes back short."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        if how == "n":
            answers = [await post(client, url, {**body, "n": CHOICES})]
        else:
            answers = await asyncio.gather(*(post(client, url, {**body, "seed": 7 + i})
                                             for i in range(CHOICES)))
        wall = time.perf_counter() - started
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    if tokens != CHOICES * max_tokens:
        raise SystemExit(f"{how}: {tokens} tokens came back, not {CHOICES * max_tokens}")
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "prompt_tokens": answers[0]["usage"]["prompt_tokens"]}


async def post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(url, json=body)
    r.raise_for_status()
    answer: dict[str, Any] = r.json()
    return answer


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n_tokens_per_s": c.median([r["n"]["tokens_per_s"] for r in runs]),
        "separate_tokens_per_s": c.median([r["separate"]["tokens_per_s"] for r in runs]),
        "ratio": c.median([c.ratio(r["n"]["tokens_per_s"], r["separate"]["tokens_per_s"])
                           for r in runs]),
        "prompt_tokens": runs[0]["n"]["prompt_tokens"] if runs else None,
    }


def render(s: dict[str, Any]) -> str:
    return "\n".join([
        f"prompt: {s['prompt_tokens']} tokens; 4 choices",
        "",
        "| line | tokens/s (median) | target |",
        "|---|---|---|",
        f"| n: 4, one request | {c.fmt(s['n_tokens_per_s'])} | |",
        f"| 4 separate concurrent requests | {c.fmt(s['separate_tokens_per_s'])} | |",
        f"| ratio n:4 / separate | {c.fmt(s['ratio'], 2)} | ≥ 1.0 |",
    ])


if __name__ == "__main__":
    main()
