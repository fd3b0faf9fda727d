#!/usr/bin/env bash
# sluice as a cluster: three instances sharing one Redis ([redis]: client
# limits, upstream key health) and one PostgreSQL store, in front of the
# bundled mock, on loopback only.
#
#   loadtest/cluster.sh
#
# Measures, with three oha processes at once (one per instance, CONNS/3
# connections each, the same limited client key):
#   - Redis on: every request runs the shared-limit script on Redis (one round trip);
#   - Redis off: the same three instances restarted without [redis], so the
#     same key is limited by each instance's in-process limiter;
#     ON and OFF alternate for ROUNDS rounds (ON OFF, OFF ON, ...), each with a
#     throughput run (as fast as possible) and a fixed-rate run (RATE req/s in
#     all: latency without queueing, where one Redis round trip shows as itself);
#   - the mock direct (one oha) for reference;
#   - cooldown propagation: a 429 for upstream key sk-up-1 met by instance 1,
#     and the time until instances 2 and 3 show that key `cooling` on /health.
#
# Knobs (environment): DURATION=10 (s per run), CONNS=63 (split over the three
# instances), RATE=1000 (req/s in all for the fixed-rate rows; 0 skips them),
# ROUNDS=3, COOL_SAMPLES=5, MOCK_PORT=19201 REDIS_PORT=19202 PG_PORT=19203,
# SLUICE_PORTS="19211 19212 19213", SKIP_BUILD=1 (use target/release/sluice
# as it is), OUT_DIR=loadtest/results. The client key's rpm is 1000000 (the
# most a config key may have), shared by the three instances over Redis, and
# Redis is emptied before each run: a single run may carry 1000000 requests
# in a minute (DURATION=10 allows 100k req/s).
#
# Needs oha, redis-server and redis-cli (redis-benchmark, if there, gives a
# bare Redis round trip for reference), python3, curl, and PostgreSQL's
# initdb, pg_ctl and createdb (on the PATH or in /usr/lib/postgresql/*/bin;
# as root, the server runs as the postgres user through runuser). Every loop
# is bounded in time or count. Prints a table and writes it to
# loadtest/results/<date>-<HHMM>-cluster.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

DURATION="${DURATION:-10}"
CONNS="${CONNS:-63}"
RATE="${RATE:-1000}"
ROUNDS="${ROUNDS:-3}"
COOL_SAMPLES="${COOL_SAMPLES:-5}"
MOCK_PORT="${MOCK_PORT:-19201}"
REDIS_PORT="${REDIS_PORT:-19202}"
PG_PORT="${PG_PORT:-19203}"
read -r -a SLUICE_PORTS <<<"${SLUICE_PORTS:-19211 19212 19213}"
OUT_DIR="${OUT_DIR:-$here/results}"
[ "${#SLUICE_PORTS[@]}" -eq 3 ] || { echo "SLUICE_PORTS needs three ports" >&2; exit 1; }
PER=$((CONNS / 3))
[ "$PER" -ge 1 ] || { echo "CONNS must be at least 3" >&2; exit 1; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== building sluice (release)"
  cargo build --release --locked --bin sluice
fi
bin="$repo/target/release/sluice"
[ -x "$bin" ] || { echo "no $bin: build it (cargo build --release --bin sluice)" >&2; exit 1; }
for tool in oha redis-server redis-cli python3 curl; do
  command -v "$tool" >/dev/null 2>&1 || {
    case "$tool" in
      oha) echo "oha is missing: cargo install oha --locked" >&2 ;;
      redis-*) echo "$tool is missing: apt-get install redis-server" >&2 ;;
      *) echo "$tool is missing" >&2 ;;
    esac
    exit 1
  }
done

# PostgreSQL: the server binaries on the PATH, else the newest packaged ones.
pgbin=""
if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
  pgbin="$(dirname "$(readlink -f "$(command -v initdb)")")"
else
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && pgbin="$d"; done
fi
if [ -z "$pgbin" ] || [ ! -x "$pgbin/pg_ctl" ]; then
  echo "PostgreSQL not found (initdb, pg_ctl on the PATH or in /usr/lib/postgresql/*/bin): apt-get install postgresql" >&2
  exit 1
