#!/usr/bin/env bash
# sluice load tests: the bundled mock straight, nginx in front of it, and sluice in
# front of it, one after another in the same run, on loopback only.
#
#   loadtest/run.sh
#
# Knobs (environment): DURATION=10 (s per scenario), CONNS=64, RATE=1000 (req/s for
# the latency scenario), STREAM_CONNS=32, STREAM_CHUNKS=20, SLOW_STREAMS=2000,
# SOAK_SECONDS=600 (0 skips the soak), SOAK_RATE=2000, TTFB_SAMPLES=200, CACHE_FILL=50000,
# CACHE_ROUNDS=5 (the cache-hit scenario's alternating rounds),
# MOCK_PORT=19001 NGINX_PORT=19002 SLUICE_PORT=19003, SKIP_NGINX=1; the upstream
# transport scenarios use ports 19004-19008 (TLS needs openssl for a throwaway
# certificate; without it those rows are skipped), the fresh cache fill 19009
# (FRESH_PORT), the cache hits without a request log 19010 (NOLOG_PORT).
# Every loop is bounded in time or count. Prints a table and writes it to
# loadtest/results/<date>-<HHMM>.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

DURATION="${DURATION:-10}"
CONNS="${CONNS:-64}"
RATE="${RATE:-1000}"
STREAM_CONNS="${STREAM_CONNS:-32}"
STREAM_CHUNKS="${STREAM_CHUNKS:-20}"
SLOW_STREAMS="${SLOW_STREAMS:-2000}"
SOAK_SECONDS="${SOAK_SECONDS:-600}"
SOAK_RATE="${SOAK_RATE:-2000}"
TTFB_SAMPLES="${TTFB_SAMPLES:-200}"
CACHE_FILL="${CACHE_FILL:-50000}"
CACHE_ROUNDS="${CACHE_ROUNDS:-5}"
MOCK_PORT="${MOCK_PORT:-19001}"
NGINX_PORT="${NGINX_PORT:-19002}"
SLUICE_PORT="${SLUICE_PORT:-19003}"
FRESH_PORT="${FRESH_PORT:-19009}"
NOLOG_PORT="${NOLOG_PORT:-19010}"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "== building sluice (release)"
cargo build --release --locked --bin sluice
bin="$repo/target/release/sluice"
if ! command -v oha >/dev/null 2>&1; then
  echo "== installing oha (cargo install oha --locked; takes a few minutes)"
  cargo install oha --locked
fi
command -v python3 >/dev/null 2>&1 || { echo "python3 is needed to read oha's JSON" >&2; exit 1; }
have_nginx=""
if [ -z "${SKIP_NGINX:-}" ] && command -v nginx >/dev/null 2>&1; then have_nginx=1; fi
[ -n "$have_nginx" ] || echo "== nginx not found (apt-get install nginx-light): its rows are skipped"

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

fill() { sed -e "s#__TMP__#$tmp#g" -e "s#__MOCK_PORT__#$MOCK_PORT#g" -e "s#__NGINX_PORT__#$NGINX_PORT#g" -e "s#__SLUICE_PORT__#$SLUICE_PORT#g" "$1"; }

"$bin" mock --listen "127.0.0.1:$MOCK_PORT" >"$tmp/mock.log" 2>&1 &
mock_pid=$!; pids+=("$mock_pid")
fill "$here/sluice.toml" >"$tmp/sluice.toml"
"$bin" serve -c "$tmp/sluice.toml" >"$tmp/sluice.log" 2>&1 &
sluice_pid=$!; pids+=("$sluice_pid")
nginx_pid=""
if [ -n "$have_nginx" ]; then
  mkdir -p "$tmp/body" "$tmp/proxy" "$tmp/fastcgi" "$tmp/uwsgi" "$tmp/scgi"
  fill "$here/nginx.conf" >"$tmp/nginx.conf"
  nginx -c "$tmp/nginx.conf" -p "$tmp" &
  nginx_pid=$!; pids+=("$nginx_pid")
fi

wait_port() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; exit 1
}
wait_port "$MOCK_PORT"; wait_port "$SLUICE_PORT"; [ -z "$have_nginx" ] || wait_port "$NGINX_PORT"

