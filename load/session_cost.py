#!/usr/bin/env python3
"""What writing persistent sessions through to Redis costs a QoS 1 publisher in a cluster.

Starts two cluster nodes (the machine's PostgreSQL, InfluxDB and Redis, a fresh database and
cluster name), connects a publisher to node 1 and a subscriber to node 1 or node 2, with a
clean session or a persistent one, and measures publish -> PUBACK one message at a time (the
PUBACK waits for the forward to node 2's stream and, for a persistent subscriber, for its
message to be in Redis). Prints one JSON line per case.

    load/session_cost.py                       # target/release/drover, 2000 messages a case
    DROVER=target/debug/drover MESSAGES=500 load/session_cost.py
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import paho.mqtt.client as mqtt

DROVER = os.environ.get("DROVER", "target/release/drover")
MESSAGES = int(os.environ.get("MESSAGES", "2000"))
PG = os.environ.get("PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
INFLUX = os.environ.get("INFLUX_URL", "http://127.0.0.1:18086")
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/")
PASSWORD = "session-cost-password-1"


def start(node, env_base, data):
    env = dict(env_base, CLUSTER_NODE_ID=node, DATA_DIR=os.path.join(data, node))
    os.makedirs(env["DATA_DIR"], exist_ok=True)
    proc = subprocess.Popen([DROVER], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "is running: console " in line:
            http = re.search(r"API (http://[0-9.:]+)/api", line).group(1)
            port = int(re.search(r", MQTT [0-9.]+:(\d+)", line).group(1))
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, http, port
    raise SystemExit(f"node {node} did not start")


def call(method, url, token=None, body=None):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def client(port, client_id, key, clean):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.username_pw_set("app", key)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    return c


def measure(publisher, subscriber, topic):
    got = threading.Semaphore(0)
    subscriber.on_message = lambda c, u, m: got.release()
    latencies = []
    for i in range(MESSAGES):
        started = time.perf_counter()
        info = publisher.publish(topic, f"{i}", qos=1)
        info.wait_for_publish(10)
        latencies.append(time.perf_counter() - started)
        if not got.acquire(timeout=10):
            raise SystemExit(f"message {i} did not arrive")
    latencies.sort()
    return {
        "mean_us": round(statistics.mean(latencies) * 1e6),
        "p50_us": round(latencies[len(latencies) // 2] * 1e6),
        "p99_us": round(latencies[int(len(latencies) * 0.99)] * 1e6),
    }


def main():
    suffix = uuid.uuid4().hex[:10]
    db = f"drover_session_cost_{suffix}"
    subprocess.run(["psql", PG, "-qc", f"CREATE DATABASE {db}"], check=True)
    data = tempfile.mkdtemp()
    env = {
        "PATH": os.environ["PATH"],
        "PORT": "0",
        "HTTP_BIND": "127.0.0.1",
        "MQTT_PORT": "0",
        "MQTT_BIND": "127.0.0.1",
        "DATABASE_URL": PG.rsplit("/", 1)[0] + f"/{db}",
        "INFLUX_URL": INFLUX,
        "INFLUX_DB": db,
        "REDIS_URL": REDIS,
        "CLUSTER_NAME": f"cost-{suffix}",
        "AUTH_KEY_FILE": os.path.join(data, "keys.json"),
        "DROVER_ADMIN_PASSWORD": PASSWORD,
        "LOG_LEVEL": "warn",
    }
    nodes = []
    try:
        nodes.append(start("c1", env, data))
        nodes.append(start("c2", env, data))
        (_, http1, mqtt1), (_, _, mqtt2) = nodes
        token = call("POST", f"{http1}/api/auth/login", body={"username": "admin", "password": PASSWORD})["token"]
        key = call("POST", f"{http1}/api/keys", token, {"name": "cost", "role": "operator"})["key"]
        publisher = client(mqtt1, "cost-publisher", key, True)
        for where, port in (("same node", mqtt1), ("other node", mqtt2)):
            for persistent in (False, True):
                name = f"cost-{'p' if persistent else 'c'}-{port}"
                subscriber = client(port, name, key, not persistent)
                subscriber.subscribe(f"cost/{name}", qos=1)
                time.sleep(1.5)  # the route reaches node 1
                result = measure(publisher, subscriber, f"cost/{name}")
                subscriber.disconnect()
                subscriber.loop_stop()
                if persistent:
                    # A clean session under the same id drops the stored copy.
                    cleaner = client(port, name, key, True)
                    time.sleep(0.5)
                    cleaner.disconnect()
                    cleaner.loop_stop()
                print(json.dumps({
                    "case": "publish -> PUBACK, QoS 1, one at a time",
                    "subscriber": where,
                    "session": "persistent" if persistent else "clean",
                    "messages": MESSAGES,
                    "binary": DROVER,
                    **result,
                }), flush=True)
    finally:
        for proc, _, _ in nodes:
            proc.terminate()
            proc.wait()
        subprocess.run(["psql", PG, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], check=False)


if __name__ == "__main__":
    sys.exit(main())
