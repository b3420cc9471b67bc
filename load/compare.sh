#!/usr/bin/env bash
# Measures Drover and Mosquitto side by side on this machine, with the same load generator,
# each broker on loopback ports of its own, and prints the ratios. Every result is appended
# to load/results/<date>.jsonl with the machine, the versions and the parameters.
#
#   load/compare.sh                      # fanout QoS 0 and 1, 1 publisher -> 1 subscriber
#   MESSAGES=500000 SUBSCRIBERS=4 load/compare.sh
#   CONNECT_DEVICES=10000 load/compare.sh   # also ramp 10,000 device connections to Drover
#   INGEST_DEVICES=0 QUERY_POINTS=0 load/compare.sh   # fanout only
#   DASHBOARD_WATCH=0 load/compare.sh     # without the publish-to-dashboard latency runs
#   SLOW_SUBSCRIBER=backpressure load/compare.sh   # Drover slows publishers instead of dropping
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-200000}
PAYLOAD=${PAYLOAD:-64}
PUBLISHERS=${PUBLISHERS:-1}
SUBSCRIBERS=${SUBSCRIBERS:-1}
CONNECT_DEVICES=${CONNECT_DEVICES:-0}
# Drover's telemetry ingestion (QoS 0 and 1, read back from the store) and queries.
INGEST_DEVICES=${INGEST_DEVICES:-100}
INGEST_SECONDS=${INGEST_SECONDS:-10}
QUERY_POINTS=${QUERY_POINTS:-1000000}
# Publish-to-dashboard latency at half the ingestion targets of DESIGN.md §8 (100,000 msg/s at
# QoS 0, 50,000 at QoS 1), a /ws session watching DASHBOARD_WATCH of the devices (0: skip).
DASHBOARD_WATCH=${DASHBOARD_WATCH:-100}
# Latency is compared at the same fixed rate, below either broker's saturation.
LATENCY_RATE=${LATENCY_RATE:-20000}
# Drover's MQTT_SLOW_SUBSCRIBER: drop (its default) or backpressure.
SLOW_SUBSCRIBER=${SLOW_SUBSCRIBER:-drop}
DROVER_HTTP=${DROVER_HTTP:-18180}
DROVER_MQTT=${DROVER_MQTT:-18183}
MOSQUITTO_PORT=${MOSQUITTO_PORT:-18283}
RESULTS=${RESULTS:-load/results/$(date -u +%Y-%m-%d).jsonl}

command -v mosquitto >/dev/null || { echo "mosquitto is needed (apt-get install mosquitto)"; exit 1; }
cargo build --release -p drover -p drover-load >&2
DROVER=${CARGO_TARGET_DIR:-target}/release/drover
LOAD=${CARGO_TARGET_DIR:-target}/release/drover-load

WORK=$(mktemp -d /tmp/drover-compare.XXXXXX)
cleanup() {
  [ -n "${DROVER_PID:-}" ] && kill "$DROVER_PID" 2>/dev/null && wait "$DROVER_PID" 2>/dev/null || true
  [ -n "${MOSQUITTO_PID:-}" ] && kill "$MOSQUITTO_PID" 2>/dev/null && wait "$MOSQUITTO_PID" 2>/dev/null || true
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
mosquitto -c "$WORK/mosquitto.conf" & MOSQUITTO_PID=$!

ADMIN_PASSWORD=compare-$(date +%s)
DATA_DIR="$WORK/data" PORT=$DROVER_HTTP HTTP_BIND=127.0.0.1 MQTT_PORT=$DROVER_MQTT MQTT_BIND=127.0.0.1 \
  MAX_DEVICES=$(( CONNECT_DEVICES > 50000 ? CONNECT_DEVICES : 50000 )) LOG_LEVEL=warn \
  TELEMETRY_MAINTENANCE_INTERVAL_SECS=10 MQTT_SLOW_SUBSCRIBER=$SLOW_SUBSCRIBER \
  DROVER_ADMIN_PASSWORD=$ADMIN_PASSWORD "$DROVER" >"$WORK/drover.out" 2>"$WORK/drover.err" & DROVER_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$DROVER_HTTP/health" >/dev/null && break; sleep 0.1; done
BASE=http://127.0.0.1:$DROVER_HTTP
TOKEN=$(curl -sf -X POST "$BASE/api/auth/login" -H 'Content-Type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$ADMIN_PASSWORD\"}" | python3 -c 'import sys,json;print(json.load(sys.stdin)["token"])')
KEY=$(curl -sf -X POST "$BASE/api/keys" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"name":"compare","role":"operator"}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])')

RUN=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$(dirname "$RESULTS")"
python3 - "$RESULTS" "$RUN" <<PY
import json, subprocess, sys
def out(cmd):
    try: return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception: return "unknown"