KEY="authorization: Bearer sk-load-client"
# A store key with limits that never refuse at these rates, usage accounted:
# what a governed client costs next to a static one.
GOVERNED_KEY="$("$bin" keys create --store "sqlite://$tmp/keys.db" --name load --rpm 1000000 --rph 1000000 --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
GOVERNED="authorization: Bearer $GOVERNED_KEY"
for _ in $(seq 1 50); do  # the server picks up the CLI's key within 2 s
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SLUICE_PORT/v1/models" -H "$GOVERNED")" = 200 ] && break
  sleep 0.1
done
CHAT='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
STREAM='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
url() { case "$1" in direct) echo "http://127.0.0.1:$MOCK_PORT/v1/chat/completions";; nginx) echo "http://127.0.0.1:$NGINX_PORT/v1/chat/completions";; sluice) echo "http://127.0.0.1:$SLUICE_PORT/v1/chat/completions";; no-log) echo "http://127.0.0.1:$NOLOG_PORT/v1/chat/completions";; up-*) echo "http://127.0.0.1:${up_port[$1]}/v1/chat/completions";; esac; }
proxy_pids() { case "$1" in direct) echo "$mock_pid";; nginx) echo "$nginx_pid $(pgrep -P "$nginx_pid" | tr '\n' ' ')";; sluice) echo "$sluice_pid";; no-log) echo "$nolog_pid";; up-*) echo "${up_pid[$1]}";; esac; }
declare -A up_port up_pid
# "utime stime" in clock ticks, each summed over the given pids.
cpu_ticks() {
  local u=0 s=0 pu ps
  for p in $1; do read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + pu)); s=$((s + ps)); done
  echo "$u $s"
}
rss_kib() { local r=0; for p in $1; do r=$((r + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$r"; }
HZ="$(getconf CLK_TCK)"

# oha JSON -> "rps p50_ms p99_ms errors total"
summarize() {
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]; p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
# Requests still open when a timed run ends are cut by oha itself: not errors.
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "aborted due to deadline" not in k}
total = sum(codes.values()) + sum(errors.values())
ms = lambda v: (v or 0) * 1000
print(f'{s["requestsPerSec"]:.0f} {ms(p.get("p50")):.3f} {ms(p.get("p99")):.3f} {total - ok} {total}')
PY
}

rows=()
# run_oha SCENARIO TARGET [oha args...]: one measured run; appends a table row.
run_oha() {
  local scenario="$1" target="$2"; shift 2
  local pids_of; pids_of="$(proxy_pids "$target")"
  local u0 s0 u1 s1; read -r u0 s0 < <(cpu_ticks "$pids_of")
  oha --no-tui --output-format json "$@" "$(url "$target")" >"$tmp/oha.json"
  read -r u1 s1 < <(cpu_ticks "$pids_of")
  read -r rps p50 p99 errors total < <(summarize "$tmp/oha.json")
  # Total, then user + kernel: the kernel part is the floor any proxy making
  # the same socket calls pays (see loadtest/README.md).
  local cpu_us="-"
  if [ "$total" -gt 0 ]; then
    local us=$(( (u1 - u0) * 1000000 / HZ / total )) ks=$(( (s1 - s0) * 1000000 / HZ / total ))
    cpu_us="$((us + ks)) ($us + $ks)"
  fi
  local rss; rss="$(( $(rss_kib "$pids_of") / 1024 ))"
  rows+=("| $scenario | $target | $rps | $p50 | $p99 | $errors / $total | $cpu_us | $rss |")
  echo "   $scenario $target: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors/$total, ${cpu_us} µs CPU/req (user + kernel)"
}

# run_alternating SCENARIO ROUNDS TARGETS [oha args...]: the targets (the
# first is the baseline, the mock direct) in ROUNDS rounds of DURATION /
# ROUNDS seconds each, the order turned by one each round (so none always
# runs first); appends one row for each over all its rounds (req/s from
# every round's requests, p50/p99 the rounds' medians) and sets
# alternating_ratios[TARGET] (TARGET / baseline, each round).
declare -A alternating_ratios
run_alternating() {
  local scenario="$1" rounds="$2" targets_here="$3"; shift 3
  local secs=$(( DURATION / rounds )); [ "$secs" -ge 1 ] || secs=1
  local -A total errors user kernel p50s p99s rps_now
  local -a list; read -r -a list <<<"$targets_here"
  local base="${list[0]}" n="${#list[@]}"
  for t in "${list[@]}"; do total[$t]=0; errors[$t]=0; user[$t]=0; kernel[$t]=0; p50s[$t]=""; p99s[$t]=""; alternating_ratios[$t]=""; done
  for round in $(seq 1 "$rounds"); do
    local i
    for i in $(seq 0 $((n - 1))); do
      local t="${list[$(( (i + round - 1) % n ))]}"
      local pids_of u0 s0 u1 s1 rps p50 p99 e count
      pids_of="$(proxy_pids "$t")"
      read -r u0 s0 < <(cpu_ticks "$pids_of")
      oha --no-tui --output-format json -z "${secs}s" "$@" "$(url "$t")" >"$tmp/oha.json"
      read -r u1 s1 < <(cpu_ticks "$pids_of")
      read -r rps p50 p99 e count < <(summarize "$tmp/oha.json")
      total[$t]=$(( total[$t] + count )); errors[$t]=$(( errors[$t] + e ))
      user[$t]=$(( user[$t] + u1 - u0 )); kernel[$t]=$(( kernel[$t] + s1 - s0 ))
      p50s[$t]="${p50s[$t]} $p50"; p99s[$t]="${p99s[$t]} $p99"; rps_now[$t]="$rps"
    done
    for t in "${list[@]:1}"; do
      alternating_ratios[$t]="${alternating_ratios[$t]} $(python3 -c "print(f'{${rps_now[$t]} / max(${rps_now[$base]}, 1):.2f}')")"
    done
  done
  for t in "${list[@]}"; do
    local median='import statistics, sys; print(f"{statistics.median(map(float, sys.argv[1:])):.3f}")'
    local p50 p99 rps cpu_us="-"
    p50="$(python3 -c "$median" ${p50s[$t]})"; p99="$(python3 -c "$median" ${p99s[$t]})"
    rps=$(( total[$t] / (rounds * secs) ))
    if [ "${total[$t]}" -gt 0 ]; then
      local us=$(( user[$t] * 1000000 / HZ / total[$t] )) ks=$(( kernel[$t] * 1000000 / HZ / total[$t] ))
      cpu_us="$((us + ks)) ($us + $ks)"
    fi
    local rss; rss="$(( $(rss_kib "$(proxy_pids "$t")") / 1024 ))"
    rows+=("| $scenario | $t | $rps | $p50 | $p99 | ${errors[$t]} / ${total[$t]} | $cpu_us | $rss |")
    echo "   $scenario $t: $rps req/s over $rounds rounds, p50 $p50 ms, p99 $p99 ms, errors ${errors[$t]}/${total[$t]}, ${cpu_us} µs CPU/req (user + kernel)"
  done
  for t in "${list[@]:1}"; do echo "   $t / $base, each round:${alternating_ratios[$t]}"; done
}

targets="direct"; [ -n "$have_nginx" ] && targets="$targets nginx"; targets="$targets sluice"
idle_rss="$(( $(rss_kib "$sluice_pid") ))"

echo "== 1. throughput: $CONNS connections, ${DURATION}s, non-streaming"
for t in $targets; do run_oha "throughput c$CONNS" "$t" -z "${DURATION}s" -c "$CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT"; done

echo "== 1b. governed: the same load with a store key (rpm/rph limits, usage written every second)"
run_oha "governed c$CONNS" sluice -z "${DURATION}s" -c "$CONNS" -m POST -H "$GOVERNED" -H 'content-type: application/json' -d "$CHAT"
run_oha "throughput c$CONNS (again)" sluice -z "${DURATION}s" -c "$CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT"

echo "== 2. latency at a fixed $RATE req/s (latency-corrected)"
for t in $targets; do run_oha "fixed ${RATE}/s" "$t" -z "${DURATION}s" -q "$RATE" -c 16 --latency-correction -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT"; done

echo "== 3. streaming: $STREAM_CONNS connections, $STREAM_CHUNKS chunks, no gap"
for t in $targets; do run_oha "streams c$STREAM_CONNS" "$t" -z "${DURATION}s" -c "$STREAM_CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM"; done

echo "== 3b. stream bytes: sluice must pass the upstream's bytes unchanged"
strip_ids() { sed -E 's/chatcmpl-mock-[0-9]+/ID/g'; }
curl -sN "$(url direct)" -H "$KEY" -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM" | strip_ids >"$tmp/direct.sse"
curl -sN "$(url sluice)" -H "$KEY" -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM" | strip_ids >"$tmp/sluice.sse"
if cmp -s "$tmp/direct.sse" "$tmp/sluice.sse"; then bytes_same="identical ($(wc -c <"$tmp/sluice.sse") bytes)"; else bytes_same="DIFFERENT"; fi
echo "   $bytes_same"

echo "== 3c. time to first byte of a stream, p50 over $TTFB_SAMPLES sequential requests"
ttfb_p50() {
  for _ in $(seq 1 "$TTFB_SAMPLES"); do
    curl -sN -o /dev/null -w '%{time_starttransfer}\n' "$(url "$1")" -H "$KEY" -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM"
  done | sort -n | awk '{v[NR]=$1} END {printf "%.3f", v[int((NR+1)/2)] * 1000}'
}
ttfb=()
for t in $targets; do ttfb+=("| $t | $(ttfb_p50 "$t") |"); done

echo "== 4. memory: idle RSS, then $SLOW_STREAMS concurrent slow streams (20 chunks x 250 ms)"
peak=0
oha --no-tui --output-format json -n "$SLOW_STREAMS" -c "$SLOW_STREAMS" -m POST -H "$KEY" -H 'content-type: application/json' -H 'x-mock-chunks: 20' -H 'x-mock-gap-ms: 250' -d "$STREAM" "$(url sluice)" >"$tmp/slow.json" &
oha_pid=$!
while kill -0 "$oha_pid" 2>/dev/null; do
  r="$(rss_kib "$sluice_pid")"; [ "$r" -gt "$peak" ] && peak="$r"
  sleep 0.2
done
wait "$oha_pid" || true
read -r _ _ slow_p99 slow_errors slow_total < <(summarize "$tmp/slow.json")
echo "   idle ${idle_rss} KiB, peak ${peak} KiB, errors $slow_errors / $slow_total, p99 $slow_p99 ms"

echo "== 5. h2c from the client (oha --http2)"
for t in direct sluice; do run_oha "h2c throughput c$CONNS" "$t" --http2 -z "${DURATION}s" -c "$CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT"; done
for t in direct sluice; do run_oha "h2c streams c$STREAM_CONNS" "$t" --http2 -z "${DURATION}s" -c "$STREAM_CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM"; done

echo "== 7. cache: the same request repeated (hits), then $CACHE_FILL distinct ~4 KiB answers into max_bytes = 64 MiB"
CACHED='{"model":"cached","messages":[{"role":"user","content":"Say hello"}]}'
CACHED_STREAM='{"model":"cached","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
# Beside it, the same config without the request log: what a line written
# for every hit costs, measured in the same rounds (the mock writes none).
mkdir -p "$tmp/no-log"
sed -e "s#__TMP__#$tmp/no-log#g" -e "s#__MOCK_PORT__#$MOCK_PORT#g" -e "s#__SLUICE_PORT__#$NOLOG_PORT#g" \
  -e "s#^url = .*#url = \"sqlite://$tmp/keys.db\"#" -e '/^requests = /d' "$here/sluice.toml" >"$tmp/no-log.toml"
"$bin" serve -c "$tmp/no-log.toml" >"$tmp/no-log.log" 2>&1 &
nolog_pid=$!; pids+=("$nolog_pid")
wait_port "$NOLOG_PORT"
kill -0 "$nolog_pid" 2>/dev/null || { echo "the sluice without a request log did not start (port $NOLOG_PORT taken?)" >&2; exit 1; }
for t in sluice no-log; do curl -s -o /dev/null "$(url "$t")" -H "$KEY" -d "$CACHED"; done  # the one miss each
# The mock and sluice in alternating rounds, each DURATION in all: a drift of
# the machine's speed during the scenario (seen here at +-10% within
# minutes) weighs on all alike, not on whichever ran second.
run_alternating "cache hits c$CONNS" "$CACHE_ROUNDS" "direct sluice no-log" -c "$CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -d "$CACHED"
kill "$nolog_pid" 2>/dev/null || true
wait "$nolog_pid" 2>/dev/null || true
before_fill="$(rss_kib "$sluice_pid")"
# Distinct keys by query string (the cache key includes it); 20-chunk streams are ~4 KiB.
oha --no-tui --output-format json -n "$CACHE_FILL" -c 32 --rand-regex-url "http://127.0.0.1:$SLUICE_PORT/v1/chat/completions\\?n=[0-9]{12}" \
  -m POST -H "$KEY" -H 'content-type: application/json' -H 'x-mock-chunks: 20' -d "$CACHED_STREAM" >"$tmp/fill.json"
read -r _ _ _ fill_errors fill_total < <(summarize "$tmp/fill.json")
after_fill="$(rss_kib "$sluice_pid")"
cache_stats="$(curl -s "http://127.0.0.1:$SLUICE_PORT/stats" -H "$KEY" | python3 -c 'import json,sys; c=json.load(sys.stdin)["cache"]; print(c["entries"], c["bytes"], c["evictions"])')"
read -r cache_entries cache_bytes cache_evictions <<<"$cache_stats"
bound_kib=$(( idle_rss + 64 * 1024 * 110 / 100 ))
verdict="within"; [ "$after_fill" -le "$bound_kib" ] || verdict="OVER"
cache_fill="$fill_total requests ($fill_errors errors): $cache_entries entries, $((cache_bytes / 1024)) KiB held, $cache_evictions evictions; RSS idle ${idle_rss} KiB, before ${before_fill} KiB, after ${after_fill} KiB: $verdict idle + 64 MiB + 10% (${bound_kib} KiB)"
echo "   $cache_fill"
# The same fill into a sluice that has served nothing before: the bound from
# its own idle RSS. (The line above counts from this run's start, so whatever
# the earlier scenarios left in the allocator counts against the cache too.)
mkdir -p "$tmp/fresh"
sed -e "s#__TMP__#$tmp/fresh#g" -e "s#__MOCK_PORT__#$MOCK_PORT#g" -e "s#__SLUICE_PORT__#$FRESH_PORT#g" \
  -e '/^\[store\]/,/^$/d' "$here/sluice.toml" >"$tmp/fresh.toml"
"$bin" serve -c "$tmp/fresh.toml" >"$tmp/fresh.log" 2>&1 &
fresh_pid=$!; pids+=("$fresh_pid")
wait_port "$FRESH_PORT"
kill -0 "$fresh_pid" 2>/dev/null || { echo "the fresh sluice did not start (port $FRESH_PORT taken?)" >&2; exit 1; }
sleep 1
fresh_idle="$(rss_kib "$fresh_pid")"
oha --no-tui --output-format json -n "$CACHE_FILL" -c 32 --rand-regex-url "http://127.0.0.1:$FRESH_PORT/v1/chat/completions\\?n=[0-9]{12}" \
  -m POST -H "$KEY" -H 'content-type: application/json' -H 'x-mock-chunks: 20' -d "$CACHED_STREAM" >"$tmp/fresh-fill.json"
read -r _ _ _ fresh_errors fresh_total < <(summarize "$tmp/fresh-fill.json")
fresh_after="$(rss_kib "$fresh_pid")"
fresh_entries="$(curl -s "http://127.0.0.1:$FRESH_PORT/stats" -H "$KEY" | python3 -c 'import json,sys; c=json.load(sys.stdin)["cache"]; print(c["entries"], c["bytes"] // 1024)')"
kill "$fresh_pid" 2>/dev/null || true
wait "$fresh_pid" 2>/dev/null || true
fresh_bound=$(( fresh_idle + 64 * 1024 * 110 / 100 ))
fresh_verdict="within"; [ "$fresh_after" -le "$fresh_bound" ] || fresh_verdict="OVER"
[ "$fresh_errors" = 0 ] || fresh_verdict="NOT MEASURED (errors) vs"
fresh_fill="$fresh_total requests ($fresh_errors errors), entries and KiB held: $fresh_entries, without [store]; RSS idle ${fresh_idle} KiB, after ${fresh_after} KiB: $fresh_verdict idle + 64 MiB + 10% (${fresh_bound} KiB)"
echo "   fresh sluice: $fresh_fill"

echo "== 8. upstream transports: sluice to the mock over HTTP/1.1, h2c and TLS + h2 (same config otherwise)"
# Each from the same config without the store, beside the others; the mock
# allows 100 streams an HTTP/2 connection, as providers do.
"$bin" mock --listen "127.0.0.1:19004" --max-streams 100 >"$tmp/mock-h2.log" 2>&1 &
pids+=("$!")
transports="up-h1 up-h2c"
if command -v openssl >/dev/null 2>&1; then
  # A throwaway CA and a leaf for localhost signed by it (a self-signed leaf
  # would be a CA used as an end entity, which webpki refuses).
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 1 -subj /CN=sluice-loadtest-ca -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
  openssl req "${ec[@]}" -subj /CN=localhost -keyout "$tmp/mock.key" -out "$tmp/mock.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tmp/leaf.ext"
  openssl x509 -req -in "$tmp/mock.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial -days 1 \
    -extfile "$tmp/leaf.ext" -out "$tmp/mock.pem" 2>/dev/null
  "$bin" mock --listen "127.0.0.1:19005" --max-streams 100 --tls-cert "$tmp/mock.pem" --tls-key "$tmp/mock.key" >"$tmp/mock-tls.log" 2>&1 &
  pids+=("$!")
  transports="$transports up-tls-h2"
else
  echo "   openssl not found: the TLS + h2 rows are skipped"
fi
port=19006
for t in $transports; do
  case "$t" in
    up-h1) base="http://127.0.0.1:19004/v1"; extra="" ;;
    up-h2c) base="http://127.0.0.1:19004/v1"; extra='http2 = "prior-knowledge"' ;;
    up-tls-h2) base="https://localhost:19005/v1"; extra="ca_file = \"$tmp/ca.pem\"" ;;
  esac
  fill "$here/sluice.toml" | sed -e '/^\[store\]/,/^$/d' -e "s#^listen = .*#listen = \"127.0.0.1:$port\"#" \
    -e "s#^base_url = .*#base_url = \"$base\"\n$extra#" -e "s#requests.jsonl#requests-$t.jsonl#" >"$tmp/$t.toml"
  "$bin" serve -c "$tmp/$t.toml" >"$tmp/$t.log" 2>&1 &
  up_pid[$t]=$!; pids+=("$!"); up_port[$t]=$port
  wait_port "$port"
  port=$((port + 1))