fi
createdb_bin="$pgbin/createdb"
[ -x "$createdb_bin" ] || createdb_bin="$(command -v createdb || true)"
[ -n "$createdb_bin" ] || { echo "createdb not found: apt-get install postgresql-client" >&2; exit 1; }
if [ "$(id -u)" -eq 0 ]; then
  # PostgreSQL refuses to run as root: its data directory belongs to postgres.
  id postgres >/dev/null 2>&1 || { echo "running as root needs a postgres user: apt-get install postgresql" >&2; exit 1; }
  command -v runuser >/dev/null 2>&1 || { echo "running as root needs runuser (util-linux)" >&2; exit 1; }
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$MOCK_PORT" "$REDIS_PORT" "$PG_PORT" "${SLUICE_PORTS[@]}"; do
  if port_busy "$p"; then echo "port $p is in use: set the *_PORT knobs" >&2; exit 1; fi
done

tmp="$(mktemp -d)"
pids=()      # mock, redis
inst_pids=() # the three sluice instances of the current mode
pgdata="$tmp/pg/data"
pg_started=""
cleanup() {
  set +e
  for pid in "${inst_pids[@]}" "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  if [ -n "$pg_started" ]; then
    (cd "$tmp/pg" && as_pg "$pgbin/pg_ctl" -D "$pgdata" -m immediate -w -t 10 stop >/dev/null 2>&1)
  fi
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

CLIENT_KEY="sk-load-cluster-client"
ADMIN_TOKEN="admin-load-cluster-token"
AUTH="authorization: Bearer $CLIENT_KEY"
ADMIN="authorization: Bearer $ADMIN_TOKEN"
CHAT='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
HZ="$(getconf CLK_TCK)"

echo "== starting redis-server, PostgreSQL ($pgbin), the mock"
mkdir -p "$tmp/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$tmp/redis" --save "" --appendonly no \
  --logfile "$tmp/redis/redis.log" >/dev/null 2>&1 &
redis_pid=$!; pids+=("$redis_pid")
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

mkdir -p "$tmp/pg"
if [ "$(id -u)" -eq 0 ]; then
  chmod 711 "$tmp"  # postgres passes through to its own directory, nothing more
  chown postgres: "$tmp/pg"
fi
chmod 700 "$tmp/pg"
if ! (cd "$tmp/pg" && as_pg "$pgbin/initdb" -D "$pgdata" -A trust -U sluice -E UTF8 --no-locale --no-sync >"$tmp/initdb.log" 2>&1); then
  cat "$tmp/initdb.log" >&2; echo "initdb failed" >&2; exit 1
fi
pg_started=1
if ! (cd "$tmp/pg" && as_pg "$pgbin/pg_ctl" -D "$pgdata" \
  -o "-p $PG_PORT -k $pgdata -c listen_addresses=127.0.0.1 -c fsync=off" -w -t 30 -l "$pgdata/log" start >/dev/null); then
  cat "$pgdata/log" >&2 2>/dev/null; echo "PostgreSQL did not start" >&2; exit 1
fi
"$createdb_bin" -h 127.0.0.1 -p "$PG_PORT" -U sluice sluice

"$bin" mock --listen "127.0.0.1:$MOCK_PORT" >"$tmp/mock.log" 2>&1 &
mock_pid=$!; pids+=("$mock_pid")

wait_port() {
  for _ in $(seq 1 100); do
    curl -s -m 5 -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; exit 1
}
wait_port "$MOCK_PORT"
for _ in $(seq 1 100); do [ "$(rcli ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
[ "$(rcli ping 2>/dev/null)" = PONG ] || { echo "redis-server does not answer on $REDIS_PORT" >&2; exit 1; }
# The floor of a Redis round trip on this machine: sequential PINGs over one
# connection (redis-benchmark's p50), before anything else runs.
redis_rtt="-"
if command -v redis-benchmark >/dev/null 2>&1; then
  redis_rtt="$(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 1 -n 20000 -t ping --csv 2>/dev/null \
    | awk -F'","' '/PING_MBULK/ {printf "%.0f", $5 * 1000}')"
  redis_rtt="${redis_rtt:--}"
  echo "   bare Redis round trip (redis-benchmark PING, 1 connection, p50): ${redis_rtt} µs"
fi

fill() {
  sed -e "s#__TMP__#$tmp#g" -e "s#__MOCK_PORT__#$MOCK_PORT#g" -e "s#__REDIS_PORT__#$REDIS_PORT#g" \
    -e "s#__PG_PORT__#$PG_PORT#g" -e "s#__SLUICE_PORT__#$2#g" -e "s#__INSTANCE__#$1#g" \
    -e "s#__CLIENT_KEY__#$CLIENT_KEY#g" -e "s#__ADMIN_TOKEN__#$ADMIN_TOKEN#g" "$here/cluster.toml"
}

mode=""  # on | off: what the running instances were started with
starts=0
stop_instances() {
  local pid
  for pid in "${inst_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${inst_pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  inst_pids=()
}
# start_instances on|off: the three instances, with [redis] or without it.
start_instances() {
  [ "$mode" = "$1" ] && return 0
  stop_instances
  mode="$1"; starts=$((starts + 1))
  local i
  for i in 1 2 3; do
    local conf="$tmp/sluice-$mode-$i.toml"
    if [ "$mode" = on ]; then fill "$i" "${SLUICE_PORTS[$((i - 1))]}" >"$conf"
    else fill "$i" "${SLUICE_PORTS[$((i - 1))]}" | sed -e '/^\[redis\]/,/^$/d' >"$conf"; fi
    "$bin" serve -c "$conf" >>"$tmp/sluice-$i.log" 2>&1 &
    inst_pids+=("$!")
  done
  for i in 0 1 2; do
    local port="${SLUICE_PORTS[$i]}" status=""
    for _ in $(seq 1 100); do
      status="$(curl -s -m 5 "http://127.0.0.1:$port/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' 2>/dev/null || true)"
      [ "$status" = ok ] && break
      sleep 0.1
    done
    [ "$status" = ok ] || { echo "instance $((i + 1)) (port $port, Redis $mode) is not healthy: ${status:-no answer}" >&2; tail -5 "$tmp/sluice-$((i + 1)).log" >&2; exit 1; }
    local code
    code="$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" -H "$AUTH" -H 'content-type: application/json' -d "$CHAT")"
    [ "$code" = 200 ] || { echo "instance $((i + 1)): a chat request with the client key answered $code" >&2; exit 1; }
    # Warm the instance's upstream pool before it is measured.
    oha --no-tui --output-format json -n 300 -c "$PER" -m POST -H "$AUTH" -H 'content-type: application/json' -d "$CHAT" \
      "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  done
}

# "utime stime" in clock ticks, each summed over the given pids.
cpu_ticks() {
  local u=0 s=0 pu ps p
  for p in "$@"; do read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + pu)); s=$((s + ps)); done
  echo "$u $s"
}
# Sum of a metric over the running instances' /metrics (- when absent).
metric_sum() {
  local port out="" v
  for port in "${SLUICE_PORTS[@]}"; do
    v="$(curl -s -m 5 "http://127.0.0.1:$port/metrics" -H "$ADMIN" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $2; n++} END {if (n) print s}')"
    out="$out ${v:--}"
  done
  echo "$out" | awk '{s = 0; for (i = 1; i <= NF; i++) { if ($i == "-") { print "-"; exit } s += $i } print s}'
}
# The instances' values of a gauge, e.g. "1 1 1".
metric_each() {
  local port v out=""
  for port in "${SLUICE_PORTS[@]}"; do
    v="$(curl -s -m 5 "http://127.0.0.1:$port/metrics" -H "$ADMIN" | awk -v m="$1" '$1 == m {print $2; exit}')"
    out="$out${out:+ }${v:--}"
  done
  echo "$out"
}
# EVAL/EVALSHA calls Redis served since the last CONFIG RESETSTAT.
redis_scripts() {
  rcli info commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_eval(sha)?:/ {s += $3} END {print s + 0}'
}

