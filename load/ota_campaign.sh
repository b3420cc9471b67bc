#!/usr/bin/env bash
# An OTA campaign over a simulated fleet, with the server's memory sampled throughout.
#
# Starts its own Drover (release build, loopback ports of its own, a temporary data directory),
# connects DEVICES simulated devices with `drover-load simulate`, then runs CAMPAIGNS campaigns
# back to back over all of them (stages 1% → 10% → 50% → 100%), each with a new IMAGE_BYTES
# image, after a WARMUP (90 s) in which every device sends its first telemetry and a CONTROL
# period (30 s) of the idle fleet alone. For each it prints the time it took, devices updated
# per second, and the server's memory: RSS before it, the peak during it and SETTLE seconds after
# it, and the live heap (`drover_heap_allocated_bytes` in /metrics: what the program holds,
# while RSS also counts what the allocator keeps for reuse). Memory that campaigns leave
# behind shows as heap and RSS rising campaign after campaign; a plateau is the allocator's
# and the caches' working set. Every second's RSS sample is kept in $WORK/rss.csv while the
# script runs; each campaign's figures are appended to $RESULTS.
#
#   cargo build --release -p drover -p drover-load
#   DEVICES=10000 CAMPAIGNS=3 load/ota_campaign.sh
#
# DROVER_WRAP runs the server under a tool, e.g. a heap profile (the C library's malloc, so
# heaptrack sees every allocation; the profile is written when the script stops the server):
#   cargo build -p drover --features system-alloc
#   DROVER=target/debug/drover DROVER_WRAP="heaptrack -o /tmp/drover-ota" DEVICES=1000 load/ota_campaign.sh
set -euo pipefail

DEVICES=${DEVICES:-10000}
IMAGE_BYTES=${IMAGE_BYTES:-65536}
CAMPAIGNS=${CAMPAIGNS:-3}
SETTLE=${SETTLE:-10}
WARMUP=${WARMUP:-90}
CONTROL=${CONTROL:-30}
HTTP_PORT=${HTTP_PORT:-18480}
MQTT_PORT=${MQTT_PORT:-18483}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${RESULTS:-$ROOT/load/results/$(date -u +%Y-%m-%d).jsonl}
RUN=$(date -u +%Y%m%dT%H%M%SZ)
DROVER=${DROVER:-$ROOT/target/release/drover}
LOAD=${LOAD:-$ROOT/target/release/drover-load}

