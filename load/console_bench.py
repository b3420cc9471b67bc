#!/usr/bin/env python3
"""Measures the web console in headless Chromium while `drover-load simulate` runs a fleet.

    cargo build --release -p drover -p drover-load
    python3 load/console_bench.py                      # 10,000 devices, 1 message/s each
    python3 load/console_bench.py --devices 1000 --seconds 10 --chart-rate 100

It starts a release `drover` on loopback ports of its own (a temporary data directory, so the
console is served from the assets embedded in the binary), then:

1. first load, idle server, cold cache: bytes transferred (the page and everything it loads,
   headers included, from Resource Timing) and the time until the sign-in form is usable, then
   from "Sign in" until the overview shows its figures;
2. starts `drover-load simulate --devices N` and waits until the devices are connected;
3. on the overview, then on a device page with its live chart (the device also receives
   `--chart-rate` extra HTTP messages per second so the chart redraws often), records every
   animation frame for `--seconds` (requestAnimationFrame timestamps) and the long tasks the
   browser reports (PerformanceObserver `longtask`, main thread busy > 50 ms).

It prints a table and appends one JSON line to load/results/<date>.jsonl. A benchmark: it
measures and asserts nothing. Needs chromium, chromium-driver and Python's selenium.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))

# requestAnimationFrame for `seconds`: every frame's interval, and the long tasks meanwhile.
RECORD_FRAMES = """
const seconds = arguments[0];
const done = arguments[arguments.length - 1];
const intervals = [];
const longTasks = [];
let observer = null;
try {
  observer = new PerformanceObserver((list) => { for (const e of list.getEntries()) longTasks.push(e.duration); });
  observer.observe({ type: 'longtask' });
} catch (e) { observer = null; }
let last = null;
const end = performance.now() + seconds * 1000;
function tick(t) {
  if (last !== null) intervals.push(t - last);
  last = t;
  if (t < end) requestAnimationFrame(tick);
  else { if (observer) observer.disconnect(); done({ intervals, longTasks, supported: observer !== null }); }
}
requestAnimationFrame(tick);
"""


def log(message):
    print(f"[console_bench] {message}", file=sys.stderr, flush=True)


def call(base, method, path, token=None, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
        return json.loads(text) if text else None


def wait(driver, what, condition, timeout=30):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.01,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        raise SystemExit(f"timed out after {timeout} s waiting for {what}") from None


def exists(driver, css):
    return len(driver.find_elements(By.CSS_SELECTOR, css)) > 0


def browser():
    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(arg)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(600)
    return driver


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def frame_summary(sample, seconds):
    intervals = sample["intervals"]
    return {
        "frames": len(intervals),
        "fps": round(len(intervals) / seconds, 1),
        "frame_p50_ms": round(percentile(intervals, 50), 1) if intervals else None,
        "frame_p95_ms": round(percentile(intervals, 95), 1) if intervals else None,
        "frame_p99_ms": round(percentile(intervals, 99), 1) if intervals else None,
        "frame_max_ms": round(max(intervals), 1) if intervals else None,
        "frames_over_50ms": sum(1 for i in intervals if i > 50),
        "long_tasks": len(sample["longTasks"]) if sample["supported"] else None,
        "long_task_ms": round(sum(sample["longTasks"]), 1) if sample["supported"] else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=1.0, help="messages per second per simulated device")
    parser.add_argument("--seconds", type=float, default=20, help="frames recorded per page")
    parser.add_argument("--chart-rate", type=int, default=100,
                        help="extra messages per second to the device whose page is measured")
    parser.add_argument("--profile", default="release", help="which build of drover and drover-load to run")
    parser.add_argument("--http-port", type=int, default=18480)
    parser.add_argument("--mqtt-port", type=int, default=18483)
    parser.add_argument("--results", default=os.path.join(ROOT, "load", "results",
                                                          datetime.now(timezone.utc).strftime("%Y-%m-%d") + ".jsonl"))
    args = parser.parse_args()

    drover = os.path.join(TARGET, args.profile, "drover")
    load = os.path.join(TARGET, args.profile, "drover-load")
    for binary in (drover, load):
        if not os.path.exists(binary):
            raise SystemExit(f"{binary} is missing: cargo build --release -p drover -p drover-load")
    work = tempfile.mkdtemp(prefix="drover-console-bench.")
    base = f"http://127.0.0.1:{args.http_port}"
    password = f"bench-{int(time.time())}"
    env = dict(os.environ, DATA_DIR=os.path.join(work, "data"), PORT=str(args.http_port), HTTP_BIND="127.0.0.1",
               MQTT_PORT=str(args.mqtt_port), MQTT_BIND="127.0.0.1", MAX_DEVICES=str(max(50000, args.devices)),
               LOG_LEVEL="warn", DROVER_ADMIN_PASSWORD=password)
    server = subprocess.Popen([drover], env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "drover.err"), "w"))
    simulate = None
    driver = None
    stop_chart = threading.Event()
    try:
        for _ in range(300):
            try:
                call(base, "GET", "/health")
                break
            except Exception:
                time.sleep(0.1)
        token = call(base, "POST", "/api/auth/login", body={"username": "admin", "password": password})["token"]
        key = call(base, "POST", "/api/keys", token, {"name": "console-bench", "role": "operator"})["key"]

        # 1. First load on an idle server, cold cache.
        driver = browser()
        driver.get(base + "/")
        wait(driver, "the sign-in form", lambda d: exists(d, "#username"))
        form_ms = driver.execute_script("return performance.now()")
        transferred = driver.execute_script("""
            const entries = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')];
            return entries.filter((e) => !new URL(e.name).pathname.startsWith('/api/')).reduce((n, e) => n + (e.transferSize || 0), 0);""")
        driver.find_element(By.ID, "username").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(password)
        clicked = driver.execute_script("return performance.now()")
        driver.find_element(By.ID, "signin").click()
        wait(driver, "the overview's figures", lambda d: exists(d, "#registered") and d.find_element(By.ID, "registered").text not in ("", "—"))
        overview_ms = driver.execute_script("return performance.now()") - clicked
        log(f"first load: {transferred / 1024:.1f} KiB, sign-in form after {form_ms:.0f} ms, overview {overview_ms:.0f} ms after sign-in")

        # 2. The fleet.
        devices_file = os.path.join(work, "devices.csv")
        simulate = subprocess.Popen(
            [load, "simulate", "--url", base, "--api-key", key, "--mqtt-port", str(args.mqtt_port),
             "--devices", str(args.devices), "--rate", str(args.rate), "--devices-file", devices_file, "--quiet"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "simulate.err"), "w"))
        started = time.monotonic()
        while True:
            stats = call(base, "GET", "/stats", token)
            if stats["devices"]["connected"] >= args.devices * 0.99:
                break
            if simulate.poll() is not None:
                raise SystemExit(f"drover-load simulate stopped: see {work}/simulate.err")
            if time.monotonic() - started > 900:
                raise SystemExit(f"only {stats['devices']['connected']} devices connected after 15 min")
            time.sleep(1)
        log(f"{args.devices} devices connected after {time.monotonic() - started:.0f} s")
        time.sleep(3)  # the simulation's first readings settle

        # 3a. The overview under load.
        driver.get(base + "/#/")
        wait(driver, "the overview", lambda d: exists(d, "#rate-chart") and d.find_element(By.ID, "registered").text not in ("", "—"))
        overview = frame_summary(driver.execute_async_script(RECORD_FRAMES, args.seconds), args.seconds)
        rate_text = driver.find_element(By.ID, "rate").text
        log(f"overview: {overview}, messages/s shown: {rate_text}")

        # 3b. A device page with its live chart, the device receiving --chart-rate more messages/s.
        with open(devices_file) as f:
            rows = [line.strip().split(",", 1) for line in f if line.strip() and not line.startswith("device_id,")]
        device, device_token = rows[0]
        # Several senders, so the rate holds even when one request takes longer than 1/rate.
        senders = max(1, min(8, args.chart_rate))

        def feed(offset):
            period = senders / max(1, args.chart_rate)
            next_at = time.monotonic() + offset * period / senders
            n = offset
            while not stop_chart.is_set():
                n += senders
                try:
                    call(base, "POST", f"/api/devices/{device}/telemetry", device_token, {"metrics": {"bench": n % 100}})
                except Exception:
                    pass
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

        driver.get(f"{base}/#/devices/{device}")
        wait(driver, "the device page watching", lambda d: exists(d, "#shadow-version")
             and device in (d.execute_script("return document.body.dataset.watching") or "").split(" "))
        feeders = [threading.Thread(target=feed, args=(i,), daemon=True) for i in range(senders)] if args.chart_rate > 0 else []
        feeder = bool(feeders)
        for thread in feeders:
            thread.start()
        if feeder:
            wait(driver, "the bench chart", lambda d: exists(d, '.chart[data-metric="bench"]'))
        before = int(driver.find_element(By.CSS_SELECTOR, '.chart[data-metric="bench"]').get_attribute("data-points") or 0) if feeder else 0
        device_page = frame_summary(driver.execute_async_script(RECORD_FRAMES, args.seconds), args.seconds)
        after = int(driver.find_element(By.CSS_SELECTOR, '.chart[data-metric="bench"]').get_attribute("data-points") or 0) if feeder else 0
        stop_chart.set()
        for thread in feeders:
            thread.join()
        device_page["chart_points_per_second"] = round((after - before) / args.seconds, 1)
        log(f"device page: {device_page}")

        stats = call(base, "GET", "/stats", token)
        line = {
            "scenario": "console",
            "at": datetime.now(timezone.utc).isoformat(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "browser": f"chromium {driver.capabilities.get('browserVersion', '')}",
            "parameters": {"profile": args.profile, "devices": args.devices, "rate_per_device": args.rate, "seconds": args.seconds,
                           "chart_rate": args.chart_rate},
            "results": {
                "first_load_bytes": transferred,
                "signin_form_ms": round(form_ms),
                "overview_after_signin_ms": round(overview_ms),
                "connected": stats["devices"]["connected"],
                "messages_committed": stats["telemetry"]["messages"],
                "overview": overview,
                "device_page": device_page,
            },
        }
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{'page':<12} {'fps':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'>50 ms':>7} {'long tasks':>11}")
        for name, s in (("overview", overview), ("device", device_page)):
            print(f"{name:<12} {s['fps']:>6} {s['frame_p50_ms']:>7} {s['frame_p95_ms']:>7} {s['frame_p99_ms']:>7} "
                  f"{s['frame_max_ms']:>7} {s['frames_over_50ms']:>7} {str(s['long_tasks']):>11}")
        print(json.dumps(line))
    finally:
        stop_chart.set()
        if driver:
            driver.quit()
        for process in (simulate, server):
            if process and process.poll() is None:
                process.send_signal(signal.SIGINT if process is simulate else signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
