#!/usr/bin/env bash
# Measures a Drover cluster on this machine: nodes over the machine's PostgreSQL, Redis and
# InfluxDB (a fresh database of each per run), with the same load generator as compare.sh.
#
#  1. Publish -> subscriber throughput and latency (QoS 0 and 1): a standalone node (embedded
#     stores, no cluster), then a 3-node cluster with publisher and subscriber on the same node,
#     then with the publisher on node 2 and the subscriber on node 1 (every message crosses
#     nodes through node 1's Redis stream).
#  2. Aggregate QoS 1 telemetry ingestion (acknowledged after the commit to the shared
#     InfluxDB, read back from it) with 1, 2 and 3 nodes, the devices spread over the nodes.
#
# Every measurement runs REPEAT times; each result is appended to load/results/<date>.jsonl
# (with "cluster_bench" and the mode in its parameters) and the medians and spreads printed.
#
#   load/cluster_bench.sh
#   REPEAT=1 MESSAGES=50000 INGEST_SECONDS=5 load/cluster_bench.sh     # a quick look
#   NODE_COUNTS="1 3" FANOUT=0 load/cluster_bench.sh                     # ingestion only
set -euo pipefail
cd "$(dirname "$0")/.."

REPEAT=${REPEAT:-3}
MESSAGES=${MESSAGES:-200000}
PAYLOAD=${PAYLOAD:-64}
LATENCY_RATE=${LATENCY_RATE:-20000}
FANOUT=${FANOUT:-1}
NODE_COUNTS=${NODE_COUNTS:-"1 2 3"}
INGEST_DEVICES=${INGEST_DEVICES:-120}
INGEST_SECONDS=${INGEST_SECONDS:-10}
POSTGRES_URL=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/}
INFLUX_URL=${INFLUX_URL:-http://127.0.0.1:18086}
BASE_PORT=${BASE_PORT:-18400}
RESULTS=${RESULTS:-load/results/$(date -u +%Y-%m-%d).jsonl}

if [ -z "${SKIP_BUILD:-}" ]; then
  nice cargo build --release -p drover -p drover-load >&2
fi
DROVER=${CARGO_TARGET_DIR:-target}/release/drover
LOAD=${CARGO_TARGET_DIR:-target}/release/drover-load

STAMP=$(date -u +%Y%m%d%H%M%S)
DB=drover_bench_$STAMP
WORK=$(mktemp -d /tmp/drover-cluster-bench.XXXXXX)
PIDS=()
stop_nodes() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_nodes
  psql "$POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  curl -s -XPOST "$INFLUX_URL/query" --data-urlencode "q=DROP DATABASE $DB" >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql "$POSTGRES_URL" -qc "CREATE DATABASE $DB" >/dev/null
DATABASE_URL="${POSTGRES_URL%/*}/$DB"
ADMIN_PASSWORD=bench-$STAMP

http_port() { echo $(( BASE_PORT + $1 * 10 )); }
mqtt_port() { echo $(( BASE_PORT + $1 * 10 + 3 )); }

# start_node N [standalone]: node N of the cluster (or a node with the embedded stores).
start_node() {
  local n=$1 mode=${2:-cluster}
  mkdir -p "$WORK/n$n"
  local env=(PORT="$(http_port "$n")" HTTP_BIND=127.0.0.1 MQTT_PORT="$(mqtt_port "$n")" MQTT_BIND=127.0.0.1
    DATA_DIR="$WORK/n$n" LOG_LEVEL=warn MAX_DEVICES=50000 DROVER_ADMIN_PASSWORD="$ADMIN_PASSWORD"
    AUTH_KEY_FILE="$WORK/keys.json" TELEMETRY_MAINTENANCE_INTERVAL_SECS=10)
  if [ "$mode" = cluster ]; then
    env+=(DATABASE_URL="$DATABASE_URL" INFLUX_URL="$INFLUX_URL" INFLUX_DB="$DB" REDIS_URL="$REDIS_URL"
      CLUSTER_NAME="bench-$STAMP" CLUSTER_NODE_ID="n$n")
  fi
  env "${env[@]}" "$DROVER" >"$WORK/n$n.out" 2>"$WORK/n$n.err" &
  PIDS+=($!)
  # MQTT listens once the node has joined its cluster.
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$(mqtt_port "$n")") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "node $n did not start:" >&2; tail -n 20 "$WORK/n$n.err" >&2; exit 1
}

# The admin's login token on node $1.
login() {
  curl -sf -X POST "http://127.0.0.1:$(http_port "$1")/api/auth/login" -H 'Content-Type: application/json' \
    -d "{\"username\":\"admin\",\"password\":\"$ADMIN_PASSWORD\"}" | python3 -c 'import sys,json;print(json.load(sys.stdin)["token"])'
}

# An operator API key of the default tenant, made on node $1.
api_key() {
  curl -sf -X POST "http://127.0.0.1:$(http_port "$1")/api/keys" -H "Authorization: Bearer $(login "$1")" \
    -H 'Content-Type: application/json' \
    -d '{"name":"cluster-bench","role":"operator"}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])'
}

# Waits until node 1 sees $1 nodes.
wait_nodes() {
  local token
  token=$(login 1)
  for _ in $(seq 1 100); do
    local seen
    seen=$(curl -sf "http://127.0.0.1:$(http_port 1)/admin/cluster" -H "Authorization: Bearer $token" 2>/dev/null \
      | python3 -c 'import sys,json;print(len(json.load(sys.stdin)["nodes"]))' 2>/dev/null || echo 0)
    [ "$seen" -ge "$1" ] && return 0
    sleep 0.2
  done
  echo "the cluster never had $1 nodes" >&2; exit 1
}

RUN=$(date -u +%Y%m%dT%H%M%SZ)
RUN_FILE="$WORK/run.jsonl"
mkdir -p "$(dirname "$RESULTS")"
python3 - "$RESULTS" "$RUN" <<PY
import json, os, subprocess, sys
def out(cmd):
    try: return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception: return "unknown"
line = {"run": sys.argv[2], "scenario": "cluster_bench", "drover": out(["$DROVER", "--version"]),
        "rustc": out(["rustc", "--version"]), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "parameters": {"repeat": $REPEAT, "messages": $MESSAGES, "payload": $PAYLOAD, "latency_rate": $LATENCY_RATE,
                       "ingest_devices": $INGEST_DEVICES, "ingest_seconds": $INGEST_SECONDS, "node_counts": "$NODE_COUNTS"}}
open(sys.argv[1], "a").write(json.dumps(line) + "\n")
print(json.dumps(line))
PY

# record MODE: tags the last line of the run file with the mode.
record() {
  python3 - "$RUN_FILE" "$1" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
last = json.loads(lines[-1])
last["parameters"]["mode"] = sys.argv[2]
last["parameters"]["cluster_bench"] = True
lines[-1] = json.dumps(last)
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
}

fanout() { # MODE SUB_NODE PUB_NODE KEY
  local mode=$1 sub=$2 pub=$3 key=$4
  for QOS in 0 1; do
    for _ in $(seq 1 "$REPEAT"); do
      "$LOAD" bench fanout --target drover --port "$(mqtt_port "$sub")" --publish-port "$(mqtt_port "$pub")" \
        --username bench --password "$key" --qos "$QOS" --messages "$MESSAGES" --payload "$PAYLOAD" \
        --record "$RUN_FILE" | tail -n 1 >/dev/null
      record "$mode"
      "$LOAD" bench fanout --target drover --port "$(mqtt_port "$sub")" --publish-port "$(mqtt_port "$pub")" \
        --username bench --password "$key" --qos "$QOS" --messages $(( LATENCY_RATE * 3 )) --payload "$PAYLOAD" \
        --rate "$LATENCY_RATE" --record "$RUN_FILE" | tail -n 1 >/dev/null
      record "$mode"
    done
  done
}

if [ "$FANOUT" = 1 ]; then
  echo "fanout: standalone node" >&2
  start_node 0 standalone
  KEY=$(api_key 0)
  fanout standalone 0 0 "$KEY"
  stop_nodes
  echo "fanout: 3-node cluster" >&2
  for n in 1 2 3; do start_node "$n"; done
  KEY=$(api_key 1)
  wait_nodes 3
  fanout cluster-same-node 1 1 "$KEY"
  fanout cluster-cross-node 1 2 "$KEY"
  stop_nodes
fi

for N in $NODE_COUNTS; do
  echo "ingest: $N node(s)" >&2
  PORTS=()
  for n in $(seq 1 "$N"); do start_node "$n"; PORTS+=("$(mqtt_port "$n")"); done
  KEY=$(api_key 1)
  wait_nodes "$N"
  for _ in $(seq 1 "$REPEAT"); do
    "$LOAD" bench ingest --url "http://127.0.0.1:$(http_port 1)" --api-key "$KEY" \
      --mqtt-ports "$(IFS=,; echo "${PORTS[*]}")" --devices "$INGEST_DEVICES" --prefix cb- \
      --devices-file "$WORK/devices.csv" --qos 1 --seconds "$INGEST_SECONDS" --record "$RUN_FILE" | tail -n 1 >/dev/null
    record "cluster-$N"
  done
  stop_nodes
done
cat "$RUN_FILE" >>"$RESULTS"

python3 - "$RUN_FILE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def summary(values):
    values = [v for v in values if v is not None]
    if not values: return "-"
    med = statistics.median(values)
    return f"{med:,.0f} ({min(values):,.0f}-{max(values):,.0f})" if med >= 100 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"
fan = [r for r in rows if r["scenario"] == "fanout"]
if fan:
    print("Fan-out, 1 publisher -> 1 subscriber: median (min-max) of the runs")
    print(f"{'mode':<20}{'QoS':>4}{'delivered/s':>26}{'paced p50 ms':>22}{'paced p99 ms':>22}")
    for mode in ("standalone", "cluster-same-node", "cluster-cross-node"):
        for qos in (0, 1):
            fast = [r["results"] for r in fan if r["parameters"]["mode"] == mode and r["parameters"]["qos"] == qos and r["parameters"]["rate_per_publisher"] == 0]
            paced = [r["results"] for r in fan if r["parameters"]["mode"] == mode and r["parameters"]["qos"] == qos and r["parameters"]["rate_per_publisher"] > 0]
            if fast or paced:
                print(f"{mode:<20}{qos:>4}{summary([x['delivered_per_second'] for x in fast]):>26}"
                      f"{summary([x.get('latency_p50_ms') for x in paced]):>22}{summary([x.get('latency_p99_ms') for x in paced]):>22}")
ing = [r for r in rows if r["scenario"] == "ingest"]
if ing:
    print("QoS 1 ingestion into the shared InfluxDB: median (min-max) of the runs")
    print(f"{'nodes':<8}{'acked/s':>26}{'stored ratio':>18}{'ack p50 ms':>20}{'ack p99 ms':>20}")
    for mode in sorted({r["parameters"]["mode"] for r in ing}):
        x = [r["results"] for r in ing if r["parameters"]["mode"] == mode]
        print(f"{mode.split('-')[1]:<8}{summary([v['acked_per_second'] for v in x]):>26}{summary([v['stored_ratio'] for v in x]):>18}"
              f"{summary([v.get('ack_latency_p50_ms') for v in x]):>20}{summary([v.get('ack_latency_p99_ms') for v in x]):>20}")
PY