line = {"run": sys.argv[2], "drover": out(["$DROVER", "--version"]), "mosquitto": out(["mosquitto", "-h"]),
        "rustc": out(["rustc", "--version"]), "parameters": {"messages": $MESSAGES, "payload": $PAYLOAD,
        "publishers": $PUBLISHERS, "subscribers": $SUBSCRIBERS, "slow_subscriber": "$SLOW_SUBSCRIBER"}}
open(sys.argv[1], "a").write(json.dumps(line) + "\n")
print(json.dumps(line))
PY

RUN_FILE="$WORK/run.jsonl"
for QOS in 0 1; do
  for TARGET in drover mosquitto; do
    if [ "$TARGET" = drover ]; then CREDS=(--port "$DROVER_MQTT" --username compare --password "$KEY" --slow-subscriber "$SLOW_SUBSCRIBER"); else CREDS=(--port "$MOSQUITTO_PORT"); fi
    "$LOAD" bench fanout --target "$TARGET" "${CREDS[@]}" --qos "$QOS" --messages "$MESSAGES" --payload "$PAYLOAD" \
      --publishers "$PUBLISHERS" --subscribers "$SUBSCRIBERS" --record "$RUN_FILE" | tail -n 1 >/dev/null
  done
done
for QOS in 0 1; do
  for TARGET in drover mosquitto; do
    if [ "$TARGET" = drover ]; then CREDS=(--port "$DROVER_MQTT" --username compare --password "$KEY" --slow-subscriber "$SLOW_SUBSCRIBER"); else CREDS=(--port "$MOSQUITTO_PORT"); fi
    "$LOAD" bench fanout --target "$TARGET" "${CREDS[@]}" --qos "$QOS" --messages $(( LATENCY_RATE * 3 )) --payload "$PAYLOAD" \
      --rate "$LATENCY_RATE" --record "$RUN_FILE" | tail -n 1 >/dev/null
  done
done
if [ "$CONNECT_DEVICES" -gt 0 ]; then
  "$LOAD" bench connect --url "$BASE" --api-key "$KEY" --mqtt-port "$DROVER_MQTT" --devices "$CONNECT_DEVICES" \
    --devices-file "$WORK/devices.csv" --record "$RUN_FILE" | tail -n 1 >/dev/null
fi
# Queries first: the ingest runs leave a large rollup pass behind that would compete with them.
if [ "$QUERY_POINTS" -gt 0 ]; then
  "$LOAD" bench query --url "$BASE" --api-key "$KEY" --points "$QUERY_POINTS" --wait-rollups 60 \
    --record "$RUN_FILE" | tail -n 1 >/dev/null
fi
if [ "$INGEST_DEVICES" -gt 0 ]; then
  for QOS in 0 1; do
    # The same load against Mosquitto, which acknowledges without storing: the reference.
    "$LOAD" bench ingest-broker --port "$MOSQUITTO_PORT" --devices "$INGEST_DEVICES" --prefix "ingest-q$QOS-" \
      --qos "$QOS" --seconds "$INGEST_SECONDS" --record "$RUN_FILE" | tail -n 1 >/dev/null
    "$LOAD" bench ingest --url "$BASE" --api-key "$KEY" --mqtt-port "$DROVER_MQTT" --devices "$INGEST_DEVICES" \
      --prefix "ingest-q$QOS-" --devices-file "$WORK/ingest-q$QOS.csv" --qos "$QOS" --seconds "$INGEST_SECONDS" --record "$RUN_FILE" | tail -n 1 >/dev/null
  done
  if [ "$DASHBOARD_WATCH" -gt 0 ]; then
    for QOS in 0 1; do
      RATE=$([ "$QOS" = 0 ] && echo 50000 || echo 25000)
      "$LOAD" bench ingest --url "$BASE" --api-key "$KEY" --mqtt-port "$DROVER_MQTT" --devices "$INGEST_DEVICES" \
        --prefix "dash-q$QOS-" --devices-file "$WORK/dash-q$QOS.csv" --qos "$QOS" --seconds "$INGEST_SECONDS" \
        --rate "$RATE" --watch "$DASHBOARD_WATCH" --record "$RUN_FILE" | tail -n 1 >/dev/null
    done
  fi
fi
cat "$RUN_FILE" >>"$RESULTS"