# oha JSON files -> "rps p50_ms p99_ms errors total": req/s summed; p50 and
# p99 the request-weighted mean of the processes' own percentiles (they run
# the same load, side by side).
summarize() {
  python3 - "$@" <<'PY'
import json, sys
rps = total_all = ok_all = 0
p50 = p99 = 0.0
for path in sys.argv[1:]:
    d = json.load(open(path))
    s = d["summary"]; p = d.get("latencyPercentiles", {})
    codes = d.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # Requests still open when a timed run ends are cut by oha itself: not errors.
    errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "aborted due to deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    rps += s["requestsPerSec"] or 0
    p50 += (p.get("p50") or 0) * total
    p99 += (p.get("p99") or 0) * total
    total_all += total; ok_all += ok
n = max(total_all, 1)
print(f"{rps:.0f} {p50 / n * 1000:.3f} {p99 / n * 1000:.3f} {total_all - ok_all} {total_all}")
PY
}
# Non-2xx answers and connection errors, by kind, over oha JSON files.
error_kinds() {
  python3 - "$@" <<'PY'
import json, sys, collections
c = collections.Counter()
for path in sys.argv[1:]:
    d = json.load(open(path))
    for k, v in d.get("statusCodeDistribution", {}).items():
        if not k.startswith("2"): c[f"HTTP {k}"] += v
    for k, v in d.get("errorDistribution", {}).items():
        if "aborted due to deadline" not in k: c[k] += v
print(", ".join(f"{k}: {v}" for k, v in c.items()) or "none")
PY
}