done
upstream_rows=()
for t in $transports; do
  run_oha "upstream throughput c$CONNS" "$t" -z "${DURATION}s" -c "$CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT"
  run_oha "upstream streams c$STREAM_CONNS" "$t" -z "${DURATION}s" -c "$STREAM_CONNS" -m POST -H "$KEY" -H 'content-type: application/json' -H "x-mock-chunks: $STREAM_CHUNKS" -d "$STREAM"
  before="$(rss_kib "${up_pid[$t]}")"; top="$before"
  oha --no-tui --output-format json -n "$SLOW_STREAMS" -c "$SLOW_STREAMS" -m POST -H "$KEY" -H 'content-type: application/json' -H 'x-mock-chunks: 20' -H 'x-mock-gap-ms: 250' -d "$STREAM" "$(url "$t")" >"$tmp/slow-$t.json" &
  oha_pid=$!
  while kill -0 "$oha_pid" 2>/dev/null; do
    r="$(rss_kib "${up_pid[$t]}")"; [ "$r" -gt "$top" ] && top="$r"
    sleep 0.2
  done
  wait "$oha_pid" || true
  read -r _ _ t_p99 t_errors t_total < <(summarize "$tmp/slow-$t.json")
  upstream_rows+=("| $t | $SLOW_STREAMS slow streams | $t_errors / $t_total errors | p99 $t_p99 ms | +$(( (top - before) / 1024 )) MiB peak |")
  echo "   $t slow streams: errors $t_errors / $t_total, p99 $t_p99 ms, peak +$(( (top - before) / 1024 )) MiB"
