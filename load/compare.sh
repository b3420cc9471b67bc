#!/usr/bin/env bash
# Measures Drover beside its references on this machine, with the same load generator, every
# server on loopback ports of its own, and prints each figure of the performance targets beside
# its target and reference. Every result is appended to load/results/<date>.jsonl with the run's
# id, the machine, the versions and the parameters; `python3 load/targets.py --last 3` prints
# the median and spread of the last three runs.
#
#   load/compare.sh                        # everything, about 9 minutes here
#   FANOUT=0 CONNECT_DEVICES=0 load/compare.sh      # skip sections: each has a switch below
#   MESSAGES=500000 SUBSCRIBERS=4 load/compare.sh
#
# Sections, in the order they run:
#   fanout      publish-to-subscriber through Drover (MQTT_SLOW_SUBSCRIBER=drop, its default)
#               and Mosquitto, QoS 0 and 1, as fast as possible and paced at LATENCY_RATE; then
#               QoS 1 through a second Drover with MQTT_SLOW_SUBSCRIBER=backpressure
#   connect     CONNECT_DEVICES device connections to a fresh Drover: server RSS per connection
#               (the lowest over 20 s after the ramp, and right after it) and heap per connection
#   query       QUERY_POINTS (and QUERY_POINTS_LARGE) points loaded, then queries timed
#   ingest      device telemetry at QoS 0 and 1 into Drover's store, and the same load against
#               Mosquitto (which stores nothing)
#   dashboard   DASHBOARD_RUNS runs at half the ingestion targets with a /ws session watching
#               DASHBOARD_WATCH devices: publish-to-dashboard latency
#   platform    PLATFORM_DEVICES devices at QoS 1, plain and then with PLATFORM_RULES rules and
#               live analytics: the rest of the platform's cost
set -euo pipefail
cd "$(dirname "$0")/.."

FANOUT=${FANOUT:-1}
MESSAGES=${MESSAGES:-200000}
PAYLOAD=${PAYLOAD:-64}
PUBLISHERS=${PUBLISHERS:-1}
SUBSCRIBERS=${SUBSCRIBERS:-1}
# Latency is compared at the same fixed rate, below either broker's saturation.
LATENCY_RATE=${LATENCY_RATE:-20000}
# The fanout runs against a second Drover whose slow-subscriber policy is backpressure.
FANOUT_BACKPRESSURE=${FANOUT_BACKPRESSURE:-1}
# The file-descriptor limit here is 20,000 per process: 19,000 connections fit.
CONNECT_DEVICES=${CONNECT_DEVICES:-19000}
QUERY_POINTS=${QUERY_POINTS:-1000000}
QUERY_POINTS_LARGE=${QUERY_POINTS_LARGE:-10000000}
INGEST_DEVICES=${INGEST_DEVICES:-100}
INGEST_SECONDS=${INGEST_SECONDS:-10}
# Half the ingestion targets of DESIGN.md §8 (100,000 msg/s at QoS 0, 50,000 at QoS 1).
DASHBOARD_WATCH=${DASHBOARD_WATCH:-100}
DASHBOARD_RUNS=${DASHBOARD_RUNS:-5}
PLATFORM_DEVICES=${PLATFORM_DEVICES:-10000}
PLATFORM_RULES=${PLATFORM_RULES:-1000}
PLATFORM_SECONDS=${PLATFORM_SECONDS:-20}
PORT_BASE=${PORT_BASE:-18180}
MOSQUITTO_PORT=${MOSQUITTO_PORT:-18283}
RESULTS=${RESULTS:-load/results/$(date -u +%Y-%m-%d).jsonl}
# The load generator of the latency runs on one core of its own when taskset is there.
PIN_LOAD=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN_LOAD=(taskset -c "$(( $(nproc) - 1 ))"); fi

command -v mosquitto >/dev/null || { echo "mosquitto is needed (apt-get install mosquitto)"; exit 1; }
cargo build --release -p drover -p drover-load >&2
DROVER=${CARGO_TARGET_DIR:-target}/release/drover
LOAD=${CARGO_TARGET_DIR:-target}/release/drover-load

