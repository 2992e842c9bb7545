#!/usr/bin/env bash
# Front-end processes sharing one GPU through Triton: live streams at p95 final latency <= 2 s for 1, 4, 8 and
# 16 front-end processes, with an XLSR-large-sized random model in bfloat16 on one GPU (issue 15's target: at
# least 1,000 streams on one H200), with GPU utilisation (nvidia-smi) and Triton's batch sizes.
#
#   bash deploy/gpu_bench.sh prepare   # here (network): the wheels the GPU machine lacks, into .whl-a and .whl-b
#   bash deploy/gpu_bench.sh run       # on the GPU machine, from the repository root: prints the table, writes $OUT
#
# The GPU machine has no network and takes at most 64 MiB of files a call: nvidia-pytriton alone is 55 MB, so
# the wheels travel in two calls, .whl-a (carry it, command `bash deploy/gpu_bench.sh stash`) then .whl-b
# (carry it, command `bash deploy/gpu_bench.sh run`), within the machine's 30 s warm time. Its python3 (3.12,
# torch with CUDA) gets the wheels with --no-deps in /tmp/site; numpy 1.26 because PyTriton pins numpy < 2.
#
# Knobs (environment): PROCS="1 4 8 16", LEVELS_<P> (clients tried for P processes), SECONDS_PER_CLIENT=15,
# CLIENT_PROCS=8, MAX_BATCH=256, QUEUE_DELAY_MS=5; for a dry run on a CPU: SKIP_INSTALL=1 MODEL_SIZE=tiny DEVICE=cpu
# DTYPE=float32. Device time is scarce: the defaults take about 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"

prepare() {
  grep -qx '/.whl-\*/' .git/info/exclude 2>/dev/null || echo '/.whl-*/' >> .git/info/exclude
  rm -rf .whl-a .whl-b && mkdir -p .whl-a .whl-b
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
              --platform manylinux1_x86_64 --platform any)
  "$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl-b nvidia-pytriton==0.7.0 tritonclient==2.73.0 \
    numpy==1.26.4 websockets aiomqtt paho-mqtt soxr soundfile flashlight-text wyoming pyzmq sh geventhttpclient \
    gevent zope.event zope.interface brotli python-rapidjson greenlet
  # the PyTriton wheel in two pieces, one per call
  local whl; whl=$(ls .whl-b/nvidia_pytriton-*.whl)
  split -b 44m "$whl" .whl-a/pytriton.part. && rm "$whl" && mv .whl-a/pytriton.part.ab .whl-b/
  echo "$(basename "$whl")" > .whl-b/pytriton.name
  # the clients' speech (the GPU machine has no espeak-ng)
  "$PY" -c "import soundfile as sf; from streamer.testing import speech_audio
sf.write('.whl-b/speech.wav', speech_audio(${SECONDS_PER_CLIENT:-15}), 16000, subtype='PCM_16')"
  du -sh .whl-a .whl-b
}

