"""Forced tool calls: decode tokens/s of a grammar-forced call against the same number of plain
tokens, on one llmserve (the demo model with the Hermes tool template of tests/fixtures).

The forced request names a tool whose arguments are a list of at least 100 numbers
(``tool_choice: {"type": "function", ...}``, so the grammar from its schema applies from the
first token, and the call cannot end before ``--max-tokens``); the plain one is a
/v1/completions request for the same rendered prompt (tools included: the context's length
changes decode speed) with ``ignore_eos``, so both generate exactly ``--max-tokens`` after the
same context. Repetitions alternate the two (drift in the machine's load hits both alike); one
warm-up pair is discarded; the rate is the server's own decode rate
(``timings.predicted_per_second``: tokens after the prompt / their time), so HTTP and prompt
reading are left out. The ratio is the median of the per-pair ratios.

Target (issue 11): forced / plain >= 0.9.

    python bench/tool_calls.py                   # 128 tokens, 7 pairs, 2 threads
    python bench/tool_calls.py --max-tokens 16 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import _common as c
import httpx

from llmserve.loadgen import llmserve_command, same_llmserve_env

TEMPLATE = c.REPO / "tests" / "fixtures" / "hermes_tools.jinja"
MESSAGES = [{"role": "user", "content": "Write down the first prime numbers."}]
TOOL = {"type": "function", "function": {
    "name": "record_numbers", "description": "Record a list of numbers",
    "parameters": {"type": "object", "properties": {
        # minItems: the call cannot end before max_tokens, so both requests generate as many
        "numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 100}},
        "required": ["numbers"]},
}}


def request(client: httpx.Client, base: str, *, forced: bool, max_tokens: int) -> dict[str, Any]:
    """The forced call on /v1/chat/completions; the plain one on /v1/completions with the very
    prompt chat renders (tools included: decode speed depends on the context's length)."""
    if forced:
        route, body = "/v1/chat/completions", {
            "messages": MESSAGES, "tools": [TOOL], "parallel_tool_calls": False,
            "tool_choice": {"type": "function", "function": {"name": "record_numbers"}}}
    else:
        rendered = client.post(f"{base}/apply-template",
                               json={"messages": MESSAGES, "tools": [TOOL]}, timeout=60)
        rendered.raise_for_status()
        route, body = "/v1/completions", {"prompt": rendered.json()["prompt"],
                                          "ignore_eos": True}
    r = client.post(f"{base}{route}", json={**body, "max_tokens": max_tokens, "temperature": 0},
                    timeout=600)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(parser)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7, help="measured pairs (default 7)")
    args = parser.parse_args()
    model = c.model_path(args.model)
    rid = c.run_id("tool_calls")
    contender = c.Contender(
        "llmserve", "llmserve",
        lambda port: llmserve_command(model, port, parallel=1, threads=args.threads,
                                      ctx_size=args.ctx_size, max_queue=4,
                                      extra=["--flash-attn", args.flash_attn,
                                             "--n-gpu-layers", str(args.n_gpu_layers),
                                             "--chat-template", str(TEMPLATE)]),
        env=same_llmserve_env(),
    )
    pairs: list[dict[str, Any]] = []
    with c.started([contender], rid) as servers, httpx.Client() as client:
        base = servers["llmserve"].url
        for rep in range(args.reps + 1):
            pair: dict[str, Any] = {}
            for forced in ((True, False) if rep % 2 else (False, True)):
                data = request(client, base, forced=forced, max_tokens=args.max_tokens)
                choice = data["choices"][0]
                if forced:
                    call = choice["message"]["tool_calls"][0]["function"]
                    pair["forced_call_name"] = call["name"]
                pair["forced" if forced else "plain"] = {
                    "tokens": data["timings"]["predicted_n"],
                    "tokens_per_s": data["timings"]["predicted_per_second"],
                    "finish_reason": choice["finish_reason"],
                }
            if rep:  # the first pair warms up
                pairs.append(pair)
    forced_rate = c.median([p["forced"]["tokens_per_s"] for p in pairs])
    plain_rate = c.median([p["plain"]["tokens_per_s"] for p in pairs])
    ratio = c.median([c.ratio(p["forced"]["tokens_per_s"], p["plain"]["tokens_per_s"])
                      for p in pairs])
    print(c.md_table(["request", "tokens", "tokens/s"], [
        ["forced tool call (grammar)", str(pairs[0]["forced"]["tokens"]), c.fmt(forced_rate)],
        ["plain (ignore_eos)", str(pairs[0]["plain"]["tokens"]), c.fmt(plain_rate)],
    ]))
    print()
    print(c.md_table(["ratio", "value", "target"], [
        ["forced / plain tokens/s", c.fmt(ratio, 3),
         f">= 0.9 ({c.verdict(ratio, lambda v: v >= 0.9)})"],
    ]))
    path = c.write_results(rid, {"args": {k: str(v) for k, v in vars(args).items()},
                                 "pairs": pairs, "ratio": ratio})
    print(f"\nresults: {path}")
    print(json.dumps({"forced_tps": forced_rate, "plain_tps": plain_rate, "ratio": ratio}))


if __name__ == "__main__":
    main()
