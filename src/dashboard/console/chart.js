// Time-series charts on uPlot. Points pushed between two frames are drawn once, on the next
// animation frame, so a device sending 100 messages per second redraws at most at the display's
// rate. A live chart keeps a sliding window (15 minutes by default).

import uPlot from './vendor/uplot/uPlot.esm.js';

const dirty = new Set();
let frameQueued = false;

function drawDirty() {
  frameQueued = false;
  for (const chart of dirty) chart.draw();
  dirty.clear();
}

function schedule(chart) {
  dirty.add(chart);
  if (!frameQueued) {
    frameQueued = true;
    requestAnimationFrame(drawDirty);
  }
}

function cssVar(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

export class TimeChart {
  /// `el`: the container; `label`: the series name (with its unit); `windowMs`: for live charts.
  constructor(el, label, { windowMs = 15 * 60 * 1000, height = 180, sparkline = false } = {}) {
    this.el = el;
    this.windowMs = windowMs;
    this.xs = [];
    this.ys = [];
    this.live = true;
    const stroke = cssVar('--accent', '#2563eb');
    const axis = { stroke: cssVar('--muted', '#666'), grid: { stroke: cssVar('--grid', '#8882') }, ticks: { stroke: cssVar('--grid', '#8882') } };
    const options = {
      width: Math.max(200, el.clientWidth || 600),
      height,
      legend: { show: !sparkline },
      cursor: { show: !sparkline },
      // A live chart shows its whole window, however few points it has yet.
      scales: { x: { time: true, range: (u, min, max) => (this.live ? [(Date.now() - this.windowMs) / 1000, Date.now() / 1000] : [min, max]) } },
      axes: sparkline ? [{ show: false }, { show: false }] : [axis, { ...axis, size: 60 }],
      series: [{}, { label, stroke, width: 2, fill: sparkline ? `${stroke}22` : undefined, points: sparkline ? { show: false } : {} }],
    };
    this.plot = new uPlot(options, [[], []], el);
    this.resizer = new ResizeObserver(() => {
      const width = el.clientWidth;
      if (width > 0 && width !== this.plot.width) this.plot.setSize({ width, height });
    });
    this.resizer.observe(el);
  }

  /// Replaces the data (x in milliseconds); a static chart stops sliding.
  set(points, { live = this.live } = {}) {
    this.live = live;
    this.xs = points.map((p) => p[0]);
    this.ys = points.map((p) => p[1]);
    schedule(this);
  }

  /// Adds one point (x in milliseconds), keeping time order.
  push(x, y) {
    if (!this.live) return;
    let i = this.xs.length;
    while (i > 0 && this.xs[i - 1] > x) i -= 1;
    this.xs.splice(i, 0, x);
    this.ys.splice(i, 0, y);
    schedule(this);
  }

  /// Redraws on the next frame (a live window slides even without new points).
  refresh() { schedule(this); }

  get length() { return this.xs.length; }

  draw() {
    if (this.live) {
      const oldest = Date.now() - this.windowMs;
      let cut = 0;
      while (cut < this.xs.length && this.xs[cut] < oldest) cut += 1;
      if (cut) { this.xs.splice(0, cut); this.ys.splice(0, cut); }
    }
    this.plot.setData([this.xs.map((x) => x / 1000), this.ys]);
    this.el.dataset.points = String(this.xs.length);
  }

  destroy() {
    dirty.delete(this);
    this.resizer.disconnect();
    this.plot.destroy();
  }
}
