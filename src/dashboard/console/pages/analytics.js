// The device page's Analytics panel: the forecast of a metric and the anomalies the server's
// analytics draw as SVG (/api/analytics/forecast/{id}.svg?metric=…, …/anomalies/{id}.svg).
// Images are fetched with the bearer token (an <img> cannot send it) and shown from object
// URLs, so the SVG never becomes part of the page's markup. When the server has no analytics
// (404) or not enough data of the metric yet (400 not_enough_data) the panel stays hidden.

import * as api from '../api.js';
import { h, clear, note } from '../ui.js';

const REFRESH_MS = 60000;

/// Returns `{ el, stop }`: the panel (hidden until an image arrives) and its cleanup.
export function analyticsPanel(deviceId, metrics) {
  const urls = new Set();
  const picker = h('select', { id: 'analytics-metric', 'aria-label': 'Forecast metric' });
  const forecast = h('figure', { class: 'analytics-figure', id: 'analytics-forecast' });
  const anomalies = h('figure', { class: 'analytics-figure', id: 'analytics-anomalies' });
  const message = h('div', { 'aria-live': 'polite' });
  const el = h('section', { class: 'card', id: 'analytics', hidden: true },
    h('div', { class: 'title-row' }, h('h2', { text: 'Analytics' }),
      h('div', { class: 'toolbar' }, h('label', { for: 'analytics-metric' }, 'Forecast of'), picker)),
    message, h('div', { class: 'analytics-grid' }, forecast, anomalies));
  let stopped = false;
  const base = `/api/analytics`;
  const id = encodeURIComponent(deviceId);

  function setMetrics(names) {
    const current = picker.value;
    clear(picker, names.map((m) => h('option', { value: m, selected: m === current }, m)));
  }

  // One image into `figure`: 'shown', 'absent' (404, or 400: too few points yet) or 'failed'.
  async function load(figure, path, caption) {
    const { status, blob } = await api.blob(path);
    if (stopped) return 'absent';
    if (status === 404 || status === 400) { figure.replaceChildren(); return 'absent'; }
    if (!blob) {
      if (status !== 0 && status !== 401) clear(figure, note('error', `${caption}: the server answered ${status}.`));
      return 'failed';
    }
    const url = URL.createObjectURL(blob);
    urls.add(url);
    const old = figure.querySelector('img');
    clear(figure, h('img', { src: url, alt: `${caption} of ${deviceId}`, loading: 'lazy' }), h('figcaption', { text: caption }));
    if (old) { URL.revokeObjectURL(old.src); urls.delete(old.src); }
    return 'shown';
  }

  async function refresh() {
    const metric = picker.value;
    const results = await Promise.all([
      metric ? load(forecast, `${base}/forecast/${id}.svg${api.query({ metric })}`, `Forecast of ${metric}`) : 'absent',
      metric ? load(anomalies, `${base}/anomalies/${id}.svg${api.query({ metric })}`, `Anomalies of ${metric}`) : 'absent',
    ]);
    if (stopped) return;
    // Quietly absent when the server has no analytics for this device.
    el.hidden = results.every((r) => r === 'absent');
    message.replaceChildren();
  }

  setMetrics(metrics());
  picker.addEventListener('change', refresh);
  refresh();
  const timer = setInterval(() => { setMetrics(metrics()); refresh(); }, REFRESH_MS);
  return {
    el,
    stop() {
      stopped = true;
      clearInterval(timer);
      for (const url of urls) URL.revokeObjectURL(url);
      urls.clear();
    },
  };
}
