#!/usr/bin/env python3
"""Prints the performance targets beside what `load/compare.sh` measured.

    python3 load/targets.py --run 20261207T010203Z load/results/2026-12-07.jsonl
    python3 load/targets.py --last 3 load/results/*.jsonl     # median and spread of three runs

Each figure is computed per run from the JSON lines the benchmarks wrote; with several runs the
table shows the median, the lowest and highest value, and how many runs met the target.
"""
import argparse
import json
import statistics


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    return rows


def scenario(rows, name, target=None, **parameters):
    out = []
    for r in rows:
        if r.get("scenario") != name or (target and r.get("target") != target):
            continue
        p = r.get("parameters", {})
        if all(p.get(k) == v for k, v in parameters.items()):
            out.append(r)
    return out


def first(rows):
    return rows[0]["results"] if rows else None


def ingest_row(rows, qos, target):
    """The full-speed ingest run (not a dashboard run) of a target at a QoS."""
    runs = [r for r in scenario(rows, "ingest", target=target, qos=qos) if r["parameters"].get("rate", 0) == 0
            and "dashboard_devices" not in r["results"]]
    return runs[0] if runs else None


def ingest(rows, qos, target):
    row = ingest_row(rows, qos, target)
    return row["results"] if row else None


# ---- the figures: each takes one run's rows and returns (value, reference text) or None ----------

def qos1_ratio(rows):
    d, m = ingest(rows, 1, "drover"), ingest(rows, 1, "mosquitto")
    if not d or not m or not m.get("acked_per_second"):
        return None
    return d["acked_per_second"] / m["acked_per_second"], \
        f"Drover {d['acked_per_second']:,.0f} acked/s after storing ({d['stored']:,} of {d['sent']:,} read back), " \
        f"Mosquitto {m['acked_per_second']:,.0f} acked/s"


def qos0_stored(rows):
    d = ingest_row(rows, 0, "drover")
    m = ingest(rows, 0, "mosquitto")
    if not d:
        return None
    x, seconds = d["results"], d["parameters"]["seconds"]
    ref = f"Mosquitto {m['sent_per_second']:,.0f} sent/s" if m else "no reference"
    return x["stored"] / seconds, f"{x['sent_per_second']:,.0f} sent/s offered; {ref}"


def memory_50k(rows):
    c = first(scenario(rows, "connect"))
    if not c or "server_rss_per_connection_kib" not in c:
        return None
    per = c["server_rss_per_connection_kib"]
    base = c["server_rss_mib"] - c["connected"] * per / 1024
    return base + 50000 * per / 1024, \
        f"{c['connected']:,} connected: {c['server_rss_mib']:.0f} MiB RSS, {per:.1f} KiB each over a {base:.0f} MiB base"


def per_connection(rows):
    c = first(scenario(rows, "connect"))
    if not c or "server_rss_per_connection_kib" not in c:
        return None
    detail = f"{c['connected']:,} connections, {c['failed']} failed"
    if "server_rss_held_per_connection_kib" in c:
        detail += f"; lowest RSS over the settle window (right after the hold: {c['server_rss_held_per_connection_kib']:.1f} KiB each)"
    if "server_heap_per_connection_kib" in c:
        detail += f"; heap {c['server_heap_per_connection_kib']:.1f} KiB each"
    return c["server_rss_per_connection_kib"], detail


def dashboard(qos):
    def figure(rows):
        runs = [r["results"] for r in scenario(rows, "ingest", target="drover", qos=qos)
                if "dashboard_latency_p99_ms" in r["results"]]
        if not runs:
            return None
        p99 = [x["dashboard_latency_p99_ms"] for x in runs]
        shown = sum(x["dashboard_received"] for x in runs)
        expected = sum(x["dashboard_expected"] for x in runs)
        busy = [x["generator_cpu_cores"] / x.get("generator_cores", 1) for x in runs if "generator_cpu_cores" in x]
        generator = f"; load generator busy {min(busy):.0%}-{max(busy):.0%} of its core" if busy else ""
        return max(p99), f"worst of {len(runs)} runs; p99 per run {', '.join(f'{v:.1f}' for v in p99)} ms; " \
            f"{shown:,} of {expected:,} shown{generator}"
    return figure


