#!/usr/bin/env bash
# Cache hits against the bare mock, and what separates them: the same repeated
# request straight to the mock, through sluice as run.sh runs it (client-key
# auth, metrics, the request log), and through sluice with none of those
# (no key, no request log, no metrics). Alternately, against one mock, on
# loopback.
#
#   loadtest/hits.sh [BINARY]          # default: target/release/sluice
#
# Knobs (environment): ROUNDS=3, DURATION=8 (s per target and round),
# CONNS=64, WORKERS=1 (sluice's runtime threads; 0 = one per core, as the
# mock runs), EVENT_LOOPS=2 (0: connections on the runtime's workers), MOCK_PORT=19151, SLUICE_PORT=19153 (and the next port for the
# bare sluice). Prints per target the median req/s and server CPU µs per
# request (user + kernel) over the rounds. Every loop is bounded.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="$(realpath "${1:-$here/../target/release/sluice}")"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-8}"
CONNS="${CONNS:-64}"
WORKERS="${WORKERS:-1}"
EVENT_LOOPS="${EVENT_LOOPS:-2}"
MOCK_PORT="${MOCK_PORT:-19151}"
SLUICE_PORT="${SLUICE_PORT:-19153}"
BARE_PORT=$((SLUICE_PORT + 1))
command -v oha >/dev/null 2>&1 || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "python3 is needed to read oha's JSON" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# The load-test config without its [store] table, at WORKERS threads and
# EVENT_LOOPS loops; the bare one also without client keys, request log and
# metrics.
config() {
  sed -e "s#__TMP__#$tmp#g" -e "s#__MOCK_PORT__#$MOCK_PORT#g" -e "s#__SLUICE_PORT__#$1#g" \
    -e '/^\[store\]/,/^$/d' -e "s#^workers = 1#workers = $WORKERS#" \
    -e "s#^event_loops = 2#event_loops = $EVENT_LOOPS#" "$here/sluice.toml"
}
config "$SLUICE_PORT" >"$tmp/full.toml"
config "$BARE_PORT" | sed -e '/^requests = /d' -e 's/^keys = \["sk-load-client"\]/require_api_key = false/' \
  -e '/^\[metrics\]/,/^$/s/^enabled = true/enabled = false/' >"$tmp/bare.toml"

"$bin" mock --listen "127.0.0.1:$MOCK_PORT" >"$tmp/mock.log" 2>&1 &
mock_pid=$!; pids+=("$mock_pid")
"$bin" serve -c "$tmp/full.toml" >"$tmp/full.log" 2>&1 &
full_pid=$!; pids+=("$full_pid")
"$bin" serve -c "$tmp/bare.toml" >"$tmp/bare.log" 2>&1 &
bare_pid=$!; pids+=("$bare_pid")

BODY='{"model":"cached","messages":[{"role":"user","content":"Say hello"}]}'
KEY='authorization: Bearer sk-load-client'
url() { echo "http://127.0.0.1:$1/v1/chat/completions"; }
for port in "$MOCK_PORT" "$SLUICE_PORT" "$BARE_PORT"; do
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
# The one miss of each sluice; every later request is a hit.
for port in "$SLUICE_PORT" "$BARE_PORT"; do
  status="$(curl -s -o /dev/null -w '%{http_code}' "$(url "$port")" -H "$KEY" -d "$BODY")"
  [ "$status" = 200 ] || { echo "sluice on $port answered $status" >&2; exit 1; }
done

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
hz="$(getconf CLK_TCK)"
run() { # name port pid
  local u0 s0 u1 s1
  read -r u0 s0 < <(ticks "$3")
  oha --no-tui --output-format json -z "${DURATION}s" -c "$CONNS" -m POST -H "$KEY" \
    -H 'content-type: application/json' -d "$BODY" "$(url "$2")" >"$tmp/oha.json"
  read -r u1 s1 < <(ticks "$3")
  python3 - "$1" "$tmp/oha.json" "$hz" "$u0" "$s0" "$u1" "$s1" >>"$tmp/rows" <<'PY'
import json, sys
name, path, hz = sys.argv[1], sys.argv[2], int(sys.argv[3])
u0, s0, u1, s1 = (int(x) for x in sys.argv[4:8])
j = json.load(open(path))
codes = j["statusCodeDistribution"]
n = sum(codes.values())
if codes.get("200", 0) != n:
    sys.exit(f"{name}: not every answer was 200: {codes}")
us = lambda ticks: ticks * 1e6 / hz / n
print(name, j["summary"]["requestsPerSec"], us(u1 - u0), us(s1 - s0))
PY
}
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  run direct "$MOCK_PORT" "$mock_pid"
  run sluice "$SLUICE_PORT" "$full_pid"
  run sluice-bare "$BARE_PORT" "$bare_pid"
done

python3 - "$tmp/rows" "$WORKERS" "$EVENT_LOOPS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print(f"cache hits c64, sluice workers = {sys.argv[2]}, event_loops = {sys.argv[3]}, medians over the rounds:")
print("| target | req/s | x direct | server CPU µs/req (user + kernel) |")
print("|---|---|---|---|")
direct = statistics.median(float(r[1]) for r in rows if r[0] == "direct")
for name in ("direct", "sluice", "sluice-bare"):
    mine = [r for r in rows if r[0] == name]
    rps = statistics.median(float(r[1]) for r in mine)
    user = statistics.median(float(r[2]) for r in mine)
    kernel = statistics.median(float(r[3]) for r in mine)
    print(f"| {name} | {rps:.0f} | {rps / direct:.2f} | {user + kernel:.1f} ({user:.1f} + {kernel:.1f}) |")
PY