done

soak="skipped (SOAK_SECONDS=0)"
if [ "$SOAK_SECONDS" -gt 0 ]; then
  echo "== 6. soak: ${SOAK_SECONDS}s at $SOAK_RATE req/s, 80% plain, 20% streams"
  plain_rate=$((SOAK_RATE * 8 / 10)); stream_rate=$((SOAK_RATE - plain_rate))
  oha --no-tui --output-format json -z "${SOAK_SECONDS}s" -q "$plain_rate" -c 32 -m POST -H "$KEY" -H 'content-type: application/json' -d "$CHAT" "$(url sluice)" >"$tmp/soak-plain.json" &
  p1=$!
  oha --no-tui --output-format json -z "${SOAK_SECONDS}s" -q "$stream_rate" -c 32 -m POST -H "$KEY" -H 'content-type: application/json' -H 'x-mock-chunks: 5' -d "$STREAM" "$(url sluice)" >"$tmp/soak-stream.json" &
  p2=$!
  sleep 60
  rss_1m="$(rss_kib "$sluice_pid")"
  wait "$p1" "$p2" || true
  rss_end="$(rss_kib "$sluice_pid")"
  read -r _ _ _ e1 t1 < <(summarize "$tmp/soak-plain.json")
  read -r _ _ _ e2 t2 < <(summarize "$tmp/soak-stream.json")
  drift="$(python3 -c "print(f'{($rss_end - $rss_1m) * 100 / $rss_1m:+.1f}%')")"
  soak="$((t1 + t2)) requests, $((e1 + e2)) errors; RSS after 1 min ${rss_1m} KiB, at the end ${rss_end} KiB ($drift)"
  echo "   $soak"
