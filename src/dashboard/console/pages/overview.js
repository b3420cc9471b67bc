// Fleet overview: device counts, messages per second (from /stats, sampled every 2 s), active
// alarms by severity (kept current by the live stream), the busiest devices (from
// /stats/busiest-devices, every 5 s) and, for platform admins, the telemetry writers' queues and
// the spool.

import * as api from '../api.js';
import * as live from '../live.js';
import { TimeChart } from '../chart.js';
import { h, clear, fmtNumber, note, errorText, emptyState } from '../ui.js';

const SEVERITIES = ['critical', 'major', 'minor', 'warning'];
const SAMPLE_MS = 2000;

function tile(label, id) {
  return h('div', { class: 'tile' }, h('div', { class: 'tile-label', text: label }), h('div', { class: 'tile-value', id, text: '—' }));
}

export async function renderOverview(main, ctx) {
  const rate = h('div', { class: 'chart', id: 'rate-chart' });
  const alarms = h('div', { class: 'severities', id: 'alarm-counts' });
  const writers = h('div', { id: 'writers' });
  const busiest = h('div', { id: 'busiest' });
  const problems = h('div');
  main.append(
    h('h1', { text: 'Fleet overview' }),
    problems,
    h('section', { class: 'tiles' },
      tile('Registered devices', 'registered'), tile('Connected', 'connected'), tile('Disabled', 'disabled'),
      tile('Messages/s', 'rate'), tile('Messages since start', 'messages')),
    h('section', { class: 'card' }, h('h2', { text: 'Messages per second (last 5 minutes)' }), rate),
    h('section', { class: 'card' }, h('h2', {}, 'Active alarms ', h('a', { href: '#/alarms', class: 'small' }, 'open the alarms console')), alarms),
    h('section', { class: 'card' }, h('h2', { text: 'Busiest devices' }), busiest),
    h('section', { class: 'card' }, h('h2', { text: 'Telemetry writers' }), writers),
  );
  const chart = new TimeChart(rate, 'messages/s', { windowMs: 5 * 60 * 1000, height: 120, sparkline: true });
  let last = null;
  let stopped = false;

  const set = (id, value) => { const el = document.getElementById(id); if (el) el.textContent = value; };

  async function sample() {
    try {
      const stats = await api.get('/stats');
      const now = Date.now();
      set('registered', fmtNumber(stats.devices.registered));
      set('connected', fmtNumber(stats.devices.connected));
      set('disabled', fmtNumber(stats.devices.disabled));
      set('messages', fmtNumber(stats.telemetry.messages));
      if (last && stats.telemetry.messages >= last.messages) {
        const perSecond = (stats.telemetry.messages - last.messages) / ((now - last.at) / 1000);
        set('rate', fmtNumber(Math.round(perSecond * 10) / 10));
        chart.push(now, perSecond);
      }
      last = { at: now, messages: stats.telemetry.messages };
      if (stats.devices.registered === 0) {
        clear(problems, emptyState('No devices yet.', 'Register one on the Devices page, or run `drover-load simulate` against this server.'));
      } else problems.replaceChildren();
    } catch (error) {
      if (error.status !== 401) clear(problems, note('error', errorText(error)));
    }
  }

  async function countAlarms() {
    try {
      const { alerts } = await api.get(`/api/alerts${api.query({ active: true, limit: 1000 })}`);
      const counts = Object.fromEntries(SEVERITIES.map((s) => [s, 0]));
      for (const alarm of alerts) counts[alarm.severity] = (counts[alarm.severity] || 0) + 1;
      clear(alarms, SEVERITIES.map((s) => h('a', { class: `severity sev-${s}`, href: '#/alarms', 'data-severity': s },
        h('span', { class: 'count', text: String(counts[s]) }), h('span', { text: s }))));
      if (alerts.length === 0) alarms.append(h('p', { class: 'muted', text: 'No active alarms. Rules open alarms when their condition holds.' }));
    } catch (error) {
      if (error.status !== 401) clear(alarms, note('error', errorText(error)));
    }
  }

  async function loadBusiest() {
    try {
      const ranking = await api.get(`/stats/busiest-devices${api.query({ limit: 10 })}`);
      if (ranking.devices.length === 0) {
        clear(busiest, h('p', { class: 'muted', text: ranking.running
          ? `No telemetry in the last ${fmtNumber(ranking.windowSeconds, 's')} from the ${fmtNumber(ranking.running)} device(s) active recently.`
          : 'No device is sending telemetry. Connect one, or run `drover-load simulate` against this server.' }));
        return;
      }
      const top = ranking.devices[0].messagesPerSecond || 1;
      clear(busiest, h('div', { class: 'table-wrap' }, h('table', { id: 'busiest-devices' },
        h('caption', { class: 'muted', text: `Telemetry messages per second over the last ${fmtNumber(ranking.windowSeconds, 's')}` }),
        h('thead', {}, h('tr', {}, ['Device', 'Messages/s', ''].map((t) => h('th', { scope: 'col', text: t })))),
        h('tbody', {}, ranking.devices.map((d) => h('tr', { 'data-device': d.deviceId },
          h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.deviceId)}`, text: d.deviceId })),
          h('td', { class: 'num', text: fmtNumber(d.messagesPerSecond, 'msg/s') }),
          h('td', { class: 'bar-cell' }, h('meter', { min: 0, max: top, value: d.messagesPerSecond, 'aria-label': `${d.deviceId}: ${d.messagesPerSecond} messages per second` }))))))));
    } catch (error) {
      if (error.status !== 401) clear(busiest, note('error', errorText(error)));
    }
  }

  async function loadWriters() {
    if (!ctx.me.platformAdmin) {
      clear(writers, h('p', { class: 'muted', text: 'Writer queues and the spool are shown to platform administrators.' }));
      return;
    }
    try {
      const tree = await api.get('/admin/actors');
      const rows = (tree.writers || []).map((w) => h('tr', {},
        h('td', { text: String(w.index) }), h('td', { text: `${fmtNumber(w.queuedPoints)} / ${fmtNumber(w.queuePoints)}` }),
        h('td', { text: fmtNumber(w.heldPoints) }), h('td', { text: fmtNumber(w.batchesWritten) }),
        h('td', { text: w.lastWriteMs == null ? '—' : `${fmtNumber(w.lastWriteMs)} ms` })));
      clear(writers,
        h('p', {}, tree.spooling ? h('strong', { class: 'warn-text', text: 'Spooling: the telemetry store is unavailable. ' }) : 'Writing to the store. ',
          `Spool: ${fmtNumber(tree.spool?.points ?? 0)} points in ${fmtNumber(tree.spool?.batches ?? 0)} batches.`),
        h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, ['Writer', 'Queued points', 'Held', 'Batches', 'Last write'].map((t) => h('th', { scope: 'col', text: t })))),
          h('tbody', {}, rows))));
    } catch (error) {
      if (error.status !== 401) clear(writers, note('error', errorText(error)));
    }
  }

  clear(busiest, h('p', { class: 'muted', text: 'Measuring…' }));
  await Promise.all([sample(), countAlarms(), loadWriters()]);
  // The first ranking takes a second to measure: the page does not wait for it.
  loadBusiest();
  const timers = [setInterval(sample, SAMPLE_MS), setInterval(loadWriters, 5000), setInterval(loadBusiest, 5000)];
  let recount = null;
  const offAlarm = live.on('alarm', () => {
    if (stopped || recount) return;
    recount = setTimeout(() => { recount = null; countAlarms(); }, 300);
  });
  // After a reconnect, alarms that changed meanwhile are counted again.
  const offOpen = live.on('open', countAlarms);
  return () => {
    stopped = true;
    timers.forEach(clearInterval);
    clearTimeout(recount);
    offAlarm();
    offOpen();
    chart.destroy();
  };
}
