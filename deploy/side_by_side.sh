#!/usr/bin/env bash
# Two daemons side by side on one core: the package of git revision REV and this working tree, each serving N live
# streams (clients/loadtest.py, the demo model's speech at 1x real time) at the same time, so that both meet the
# same machine. This machine's speed moves by a quarter from one hour to the next, and daemons run one after the
# other (loadtest --compare, or alternated runs) show it as much as what changed; run side by side, a few per cent
# shows in every repetition. Prints, per repetition, each daemon's CPU per audio second per stream (its event loop's
# and engine thread's apart: loadtest --daemon-pid) and its final latency, and this tree's CPU over REV's.
#
#   STREAMER_TRITON_PYTHON=<a python with streamer[triton-server]> bash deploy/side_by_side.sh HEAD~1 16 3
#
# Core 0 runs the two daemons; core 1 the clients and the model server (`streamer model-server --memo`: windows
# it has answered before come from memory, so the model's cost is left out). N of 16 each keeps core 0 below
# full; a full core shares itself out and shows little. Knobs (environment): PORT_BASE=8765, GRPC_PORT=8101,
# THIS_SET="SECTION.KEY=VALUE ..." (config overrides of this tree's daemon only: REV = HEAD compares a setting),
# THIS_LOAD="--finals-only" (loadtest options of this tree's clients only: REV = HEAD compares what clients ask),
# THIS_ENV="NAME=VALUE ..." (the environment of this tree's daemon only), BOTH_SET="SECTION.KEY=VALUE ..." (config
# overrides of both daemons: BOTH_SET="decoder.words='' decoder.lm=''" compares them decoding greedily),
# THIS_SERVER_SET="SECTION.KEY=VALUE ..." (this tree's daemon gets a model server of its own, started with these
# overrides and given to the daemon too: THIS_SERVER_SET="model_server.dtype=int16" compares what travels).
set -euo pipefail
REV=${1:?usage: side_by_side.sh REV [STREAMS] [REPS]}
N=${2:-16}
REPS=${3:-3}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TRITON_PY=${STREAMER_TRITON_PYTHON:?set STREAMER_TRITON_PYTHON to a python that has streamer[triton-server]}
P1=${PORT_BASE:-8765}
P2=$((P1 + 1))
GRPC=${GRPC_PORT:-8101}
WORK=$(mktemp -d)
git worktree add -q --detach "$WORK/rev" "$REV"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  git worktree remove --force "$WORK/rev" || true
  rm -rf "$WORK"
}
trap cleanup EXIT

logs=()
model_server() {  # model_server GRPC_PORT [SET...]: a memo model server on core 1, its log in $WORK
  local grpc=$1
  shift
  taskset -c 1 "$TRITON_PY" -m streamer model-server --model demo --memo 16384 --grpc-port "$grpc" \
    --http-port $((grpc + 1)) --metrics-port $((grpc + 2)) "$@" > "$WORK/model$grpc.log" 2>&1 &
  pids+=($!)
  logs+=("$WORK/model$grpc.log")
}
model_server "$GRPC"
this_grpc=$GRPC
server_set=()
for kv in ${THIS_SERVER_SET:-}; do server_set+=(--set "$kv"); done
if ((${#server_set[@]})); then
  this_grpc=$((GRPC + 10))
  model_server "$this_grpc" "${server_set[@]}"
fi
serve() {  # serve TREE PORT GRPC ENV [SET...]: a daemon of the package in TREE on core 0; its pid in $served
  local tree=$1 port=$2 grpc=$3 env=$4
  shift 4
  # shellcheck disable=SC2086  # (ENV: NAME=VALUE words)
  (cd "$tree" && exec env $env taskset -c 0 "$PY" -m streamer serve --model demo --port "$port" \
    --set server.max_streams=1024 --set model_server.kind=triton --set model_server.url=127.0.0.1:"$grpc" \
    "${both_set[@]}" "$@") \
    > "$WORK/daemon$port.log" 2>&1 &
  served=$!  # (the subshell execs taskset, which execs python: the daemon's own pid)
  pids+=("$served")
}
both_set=()
for kv in ${BOTH_SET:-}; do both_set+=(--set "$kv"); done
for log in "${logs[@]}"; do
  for _ in $(seq 180); do grep -q "on grpc" "$log" && break; sleep 1; done
done
serve "$WORK/rev" "$P1" "$GRPC" ""
A=$served
this_set=()
for kv in ${THIS_SET:-}; do this_set+=(--set "$kv"); done
serve "$PWD" "$P2" "$this_grpc" "${THIS_ENV:-}" "${this_set[@]}" "${server_set[@]}"
B=$served
for _ in $(seq 120); do
  grep -q "listening on" "$WORK/daemon$P1.log" && grep -q "listening on" "$WORK/daemon$P2.log" && break
  sleep 1
done
load() {  # load PORT PID STREAMS [LOADTEST OPTIONS]: the level's row (loadtest reads the daemon's CPU from /proc)
  local port=$1 pid=$2 n=$3
  shift 3
  taskset -c 1 "$PY" clients/loadtest.py --url "ws://127.0.0.1:$port/v1/stream" --daemon-pid "$pid" --clients "$n" \
    --max-p95 100 --seconds 20 --cycles 0 "$@" 2>&1 | grep -A1 "clients  partial" | tail -1
}
this_load=()
for opt in ${THIS_LOAD:-}; do this_load+=("$opt"); done
load "$P1" "$A" 8 > /dev/null & w1=$!
load "$P2" "$B" 8 "${this_load[@]}" > /dev/null & w2=$!
wait "$w1" "$w2"  # warm up: first searches, first windows
echo "REV $REV on port $P1, this tree on port $P2; $N streams each, core 0"
echo "CPU s per audio second per stream (event loop / engine thread), final latency p50 / p95 s"
for r in $(seq "$REPS"); do
  load "$P1" "$A" "$N" > "$WORK/la" & w1=$!
  load "$P2" "$B" "$N" "${this_load[@]}" > "$WORK/lb" & w2=$!
  wait "$w1" "$w2"
  # loadtest's row: ... final p50 ($9) p95 ($10) ... CPU/audio ($13), loop ($14), engine ($15)
  show() { awk '{printf "%s (%s / %s), final %s / %s", $13, $14, $15, $9, $10}' "$WORK/$1"; }
  ratio=$(paste "$WORK/la" "$WORK/lb" | awk -v n="$(wc -w < "$WORK/la")" '{printf "%.3f", $(n + 13) / $13}')
  echo "rep $r: REV $(show la);  this $(show lb);  this/REV $ratio"
done