rows=()
odd=()
declare -A res  # "<kind>,<mode>,<round>" -> "p50_ms sluice_cpu_us rps redis_cpu_us"
# measure KIND ROUND oha-args...: three oha at once, one per instance, Redis $mode.
measure() {
  local kind="$1" round="$2"; shift 2
  local i files=() ohas=()
  [ "$mode" = on ] && { rcli flushdb >/dev/null; rcli config resetstat >/dev/null; }
  local err0; err0="$(metric_sum sluice_redis_errors_total)"
  local u0 s0 ru0 rs0 u1 s1 ru1 rs1
  read -r u0 s0 < <(cpu_ticks "${inst_pids[@]}")
  read -r ru0 rs0 < <(cpu_ticks "$redis_pid")
  for i in 0 1 2; do
    files+=("$tmp/oha-$i.json")
    oha --no-tui --output-format json "$@" "http://127.0.0.1:${SLUICE_PORTS[$i]}/v1/chat/completions" >"$tmp/oha-$i.json" &
    ohas+=("$!")
  done
  for i in 0 1 2; do wait "${ohas[$i]}"; done
  read -r u1 s1 < <(cpu_ticks "${inst_pids[@]}")
  read -r ru1 rs1 < <(cpu_ticks "$redis_pid")
  local rps p50 p99 errors total
  read -r rps p50 p99 errors total < <(summarize "${files[@]}")
  local cpu="-" cpu_total="-" rcpu="-" scripts="-" rerr="-" up="-"
  if [ "$total" -gt 0 ]; then
    local us=$(( (u1 - u0) * 1000000 / HZ / total )) ks=$(( (s1 - s0) * 1000000 / HZ / total ))
    cpu_total=$((us + ks)); cpu="$cpu_total ($us + $ks)"
    rcpu=$(( (ru1 - ru0 + rs1 - rs0) * 1000000 / HZ / total ))
  fi
  if [ "$mode" = on ]; then
    local calls; calls="$(redis_scripts)"
    scripts="$(awk -v c="$calls" -v t="$total" 'BEGIN { printf "%.2f", t ? c / t : 0 }')"
    local err1; err1="$(metric_sum sluice_redis_errors_total)"
    if [ "$err0" != - ] && [ "$err1" != - ]; then rerr=$((err1 - err0)); fi
    up="$(metric_each sluice_redis_up)"
    [ "$rerr" = 0 ] || odd+=("$kind, Redis on, round $round: sluice_redis_errors_total rose by $rerr (sluice_redis_up: $up)")
  fi
  [ "$errors" = 0 ] || odd+=("$kind, Redis $mode, round $round: $errors of $total not 2xx: $(error_kinds "${files[@]}")")
  res["$kind,$mode,$round"]="$p50 $cpu_total $rps $rcpu"
  rows+=("| $kind | $round | $mode | $rps | $p50 | $p99 | $errors / $total | $cpu | $rcpu | $scripts | $rerr |")
  echo "   round $round, Redis $mode, $kind: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors/$total, sluice ${cpu} µs CPU/req, redis $rcpu µs/req, scripts/req $scripts, redis errors $rerr"
}

