// The alarms console: active alarms (or all recent ones) with filters, kept current by the live
// stream; operators acknowledge and clear them here.

import * as api from '../api.js';
import * as live from '../live.js';
import { h, clear, note, errorText, fmtAge, fmtTime, fmtNumber, emptyState, severityBadge, dialog } from '../ui.js';

const SEVERITY_ORDER = { critical: 0, major: 1, minor: 2, warning: 3 };

export async function renderAlarms(main, ctx) {
  const severity = h('select', { id: 'alarm-severity' }, ['', 'critical', 'major', 'minor', 'warning'].map((s) => h('option', { value: s }, s || 'any')));
  const scope = h('select', { id: 'alarm-scope' }, h('option', { value: 'active' }, 'active'), h('option', { value: 'all' }, 'active and cleared'));
  const deviceFilter = h('input', { id: 'alarm-device', placeholder: 'device id' });
  const message = h('div');
  const list = h('div', { id: 'alarm-list', 'aria-live': 'polite' });
  main.append(h('h1', { text: 'Alarms' }),
    h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); load(); } },
      h('div', { class: 'field' }, h('label', { for: 'alarm-scope' }, 'Show'), scope),
      h('div', { class: 'field' }, h('label', { for: 'alarm-severity' }, 'Severity'), severity),
      h('div', { class: 'field' }, h('label', { for: 'alarm-device' }, 'Device'), deviceFilter),
      h('button', { type: 'submit' }, 'Filter')),
    message, list);

  let alarms = new Map();
  let stopped = false;

  const matches = (a) => (!severity.value || a.severity === severity.value)
    && (scope.value === 'all' || a.active)
    && (!deviceFilter.value.trim() || a.deviceId === deviceFilter.value.trim());

  async function load() {
    const params = { limit: 500, severity: severity.value, deviceId: deviceFilter.value.trim() };
    if (scope.value === 'active') params.active = true;
    try {
      const { alerts } = await api.get(`/api/alerts${api.query(params)}`);
      if (stopped) return;
      alarms = new Map(alerts.map((a) => [a.id, a]));
      message.replaceChildren();
      render();
    } catch (error) {
      if (error.status !== 401) clear(message, note('error', errorText(error)));
    }
  }

  async function act(alarm, action) {
    try {
      const answer = await api.post(`/api/alerts/${encodeURIComponent(alarm.id)}/${action}`);
      const updated = answer && answer.id ? answer : answer?.alert;
      if (updated) alarms.set(updated.id, updated);
      render();
    } catch (error) {
      clear(message, note('error', errorText(error)));
    }
  }

  async function history(alarm) {
    let detail;
    try {
      detail = await api.get(`/api/alerts/${encodeURIComponent(alarm.id)}`);
    } catch (error) {
      clear(message, note('error', errorText(error)));
      return;
    }
    const events = detail.events.map((e) => h('tr', {}, h('td', { text: fmtTime(e.at) }), h('td', { text: e.kind }), h('td', { text: e.actor || '—' }), h('td', { class: 'wrap', text: e.message })));
    const deliveries = detail.deliveries.map((d) => h('tr', {}, h('td', { text: fmtTime(d.at) }), h('td', { text: `${d.channel} (${d.kind})` }), h('td', { class: 'num', text: String(d.step) }), h('td', { class: 'num', text: String(d.attempts) }), h('td', { text: d.outcome }), h('td', { class: 'wrap', text: d.detail })));
    const table = (id, heads, rows, empty) => (rows.length ? h('div', { class: 'table-wrap' }, h('table', { id }, h('thead', {}, h('tr', {}, heads.map((t) => h('th', { scope: 'col', text: t })))), h('tbody', {}, rows))) : h('p', { class: 'muted', text: empty }));
    await dialog(`${alarm.ruleName} on ${alarm.deviceId}`, h('div', { class: 'stack wide', id: 'alarm-history' },
      h('h3', { text: 'History' }), table('alarm-events', ['At', 'Event', 'By', 'Message'], events, 'No events.'),
      h('h3', { text: 'Notifications' }), table('alarm-deliveries', ['At', 'Channel', 'Step', 'Attempts', 'Outcome', 'Detail'], deliveries, 'The rule notifies no channel.')),
    [{ label: 'Close', value: 'ok', class: 'primary', testid: 'history-close' }]);
  }

  function render() {
    const shown = [...alarms.values()].filter(matches)
      .sort((a, b) => (a.active === b.active ? 0 : a.active ? -1 : 1)
        || (SEVERITY_ORDER[a.severity] ?? 9) - (SEVERITY_ORDER[b.severity] ?? 9)
        || Date.parse(b.lastSeen) - Date.parse(a.lastSeen));
    if (shown.length === 0) {
      clear(list, emptyState(scope.value === 'active' ? 'No active alarms.' : 'No alarms.', 'Alarms open when a rule\'s condition holds; create rules with POST /api/rules (see the README).'));
      return;
    }
    clear(list, h('div', { class: 'table-wrap' }, h('table', { id: 'alarms' },
      h('thead', {}, h('tr', {}, ['Severity', 'Device', 'Rule', 'State', 'Value', 'Count', 'Age', ''].map((t) => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, shown.map((a) => h('tr', { 'data-alarm': a.id, 'data-status': a.status },
        h('td', {}, severityBadge(a.severity)),
        h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(a.deviceId)}`, text: a.deviceId })),
        h('td', { text: a.ruleName }),
        h('td', { class: 'state', text: a.status }),
        h('td', { class: 'num', text: fmtNumber(a.value) }),
        h('td', { class: 'num', text: String(a.count) }),
        h('td', { title: fmtTime(a.firstSeen), text: fmtAge(a.firstSeen) }),
        h('td', { class: 'actions' },
          h('button', { type: 'button', class: 'small', 'data-action': 'history', onclick: () => history(a) }, 'History'),
          ctx.me.canWrite && !a.acknowledged ? h('button', { type: 'button', class: 'small', 'data-action': 'ack', onclick: () => act(a, 'ack') }, 'Acknowledge') : null,
          ctx.me.canWrite && a.active ? h('button', { type: 'button', class: 'small', 'data-action': 'clear', onclick: () => act(a, 'clear') }, 'Clear') : null)))))));
  }

  const offAlarm = live.on('alarm', (frame) => {
    alarms.set(frame.alarm.id, frame.alarm);
    render();
  });
  // After a reconnect, alarm changes made meanwhile are read again.
  const offOpen = live.on('open', load);
  await load();
  const ages = setInterval(render, 30000);
  return () => { stopped = true; offAlarm(); offOpen(); clearInterval(ages); };
}