python3 - "$RUN_FILE" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
fan = {(r["target"], r["parameters"]["qos"]): r["results"] for r in rows if r["scenario"] == "fanout" and r["parameters"]["rate_per_publisher"] == 0}
paced = {(r["target"], r["parameters"]["qos"]): r for r in rows if r["scenario"] == "fanout" and r["parameters"]["rate_per_publisher"] > 0}
print(f"Throughput: publishers as fast as they can (Drover: MQTT_SLOW_SUBSCRIBER={next((r['parameters'].get('slow_subscriber') for r in rows if r['target'] == 'drover' and r['scenario'] == 'fanout'), None) or 'drop'})")
print(f"{'fanout':<10}{'target':<11}{'published/s':>13}{'delivered/s':>13}{'delivered':>11}{'p50 ms':>9}{'p99 ms':>9}")
for qos in (0, 1):
    for target in ("drover", "mosquitto"):
        r = fan.get((target, qos))
        if r:
            print(f"{'QoS ' + str(qos):<10}{target:<11}{r['published_per_second']:>13.0f}{r['delivered_per_second']:>13.0f}{r['delivered_ratio']:>11.3f}"
                  f"{r.get('latency_p50_ms', 0):>9.2f}{r.get('latency_p99_ms', 0):>9.2f}")
    d, m = fan.get(("drover", qos)), fan.get(("mosquitto", qos))
    if d and m:
        print(f"{'':<10}{'ratio':<11}{'':>13}{d['delivered_per_second'] / m['delivered_per_second']:>13.2f}  (Drover / Mosquitto)")
if paced:
    rate = next(iter(paced.values()))["parameters"]["rate_per_publisher"]
    print(f"Latency at {rate} messages/s, the same for both")
    print(f"{'fanout':<10}{'target':<11}{'delivered':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for qos in (0, 1):
        for target in ("drover", "mosquitto"):
            r = paced.get((target, qos))
            if r:
                x = r["results"]
                print(f"{'QoS ' + str(qos):<10}{target:<11}{x['delivered_ratio']:>11.3f}{x.get('latency_p50_ms', 0):>9.2f}"
                      f"{x.get('latency_p95_ms', 0):>9.2f}{x.get('latency_p99_ms', 0):>9.2f}{x.get('latency_max_ms', 0):>9.2f}")
reference = {r["parameters"]["qos"]: r["results"] for r in rows if r["scenario"] == "ingest" and r["target"] != "drover"}
for r in rows:
    if r["scenario"] == "ingest" and r["target"] != "drover":
        x, p = r["results"], r["parameters"]
        acked = f", {x['acked_per_second']:.0f} acked/s, ack p50 {x.get('ack_latency_p50_ms', 0):.1f} / p99 {x.get('ack_latency_p99_ms', 0):.1f} ms" if p["qos"] else ""
        print(f"ingest QoS {p['qos']} {r['target']} (stores nothing): {p['devices']} clients, {x['sent_per_second']:.0f} sent/s{acked}")
    elif r["scenario"] == "ingest":
        x, p = r["results"], r["parameters"]
        acked = f", {x['acked_per_second']:.0f} acked/s, ack p50 {x.get('ack_latency_p50_ms', 0):.1f} / p99 {x.get('ack_latency_p99_ms', 0):.1f} ms" if p["qos"] else ""
        print(f"ingest QoS {p['qos']} drover: {p['devices']} devices, {x['sent_per_second']:.0f} sent/s{acked}, "
              f"{x['stored']} of {x['sent']} read back from the store ({x['stored_ratio']:.3f})")
        ref = reference.get(p["qos"])
        if ref and "dashboard_devices" not in x:
            if p["qos"]:
                print(f"  acknowledged after storing / Mosquitto acknowledged: {x['acked_per_second'] / ref['acked_per_second']:.2f}")
            else:
                stored_rate = x["stored"] / max(p["seconds"], 1)
                print(f"  stored {stored_rate:.0f}/s; Drover sent / Mosquitto sent: {x['sent_per_second'] / ref['sent_per_second']:.2f}")
        if "dashboard_received" in x:
            print(f"  dashboard watching {x['dashboard_devices']} devices at {p['rate']} msg/s: {x['dashboard_received']} of "
                  f"{x['dashboard_expected']} shown, publish-to-dashboard p50 {x.get('dashboard_latency_p50_ms', 0):.2f} / "
                  f"p99 {x.get('dashboard_latency_p99_ms', 0):.2f} / max {x.get('dashboard_latency_max_ms', 0):.2f} ms")
    if r["scenario"] == "query":
        x = r["results"]
        print(f"query over {r['parameters']['points']} points (loaded at {x['load_points_per_second']:.0f} points/s over HTTP):")
        for shape in ("mean_per_hour", "max_per_day", "count_whole_range", "p95_per_hour", "raw_last_10000"):
            print(f"  {shape:<20} p50 {x[shape + '_p50_ms']:>8.1f} ms  max {x[shape + '_max_ms']:>8.1f} ms  from {x[shape + '_source']}")
    if r["scenario"] == "connect":
        c = r["results"]
        print(f"connect: {c['connected']} devices in {c['ramp_seconds']:.1f} s ({c['connects_per_second']:.0f}/s), "
              f"{c.get('server_rss_per_connection_kib', 0):.1f} KiB server memory per connection, {c['failed']} failed")
PY
echo "results appended to $RESULTS"