FIXED_CONNS=6
run_mode() {
  local round="$1"
  start_instances "$2"
  measure "throughput c$((PER * 3))" "$round" -z "${DURATION}s" -c "$PER" -m POST -H "$AUTH" -H 'content-type: application/json' -d "$CHAT"
  if [ "$RATE" -gt 0 ]; then
    measure "fixed ${RATE}/s" "$round" -z "${DURATION}s" -q "$(awk -v r="$RATE" 'BEGIN { printf "%.2f", r / 3 }')" -c "$FIXED_CONNS" \
      --latency-correction -m POST -H "$AUTH" -H 'content-type: application/json' -d "$CHAT"
  fi
}

echo "== 1. Redis on / off, $ROUNDS rounds: 3 x oha -c $PER, ${DURATION}s each (and ${RATE} req/s in all, latency-corrected)"
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then order="on off"; else order="off on"; fi
  for m in $order; do run_mode "$round" "$m"; done
done

echo "== 2. the mock direct: one oha -c $((PER * 3))"
direct_rows=()
direct() {
  local kind="$1"; shift
  local u0 s0 u1 s1 rps p50 p99 errors total
  read -r u0 s0 < <(cpu_ticks "$mock_pid")
  oha --no-tui --output-format json "$@" "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" >"$tmp/direct.json"
  read -r u1 s1 < <(cpu_ticks "$mock_pid")
  read -r rps p50 p99 errors total < <(summarize "$tmp/direct.json")
  local cpu="-"
  [ "$total" -gt 0 ] && cpu="$(( (u1 - u0 + s1 - s0) * 1000000 / HZ / total ))"
  direct_rows+=("| $kind | mock direct | $rps | $p50 | $p99 | $errors / $total | $cpu |")
  echo "   $kind: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors/$total, mock $cpu µs CPU/req"
}
direct "throughput c$((PER * 3))" -z "${DURATION}s" -c "$((PER * 3))" -m POST -H "$AUTH" -H 'content-type: application/json' -d "$CHAT"
if [ "$RATE" -gt 0 ]; then
  direct "fixed ${RATE}/s" -z "${DURATION}s" -q "$RATE" -c "$((FIXED_CONNS * 3))" --latency-correction -m POST -H "$AUTH" -H 'content-type: application/json' -d "$CHAT"
fi

echo "== 3. cooldown propagation: a 429 for sk-up-1 met by instance 1, seen on 2 and 3 ($COOL_SAMPLES samples)"
start_instances on
rcli flushdb >/dev/null
# In Python for the timing: one keep-alive connection to each instance, so a
# poll of /health is a round trip (about 0.2 ms), not a curl process (several
# ms). A subscriber on sluice:events timestamps the publish itself.
cool_out="$(python3 - "$MOCK_PORT" "$REDIS_PORT" "$CLIENT_KEY" "$ADMIN_TOKEN" "$COOL_SAMPLES" "$CHAT" "${SLUICE_PORTS[@]}" <<'PY'
import http.client, json, socket, statistics, sys, threading, time

mock_port, redis_port, client_key, admin, samples, chat = sys.argv[1:7]
ports = [int(p) for p in sys.argv[7:10]]
samples = int(samples)
UP = "sk-up-1"

def fingerprint(key):  # src/config/keys.rs fingerprint()
    h = 0x811C9DC5
    for b in key.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return f"{key[:4]}…{h:08x}"

FP = fingerprint(UP)
conns = {}

def call(port, method, path, body=None, headers=None):
    for attempt in (0, 1):
        c = conns.get(port)
        if c is None:
            c = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        except (http.client.HTTPException, OSError):
            c.close(); conns.pop(port, None)
            if attempt:
                raise