stash() { mkdir -p /tmp/wheels && cp .whl-a/* /tmp/wheels/ && ls -la /tmp/wheels; }

install() {
  cp .whl-b/*.whl .whl-b/pytriton.* /tmp/wheels/
  AUDIO=${AUDIO:-$PWD/.whl-b/speech.wav}
  (cd /tmp/wheels && cat pytriton.part.* > "$(cat pytriton.name)" && rm pytriton.part.* pytriton.name)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
}

triton() {  # Triton's counters of the model (requests, windows, executions), summed over its versions
  "$PY" - <<'EOF'
import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8002/metrics", timeout=10).read().decode()
print(*(sum(float(v) for v in re.findall(rf'^{m}{{model="streamer"[^}}]*}} (\S+)$', text, re.M))
        for m in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")))
EOF
}

wait_http() {  # wait_http URL SECONDS
  "$PY" -c "
import sys, time, urllib.request
for _ in range(int(sys.argv[2])):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2); break
    except Exception:
        time.sleep(1)" "$1" "$2"
}

run() {
  [ -n "${SKIP_INSTALL:-}" ] || install
  local size=${MODEL_SIZE:-xlsr-large} model=/tmp/random-model
  "$PY" -c "from streamer.testing import save_random_model; save_random_model('$size', '$model')" >/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
  # one model server for every daemon below: bf16 on the GPU, a dynamic batcher of up to MAX_BATCH windows
  local common=(--model "$model" --set model.device="'${DEVICE:-cuda}'" --set model.dtype="'${DTYPE:-bfloat16}'"
                --set model_server.max_batch="${MAX_BATCH:-256}" --set model_server.max_queue_delay_ms="${QUEUE_DELAY_MS:-5}")
  setsid "$PY" -m streamer model-server "${common[@]}" > "$OUT/model_server.log" 2>&1 &
  MS_PID=$!
  trap 'kill -TERM -- -$MS_PID 2>/dev/null || true' EXIT
  wait_http http://127.0.0.1:8000/v2/health/ready 300
  # per process count: the clients tried, the most streams with p95 final latency <= 2 s, each level's p95 (s) and
  # the front ends' CPU seconds per stream-second (all their processes: issue 31's <= 0.01 with the default decoder),
  # mean GPU utilisation (%), requests per execution (front-ends merged) and windows per execution (batch size)
  printf '%-6s %-22s %8s %16s %22s %9s %9s %9s\n' procs clients streams p95_final_s front_cpu_per_stream_s gpu_util \
    req/exec win/exec | tee "$OUT/table.txt"
  for p in ${PROCS:-1 4 8 16}; do
    local levels_var="LEVELS_$p" levels
    case $p in 1) levels=128,256,384 ;; 4) levels=384,640,896 ;; 8) levels=640,896,1152 ;; *) levels=896,1152,1408 ;; esac
    levels=${!levels_var:-$levels}
    local port=$((9000 + p))
    "$PY" -m streamer serve --processes "$p" --port "$port" "${common[@]}" --set model_server.kind=\'triton\' \
      --set model_server.url=\'127.0.0.1:8001\' --set server.max_streams=4096 --set worker.max_batch=128 \
      > "$OUT/serve_$p.log" 2>&1 &
    local daemon=$!
    wait_http "http://127.0.0.1:$port/healthz" 180
    local before; before=$(triton)
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$OUT/util_$p.txt" 2>/dev/null &
    local smi=$!
    "$PY" clients/loadtest.py --url "ws://127.0.0.1:$port/v1/stream" --daemon-pid "$daemon" --procs "${CLIENT_PROCS:-8}" --clients "$levels" \
      --seconds "${SECONDS_PER_CLIENT:-15}" ${AUDIO:+--audio "$AUDIO"} --cycles 0 --json "$OUT/loadtest_$p.json" > "$OUT/loadtest_$p.log" 2>&1 || true
    kill "$smi" 2>/dev/null || true; kill -TERM "$daemon"; wait "$daemon" || true
    local after; after=$(triton)
    "$PY" - "$p" "$levels" "$OUT" "$before" "$after" <<'EOF' | tee -a "$OUT/table.txt"
import json, sys
p, levels, out, before, after = sys.argv[1:]
(r0, w0, e0), (r1, w1, e1) = ([float(x) for x in s.split()] for s in (before, after))
try:
    lt = json.load(open(f"{out}/loadtest_{p}.json"))
    best, p95 = lt["max_clients_p95_ok"], "/".join(f"{lv['final_p95']:.2f}" for lv in lt["levels"])
    cpu = "/".join(f"{lv['cost'].get('front_cpu_s_per_audio_s', float('nan')):.4f}" for lv in lt["levels"])
except (OSError, ValueError, KeyError):
    best, p95, cpu = "?", "?", "?"
util = [float(x) for x in open(f"{out}/util_{p}.txt").read().split() if x.replace(".", "").isdigit()]
print(f"{p:<6} {levels:<22} {best:>8} {p95:>16} {cpu:>22} {sum(util) / max(1, len(util)):>9.0f} "
      f"{(r1 - r0) / max(1, e1 - e0):>9.2f} {(w1 - w0) / max(1, e1 - e0):>9.2f}")
EOF
  done
}

case "${1:-}" in
  prepare) prepare ;;
  stash) stash ;;
  run) run ;;
  *) echo "usage: $0 prepare | stash | run" >&2; exit 2 ;;
esac