WORK=$(mktemp -d /tmp/drover-compare.XXXXXX)
cleanup() {
  for pidfile in "$WORK"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/mosquitto.conf" <<CONF
listener $MOSQUITTO_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest none
# As Drover's listeners, and as a latency-minded Mosquitto is run: no Nagle delays.
set_tcp_nodelay true
CONF
mosquitto -c "$WORK/mosquitto.conf" & echo $! >"$WORK/mosquitto.pid"

# start_drover NAME OFFSET [VAR=value…]: a Drover on its own data directory, HTTP on
# PORT_BASE+OFFSET and MQTT on PORT_BASE+OFFSET+3; sets HTTP_<NAME>, MQTT_<NAME>, KEY_<NAME>.
start_drover() {
  local name=$1 offset=$2; shift 2
  local http=$(( PORT_BASE + offset )) mqtt=$(( PORT_BASE + offset + 3 )) password
  password=compare-$(date +%s)-$RANDOM
  env DATA_DIR="$WORK/$name" PORT=$http HTTP_BIND=127.0.0.1 MQTT_PORT=$mqtt MQTT_BIND=127.0.0.1 \
    MAX_DEVICES=50000 LOG_LEVEL=warn TELEMETRY_MAINTENANCE_INTERVAL_SECS=10 \
    DROVER_ADMIN_PASSWORD="$password" "$@" "$DROVER" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  echo $! >"$WORK/$name.pid"
  for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$http/health" >/dev/null && break; sleep 0.1; done
  local token key
  token=$(curl -sf -X POST "http://127.0.0.1:$http/api/auth/login" -H 'Content-Type: application/json' \
    -d "{\"username\":\"admin\",\"password\":\"$password\"}" | python3 -c 'import sys,json;print(json.load(sys.stdin)["token"])')
  key=$(curl -sf -X POST "http://127.0.0.1:$http/api/keys" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d '{"name":"compare","role":"operator"}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])')
  printf -v "HTTP_$name" '%s' "$http"
  printf -v "MQTT_$name" '%s' "$mqtt"
  printf -v "KEY_$name" '%s' "$key"
}
stop_drover() {
  local pid; pid=$(cat "$WORK/$1.pid")
  kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -f "$WORK/$1.pid"
}

RUN=$(date -u +%Y%m%dT%H%M%SZ)
RUN_FILE="$WORK/run.jsonl"
mkdir -p "$(dirname "$RESULTS")"
python3 - "$RESULTS" "$RUN" <<PY
import json, subprocess, sys
def out(cmd):
    try: return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception: return "unknown"
line = {"run": sys.argv[2], "drover": out(["$DROVER", "--version"]), "mosquitto": out(["mosquitto", "-h"]),
        "rustc": out(["rustc", "--version"]), "parameters": {"messages": $MESSAGES, "payload": $PAYLOAD,
        "publishers": $PUBLISHERS, "subscribers": $SUBSCRIBERS, "connect_devices": $CONNECT_DEVICES,
        "query_points": [$QUERY_POINTS, $QUERY_POINTS_LARGE], "ingest_devices": $INGEST_DEVICES,
        "dashboard_runs": $DASHBOARD_RUNS, "platform_devices": $PLATFORM_DEVICES, "platform_rules": $PLATFORM_RULES}}
open(sys.argv[1], "a").write(json.dumps(line) + "\n")
print(json.dumps(line))
PY

start_drover main 0
section() { printf '\n==> %s\n' "$*" >&2; }

if [ "$FANOUT" = 1 ]; then
  section "fanout"
  for QOS in 0 1; do
    for TARGET in drover mosquitto; do
      if [ "$TARGET" = drover ]; then CREDS=(--port "$MQTT_main" --username compare --password "$KEY_main" --slow-subscriber drop); else CREDS=(--port "$MOSQUITTO_PORT"); fi
      "$LOAD" bench fanout --target "$TARGET" "${CREDS[@]}" --qos "$QOS" --messages "$MESSAGES" --payload "$PAYLOAD" \
        --publishers "$PUBLISHERS" --subscribers "$SUBSCRIBERS" --record "$RUN_FILE" | tail -n 1 >/dev/null
      "$LOAD" bench fanout --target "$TARGET" "${CREDS[@]}" --qos "$QOS" --messages $(( LATENCY_RATE * 3 )) --payload "$PAYLOAD" \
        --rate "$LATENCY_RATE" --record "$RUN_FILE" | tail -n 1 >/dev/null
    done
  done
  if [ "$FANOUT_BACKPRESSURE" = 1 ]; then
    start_drover backpressure 10 MQTT_SLOW_SUBSCRIBER=backpressure
    "$LOAD" bench fanout --target drover --port "$MQTT_backpressure" --username compare --password "$KEY_backpressure" \
      --slow-subscriber backpressure --qos 1 --messages "$MESSAGES" --payload "$PAYLOAD" \
      --publishers "$PUBLISHERS" --subscribers "$SUBSCRIBERS" --record "$RUN_FILE" | tail -n 1 >/dev/null
    stop_drover backpressure
  fi
fi

if [ "$CONNECT_DEVICES" -gt 0 ]; then
  section "connect $CONNECT_DEVICES"
  # A fresh server: its memory before the ramp is the base the per-connection cost is measured from.
  # HEAP_METRICS=1: the live heap beside the RSS (the counting costs CPU, not memory).
  start_drover connect 20 HEAP_METRICS=1
  "$LOAD" bench connect --url "http://127.0.0.1:$HTTP_connect" --api-key "$KEY_connect" --mqtt-port "$MQTT_connect" \
    --devices "$CONNECT_DEVICES" --devices-file "$WORK/connect.csv" --record "$RUN_FILE" | tail -n 1 >/dev/null
  stop_drover connect
fi

BASE=http://127.0.0.1:$HTTP_main
# Queries first: the ingest runs leave a large rollup pass behind that would compete with them.
for POINTS in "$QUERY_POINTS" "$QUERY_POINTS_LARGE"; do
  if [ "$POINTS" -gt 0 ]; then
    section "query over $POINTS points"
    "$LOAD" bench query --url "$BASE" --api-key "$KEY_main" --points "$POINTS" --device "bench-query-$POINTS" \
      --wait-rollups $(( 60 + POINTS / 40000 )) --record "$RUN_FILE" | tail -n 1 >/dev/null
  fi
done

if [ "$INGEST_DEVICES" -gt 0 ]; then
  for QOS in 0 1; do
    section "ingest QoS $QOS"
    # The same load against Mosquitto, which acknowledges without storing: the reference.
    "$LOAD" bench ingest-broker --port "$MOSQUITTO_PORT" --devices "$INGEST_DEVICES" --prefix "ingest-q$QOS-" \
      --qos "$QOS" --seconds "$INGEST_SECONDS" --record "$RUN_FILE" | tail -n 1 >/dev/null
    "$LOAD" bench ingest --url "$BASE" --api-key "$KEY_main" --mqtt-port "$MQTT_main" --devices "$INGEST_DEVICES" \
      --prefix "ingest-q$QOS-" --devices-file "$WORK/ingest-q$QOS.csv" --qos "$QOS" --seconds "$INGEST_SECONDS" --record "$RUN_FILE" | tail -n 1 >/dev/null
  done
fi

if [ "$DASHBOARD_WATCH" -gt 0 ] && [ "$DASHBOARD_RUNS" -gt 0 ]; then
  for RUN_N in $(seq 1 "$DASHBOARD_RUNS"); do
    for QOS in 0 1; do
      section "dashboard QoS $QOS, run $RUN_N of $DASHBOARD_RUNS"
      RATE=$([ "$QOS" = 0 ] && echo 50000 || echo 25000)
      "${PIN_LOAD[@]}" "$LOAD" bench ingest --url "$BASE" --api-key "$KEY_main" --mqtt-port "$MQTT_main" --devices "$DASHBOARD_WATCH" \
        --prefix "dash-q$QOS-" --devices-file "$WORK/dash-q$QOS.csv" --qos "$QOS" --seconds "$INGEST_SECONDS" \
        --rate "$RATE" --watch "$DASHBOARD_WATCH" --record "$RUN_FILE" | tail -n 1 >/dev/null
    done
  done
fi

if [ "$PLATFORM_DEVICES" -gt 0 ]; then
  section "platform: $PLATFORM_DEVICES devices, plain, then $PLATFORM_RULES rules and analytics"
  # A Drover of its own: a tenant without rules, and the other sections' series not in its store.
  stop_drover main
  start_drover platform 30
  "$LOAD" bench analytics --url "http://127.0.0.1:$HTTP_platform" --api-key "$KEY_platform" --mqtt-port "$MQTT_platform" \
    --devices "$PLATFORM_DEVICES" --devices-file "$WORK/platform.csv" --prefix platform- --rules "$PLATFORM_RULES" \
    --qos 1 --seconds "$PLATFORM_SECONDS" --record "$RUN_FILE" | tail -n 1 >/dev/null
  stop_drover platform
fi

python3 - "$RUN_FILE" "$RUN" "$RESULTS" <<'PY'
import json, sys
rows = [dict(json.loads(l), run=sys.argv[2]) for l in open(sys.argv[1])]
with open(sys.argv[3], "a") as out:
    for r in rows:
        out.write(json.dumps(r) + "\n")
PY
python3 load/targets.py --run "$RUN" "$RESULTS"
echo "results appended to $RESULTS (run $RUN)"