def mock(method, path, body=None):
    return call(int(mock_port), method, path, json.dumps(body) if body is not None else None,
                {"content-type": "application/json"})

def by_key():
    return json.loads(mock("GET", "/_stats")[1]).get("by_key", {}).get(UP, 0)

def state(port):
    status, body = call(port, "GET", "/health", headers={"authorization": f"Bearer {admin}"})
    for up in json.loads(body).get("upstreams", []):
        for k in up.get("keys", []):
            if k.get("key") == FP:
                return k.get("state")
    return None

# Redis subscriber on a raw RESP socket, in a thread that timestamps each
# read: when a cooldown was published, independent of the polling.
sub = socket.create_connection(("127.0.0.1", int(redis_port)))
sub.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$13\r\nsluice:events\r\n")
sub.settimeout(2); sub.recv(4096); sub.settimeout(None)
heard = []  # (perf_counter_ns, bytes)
def listen():
    while True:
        try:
            data = sub.recv(65536)
        except OSError:
            return
        if not data:
            return
        heard.append((time.perf_counter_ns(), data))
threading.Thread(target=listen, daemon=True).start()
def published_after(t0):
    for t, data in list(heard):
        if t >= t0 and b" cool " in data:
            return t
    return None

ms = lambda ns: ns / 1e6
from_send = {2: [], 3: []}; from_answer = {2: [], 3: []}; pub_after_send = []
# What one poll costs: the resolution of the figures below.
polls_ms = []
for _ in range(20):
    t = time.perf_counter_ns(); state(ports[1]); polls_ms.append(ms(time.perf_counter_ns() - t))
notes = []
chat_headers = {"authorization": f"Bearer {client_key}", "content-type": "application/json"}
for n in range(samples):
    for i, p in enumerate(ports):
        s = state(p)
        if s != "healthy":
            notes.append(f"sample {n + 1}: {UP} is {s} on instance {i + 1} before the fault"); break
    mock("POST", "/_control", {"keys": {UP: {"status": 429, "retry_after": "30"}}})
    base = by_key()
    hit = None
    for _ in range(12):  # three keys in rotation: sk-up-1 comes within a few requests
        t_send = time.perf_counter_ns()
        status, _ = call(ports[0], "POST", "/v1/chat/completions", chat, chat_headers)
        t_done = time.perf_counter_ns()
        # Poll 2 and 3 once before asking the mock, so the first poll follows the answer at once.
        first = {i: (state(ports[i - 1]), time.perf_counter_ns()) for i in (2, 3)}
        if by_key() > base:
            hit = (t_send, t_done, status, first); break
    if hit is None:
        notes.append(f"sample {n + 1}: instance 1 never sent {UP} in 12 requests"); break
    t_send, t_done, status, first = hit
    if status != 200:
        notes.append(f"sample {n + 1}: the request that met the 429 answered {status} (another key should have served it)")
    seen = {i: t for i, (s, t) in first.items() if s == "cooling"}
    deadline = t_done + 2_000_000_000
    while len(seen) < 2 and time.perf_counter_ns() < deadline:
        for i in (2, 3):
            if i not in seen and state(ports[i - 1]) == "cooling":
                seen[i] = time.perf_counter_ns()
    t_pub = None
    for _ in range(200):
        t_pub = published_after(t_send)
        if t_pub is not None: break
        time.sleep(0.01)
    if t_pub is not None:
        pub_after_send.append(ms(t_pub - t_send))
    for i in (2, 3):
        if i in seen:
            from_send[i].append(ms(seen[i] - t_send)); from_answer[i].append(ms(seen[i] - t_done))
        else:
            notes.append(f"sample {n + 1}: instance {i} did not show {UP} cooling within 2 s")
    own = state(ports[0])
    if own != "cooling":
        notes.append(f"sample {n + 1}: instance 1 itself shows {UP} {own}")
    # Clear: the mock's fault, then the cooldown everywhere (a reset on
    # instance 1 is published to the others and deletes the Redis record).
    mock("POST", "/_control", {})
    call(ports[0], "POST", "/admin/reset-failed-keys", b"", {"authorization": f"Bearer {admin}"})
    for _ in range(200):
        if all(state(p) == "healthy" for p in ports): break
        time.sleep(0.01)
    else:
        notes.append(f"sample {n + 1}: {UP} not healthy everywhere 2 s after the reset")