def query_figure(points, shapes, stat, label):
    def figure(rows):
        q = first([r for r in scenario(rows, "query") if r["parameters"].get("points") == points])
        if not q:
            return None
        values = [(q[f"{s}_{stat}_ms"], s) for s in shapes if f"{s}_{stat}_ms" in q]
        if not values:
            return None
        worst = max(values)
        return worst[0], f"{label}: slowest {worst[1]} ({', '.join(f'{s} {v:.1f}' for v, s in values)} ms)"
    return figure


RAW_SHAPES = ["p95_per_hour", "p99_whole_range", "raw_export_100000", "raw_last_10000"]
AGGREGATE_SHAPES = ["mean_per_hour", "max_per_day", "count_whole_range"]


def backpressure_fanout(rows):
    """Drover's full-speed QoS 1 fan-out run with MQTT_SLOW_SUBSCRIBER=backpressure."""
    return first([r for r in scenario(rows, "fanout", target="drover", qos=1)
                  if r["parameters"].get("slow_subscriber") == "backpressure" and r["parameters"].get("rate_per_publisher", 0) == 0])


def fanout_backpressure(rows):
    d = backpressure_fanout(rows)
    m = first([r for r in scenario(rows, "fanout", target="mosquitto", qos=1) if r["parameters"].get("rate_per_publisher", 0) == 0])
    if not d or not m:
        return None
    return d["delivered_per_second"] / m["delivered_per_second"], \
        f"Drover delivered {d['delivered']:,} of {d['expected']:,} ({d['delivered_per_second']:,.0f}/s), " \
        f"Mosquitto {m['delivered']:,} of {m['expected']:,} ({m['delivered_per_second']:,.0f}/s)"


def fanout_lost(rows):
    d = backpressure_fanout(rows)
    if not d:
        return None
    return d["expected"] - d["delivered"], "messages lost with MQTT_SLOW_SUBSCRIBER=backpressure"


def platform(rows):
    a = first(scenario(rows, "analytics"))
    if not a:
        return None
    rules = a.get("rules_created", 0)
    return a["throughput_ratio"], \
        f"{a['msgs_per_second_without_analytics']:,.0f} acked/s plain, {a['msgs_per_second_with_analytics']:,.0f} with " \
        f"{rules} rules and analytics; rule events dropped {a.get('rule_events_dropped', 0):,.0f}, " \
        f"analytics events dropped {a.get('analytics_events_dropped', 0):,.0f}"


# (number, what, target text, met(value), format, figure)
TARGETS = [
    (1, "QoS 1 ingest stored and acked / Mosquitto acked", ">= 1.00", lambda v: v >= 1.0, "{:.2f}", qos1_ratio),
    (2, "QoS 0 stored per second", ">= 200,000", lambda v: v >= 200000, "{:,.0f}", qos0_stored),
    (3, "RSS per connection with its device actor, KiB", "<= 10", lambda v: v <= 10, "{:.1f}", per_connection),
    (3, "50,000 connections, MiB RSS (extrapolated)", "< 512", lambda v: v < 512, "{:.0f}", memory_50k),
    (4, "publish-to-dashboard p99, QoS 0 at 50,000 msg/s, ms", "< 10 every run", lambda v: v < 10, "{:.1f}", dashboard(0)),
    (4, "publish-to-dashboard p99, QoS 1 at 25,000 msg/s, ms", "< 10 every run", lambda v: v < 10, "{:.1f}", dashboard(1)),
    (5, "raw query p95 over 1M points, ms", "< 100", lambda v: v < 100, "{:.1f}",
     query_figure(1_000_000, RAW_SHAPES, "p95", "p95 latency")),
    (5, "aggregated query p95 over 10M points, ms", "< 200", lambda v: v < 200, "{:.1f}",
     query_figure(10_000_000, AGGREGATE_SHAPES, "p95", "p95 latency")),
    (6, "QoS 1 fan-out, backpressure, delivered/s / Mosquitto", ">= 1.00", lambda v: v >= 1.0, "{:.2f}", fanout_backpressure),
    (6, "QoS 1 fan-out, backpressure, messages lost", "0", lambda v: v == 0, "{:,.0f}", fanout_lost),
    (7, "ingest with 1,000 rules + analytics / plain ingest", ">= 0.80", lambda v: v >= 0.8, "{:.2f}", platform),
]


