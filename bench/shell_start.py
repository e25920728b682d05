"""How fast the shell commands start (issue 14, item 5): `llmserve --version` (target: median
under 0.2 s) and `llmserve ask` for a 1-token answer from a warm local server (target: median
under 0.3 s), each run N times as a user runs them (a fresh `python -m llmserve` process), median
and max. Side by side, for scale: a bare `python -c pass`, and the same chat request made from
this process (the server's part of `ask`'s time). Besides wall time it reports the CPU time
(user + system) of each command's process: on a shared machine the wall time mostly measures
the wait for a CPU.

    python bench/shell_start.py            # serves the demo model on a free port
    python bench/shell_start.py --url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from _common import md_table, median, model_path, run_id, verdict, write_results

from llmserve.loadgen import llmserve_server, same_llmserve_env

BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


def timed(run: Callable[[], None], n: int) -> dict[str, list[float]]:
    """Wall seconds of each run, and the CPU seconds (user + system) of the child processes it
    ran: on a busy machine the wall time mostly measures waiting for a CPU."""
    wall, cpu = [], []
    for _ in range(n):
        before = _children_cpu()
        started = time.perf_counter()
        run()
        wall.append(time.perf_counter() - started)
        cpu.append(_children_cpu() - before)
    return {"wall": wall, "cpu": cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def command(argv: Sequence[str]) -> Callable[[], None]:
    # As a user's Python runs it: bytecode written once and reused (pip compiles it at install).
    # Where PYTHONDONTWRITEBYTECODE is set (this workplace's shells), every run would compile
    # llmserve's modules from source again (~30 ms): measured that way before this was unset.
    env = {k: v for k, v in {**os.environ, **same_llmserve_env()}.items()
           if k != "PYTHONDONTWRITEBYTECODE"}

    def run() -> None:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True,
                       env=env, timeout=120)

    return run


def direct_request(url: str) -> Callable[[], None]:
    parts = urllib.parse.urlsplit(url)

    def run() -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(BODY),
                     headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        conn.close()

    return run


def measure(url: str, n: int) -> dict[str, dict[str, list[float]]]:
    llmserve = [sys.executable, "-m", "llmserve"]
    ask = [*llmserve, "ask", "--url", url, "--max-tokens", "1", "--temperature", "0", "Hi"]
    command(ask)()  # warm: the model has read the prompt once, the OS has cached the files
    return {
        "python -c pass": timed(command([sys.executable, "-c", "pass"]), n),
        "llmserve --version": timed(command([*llmserve, "--version"]), n),
        "llmserve ask (1 token)": timed(command(ask), n),
        "same request in-process (server time)": timed(direct_request(url), n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF to serve (default: the demo model)")
    parser.add_argument("-n", "--runs", type=int, default=20, help="runs of each (default 20)")
    args = parser.parse_args()
    if args.url:
        results = measure(args.url, args.runs)
    else:
        with llmserve_server(model_path(args.model), parallel=1) as server:
            results = measure(server.url, args.runs)
    load = os.getloadavg()
    targets = {"llmserve --version": 0.2, "llmserve ask (1 token)": 0.3}
    rows = []
    for name, times in results.items():
        med, target = median(times["wall"]), targets.get(name)
        cpu = "" if name.startswith("same request") else f"{median(times['cpu']):.3f}"
        rows.append([name, f"{med:.3f}", f"{max(times['wall']):.3f}", cpu,
                     f"< {target}" if target else "",
                     verdict(med, lambda m, t=target: m < t) if target else ""])
    print(f"{args.runs} runs each; load average {load[0]:.2f} (1 min) on "
          f"{os.cpu_count()} CPUs at the end\n")
    print(md_table(["command", "median s", "max s", "median CPU s", "target", ""], rows))
    path = write_results(run_id("shell_start"), {"runs": args.runs, "load_average": load,
                                                   "seconds": results})
    print(f"\nevery run: {path}")


if __name__ == "__main__":
    main()