def med(v): return f"{statistics.median(v):.2f}" if v else "-"
def mx(v): return f"{max(v):.2f}" if v else "-"
for i in (2, 3):
    print(f"ROW | instance 1 -> {i} | {len(from_send[i])} | {med(from_send[i])} (max {mx(from_send[i])}) | {med(from_answer[i])} (max {mx(from_answer[i])}) |")
print(f"PUB {med(pub_after_send)} {mx(pub_after_send)} {len(pub_after_send)}")
print(f"POLL {statistics.median(polls_ms):.2f}")
for note in notes:
    print(f"NOTE {note}")
PY
)" || { echo "the cooldown step failed" >&2; exit 1; }
cool_rows=(); cool_notes=()
while IFS= read -r line; do
  case "$line" in
    "ROW "*) cool_rows+=("${line#ROW }") ;;
    "PUB "*) read -r _ pub_med pub_max pub_n <<<"$line" ;;
    "POLL "*) read -r _ poll_ms <<<"$line" ;;
    "NOTE "*) cool_notes+=("${line#NOTE }"); odd+=("cooldown: ${line#NOTE }") ;;
  esac
done <<<"$cool_out"
printf '   %s\n' "${cool_rows[@]}"
echo "   publish seen by a subscriber: median ${pub_med:-?} ms after the request was sent (${pub_n:-0} samples); one /health poll ${poll_ms:-?} ms"

stop_instances
# The instances' own log (stderr, level warn), without the startup line on stdout.
log_of() { cat "$tmp"/sluice-*.log | grep -v ' listening on ' | grep . || true; }
log_redis="$(log_of | grep -c -i redis || true)"
log_lines="$(log_of | grep -c . || true)"
if [ "$log_lines" -gt 0 ]; then
  odd+=("the instances logged $log_lines warning/error lines (${log_redis:-0} mention Redis); first: $(log_of | head -3 | tr '\n' ' ' | cut -c1-400)")
fi

# Per round: ON minus OFF, p50 (µs) and sluice CPU per request (µs).
compare() {
  local kind="$1" r diffs_p50=() diffs_cpu=() diffs_all=() lines=()
  for r in $(seq 1 "$ROUNDS"); do
    local on="${res["$kind,on,$r"]:-}" off="${res["$kind,off,$r"]:-}"
    [ -n "$on" ] && [ -n "$off" ] || continue
    local on_p50 on_cpu on_rps on_r off_p50 off_cpu off_rps off_r
    read -r on_p50 on_cpu on_rps on_r <<<"$on"; read -r off_p50 off_cpu off_rps off_r <<<"$off"
    [ "$on_cpu" != - ] && [ "$off_cpu" != - ] || continue
    local dp; dp="$(awk -v a="$on_p50" -v b="$off_p50" 'BEGIN { printf "%+.0f", (a - b) * 1000 }')"
    local dc; dc="$(awk -v a="$on_cpu" -v b="$off_cpu" 'BEGIN { printf "%+d", a - b }')"
    local da; da="$(awk -v a="$on_cpu" -v b="$off_cpu" -v c="$on_r" -v d="$off_r" 'BEGIN { printf "%+d", a + c - b - d }')"
    local rr; rr="$(awk -v a="$on_rps" -v b="$off_rps" 'BEGIN { printf "%.2f", b ? a / b : 0 }')"
    diffs_p50+=("$dp"); diffs_cpu+=("$dc"); diffs_all+=("$da")
    lines+=("| $kind | $r | $on_p50 / $off_p50 | $dp | $on_cpu / $off_cpu | $dc | $da | $rr |")
  done
  printf '%s\n' "${lines[@]}"
  median() { printf '%s\n' "$@" | sort -g | awk '$1 != "" {v[++n] = $1} END {if (n) printf "%+d", v[int((n + 1) / 2)]}'; }
  echo "| $kind | median | | $(median "${diffs_p50[@]}") | | $(median "${diffs_cpu[@]}") | $(median "${diffs_all[@]}") | |"
}