def fanout_table(rows):
    """The fan-out runs of the last run: throughput and paced latency, Drover beside Mosquitto."""
    fan = [r for r in rows if r.get("scenario") == "fanout"]
    if not fan:
        return
    print(f"\n{'fanout (last run)':<22}{'target':<26}{'delivered/s':>13}{'delivered':>11}{'p50 ms':>9}{'p99 ms':>9}")
    for r in fan:
        p, x = r["parameters"], r["results"]
        rate = p.get("rate_per_publisher", 0)
        shape = f"QoS {p['qos']}" + (f" at {rate:,}/s" if rate else "")
        target = r["target"] + (f" ({p['slow_subscriber']})" if p.get("slow_subscriber") else "")
        print(f"{shape:<22}{target:<26}{x['delivered_per_second']:>13,.0f}{x['delivered_ratio']:>11.3f}"
              f"{x.get('latency_p50_ms', 0):>9.2f}{x.get('latency_p99_ms', 0):>9.2f}")


def markdown(ids, by_run):
    print(f"Runs: {', '.join(f'`{i}`' for i in ids)}\n")
    print("| # | Target | Median | Spread | Met | Last run |")
    print("|---|---|---|---|---|---|")
    for number, what, target, met, fmt, figure in TARGETS:
        got = [g for g in (figure(by_run[i]) for i in ids) if g is not None]
        if not got:
            print(f"| {number} | {what}: {target} | not run | | | |")
            continue
        values = [g[0] for g in got]
        spread = f"{fmt.format(min(values))}–{fmt.format(max(values))}" if len(values) > 1 else ""
        hits = sum(1 for v in values if met(v))
        print(f"| {number} | {what}: {target} | {fmt.format(statistics.median(values))} | {spread} | "
              f"{hits}/{len(values)} | {got[-1][1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--run", action="append", help="a run id (repeatable)")
    group.add_argument("--last", type=int, help="the last N runs in the files")
    parser.add_argument("--markdown", action="store_true", help="print the targets as a Markdown table")
    args = parser.parse_args()
    rows = load(args.files)
    ids = []
    for r in rows:
        if r.get("run") and "scenario" in r and r["run"] not in ids:
            ids.append(r["run"])
    if args.run:
        ids = [i for i in ids if i in args.run]
    elif args.last:
        ids = ids[-args.last:]
    else:
        ids = ids[-1:]
    if not ids:
        raise SystemExit("no run with results in " + ", ".join(args.files))
    by_run = {i: [r for r in rows if r.get("run") == i and "scenario" in r] for i in ids}
    if args.markdown:
        markdown(ids, by_run)
        return
    print(f"Runs: {', '.join(ids)}")
    print(f"{'#':<3}{'figure':<56}{'target':>16}{'median':>12}{'spread':>22}{'met':>8}")
    for number, what, target, met, fmt, figure in TARGETS:
        values = []
        detail = None
        for i in ids:
            got = figure(by_run[i])
            if got is not None:
                values.append(got[0])
                detail = got[1]
        if not values:
            print(f"{number:<3}{what:<56}{target:>16}{'not run':>12}")
            continue
        median = statistics.median(values)
        spread = f"{fmt.format(min(values))}-{fmt.format(max(values))}" if len(values) > 1 else ""
        hits = sum(1 for v in values if met(v))
        print(f"{number:<3}{what:<56}{target:>16}{fmt.format(median):>12}{spread:>22}{f'{hits}/{len(values)}':>8}")
        print(f"{'':<5}last run: {detail}")
    fanout_table(by_run[ids[-1]])


if __name__ == "__main__":
    main()
