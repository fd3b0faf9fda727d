#!/usr/bin/env bash
# A/B: two sluice builds against one mock, alternately, same scenarios, on
# loopback, so a change's cost is measured apart from the machine's drift
# (single runs of run.sh move several percent between days).
#
#   loadtest/ab.sh OLD_BINARY NEW_BINARY
#
# Both run loadtest/sluice.toml without its [store] table (builds before the
# key store would refuse it; the static-key path is what is compared). Knobs (environment): ROUNDS=3, DURATION=8 (s per
# scenario), CONNS=64, STREAM_CONNS=32, STREAM_CHUNKS=20, SLOW_STREAMS=2000,
# MOCK_PORT=19101 SLUICE_PORT=19103. Prints, per scenario and build, the median
# req/s and proxy CPU µs per request over the rounds, and the memory per slow
# stream. Every loop is bounded in count and time.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
old_bin="$(realpath "${1:?old binary}")"
new_bin="$(realpath "${2:?new binary}")"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-8}"
CONNS="${CONNS:-64}"
STREAM_CONNS="${STREAM_CONNS:-32}"
STREAM_CHUNKS="${STREAM_CHUNKS:-20}"
SLOW_STREAMS="${SLOW_STREAMS:-2000}"
MOCK_PORT="${MOCK_PORT:-19101}"
SLUICE_PORT="${SLUICE_PORT:-19103}"
command -v oha >/dev/null 2>&1 || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

"$new_bin" mock --listen "127.0.0.1:$MOCK_PORT" >"$tmp/mock.log" 2>&1 &
pids+=("$!")
sed -e "s#__TMP__#$tmp#g" -e "s#__MOCK_PORT__#$MOCK_PORT#g" -e "s#__SLUICE_PORT__#$SLUICE_PORT#g" \
  -e '/^\[store\]/,/^$/d' "$here/sluice.toml" >"$tmp/sluice.toml"

wait_port() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; exit 1
}
wait_port "$MOCK_PORT"

KEY="authorization: Bearer sk-load-client"
CHAT='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
STREAM='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
URL="http://127.0.0.1:$SLUICE_PORT/v1/chat/completions"
HZ="$(getconf CLK_TCK)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# One scenario on the running sluice: "rps cpu_us_per_request".
measure() {
  local pid="$1"; shift
  local t0 t1; t0="$(ticks "$pid")"
  oha --no-tui --output-format json -z "${DURATION}s" "$@" "$URL" >"$tmp/oha.json"
  t1="$(ticks "$pid")"
  python3 - "$tmp/oha.json" "$((t1 - t0))" "$HZ" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); ticks, hz = int(sys.argv[2]), int(sys.argv[3])
total = sum(d.get("statusCodeDistribution", {}).values())
print(f'{d["summary"]["requestsPerSec"]:.0f} {ticks * 1e6 / hz / max(total, 1):.1f}')
PY
}

# Bytes of RSS per open slow stream (20 chunks x 250 ms each).
slow_streams() {
  local pid="$1" idle peak=0 r
  idle="$(rss_kib "$pid")"
  oha --no-tui --output-format json -n "$SLOW_STREAMS" -c "$SLOW_STREAMS" -m POST -H "$KEY" \
    -H 'content-type: application/json' -H 'x-mock-chunks: 20' -H 'x-mock-gap-ms: 250' -d "$STREAM" "$URL" >/dev/null &
  local load=$!
  for _ in $(seq 1 100); do
    r="$(rss_kib "$pid")"; [ "$r" -gt "$peak" ] && peak="$r"
    kill -0 "$load" 2>/dev/null || break
    sleep 0.1
  done
  wait "$load" || true
  echo $(( (peak - idle) * 1024 / SLOW_STREAMS ))
}

declare -A results
for round in $(seq 1 "$ROUNDS"); do
  for build in old new; do
    bin="$old_bin"; [ "$build" = new ] && bin="$new_bin"
    "$bin" serve -c "$tmp/sluice.toml" >"$tmp/sluice-$build.log" 2>&1 &
    pid=$!
    wait_port "$SLUICE_PORT"
    results[$build,plain,$round]="$(measure "$pid" -c "$CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT")"
    results[$build,stream,$round]="$(measure "$pid" -c "$STREAM_CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM")"
    results[$build,h2stream,$round]="$(measure "$pid" --http2 -c "$STREAM_CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM")"
    results[$build,slow,$round]="$(slow_streams "$pid")"
    echo "round $round $build: plain ${results[$build,plain,$round]} | streams ${results[$build,stream,$round]} | h2c streams ${results[$build,h2stream,$round]} | B/slow stream ${results[$build,slow,$round]}"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
echo
echo "| scenario | build | req/s (median) | CPU µs/req (median) |"
echo "|---|---|---|---|"
for scenario in plain stream h2stream; do
  for build in old new; do
    rps="$(for r in $(seq 1 "$ROUNDS"); do echo "${results[$build,$scenario,$r]}" | cut -d' ' -f1; done | median)"
    cpu="$(for r in $(seq 1 "$ROUNDS"); do echo "${results[$build,$scenario,$r]}" | cut -d' ' -f2; done | median)"
    echo "| $scenario | $build | $rps | $cpu |"
  done
done
for build in old new; do
  echo "slow streams, $build: $(for r in $(seq 1 "$ROUNDS"); do echo "${results[$build,slow,$r]}"; done | median) bytes each (median)"
done