machine="$(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit (with uncommitted changes)"
mkdir -p "$OUT_DIR"
out="$OUT_DIR/$(date +%F-%H%M)-cluster.md"
{
  echo "# sluice cluster load test, $(date '+%F %H:%M %Z')"
  echo
  echo "Machine: $machine. oha, the mock, Redis, PostgreSQL and three sluice instances share these cores."
  echo "Commit $commit, sluice $("$bin" --version | awk '{print $2}'), $(redis-server --version | awk '{print $1, $3}'), PostgreSQL $("$pgbin/pg_ctl" --version | awk '{print $3}'), oha $(oha --version | awk '{print $2}')."
  echo
  echo "Settings: DURATION=${DURATION}s a run, CONNS=$((PER * 3)) (3 oha x $PER, one per instance), RATE=$RATE req/s in all (3 x $FIXED_CONNS connections, latency-corrected), ROUNDS=$ROUNDS (ON and OFF alternate: ON OFF, OFF ON, ...), COOL_SAMPLES=$COOL_SAMPLES."
  echo "Each instance: \`loadtest/cluster.toml\`: one worker thread, [store] PostgreSQL, request log and metrics on, 3 upstream keys to the mock over HTTP/1.1; the client key \`[[clients]]\` with rpm = 1000000 (checked on every request, never refused). Redis on: \`[redis]\` timeout 50ms, on_error local; Redis off: the same file without \`[redis]\` (in-process limiter). Redis is emptied before each run."
  echo
  echo "req/s: the three oha summed; p50/p99: the request-weighted mean of the three oha's percentiles; sluice CPU: utime+stime of the three instances over the run / all requests (user + kernel); Redis CPU: redis-server's, the same way; scripts/req: Redis EVAL/EVALSHA calls / requests; Redis errors: rise of sluice_redis_errors_total over the three instances."
  echo
  echo "| scenario | round | Redis | req/s | p50 ms | p99 ms | errors / total | sluice CPU µs/req (user + kernel) | Redis CPU µs/req | scripts/req | Redis errors |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "The mock direct, for reference (one oha):"
  echo
  echo "| scenario | target | req/s | p50 ms | p99 ms | errors / total | mock CPU µs/req |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${direct_rows[@]}"
  echo
  echo "Shared limits over Redis against the in-process limiter, per round (ON minus OFF; target: under 30 µs of p50 on loopback; a bare Redis round trip here, redis-benchmark PING over one connection, sequential: p50 ${redis_rtt} µs):"
  echo
  echo "| scenario | round | p50 ms ON / OFF | p50 ON - OFF µs | sluice CPU µs/req ON / OFF | sluice CPU ON - OFF µs | sluice + Redis CPU ON - OFF µs | req/s ON / OFF |"
  echo "|---|---|---|---|---|---|---|---|"
  compare "throughput c$((PER * 3))"
  [ "$RATE" -gt 0 ] && compare "fixed ${RATE}/s"
  echo
  echo "Cooldown propagation: the mock answers 429 (Retry-After: 30) for upstream key sk-up-1; requests go through instance 1 until one meets it (another key serves it); then instances 2 and 3 are polled on /health until sk-up-1 is \`cooling\` there. Times in ms, median (max) of the samples, from sending that request and from its answer (the 429 came in between, so the true propagation lies between the two; a figure near one /health poll from the answer means sk-up-1 was already cooling at the first poll):"
  echo
  echo "| path | samples | from the request sent, ms | from its answer, ms |"
  echo "|---|---|---|---|"
  printf '%s\n' "${cool_rows[@]}"
  echo
  echo "- A subscriber on \`sluice:events\` saw the cooldown published a median ${pub_med:-?} ms (max ${pub_max:-?}) after the request was sent; one /health poll took ${poll_ms:-?} ms."
  if [ "${#odd[@]}" -gt 0 ]; then
    for o in "${odd[@]}"; do echo "- $o"; done
  else
    echo "- Nothing odd: every answer 2xx, no Redis errors, nothing in the instances' logs."
  fi
} >"$out"
echo
cat "$out"
echo
echo "written to $out"
