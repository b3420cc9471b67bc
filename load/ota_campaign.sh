#!/usr/bin/env bash
# An OTA campaign over a simulated fleet, with the server's memory sampled throughout.
#
# Starts its own Drover (release build, loopback ports of its own, a temporary data directory),
# connects DEVICES simulated devices with `drover-load simulate`, uploads an IMAGE_BYTES image
# and runs two campaigns in a row over all of them (stages 1% → 10% → 50% → 100%). Prints the time the
# campaign took, devices updated per second, and the server's RSS: with the fleet connected
# before the campaign, its peak during it, and after it. Every second's sample is kept in
# $WORK/rss.csv while the script runs.
#
#   cargo build --release -p drover -p drover-load
#   DEVICES=10000 load/ota_campaign.sh
set -euo pipefail

DEVICES=${DEVICES:-10000}
IMAGE_BYTES=${IMAGE_BYTES:-65536}
HTTP_PORT=${HTTP_PORT:-18480}
MQTT_PORT=${MQTT_PORT:-18483}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DROVER=${DROVER:-$ROOT/target/release/drover}
LOAD=${LOAD:-$ROOT/target/release/drover-load}

WORK=$(mktemp -d /tmp/drover-ota.XXXXXX)
cleanup() {
  [ -n "${SIM_PID:-}" ] && kill -INT "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null || true
  [ -n "${SAMPLER_PID:-}" ] && kill "$SAMPLER_PID" 2>/dev/null || true
  [ -n "${DROVER_PID:-}" ] && kill "$DROVER_PID" 2>/dev/null && wait "$DROVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ADMIN_PASSWORD=ota-$(date +%s)
DATA_DIR="$WORK/data" PORT=$HTTP_PORT HTTP_BIND=127.0.0.1 MQTT_PORT=$MQTT_PORT MQTT_BIND=127.0.0.1 \
  LOG_LEVEL=warn DROVER_ADMIN_PASSWORD=$ADMIN_PASSWORD "$DROVER" >"$WORK/drover.out" 2>"$WORK/drover.err" &
DROVER_PID=$!
BASE=http://127.0.0.1:$HTTP_PORT
for _ in $(seq 1 100); do curl -sf "$BASE/health" >/dev/null && break; sleep 0.1; done
json() { python3 -c "import sys,json; print(json.load(sys.stdin)$1)"; }
TOKEN=$(curl -sf -X POST "$BASE/api/auth/login" -H 'Content-Type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$ADMIN_PASSWORD\"}" | json '["token"]')
KEY=$(curl -sf -X POST "$BASE/api/keys" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"name":"ota","role":"operator"}' | json '["key"]')

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$DROVER_PID/status"; }
( while true; do echo "$(date +%s),$(rss_kib)"; sleep 1; done ) >"$WORK/rss.csv" & SAMPLER_PID=$!

# The fleet: registered, connected, idle (one reading a minute), reporting firmware 1.0.0.
"$LOAD" simulate --url "$BASE" --api-key "$KEY" --mqtt-port "$MQTT_PORT" --devices "$DEVICES" \
  --devices-file "$WORK/devices.csv" --rate 0.016 --ota-install-ms 200 --quiet >"$WORK/sim.out" 2>&1 &
SIM_PID=$!
connected() { curl -sf "$BASE/stats" -H "Authorization: Bearer $TOKEN" | json '["devices"]["connected"]'; }
until [ "$(connected 2>/dev/null || echo 0)" -ge "$DEVICES" ]; do sleep 1; done
sleep 5
RSS_CONNECTED=$(rss_kib)

# Two campaigns in a row (1.1.0, then 1.2.0): memory that a campaign leaves behind would show
# as a higher second peak.
for VERSION in 1.1.0 1.2.0; do
head -c "$IMAGE_BYTES" /dev/urandom >"$WORK/fw.bin"
FW=$(curl -sf -X POST "$BASE/api/firmware?version=$VERSION&deviceTypes=environment" -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/fw.bin" | json '["id"]')
START=$(date +%s.%N)
CAMPAIGN=$(curl -sf -X POST "$BASE/api/campaigns" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d "{\"firmwareId\":\"$FW\",\"target\":{\"type\":\"environment\"},\"rollout\":{\"stages\":[1,10,50,100]},\"failureRule\":{\"maxFailureRate\":0.01},\"timeoutSecs\":600}" \
  | json '["id"]')
PEAK=0
while true; do
  STATUS=$(curl -sf "$BASE/api/campaigns/$CAMPAIGN" -H "Authorization: Bearer $KEY")
  STATE=$(echo "$STATUS" | json '["status"]')
  RSS=$(rss_kib); [ "$RSS" -gt "$PEAK" ] && PEAK=$RSS
  [ "$STATE" != running ] && break
  sleep 1
done
END=$(date +%s.%N)
sleep 5
RSS_AFTER=$(rss_kib)
SUCCEEDED=$(echo "$STATUS" | json '["counts"]["succeeded"]')
python3 - "$START" "$END" "$DEVICES" "$SUCCEEDED" "$STATE" "$RSS_CONNECTED" "$PEAK" "$RSS_AFTER" "$IMAGE_BYTES" "$VERSION" <<'PY'
import json, sys
start, end = float(sys.argv[1]), float(sys.argv[2])
devices, succeeded, state = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
connected, peak, after, image = (int(x) for x in sys.argv[6:10])
seconds = end - start
print(f"campaign {sys.argv[10]} over {devices} devices ({image} B image, stages 1/10/50/100%): {state}, "
      f"{succeeded} succeeded in {seconds:.1f} s ({succeeded / seconds:.0f} devices/s)")
print(f"server RSS: {connected / 1024:.0f} MiB with the fleet connected, peak {peak / 1024:.0f} MiB "
      f"during the campaign, {after / 1024:.0f} MiB after")
print(json.dumps({"version": sys.argv[10], "devices": devices, "succeeded": succeeded, "status": state, "seconds": round(seconds, 1),
                  "rss_connected_kib": connected, "rss_peak_kib": peak, "rss_after_kib": after}))
PY
RSS_CONNECTED=$RSS_AFTER
done
