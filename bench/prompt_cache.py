"""Prompt reading and prompt-cache reuse (issue 10), llmserve --parallel 2 over HTTP, in one run:

read     a ~1,500-token prompt alone on the server: time to first token, against the same
         prompt evaluated in-process by llama_cpp.Llama (its default n_batch = n_ubatch = 512,
         as llmserve's; create_completion, max_tokens=1, streamed).
         Target: llmserve <= 1.1 x in-process.
resend   a chat over a ~1,500-token history, streamed; the connection dropped at the first
         content token and the next turn (the history + one more user message) sent at once,
         as SillyTavern's Stop then Regenerate does. Target: the second turn's first token in
         <= 10% of the first turn's time (the history is read from the cache).

Each repetition uses a history no earlier prompt starts with (the session number leads), so no
cache carries over; contenders alternate within a repetition, and the ratios are medians of the
per-repetition (paired) ratios. The same llama.cpp settings everywhere: model, threads, context
size, flash attention (auto = on, as llmserve's default).

    python bench/prompt_cache.py                       # 3 repetitions, ~3-6 min on 2 cores
    python bench/prompt_cache.py --reps 1 --history-sentences 12   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import _common as c
import httpx
from concurrency import history
from single_stream import load_in_process

LLMSERVE = "llmserve -np 2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(parser)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--history-sentences", type=int, default=60,
                        help="history length (default 60 ≈ 1,500 tokens on SmolLM2)")
    args = parser.parse_args()

    model = c.model_path(args.model)
    rid = c.run_id("prompt_cache")
    server_spec = c.llmserve(model, threads=args.threads, ctx_size=args.ctx_size, parallel=2,
                             flash_attn=args.flash_attn, name=LLMSERVE)
    llm = load_in_process(model, threads=args.threads, ctx_size=args.ctx_size,
                          flash_attn=c.flash_attn_bool(args.flash_attn))
    reads: list[dict[str, Any]] = []
    resends: list[dict[str, Any]] = []
    with c.started([server_spec], rid) as servers, httpx.Client(timeout=600) as client:
        if LLMSERVE not in servers:
            raise SystemExit("llmserve did not start")
        url = servers[LLMSERVE].url
        for rep in range(args.reps):
            session = 2000 + rep
            progress(f"read {rep + 1}/{args.reps}")
            prompt = history_text(session, args.history_sentences)
            in_process = time_in_process(llm, prompt)
            served, _ = stream(client, url + "/v1/completions",
                               {"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                "stream": True}, drop_after_first=False)
            reads.append({"prompt_tokens": len(llm.tokenize(prompt.encode())),
                          "in_process_ms": in_process * 1000, "llmserve_ms": served * 1000})
            progress(f"resend {rep + 1}/{args.reps}")
            resends.append(resend_once(client, url, session + 100, args.history_sentences))

    summary = summarise(reads, resends)
    data = {"benchmark": "prompt_cache", "run_id": rid, "machine": c.machine(),
            "config": {"model": str(model), "threads": args.threads, "ctx_size": args.ctx_size,
                       "flash_attn": args.flash_attn, "reps": args.reps,
                       "history_sentences": args.history_sentences},
            "summary": summary, "read": reads, "resend": resends}
    path = c.write_results(rid, data)
    print(render(summary, args))
    print(f"\nresults: {path}")


def progress(message: str) -> None:
    c.note(message)


def history_text(session: int, sentences: int) -> str:
    return "\n".join(m["content"] for m in history(session, sentences))


def time_in_process(llm: Any, prompt: str) -> float:
    """Seconds to the first streamed token of ``prompt`` (tokenise, read, sample one)."""
    started = time.perf_counter()
    for _chunk in llm.create_completion(prompt, max_tokens=1, temperature=0.0, stream=True):
        return time.perf_counter() - started
    raise RuntimeError("no token")


def stream(client: httpx.Client, url: str, body: dict[str, Any], *,
           drop_after_first: bool) -> tuple[float, dict[str, Any]]:
    """(seconds to the first token, the timings and usage the last chunks carried); with
    ``drop_after_first`` the connection is closed at the first content token."""
    started = time.perf_counter()
    first: float | None = None
    last: dict[str, Any] = {}
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            choices = chunk.get("choices") or []
            choice = choices[0] if choices else {}
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if first is None and text:
                first = time.perf_counter() - started
                if drop_after_first:
                    break
            last.update((k, chunk[k]) for k in ("timings", "usage") if chunk.get(k))
    if first is None:
        raise SystemExit(f"{url}: no token came")
    return first, last


def resend_once(client: httpx.Client, url: str, session: int,
                sentences: int) -> dict[str, Any]:
    messages = [*history(session, sentences),
                {"role": "user", "content": "Which animal walked the most steps?"}]
    body: dict[str, Any] = {"messages": messages, "max_tokens": 200, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    path = url + "/v1/chat/completions"
    first, _ = stream(client, path, body, drop_after_first=True)
    body = {**body, "max_tokens": 8,
            "messages": [*messages, {"role": "user", "content": "And which walked the fewest?"}]}
    second, last = stream(client, path, body, drop_after_first=False)
    return {"first_ttft_ms": first * 1000, "second_ttft_ms": second * 1000,
            "second_prompt_tokens": last.get("usage", {}).get("prompt_tokens"),
            "second_cache_n": last.get("timings", {}).get("cache_n")}


def summarise(reads: list[dict[str, Any]], resends: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "prompt_tokens": reads[0]["prompt_tokens"] if reads else None,
        "in_process_ms": c.median([r["in_process_ms"] for r in reads]),
        "llmserve_ms": c.median([r["llmserve_ms"] for r in reads]),
        "read_ratio": c.median([c.ratio(r["llmserve_ms"], r["in_process_ms"]) for r in reads]),
        "first_ttft_ms": c.median([r["first_ttft_ms"] for r in resends]),
        "second_ttft_ms": c.median([r["second_ttft_ms"] for r in resends]),
        "second_prompt_tokens": resends[0]["second_prompt_tokens"] if resends else None,
        "second_cache_n": [r["second_cache_n"] for r in resends],
        "resend_ratio": c.median([c.ratio(r["second_ttft_ms"], r["first_ttft_ms"])
                                  for r in resends]),
    }


def render(s: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        [f"read: {s['prompt_tokens']}-token prompt alone, llmserve / Llama(n_batch=512) TTFT",
         f"{c.fmt(s['llmserve_ms'], 0)} / {c.fmt(s['in_process_ms'], 0)} ms",
         c.fmt(s["read_ratio"], 3), "≤ 1.1", c.verdict(s["read_ratio"], lambda v: v <= 1.1)],
        [f"resend: turn 2 ({s['second_prompt_tokens']} tokens, cache_n "
         f"{', '.join(str(n) for n in s['second_cache_n'])}) / turn 1 TTFT",
         f"{c.fmt(s['second_ttft_ms'], 0)} / {c.fmt(s['first_ttft_ms'], 0)} ms",
         c.fmt(s["resend_ratio"], 3), "≤ 0.10",
         c.verdict(s["resend_ratio"], lambda v: v <= 0.10)],
    ]
    return "\n".join([
        f"### Prompt reading and cache reuse: llmserve -np 2, {args.threads} threads, "
        f"flash attention {args.flash_attn}, median of {args.reps}\n",
        c.md_table(["line", "times (medians)", "ratio", "target", ""], rows),
    ])


if __name__ == "__main__":
    main()
