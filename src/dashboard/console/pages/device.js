// One device: its record, its shadow (with an editor for `desired`), a chart per metric that is
// live over /ws (last 15 minutes) or read from /api/telemetry for a longer range with an
// aggregation, the latest values with their units, its alarms, its analytics (when the server
// has them) and, for admins, its recent audit entries.

import * as api from '../api.js';
import * as live from '../live.js';
import { TimeChart } from '../chart.js';
import { analyticsPanel } from './analytics.js';
import { h, clear, note, errorText, fmtTime, fmtNumber, fmtAge, dialog, emptyState, severityBadge, statusDot } from '../ui.js';

const RANGES = [
  { value: 'live', label: 'Live (15 min)', ms: 15 * 60e3 },
  { value: '1h', label: 'Last hour', ms: 3600e3, every: '1m' },
  { value: '6h', label: 'Last 6 hours', ms: 6 * 3600e3, every: '5m' },
  { value: '24h', label: 'Last 24 hours', ms: 24 * 3600e3, every: '15m' },
  { value: '7d', label: 'Last 7 days', ms: 7 * 86400e3, every: '1h' },
  { value: '30d', label: 'Last 30 days', ms: 30 * 86400e3, every: '6h' },
];

/// The JSON merge patch (the shadow's update semantics) that turns `from` into `to`:
/// removed keys become null, objects are compared key by key, anything else replaces.
export function mergePatch(from, to) {
  const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
  const patch = {};
  for (const key of Object.keys(from || {})) if (!(key in to)) patch[key] = null;
  for (const [key, value] of Object.entries(to)) {
    const before = from ? from[key] : undefined;
    if (isObject(value) && isObject(before)) {
      const inner = mergePatch(before, value);
      if (Object.keys(inner).length) patch[key] = inner;
    } else if (JSON.stringify(value) !== JSON.stringify(before)) {
      patch[key] = value;
    }
  }
  return patch;
}

function pretty(value) {
  return value === undefined ? '—' : JSON.stringify(value, null, 2);
}