fi

dropped="$(curl -s "http://127.0.0.1:$SLUICE_PORT/metrics" -H "$KEY" | awk '/^sluice_request_log_dropped_total/ {print $2}')"
machine="$(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
out="$here/results/$(date +%F-%H%M).md"  # a second run the same day keeps the first
mkdir -p "$here/results"
{
  echo "# sluice load test, $(date '+%F %H:%M %Z')"
  echo
  echo "Machine: $machine. Load generator, mock, and proxy share these cores."
  echo "sluice $("$bin" --version | awk '{print $2}'): client-key auth, 3 rotating upstream keys, metrics and request log on."
  echo
  echo "| scenario | target | req/s | p50 ms | p99 ms | errors / total | proxy CPU µs/req (user + kernel) | RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Stream time to first byte, p50 ms over $TTFB_SAMPLES sequential requests (curl):"
  echo
  echo "| target | TTFB p50 ms |"
  echo "|---|---|"
  printf '%s\n' "${ttfb[@]}"
  echo
  echo "Upstream transports (rows \`up-*\` above: sluice to the mock over HTTP/1.1, h2c, TLS + h2), $SLOW_STREAMS concurrent slow streams each:"
  echo
  printf '%s\n' "${upstream_rows[@]}"
  echo
  echo "- Stream bytes through sluice vs direct (ids masked): $bytes_same"
  mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
  echo "- Memory: idle RSS $(mib "$idle_rss") MiB; with $SLOW_STREAMS concurrent slow streams peak $(mib "$peak") MiB (+$(mib $((peak - idle_rss))) MiB, $(( (peak - idle_rss) * 1024 / SLOW_STREAMS )) bytes a stream); errors $slow_errors / $slow_total"
  echo "- Cache hits, sluice / direct req/s in each of $CACHE_ROUNDS alternating rounds:${alternating_ratios[sluice]}"
  echo "- Cache hits without the request log (otherwise the same config), no-log / direct:${alternating_ratios[no-log]}"
  echo "- Cache fill: $cache_fill"
  echo "- Cache fill into a fresh sluice (nothing served before): $fresh_fill"
  echo "- Soak: $soak"
  echo "- Request-log lines dropped: ${dropped:-?}"
} >"$out"
echo
cat "$out"
echo
echo "written to $out"
