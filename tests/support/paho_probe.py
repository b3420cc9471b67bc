"""MQTT 5 scenarios with paho-mqtt, for Drover's broker tests.

Usage: python3 paho_probe.py <scenario> '<json arguments>'
Prints one JSON object with what the scenario observed. The Rust tests assert on it.
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def client(args, client_id, clean_start=True, session_expiry=None, keepalive=60, will=None, props=None, on_message=None):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if on_message:
        # Set before connecting: a resumed session's queue arrives right after CONNACK.
        c.on_message = on_message
    if not args.get("anonymous"):
        c.username_pw_set(args.get("username", "app"), args["password"])
    if will:
        c.will_set(will["topic"], will["payload"], qos=will.get("qos", 1), properties=will.get("properties"))
    connack = {}
    connected = threading.Event()

    def on_connect(cl, userdata, flags, reason_code, properties):
        connack["reason"] = reason_code.value
        connack["session_present"] = flags.session_present
        connack["properties"] = properties.json() if properties else {}
        connected.set()

    def on_disconnect(cl, userdata, flags, reason_code, properties):
        connack.setdefault("disconnects", []).append(reason_code.value)

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    connect_props = props or Properties(PacketTypes.CONNECT)
    if session_expiry is not None:
        connect_props.SessionExpiryInterval = session_expiry
    c.connect(args["host"], args["port"], keepalive=keepalive, clean_start=clean_start, properties=connect_props)
    c.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK")
    return c, connack


def collector(c, topic, qos=1, subscription_id=None, no_local=False, wait=True):
    got = []
    subscribed = threading.Event()

    def on_message(cl, userdata, msg):
        props = msg.properties.json() if msg.properties else {}
        got.append({"topic": msg.topic, "payload": msg.payload.decode(errors="replace"), "qos": msg.qos,
                    "retain": msg.retain, "properties": props, "at": time.time()})

    def on_subscribe(cl, userdata, mid, reason_codes, properties):
        subscribed.set()

    c.on_message = on_message
    c.on_subscribe = on_subscribe
    sub_props = None
    if subscription_id:
        sub_props = Properties(PacketTypes.SUBSCRIBE)
        sub_props.SubscriptionIdentifier = subscription_id
    c.subscribe(topic, options=mqtt.SubscribeOptions(qos=qos, noLocal=no_local), properties=sub_props)
    if wait and not subscribed.wait(10):
        raise SystemExit("no SUBACK")
    return got


def wait_for(predicate, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.02)


def shared(args):
    a, _ = client(args, "worker-a")
    b, _ = client(args, "worker-b")
    got_a = collector(a, "$share/workers/jobs/#")
    got_b = collector(b, "$share/workers/jobs/#")
    watcher, _ = client(args, "watcher")
    got_w = collector(watcher, "jobs/#")
    p, _ = client(args, "producer")
    n = args.get("count", 20)
    for i in range(n):
        p.publish(f"jobs/{i}", f"job-{i}", qos=1).wait_for_publish(5)
    wait_for(lambda: len(got_a) + len(got_b) >= n and len(got_w) >= n)
    time.sleep(0.3)
    return {"a": len(got_a), "b": len(got_b), "watcher": len(got_w),
            "payloads": sorted(m["payload"] for m in got_a + got_b)}


def connack(args):
    c, info = client(args, args.get("client_id", ""), keepalive=args.get("keepalive", 60),
                     session_expiry=args.get("session_expiry"))
    c.disconnect()
    c.loop_stop()
    return info


def properties(args):
    sub, _ = client(args, "props-sub")
    got = collector(sub, "props/#", subscription_id=7)
    pub, info = client(args, "props-pub")
    first = Properties(PacketTypes.PUBLISH)
    first.TopicAlias = 1
    first.UserProperty = [("site", "north"), ("shift", "night")]
    first.ContentType = "application/json"
    first.ResponseTopic = "props/replies"
    first.CorrelationData = b"req-42"
    first.MessageExpiryInterval = 600
    pub.publish("props/a", '{"n":1}', qos=1, properties=first).wait_for_publish(5)
    # Alias only: empty topic, alias 1 set by the previous publish.
    second = Properties(PacketTypes.PUBLISH)
    second.TopicAlias = 1
    pub.publish("", "alias-only", qos=1, properties=second).wait_for_publish(5)
    wait_for(lambda: len(got) >= 2)
    return {"messages": got, "connack": info}


def expiry(args):
    sub, _ = client(args, "expiring", clean_start=True, session_expiry=300)
    collector(sub, "exp/#")
    sub.disconnect()
    sub.loop_stop()
    time.sleep(0.3)
    pub, _ = client(args, "exp-pub")
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 1
    pub.publish("exp/short", "stale", qos=1, properties=short).wait_for_publish(5)
    long = Properties(PacketTypes.PUBLISH)
    long.MessageExpiryInterval = 300
    pub.publish("exp/long", "fresh", qos=1, properties=long).wait_for_publish(5)
    time.sleep(2.5)
    got = []
    back, info = client(args, "expiring", clean_start=False, session_expiry=300,
                        on_message=lambda cl, u, msg: got.append({"payload": msg.payload.decode(),
                                                                  "properties": msg.properties.json() if msg.properties else {}}))
    wait_for(lambda: len(got) >= 1, 3)
    time.sleep(0.5)
    return {"session_present": info["session_present"], "messages": got}


def will_delay(args):
    watcher, _ = client(args, "will-watch")
    got = collector(watcher, "wills/#")
    props = Properties(PacketTypes.WILLMESSAGE)
    props.WillDelayInterval = args.get("delay", 2)
    will = {"topic": "wills/" + args["name"], "payload": "gone", "properties": props}
    c, _ = client(args, "will-" + args["name"], clean_start=True, session_expiry=30, will=will)
    time.sleep(0.2)
    dropped_at = time.time()
    # Drop the connection without DISCONNECT.
    c.loop_stop()
    c.socket().close()
    if args.get("reconnect_after") is not None:
        time.sleep(args["reconnect_after"])
        back, info = client(args, "will-" + args["name"], clean_start=False, session_expiry=30)
    wait_for(lambda: len(got) >= 1, args.get("delay", 2) + 3)
    return {"wills": [{"payload": m["payload"], "after": m["at"] - dropped_at} for m in got]}


def reason_codes(args):
    c, _ = client(args, "codes")
    results = {}
    done = threading.Event()

    def on_publish(cl, userdata, mid, reason_code, properties):
        results[mid] = reason_code.value
        done.set()

    c.on_publish = on_publish
    info = c.publish(args["topic"], "x", qos=1)
    done.wait(5)
    return {"puback": results.get(info.mid)}


def oversize(args):
    c, info = client(args, "big")
    c.publish("devices/big", b"z" * args["size"], qos=1)
    wait_for(lambda: info.get("disconnects"), 5)
    return {"disconnects": info.get("disconnects", [])}


def rate(args):
    c, info = client(args, "fast")
    for i in range(args["count"]):
        c.publish("rate/x", str(i), qos=0)
    wait_for(lambda: info.get("disconnects"), 5)
    return {"disconnects": info.get("disconnects", [])}


def takeover(args):
    first, info = client(args, "twin")
    second, _ = client(args, "twin")
    wait_for(lambda: info.get("disconnects"), 5)
    return {"first_disconnects": info.get("disconnects", [])}


def subscribe_then_publish(args):
    """Rounds of: A subscribes; B subscribes and, without waiting for B's SUBACK, A publishes.
    Reports, per round, what B received."""
    no_local = args.get("no_local", True)
    a, _ = client(args, "order-a")
    b, _ = client(args, "order-b")
    rounds = []
    for i in range(args.get("rounds", 1)):
        topic = f"order/{i}"
        got_a = collector(a, topic, no_local=no_local)
        time.sleep(args.get("pause", 0.2))
        got_b = collector(b, topic, no_local=no_local, wait=False)
        # paho writes from its network thread: wait until B's SUBSCRIBE is on the wire (on
        # loopback, in the broker's receive buffer) so that A's PUBLISH is read after it.
        wait_for(lambda: not b._out_packet, 2)
        a.publish(topic, f"m{i}", qos=1).wait_for_publish(5)
        wait_for(lambda: len(got_b) >= 1 and (no_local or len(got_a) >= 1), 2)
        rounds.append({"a": [m["payload"] for m in got_a], "b": [m["payload"] for m in got_b]})
    return {"rounds": rounds}


def withheld(args):
    """Subscribes one client per filter, publishes each topic (retained first, then live), and
    reports the SUBACK reason code and the messages each subscriber got."""
    pub, _ = client(args, "withheld-pub")
    for topic in args["topics"]:
        pub.publish(topic, "retained " + topic, qos=1, retain=True).wait_for_publish(5)
    subscribers = []
    for i, topic_filter in enumerate(args["filters"]):
        c, _ = client(args, f"withheld-sub-{i}")
        got, codes = [], []
        subscribed = threading.Event()
        c.on_message = lambda cl, u, msg, got=got: got.append(
            {"topic": msg.topic, "retain": bool(msg.retain), "payload": msg.payload.decode()})

        def on_subscribe(cl, userdata, mid, reason_codes, properties, codes=codes, done=subscribed):
            codes.extend(rc.value for rc in reason_codes)
            done.set()

        c.on_subscribe = on_subscribe
        c.subscribe(topic_filter, qos=1)
        if not subscribed.wait(10):
            raise SystemExit("no SUBACK")
        subscribers.append({"filter": topic_filter, "got": got, "codes": codes})
    for topic in args["topics"] + [args["last"]]:
        pub.publish(topic, "live " + topic, qos=1).wait_for_publish(5)
    # Each subscriber that could see the last topic has seen everything before it.
    for s in subscribers:
        if s["codes"] and s["codes"][0] < 0x80 and s["filter"] in args.get("see_last", []):
            wait_for(lambda s=s: any(m["topic"] == args["last"] for m in s["got"]), 5)
    time.sleep(0.2)
    return {"subscribers": [{"filter": s["filter"], "code": s["codes"][0], "got": s["got"]} for s in subscribers]}


SCENARIOS = {f.__name__: f for f in [shared, connack, properties, expiry, will_delay, reason_codes, oversize, rate, takeover, subscribe_then_publish, withheld]}

if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(SCENARIOS[scenario](arguments)))
    sys.stdout.flush()