WORK=$(mktemp -d /tmp/drover-ota.XXXXXX)
cleanup() {
  [ -n "${SIM_PID:-}" ] && kill -INT "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null || true
  [ -n "${SAMPLER_PID:-}" ] && kill "$SAMPLER_PID" 2>/dev/null || true
  if [ -n "${SERVER_PID:-}" ] && [ "$SERVER_PID" != "${DROVER_PID:-}" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 600); do [ -d "/proc/$SERVER_PID" ] || break; sleep 0.1; done
  fi
  [ -n "${DROVER_PID:-}" ] && kill "$DROVER_PID" 2>/dev/null && wait "$DROVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ADMIN_PASSWORD=ota-$(date +%s)
DATA_DIR="$WORK/data" PORT=$HTTP_PORT HTTP_BIND=127.0.0.1 MQTT_PORT=$MQTT_PORT MQTT_BIND=127.0.0.1 \
  LOG_LEVEL=warn HEAP_METRICS=1 DROVER_ADMIN_PASSWORD=$ADMIN_PASSWORD ${DROVER_WRAP:-} "$DROVER" >"$WORK/drover.out" 2>"$WORK/drover.err" &
DROVER_PID=$!
BASE=http://127.0.0.1:$HTTP_PORT
for _ in $(seq 1 600); do curl -sf "$BASE/health" >/dev/null && break; sleep 0.1; done
json() { python3 -c "import sys,json; print(json.load(sys.stdin)$1)"; }
TOKEN=$(curl -sf -X POST "$BASE/api/auth/login" -H 'Content-Type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$ADMIN_PASSWORD\"}" | json '["token"]')
KEY=$(curl -sf -X POST "$BASE/api/keys" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"name":"ota","role":"operator"}' | json '["key"]')

# The server's own process (under DROVER_WRAP, e.g. `heaptrack`, a child of it).
SERVER_PID=$(ss -ltnpH "sport = :$HTTP_PORT" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
SERVER_PID=${SERVER_PID:-$DROVER_PID}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status"; }
( while true; do echo "$(date +%s),$(rss_kib)"; sleep 1; done ) >"$WORK/rss.csv" & SAMPLER_PID=$!

# The fleet: registered, connected, idle (one reading a minute), reporting firmware 1.0.0.
"$LOAD" simulate --url "$BASE" --api-key "$KEY" --mqtt-port "$MQTT_PORT" --devices "$DEVICES" \
  --devices-file "$WORK/devices.csv" --rate 0.016 --ota-install-ms 200 --quiet >"$WORK/sim.out" 2>&1 &
SIM_PID=$!
connected() { curl -sf "$BASE/stats" -H "Authorization: Bearer $TOKEN" | json '["devices"]["connected"]'; }
until [ "$(connected 2>/dev/null || echo 0)" -ge "$DEVICES" ]; do sleep 1; done
sleep 5
RSS_JUST_CONNECTED=$(rss_kib)

heap_kib() {
  curl -sf "$BASE/metrics" -H "Authorization: Bearer $TOKEN" \
    | awk '/^drover_heap_allocated_bytes / {printf "%d", $2 / 1024}' || true
}
HEAP_JUST_CONNECTED=$(heap_kib)
# Warm-up: every device sends its first reading within a telemetry interval (62.5 s at the
# simulator's rate of 0.016/s), and each new series starts its analytics state then. Measured
# from a fleet that has not sent yet, that growth would be charged to the first campaign.
sleep "$WARMUP"
RSS_CONNECTED=$(rss_kib)
HEAP_CONNECTED=$(heap_kib)
echo "fleet of $DEVICES connected: RSS $((RSS_JUST_CONNECTED / 1024)) MiB, heap $((HEAP_JUST_CONNECTED / 1024)) MiB;" \
  "after a ${WARMUP} s warm-up (every device has sent telemetry): RSS $((RSS_CONNECTED / 1024)) MiB, heap $((HEAP_CONNECTED / 1024)) MiB" >&2
# Control: the idle fleet alone for CONTROL seconds (about one campaign and its settling):
# what memory does with no campaign at all (telemetry keeps arriving, SQLite's page caches
# fill), to set the campaigns' figures against.
sleep "$CONTROL"
RSS_CONTROL=$(rss_kib)
HEAP_CONTROL=$(heap_kib)
echo "idle for ${CONTROL} s: RSS $((RSS_CONNECTED / 1024)) -> $((RSS_CONTROL / 1024)) MiB, heap $((HEAP_CONNECTED / 1024)) -> $((HEAP_CONTROL / 1024)) MiB" >&2
RSS_CONNECTED=$RSS_CONTROL HEAP_CONNECTED=$HEAP_CONTROL
RSS_START=$RSS_CONNECTED HEAP_START=$HEAP_CONNECTED
export RSS_JUST_CONNECTED HEAP_JUST_CONNECTED WARMUP CONTROL

# CAMPAIGNS campaigns in a row (1.1.0, 1.2.0, …): memory a campaign leaves behind would show as
# a higher RSS and heap after each.
for N in $(seq 1 "$CAMPAIGNS"); do
VERSION=1.$N.0
head -c "$IMAGE_BYTES" /dev/urandom >"$WORK/fw.bin"
FW=$(curl -sf -X POST "$BASE/api/firmware?version=$VERSION&deviceTypes=environment" -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/fw.bin" | json '["id"]')
START=$(date +%s.%N)
CAMPAIGN=$(curl -sf -X POST "$BASE/api/campaigns" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d "{\"firmwareId\":\"$FW\",\"target\":{\"type\":\"environment\"},\"rollout\":{\"stages\":[1,10,50,100]},\"failureRule\":{\"maxFailureRate\":0.01},\"timeoutSecs\":600}" \
  | json '["id"]')
PEAK=0 HEAP_PEAK=0
while true; do
  STATUS=$(curl -sf "$BASE/api/campaigns/$CAMPAIGN" -H "Authorization: Bearer $KEY")
  STATE=$(echo "$STATUS" | json '["status"]')
  RSS=$(rss_kib); [ "$RSS" -gt "$PEAK" ] && PEAK=$RSS
  HEAP=$(heap_kib); [ "${HEAP:-0}" -gt "$HEAP_PEAK" ] && HEAP_PEAK=$HEAP
  [ "$STATE" != running ] && break
  sleep 1
done
END=$(date +%s.%N)
sleep "$SETTLE"
RSS_AFTER=$(rss_kib)
HEAP_AFTER=$(heap_kib)
SUCCEEDED=$(echo "$STATUS" | json '["counts"]["succeeded"]')
HEAP_PEAK=$HEAP_PEAK python3 - "$START" "$END" "$DEVICES" "$SUCCEEDED" "$STATE" "$RSS_CONNECTED" "$PEAK" "$RSS_AFTER" "$IMAGE_BYTES" "$VERSION" \
  "$HEAP_CONNECTED" "$HEAP_AFTER" "$N" "$RUN" "$RSS_START" "$HEAP_START" >>"$WORK/results.jsonl" <<'PY'
import json, os, sys
start, end = float(sys.argv[1]), float(sys.argv[2])
devices, succeeded, state = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
before, peak, after, image = (int(x) for x in sys.argv[6:10])
heap_before, heap_after, n = int(sys.argv[11] or 0), int(sys.argv[12] or 0), int(sys.argv[13])
rss_start, heap_start = int(sys.argv[15]), int(sys.argv[16] or 0)
seconds = end - start
heap_peak = int(os.environ["HEAP_PEAK"] or 0)
mib = lambda kib: f"{kib / 1024:.0f} MiB"
print(f"campaign {n} ({sys.argv[10]}) over {devices} devices ({image} B image, stages 1/10/50/100%): {state}, "
      f"{succeeded} succeeded in {seconds:.1f} s ({succeeded / seconds:.0f} devices/s)", file=sys.stderr)
print(f"  server RSS {mib(before)} before, peak {mib(peak)}, {mib(after)} after ({mib(after - rss_start)} above the idle fleet); "
      f"heap {mib(heap_before)} before, peak {mib(heap_peak)}, {mib(heap_after)} after ({mib(heap_after - heap_start)} above the idle fleet)", file=sys.stderr)
print(json.dumps({"scenario": "ota_campaign", "run": sys.argv[14], "campaign": n, "version": sys.argv[10],
                  "parameters": {"devices": devices, "image_bytes": image, "stages": [1, 10, 50, 100],
                                 "warmup_secs": int(os.environ["WARMUP"]), "control_secs": int(os.environ["CONTROL"])},
                  "results": {"succeeded": succeeded, "status": state, "seconds": round(seconds, 1),
                              "rss_fleet_connected_kib": int(os.environ["RSS_JUST_CONNECTED"]),
                              "heap_fleet_connected_kib": int(os.environ["HEAP_JUST_CONNECTED"] or 0),
                              "rss_fleet_idle_kib": rss_start, "rss_before_kib": before, "rss_peak_kib": peak,
                              "rss_after_kib": after, "heap_fleet_idle_kib": heap_start,
                              "heap_before_kib": heap_before, "heap_peak_kib": heap_peak, "heap_after_kib": heap_after}}))
PY
if [ "$STATE" != completed ]; then
  echo "  $(echo "$STATUS" | json '["statusReason"]'); counts: $(echo "$STATUS" | json '["counts"]')" >&2
  for S in failed timed_out rejected; do
    curl -sf "$BASE/api/campaigns/$CAMPAIGN/devices?state=$S&limit=3" -H "Authorization: Bearer $KEY" \
      | python3 -c "import sys, json; [print('  ', d['deviceId'], d['state'], d.get('reason'), file=sys.stderr) for d in json.load(sys.stdin)['devices']]"
  done
fi
RSS_CONNECTED=$RSS_AFTER HEAP_CONNECTED=$HEAP_AFTER
done
cat "$WORK/results.jsonl" >>"$RESULTS"
echo "figures appended to $RESULTS" >&2
