// Devices: filters (type, tag, group, status, one metadata key=value) kept in the address so a
// reload or a return from sign-in keeps them, cursor paging, live dots for the devices on
// screen, registration (the token shown once) and deletion with confirmation.

import * as api from '../api.js';
import * as live from '../live.js';
import { h, clear, note, errorText, fmtAge, dialog, emptyState, statusDot } from '../ui.js';

const PAGE = 50;
const REFRESH_MS = 15000;

function readFilters() {
  const query = location.hash.split('?')[1] || '';
  return Object.fromEntries(new URLSearchParams(query));
}

export async function renderDevices(main, ctx) {
  const filters = readFilters();
  const field = (name, label, attrs = {}) => {
    const input = h('input', { id: `filter-${name}`, name, value: filters[name] || '', ...attrs });
    return [h('label', { for: `filter-${name}` }, label), input];
  };
  const status = h('select', { id: 'filter-status', name: 'status' },
    ['', 'online', 'offline', 'disabled'].map((s) => h('option', { value: s, selected: filters.status === s }, s || 'any')));
  const form = h('form', { class: 'filters', role: 'search', onsubmit: (event) => {
    event.preventDefault();
    const data = Object.fromEntries([...new FormData(form)].filter(([, v]) => v !== ''));
    // In the address (for reload and return from sign-in) without running the route again.
    history.replaceState(null, '', `#/devices${api.query(data)}`);
    load(null);
  } },
  h('div', { class: 'field' }, field('type', 'Type')),
  h('div', { class: 'field' }, field('tag', 'Tag')),
  h('div', { class: 'field' }, field('group', 'Group')),
  h('div', { class: 'field' }, h('label', { for: 'filter-status' }, 'Status'), status),
  h('div', { class: 'field' }, field('meta', 'Metadata', { placeholder: 'key=value' })),
  h('button', { type: 'submit', id: 'apply-filters' }, 'Filter'));

  const goto = h('form', { class: 'goto', onsubmit: (event) => {
    event.preventDefault();
    const id = goto.elements.deviceId.value.trim();
    if (id) location.hash = `#/devices/${encodeURIComponent(id)}`;
  } }, h('label', { for: 'goto-id' }, 'Open device by id'), h('input', { id: 'goto-id', name: 'deviceId' }), h('button', { type: 'submit' }, 'Open'));

  const list = h('div', { id: 'device-list', 'aria-live': 'polite' });
  const pager = h('div', { class: 'pager' });
  const message = h('div');
  main.append(
    h('div', { class: 'title-row' }, h('h1', { text: 'Devices' }),
      ctx.me.canWrite ? h('button', { type: 'button', class: 'primary', id: 'register-open', onclick: () => register() }, 'Register a device') : null),
    form, goto, message, list, pager);

  let cursors = [null]; // the `after` of each page shown so far
  let page = 0;
  let unwatch = () => {};
  let rows = new Map();
  let stopped = false;

  function params(after) {
    const f = readFilters();
    const p = { type: f.type, tag: f.tag, group: f.group, status: f.status, limit: PAGE, after };
    if (f.meta && f.meta.includes('=')) {
      const [key, ...rest] = f.meta.split('=');
      p[`metadata.${key.trim()}`] = rest.join('=').trim();
    }
    return p;
  }

  async function load(after, quiet = false) {
    if (!quiet && after === null) { cursors = [null]; page = 0; }
    let answer;
    try {
      answer = await api.get(`/api/devices${api.query(params(after))}`);
    } catch (error) {
      if (error.status !== 401) clear(message, note('error', errorText(error)));
      return;
    }
    if (stopped) return;
    message.replaceChildren();
    show(answer);
  }

  function show({ devices, total, next }) {
    unwatch();
    rows = new Map();
    if (devices.length === 0) {
      const filtered = Object.values(readFilters()).some(Boolean);
      clear(list, filtered
        ? emptyState('No device matches these filters.', 'Clear a filter to see more.')
        : emptyState('No devices yet.', ctx.me.canWrite ? 'Register one with the button above, or run `drover-load simulate` against this server.' : 'An operator can register devices, or run `drover-load simulate` against this server.'));
    } else {
      const body = h('tbody', {}, devices.map((d) => {
        const dot = statusDot(d.connected, d.status);
        const seen = h('td', { text: fmtAge(d.lastSeenAt) });
        const row = h('tr', { 'data-device': d.deviceId },
          h('td', {}, dot),
          h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.deviceId)}`, text: d.deviceId })),
          h('td', { text: d.type }),
          h('td', { text: d.tags.join(', ') }),
          h('td', { text: d.groups.join(', ') }),
          seen,
          ctx.me.canWrite ? h('td', {}, h('button', { type: 'button', class: 'danger small', 'data-action': 'delete', 'aria-label': `Delete ${d.deviceId}`, onclick: () => remove(d.deviceId) }, 'Delete')) : null);
        rows.set(d.deviceId, { dot, seen, device: d });
        return row;
      }));
      clear(list, h('div', { class: 'table-wrap' }, h('table', { id: 'devices' },
        h('caption', { class: 'muted', text: `${total} device(s)` }),
        h('thead', {}, h('tr', {}, ['', 'Device', 'Type', 'Tags', 'Groups', 'Last seen', ctx.me.canWrite ? '' : null].filter((x) => x !== null).map((t) => h('th', { scope: 'col', text: t })))),
        body)));
      unwatch = live.watch(devices.map((d) => d.deviceId));
    }
    clear(pager,
      h('button', { type: 'button', disabled: page === 0, onclick: () => { page -= 1; load(cursors[page], true); } }, '← Previous'),
      h('span', { class: 'muted', text: `Page ${page + 1} of ${Math.max(1, Math.ceil(total / PAGE))}` }),
      h('button', { type: 'button', id: 'next-page', disabled: !next, onclick: () => { page += 1; cursors[page] = next; load(next, true); } }, 'Next →'));
  }

  // A reading from a device on screen: it is online now.
  const offTelemetry = live.on('telemetry', (frame) => {
    const row = rows.get(frame.deviceId);
    if (!row) return;
    row.dot.className = 'dot on';
    row.dot.setAttribute('aria-label', 'online');
    row.seen.textContent = fmtAge(Date.now());
  });

  async function register() {
    const message = h('div');
    const form = h('form', { id: 'register-form', class: 'stack' },
      h('label', { for: 'reg-id' }, 'Device id'), h('input', { id: 'reg-id', name: 'deviceId', required: true, maxlength: 128 }),
      h('label', { for: 'reg-type' }, 'Type'), h('input', { id: 'reg-type', name: 'type', required: true, maxlength: 64 }),
      h('label', { for: 'reg-tags' }, 'Tags (comma separated)'), h('input', { id: 'reg-tags', name: 'tags' }),
      h('label', { for: 'reg-meta' }, 'Metadata (JSON object, optional)'), h('textarea', { id: 'reg-meta', name: 'metadata', rows: 3, placeholder: '{"location": "warehouse-a"}' }),
      message);
    const box = h('dialog', { class: 'dialog', 'aria-label': 'Register a device' }, h('h2', { text: 'Register a device' }), form,
      h('div', { class: 'actions' },
        h('button', { type: 'button', onclick: () => box.close() }, 'Cancel'),
        h('button', { type: 'button', class: 'primary', id: 'register-submit', onclick: submit }, 'Register')));
    async function submit() {
      const data = new FormData(form);
      const body = { deviceId: String(data.get('deviceId')).trim(), type: String(data.get('type')).trim() };
      const tags = String(data.get('tags')).split(',').map((t) => t.trim()).filter(Boolean);
      if (tags.length) body.tags = tags;
      const meta = String(data.get('metadata')).trim();
      if (meta) {
        try { body.metadata = JSON.parse(meta); } catch (e) { clear(message, note('error', `Metadata is not JSON: ${e.message}`)); return; }
      }
      try {
        const answer = await api.post('/api/devices/register', body);
        box.close();
        await showToken(answer.device.deviceId, answer.token);
        load(null);
      } catch (error) {
        clear(message, note('error', errorText(error)));
      }
    }
    box.addEventListener('close', () => box.remove());
    document.body.append(box);
    box.showModal();
  }

  async function showToken(id, token) {
    const value = h('input', { id: 'device-token', readonly: true, value: token, class: 'mono', 'aria-label': 'Device token' });
    const copied = h('span', { 'aria-live': 'polite', class: 'muted' });
    await dialog(`${id} registered`, h('div', { class: 'stack' },
      h('p', {}, 'This is the device\'s token: its MQTT password (username = device id) and HTTP bearer token. It is shown only now.'),
      value,
      h('button', { type: 'button', onclick: async () => {
        value.select();
        try { await navigator.clipboard.writeText(token); copied.textContent = 'Copied.'; } catch { copied.textContent = 'Select the text and copy it.'; }
      } }, 'Copy'), copied),
    [{ label: 'Done', value: 'ok', class: 'primary', testid: 'token-done' }]);
  }

  async function remove(id) {
    const answer = await dialog(`Delete ${id}?`,
      h('p', {}, 'Its credentials, tags, metadata, memberships and shadow are deleted and it is disconnected. Its telemetry and alarms are kept.'),
      [{ label: 'Cancel', value: 'cancel' }, { label: 'Delete', value: 'delete', class: 'danger', testid: 'confirm-delete' }]);
    if (answer !== 'delete') return;
    try {
      await api.del(`/api/devices/${encodeURIComponent(id)}`);
      load(cursors[page], true);
    } catch (error) {
      clear(message, note('error', errorText(error)));
    }
  }

  await load(null);
  const timer = setInterval(() => load(cursors[page], true), REFRESH_MS);
  // After a reconnect, statuses that changed meanwhile are read again.
  const offOpen = live.on('open', () => load(cursors[page], true));
  return () => {
    stopped = true;
    clearInterval(timer);
    offOpen();
    offTelemetry();
    unwatch();
  };
}
