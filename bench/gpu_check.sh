#!/usr/bin/env bash
# GPU check: is the model really offloaded, what does /system/info say, and how fast is it with
# 1 and 8 streams, next to the same server on the CPU alone. Needs llama-cpp-python built with
# CUDA (see README "Install"). Usage: bench/gpu_check.sh [MODEL.gguf] [OUTDIR]
# (default: the demo model; results in bench/results/gpu-<time>/). Bounded: every step has a
# timeout; the servers it starts are stopped at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$(python3 -c "from llmserve.config import demo_model_path as d; print(d() or '')")}
OUT=${2:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
[ -f "$MODEL" ] || { echo "no model: give a .gguf path (or install the demo model)" >&2; exit 1; }
mkdir -p "$OUT"
get() { python3 -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" "$1" 2>/dev/null; }
serve() {  # serve PORT NGL: start llmserve, wait for /health
  python3 -m llmserve run "$MODEL" -ngl "$2" --port "$1" --parallel 8 --log-level info \
    > "$OUT/server-ngl$2.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 120); do get "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done
  echo "the server on port $1 did not come up; see $OUT/server-ngl$2.log" >&2; return 1
}
bench() {  # bench PORT NAME
  timeout 300 python3 -m llmserve bench --url "http://127.0.0.1:$1" --clients 1 --requests 8 \
    --max-tokens 256 --json > "$OUT/$2-1.json"
  timeout 300 python3 -m llmserve bench --url "http://127.0.0.1:$1" --clients 8 --requests 32 \
    --max-tokens 256 --json > "$OUT/$2-8.json"
}
python3 -c "
import json
from llmserve.engine.model import build_info
b = build_info(); b.pop('system_info', None); print(json.dumps(b, indent=1))" | tee "$OUT/build.json"
serve 8090 -1 || exit 2
get http://127.0.0.1:8090/system/info > "$OUT/system_info.json"
grep -m1 offload "$OUT/server-ngl-1.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid,used_memory --format=csv
bench 8090 gpu; kill $SERVER; wait $SERVER 2>/dev/null
serve 8091 0 || exit 2
bench 8091 cpu; kill $SERVER; wait $SERVER 2>/dev/null
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| streams | GPU tok/s | GPU TTFT p50 ms | CPU tok/s | GPU / CPU |\n|---|---|---|---|---|")
for n in (1, 8):
    g, c = (json.load(open(f"{out}/{k}-{n}.json")) for k in ("gpu", "cpu"))
    print(f"| {n} | {g['aggregate_tokens_per_s']:.0f} | {g['ttft_s']['p50'] * 1000:.0f} | "
          f"{c['aggregate_tokens_per_s']:.0f} | "
          f"{g['aggregate_tokens_per_s'] / c['aggregate_tokens_per_s']:.2f} |")
PY
echo "results: $OUT"