export async function renderDevice(main, ctx) {
  const id = ctx.params[0];
  const path = `/api/devices/${encodeURIComponent(id)}`;
  let device;
  try {
    device = await api.get(path);
  } catch (error) {
    if (error.status === 404) {
      main.append(h('h1', { text: id }), emptyState('No such device in this tenant.', h('a', { href: '#/devices' }, 'Back to the device list')));
      return null;
    }
    throw error;
  }
  let schema = {};
  try {
    schema = (await api.get(`/api/device-types/${encodeURIComponent(device.type)}`)).schema?.metrics || {};
  } catch { schema = {}; }
  const unit = (metric) => schema[metric]?.unit;
  // No endpoint lists a device's stored metrics yet: the schema's, and those this browser has
  // seen for the device type, are read back; others can be named in the toolbar.
  const memoryKey = `drover.metrics.${device.type}`;
  const remembered = () => { try { return JSON.parse(localStorage.getItem(memoryKey)) || []; } catch { return []; } };
  const remember = (metric) => {
    const known = remembered();
    if (!known.includes(metric) && known.length < 50) localStorage.setItem(memoryKey, JSON.stringify([...known, metric]));
  };

  const dot = statusDot(device.connected, device.status);
  const header = h('div', { class: 'title-row' },
    h('h1', {}, dot, ' ', device.deviceId),
    ctx.me.canWrite ? h('div', { class: 'actions-row' },
      h('button', { type: 'button', id: 'edit-device', onclick: editDevice }, 'Edit tags and metadata'),
      h('button', { type: 'button', id: 'rotate-token', onclick: rotate }, 'New token'),
      h('button', { type: 'button', class: 'danger', id: 'delete-device', onclick: remove }, 'Delete')) : null);
  const facts = h('dl', { class: 'facts' },
    h('dt', { text: 'Type' }), h('dd', { text: device.type }),
    h('dt', { text: 'Status' }), h('dd', { id: 'device-status', text: device.status }),
    h('dt', { text: 'Last seen' }), h('dd', { text: fmtTime(device.lastSeenAt) }),
    h('dt', { text: 'Tags' }), h('dd', { text: device.tags.join(', ') || '—' }),
    h('dt', { text: 'Groups' }), h('dd', { text: device.groups.join(', ') || '—' }),
    h('dt', { text: 'Registered' }), h('dd', { text: fmtTime(device.createdAt) }),
    Object.entries(device.metadata).map(([k, v]) => [h('dt', { text: k }), h('dd', { text: typeof v === 'string' ? v : JSON.stringify(v) })]));

  const shadowBox = h('div', { id: 'shadow' });
  const range = h('select', { id: 'range' }, RANGES.map((r) => h('option', { value: r.value }, r.label)));
  const agg = h('select', { id: 'agg', disabled: true }, ['mean', 'min', 'max', 'last', 'count'].map((a) => h('option', { value: a }, a)));
  const addMetric = h('form', { class: 'inline', onsubmit: (event) => {
    event.preventDefault();
    const name = addMetric.elements.metric.value.trim();
    if (name) { chartFor(name); addMetric.reset(); reload(); }
  } }, h('label', { for: 'add-metric' }, 'Metric'), h('input', { id: 'add-metric', name: 'metric', placeholder: 'name' }), h('button', { type: 'submit' }, 'Show'));
  const charts = h('div', { class: 'charts', id: 'charts' });
  const chartsNote = h('div');
  const latest = h('tbody');
  const alarms = h('div', { id: 'device-alarms' });
  const audit = ctx.me.role === 'admin' ? h('div', { id: 'device-audit' }) : null;
  const analyticsSlot = h('div');

  main.append(
    h('p', { class: 'crumbs' }, h('a', { href: '#/devices' }, 'Devices'), ' / ', device.deviceId),
    header, facts,
    h('section', { class: 'card' }, h('h2', { text: 'Telemetry' }),
      h('div', { class: 'toolbar' }, h('label', { for: 'range' }, 'Range'), range, h('label', { for: 'agg' }, 'Aggregation'), agg, addMetric),
      chartsNote, charts,
      h('h3', { text: 'Latest values' }),
      h('div', { class: 'table-wrap' }, h('table', { id: 'latest' }, h('thead', {}, h('tr', {}, ['Metric', 'Value', 'At'].map((t) => h('th', { scope: 'col', text: t })))), latest))),
    h('section', { class: 'card' }, h('h2', { text: 'Shadow' }), shadowBox),
    h('section', { class: 'card' }, h('h2', { text: 'Alarms' }), alarms),
    analyticsSlot,
    audit ? h('section', { class: 'card' }, h('h2', { text: 'Recent activity (audit log)' }), audit) : null);

  // --- telemetry ---
  const series = new Map(); // metric -> { chart, el, latest: {v, t} }
  function chartFor(metric) {
    let entry = series.get(metric);
    if (entry) return entry;
    const el = h('div', { class: 'chart', 'data-metric': metric });
    const label = unit(metric) ? `${metric} (${unit(metric)})` : metric;
    charts.append(h('figure', { class: 'metric' }, h('figcaption', { text: label }), el));
    entry = { chart: new TimeChart(el, label), el, latest: null };
    series.set(metric, entry);
    remember(metric);
    chartsNote.replaceChildren();
    return entry;
  }
  const latestRows = () => clear(latest, [...series.entries()].filter(([, e]) => e.latest).map(([metric, e]) =>
    h('tr', { 'data-metric': metric }, h('td', { text: metric }), h('td', { class: 'num', text: fmtNumber(e.latest.v, unit(metric)) }), h('td', { text: fmtTime(e.latest.t) }))));
  let latestQueued = false;
  const noteLatest = (metric, v, t) => {
    const entry = chartFor(metric);
    if (!entry.latest || entry.latest.t <= t) entry.latest = { v, t };
    if (!latestQueued) { latestQueued = true; requestAnimationFrame(() => { latestQueued = false; latestRows(); }); }
  };
  for (const metric of new Set([...Object.keys(schema), ...remembered()])) chartFor(metric);
  const analytics = analyticsPanel(device.deviceId, () => [...series.keys()]);
  analyticsSlot.replaceWith(analytics.el);

  async function reload() {
    const chosen = RANGES.find((r) => r.value === range.value);
    const isLive = chosen.value === 'live';
    agg.disabled = isLive;
    const metrics = [...series.keys()];
    if (metrics.length === 0) {
      clear(chartsNote, emptyState('No telemetry seen yet.', 'Charts appear when the device publishes to devices/' + device.deviceId + '/telemetry, or name a metric above to read its history.'));
      return;
    }
    const end = Date.now();
    const params = { metric: metrics.slice(0, 50).join(','), start: Math.floor((end - chosen.ms) / 1000), end: Math.ceil(end / 1000) + 1 };
    if (!isLive) Object.assign(params, { agg: agg.value, every: chosen.every });
    else params.limit = 10000;
    try {
      const answer = await api.get(`/api/telemetry/${encodeURIComponent(device.deviceId)}${api.query(params)}`);
      for (const s of answer.series) {
        const numeric = s.points.filter((p) => typeof p.v === 'number').map((p) => [Date.parse(p.t), p.v]);
        const entry = chartFor(s.metric);
        entry.chart.windowMs = chosen.ms;
        entry.chart.set(numeric, { live: isLive });
        const last = s.points[s.points.length - 1];
        if (last) noteLatest(s.metric, last.v, Date.parse(last.t));
      }
      chartsNote.replaceChildren();
    } catch (error) {
      if (error.status !== 401) clear(chartsNote, note('error', errorText(error)));
    }
  }
  range.addEventListener('change', reload);
  agg.addEventListener('change', reload);

  const unwatch = live.watch([device.deviceId]);
  const offTelemetry = live.on('telemetry', (frame) => {
    if (frame.deviceId !== device.deviceId) return;
    dot.className = 'dot on';
    for (const message of frame.messages) {
      for (const [metric, value] of Object.entries(message.metrics)) {
        noteLatest(metric, value, message.ts);
        if (typeof value === 'number') chartFor(metric).chart.push(message.ts, value);
      }
    }
  });
  // After a reconnect, fill what was missed while away.
  const offOpen = live.on('open', () => { if (range.value === 'live') reload(); });

  // --- shadow ---
  let shadow = null;
  async function loadShadow() {
    try {
      shadow = await api.get(`${path}/shadow`);
    } catch (error) {
      if (error.status === 404) shadow = { state: {}, version: 0 };
      else { clear(shadowBox, note('error', errorText(error))); return; }
    }
    showShadow();
  }
  function showShadow() {
    const state = shadow.state || {};
    const parts = ['desired', 'reported', 'delta'].map((part) => h('div', { class: 'shadow-part' },
      h('h3', { text: part }), h('pre', { id: `shadow-${part}`, text: pretty(state[part]) })));
    const version = h('p', { class: 'muted', id: 'shadow-version', text: `Version ${shadow.version}${shadow.timestamp ? ` · updated ${fmtTime(shadow.timestamp * 1000)}` : ''}` });
    clear(shadowBox, version, h('div', { class: 'shadow-grid' }, parts));
    if (!ctx.me.canWrite) return;
    const editor = h('textarea', { id: 'desired-editor', rows: 8, class: 'mono', spellcheck: 'false', 'aria-label': 'Desired state (JSON)' });
    editor.value = pretty(state.desired || {});
    const message = h('div', { id: 'shadow-message', 'aria-live': 'polite' });
    const save = h('button', { type: 'button', class: 'primary', id: 'desired-save' }, 'Save desired state');
    const check = () => {
      try {
        const value = JSON.parse(editor.value);
        if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('desired state must be a JSON object');
        message.replaceChildren();
        save.disabled = false;
        return value;
      } catch (e) {
        clear(message, note('error', e.message));
        save.disabled = true;
        return null;
      }
    };
    editor.addEventListener('input', check);
    save.addEventListener('click', async () => {
      const edited = check();
      if (!edited) return;
      const patch = mergePatch(state.desired || {}, edited);
      if (Object.keys(patch).length === 0) { clear(message, note('info', 'Nothing changed.')); return; }
      const desired = Object.keys(edited).length === 0 ? null : patch;
      save.disabled = true;
      try {
        await api.patch(`${path}/shadow`, { state: { desired }, version: shadow.version });
        await loadShadow();
        const saved = document.getElementById('shadow-message');
        if (saved) clear(saved, note('ok', `Saved as version ${shadow.version}; a connected device is sent the delta.`));
      } catch (error) {
        save.disabled = false;
        if (error.code === 'version_conflict') {
          clear(message, note('error', 'The shadow changed since it was loaded (someone else, or the device). Reload it, then apply your change again.'),
            h('button', { type: 'button', onclick: loadShadow }, 'Reload shadow'));
        } else {
          clear(message, note('error', errorText(error)));
        }
      }
    });
    shadowBox.append(h('h3', {}, h('label', { for: 'desired-editor' }, 'Edit desired state')), editor, message, save);
  }

  // --- alarms ---
  async function loadAlarms() {
    try {
      const { alerts } = await api.get(`/api/alerts${api.query({ deviceId: device.deviceId, limit: 50 })}`);
      if (alerts.length === 0) { clear(alarms, h('p', { class: 'muted', text: 'No alarms for this device.' })); return; }
      clear(alarms, h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, ['Severity', 'Rule', 'State', 'First seen', 'Age'].map((t) => h('th', { scope: 'col', text: t })))),
        h('tbody', {}, alerts.map((a) => h('tr', { 'data-alarm': a.id },
          h('td', {}, severityBadge(a.severity)), h('td', { text: a.ruleName }), h('td', { text: a.status }),
          h('td', { text: fmtTime(a.firstSeen) }), h('td', { text: fmtAge(a.firstSeen) })))))));
    } catch (error) {
      if (error.status !== 401) clear(alarms, note('error', errorText(error)));
    }
  }
  const offAlarm = live.on('alarm', (frame) => { if (frame.alarm.deviceId === device.deviceId) loadAlarms(); });

  // --- audit (admins) ---
  async function loadAudit() {
    if (!audit) return;
    try {
      const { entries } = await api.get(`/api/audit${api.query({ target: device.deviceId, limit: 20 })}`);
      if (entries.length === 0) { clear(audit, h('p', { class: 'muted', text: 'Nothing recorded for this device yet: registrations, edits, token rotations and deletions are.' })); return; }
      clear(audit, h('div', { class: 'table-wrap' }, h('table', { id: 'device-audit-table' },
        h('thead', {}, h('tr', {}, ['At', 'Actor', 'Action', 'Outcome'].map((t) => h('th', { scope: 'col', text: t })))),
        h('tbody', {}, entries.map((e) => h('tr', { 'data-action': e.action },
          h('td', { text: fmtTime(e.at) }), h('td', { text: e.actor }), h('td', { text: e.action }),
          h('td', { text: e.count > 1 ? `${e.outcome} (×${e.count})` : e.outcome })))))));
    } catch (error) {
      if (error.status !== 401) clear(audit, note('error', errorText(error)));
    }
  }

  async function editDevice() {
    const tags = h('input', { id: 'edit-tags', value: device.tags.join(', ') });
    const meta = h('textarea', { id: 'edit-metadata', rows: 6, class: 'mono', spellcheck: 'false' });
    meta.value = JSON.stringify(device.metadata, null, 2);
    const problems = h('div', { id: 'edit-problems', 'aria-live': 'polite' });
    const box = h('dialog', { class: 'dialog', 'aria-label': `Edit ${device.deviceId}` }, h('h2', { text: `Edit ${device.deviceId}` }),
      h('div', { class: 'stack' }, h('label', { for: 'edit-tags' }, 'Tags (comma separated; replaces the list)'), tags,
        h('label', { for: 'edit-metadata' }, 'Metadata (JSON object)'), meta, problems),
      h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => box.close() }, 'Cancel'),
        h('button', { type: 'button', class: 'primary', id: 'edit-save', onclick: save }, 'Save')));
    async function save() {
      let edited;
      try {
        edited = JSON.parse(meta.value);
        if (edited === null || typeof edited !== 'object' || Array.isArray(edited)) throw new Error('metadata must be a JSON object');
      } catch (e) { clear(problems, note('error', e.message)); return; }
      // Metadata merges key by key on the server: removed keys are sent as null.
      const metadata = {};
      for (const key of Object.keys(device.metadata)) if (!(key in edited)) metadata[key] = null;
      for (const [key, value] of Object.entries(edited)) if (JSON.stringify(value) !== JSON.stringify(device.metadata[key])) metadata[key] = value;
      try {
        await api.patch(path, { tags: tags.value.split(',').map((t) => t.trim()).filter(Boolean), metadata });
        box.close();
        ctx.rerender();
      } catch (error) { clear(problems, note('error', errorText(error))); }
    }
    box.addEventListener('close', () => box.remove());
    document.body.append(box);
    box.showModal();
  }

  async function rotate() {
    const answer = await dialog(`New token for ${device.deviceId}?`,
      h('p', {}, 'The current token stops working at once and the device is disconnected until it uses the new one.'),
      [{ label: 'Cancel', value: 'cancel' }, { label: 'Make a new token', value: 'rotate', class: 'danger', testid: 'confirm-rotate' }]);
    if (answer !== 'rotate') return;
    try {
      const { token } = await api.post(`${path}/token`);
      await dialog(`New token for ${device.deviceId}`, h('div', { class: 'stack' },
        h('p', {}, 'It is shown only now.'), h('input', { id: 'device-token', readonly: true, value: token, class: 'mono', 'aria-label': 'Device token' })),
      [{ label: 'Done', value: 'ok', class: 'primary', testid: 'token-done' }]);
    } catch (error) {
      main.prepend(note('error', errorText(error)));
    }
  }

  async function remove() {
    const answer = await dialog(`Delete ${device.deviceId}?`,
      h('p', {}, 'Its credentials, tags, metadata, memberships and shadow are deleted and it is disconnected. Its telemetry and alarms are kept.'),
      [{ label: 'Cancel', value: 'cancel' }, { label: 'Delete', value: 'delete', class: 'danger', testid: 'confirm-delete' }]);
    if (answer !== 'delete') return;
    try {
      await api.del(path);
      location.hash = '#/devices';
    } catch (error) {
      main.prepend(note('error', errorText(error)));
    }
  }

  await Promise.all([reload(), loadShadow(), loadAlarms(), loadAudit()]);
  const slide = setInterval(() => { for (const entry of series.values()) if (entry.chart.live) entry.chart.refresh(); }, 5000);
  return () => {
    clearInterval(slide);
    unwatch();
    offTelemetry();
    offOpen();
    offAlarm();
    analytics.stop();
    for (const entry of series.values()) entry.chart.destroy();
  };
}
