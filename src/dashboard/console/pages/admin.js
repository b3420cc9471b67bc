// Administration (tenant admins): users, API keys (the key shown once, revoke with
// confirmation) and the audit log; for platform admins also the live actor tree (every kind of
// actor: tenant supervisors and device actors, writers, services, rule actors, /ws sessions).

import * as api from '../api.js';
import { h, clear, note, errorText, fmtTime, fmtAge, fmtNumber, dialog } from '../ui.js';

const ROLES = ['viewer', 'operator', 'admin'];

function table(id, headings, rows) {
  return h('div', { class: 'table-wrap' }, h('table', { id },
    h('thead', {}, h('tr', {}, headings.map((t) => h('th', { scope: 'col', text: t })))),
    h('tbody', {}, rows)));
}

function roleSelect(id) {
  return h('select', { id, name: 'role' }, ROLES.map((r) => h('option', { value: r }, r)));
}

export async function renderAdmin(main, ctx) {
  if (ctx.me.role !== 'admin') {
    main.append(h('h1', { text: 'Administration' }), note('info', 'Administration needs the admin role.'));
    return null;
  }
  const users = h('div', { id: 'users' });
  const keys = h('div', { id: 'keys' });
  const audit = h('div', { id: 'audit' });
  const actors = h('div', { id: 'actors' });
  const message = h('div', { 'aria-live': 'polite' });

  const userForm = h('form', { class: 'filters', id: 'user-form', onsubmit: async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(userForm));
    try {
      await api.post('/api/users', data);
      userForm.reset();
      clear(message, note('ok', `User ${data.username} created.`));
      loadUsers();
    } catch (error) { clear(message, note('error', errorText(error))); }
  } },
  h('div', { class: 'field' }, h('label', { for: 'new-username' }, 'Username'), h('input', { id: 'new-username', name: 'username', required: true, maxlength: 64 })),
  h('div', { class: 'field' }, h('label', { for: 'new-password' }, 'Password'), h('input', { id: 'new-password', name: 'password', type: 'password', required: true, autocomplete: 'new-password', maxlength: 256 })),
  h('div', { class: 'field' }, h('label', { for: 'new-role' }, 'Role'), roleSelect('new-role')),
  h('button', { type: 'submit' }, 'Create user'));

  const keyForm = h('form', { class: 'filters', id: 'key-form', onsubmit: async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(keyForm));
    try {
      const answer = await api.post('/api/keys', data);
      keyForm.reset();
      loadKeys();
      const value = h('input', { id: 'new-key', readonly: true, value: answer.key, class: 'mono', 'aria-label': 'API key' });
      await dialog(`API key ${answer.apiKey.name}`, h('div', { class: 'stack' },
        h('p', {}, 'Send it as Authorization: Bearer <key>. It is shown only now.'), value),
      [{ label: 'Done', value: 'ok', class: 'primary', testid: 'key-done' }]);
    } catch (error) { clear(message, note('error', errorText(error))); }
  } },
  h('div', { class: 'field' }, h('label', { for: 'key-name' }, 'Name'), h('input', { id: 'key-name', name: 'name', required: true, maxlength: 128 })),
  h('div', { class: 'field' }, h('label', { for: 'key-role' }, 'Role'), roleSelect('key-role')),
  h('button', { type: 'submit' }, 'Create API key'));

  main.append(h('h1', { text: 'Administration' }), message,
    ctx.me.platformAdmin ? h('section', { class: 'card' }, h('h2', { text: 'Actors' }), actors) : null,
    h('section', { class: 'card' }, h('h2', { text: 'Users' }), userForm, users),
    h('section', { class: 'card' }, h('h2', { text: 'API keys' }), keyForm, keys),
    h('section', { class: 'card' }, h('h2', { text: 'Audit log (latest 50)' }), audit));

  async function guarded(el, fn) {
    try { await fn(); } catch (error) { if (error.status !== 401) clear(el, note('error', errorText(error))); }
  }

  const loadUsers = () => guarded(users, async () => {
    const answer = await api.get('/api/users');
    clear(users, table('user-table', ['Username', 'Role', 'State', 'Created'], answer.users.map((u) => h('tr', { 'data-user': u.username },
      h('td', { text: u.username + (u.platformAdmin ? ' (platform admin)' : '') }), h('td', { text: u.role }),
      h('td', { text: u.disabled ? 'disabled' : 'active' }), h('td', { text: fmtTime(u.createdAt) })))));
  });

  const loadKeys = () => guarded(keys, async () => {
    const answer = await api.get('/api/keys');
    if (answer.apiKeys.length === 0) { clear(keys, h('p', { class: 'muted', text: 'No API keys. Applications and load generators authenticate with one.' })); return; }
    clear(keys, table('key-table', ['Name', 'Role', 'Prefix', 'State', 'Created', ''], answer.apiKeys.map((k) => h('tr', { 'data-key': k.name },
      h('td', { text: k.name }), h('td', { text: k.role }), h('td', { class: 'mono', text: k.prefix }), h('td', { text: k.status }),
      h('td', { text: fmtTime(k.createdAt) }),
      h('td', {}, k.status === 'active' ? h('button', { type: 'button', class: 'danger small', 'data-action': 'revoke', onclick: () => revoke(k) }, 'Revoke') : null)))));
  });

  async function revoke(k) {
    const answer = await dialog(`Revoke ${k.name}?`, h('p', {}, 'Every request with this key is refused from now on.'),
      [{ label: 'Cancel', value: 'cancel' }, { label: 'Revoke', value: 'revoke', class: 'danger', testid: 'confirm-revoke' }]);
    if (answer !== 'revoke') return;
    try { await api.del(`/api/keys/${encodeURIComponent(k.id)}`); loadKeys(); } catch (error) { clear(message, note('error', errorText(error))); }
  }

  const loadAudit = () => guarded(audit, async () => {
    const answer = await api.get('/api/audit?limit=50');
    clear(audit, table('audit-table', ['At', 'Actor', 'Action', 'Target', 'Outcome'], answer.entries.map((e) => h('tr', {},
      h('td', { text: fmtTime(e.at) }), h('td', { text: e.actor }), h('td', { text: e.action }),
      h('td', { text: e.target || '—' }), h('td', { text: e.outcome })))));
  });

  // The live actor tree: one group per kind of actor the platform runs.
  const loadActors = () => guarded(actors, async () => {
    const tree = await api.get('/admin/actors');
    const num = (v) => h('td', { class: 'num', text: fmtNumber(v ?? 0) });
    const group = (id, title, summary, body) => h('details', { class: 'actor-group', id, open: true },
      h('summary', {}, h('strong', { text: title }), ' ', h('span', { class: 'muted', text: summary })), body);
    const state = (snapshot) => (snapshot && snapshot.state ? snapshot.state : null);
    const tenants = (tree.tenants || []).map((t) => h('tr', {},
      h('td', { text: t.tenant }), num(t.devices.length),
      num(t.devices.reduce((n, d) => n + d.restarts, 0)), num(t.restartsTotal),
      num(t.devices[0]?.mailboxCapacity), h('td', { text: fmtAge(t.startedAt) })));
    const writers = (tree.writers || []).map((w) => h('tr', {},
      h('td', { text: `writer ${w.index}` }), h('td', { class: 'num', text: `${fmtNumber(w.queuedPoints)} / ${fmtNumber(w.queuePoints)}` }),
      num(w.messagesHandled), num(w.batchesWritten), h('td', { text: fmtAge(w.startedAt) })));
    const router = tree.rules?.router || {};
    const workers = tree.rules?.workers || { tenants: [] };
    const queues = new Map((workers.tenants || []).map((q) => [q.tenant, q]));
    const ruleActors = (router.ruleActors || []).map((r) => h('tr', {},
      h('td', { text: `rules of ${r.tenant}` }), num(queues.get(r.tenant)?.queued), num(r.messagesHandled),
      num(r.dropped), num(r.mailboxCapacity), h('td', { text: fmtAge(r.startedAt) })));
    const alarm = tree.alarmService || {};
    const replayer = tree.replayer || {};
    const down = tree.downsampler || {};
    const sessions = (tree.sessions || []).map((s) => h('tr', { 'data-session': String(s.id) },
      h('td', { text: `#${s.id} ${s.principal}` }), h('td', { text: s.tenant }),
      h('td', { text: s.subscriptions.all ? 'all devices' : `${fmtNumber(s.subscriptions.devices)} device(s)` }),
      num(s.framesSent), num(s.framesSkipped), h('td', { class: 'num', text: fmtNumber(s.queuedBytes, 'B') }),
      h('td', { text: fmtAge(s.startedAt) })));
    const jobs = tree.jobRunner || {};
    const campaigns = tree.campaignRunner || {};
    const singles = [
      ['Rule router', state(router) || `${fmtNumber(router.messagesHandled)} events routed, mailbox ${fmtNumber(router.mailboxCapacity)}`, router.startedAt],
      ['Rule workers', `${fmtNumber(workers.threads)} thread(s), ${fmtNumber(workers.readyTenants)} tenant(s) waiting, slice ${fmtNumber(workers.sliceMs, 'ms')}`, null],
      ['Alarm service', state(alarm) || `${fmtNumber(alarm.messagesHandled)} batches, ${fmtNumber(alarm.signalsHandled)} signals, mailbox ${fmtNumber(alarm.mailboxCapacity)}`, alarm.startedAt],
      ['Spool replayer', state(replayer) || `${replayer.replaying ? 'replaying' : 'idle'}, ${fmtNumber(replayer.replayedBatches)} batches replayed${replayer.lastError ? `, last error: ${replayer.lastError}` : ''}`, replayer.startedAt],
      ['Batch job runner', state(jobs) || `${fmtNumber(jobs.running?.length)} job(s) running, ${fmtNumber(jobs.waiting?.length)} waiting (at most ${fmtNumber(jobs.maxRunning)} at once), ${fmtNumber(jobs.devicesDone)} device results, ${fmtNumber(jobs.completed)} completed, ${fmtNumber(jobs.cancelled)} cancelled`, null],
      ['Campaign runner', state(campaigns) || `${fmtNumber(campaigns.running?.length)} campaign(s) running${campaigns.driving ? '' : ' (driven by another node)'}, ${fmtNumber(campaigns.queuedReports)} report(s) queued, ${fmtNumber(campaigns.passes)} passes (last ${fmtNumber(campaigns.lastPassMs, 'ms')}), ${fmtNumber(campaigns.devicesNotified)} notified, ${fmtNumber(campaigns.devicesTimedOut)} timed out`, null],
      ['Downsampler', state(down) || `${fmtNumber(down.passes)} passes, ${fmtNumber(down.failures)} failed, every ${fmtNumber(down.intervalSecs, 's')}${down.lastError ? `, last error: ${down.lastError}` : ''}`, down.lastStartedAt],
    ].map(([name, text, at]) => h('tr', {}, h('td', { text: name }), h('td', { text }), h('td', { text: at ? fmtAge(at) : '—' })));
    clear(actors,
      group('actor-fleet', 'Fleet', `${fmtNumber(tenants.length)} tenant supervisor(s)`,
        table('tenant-actors', ['Tenant supervisor', 'Device actors', 'Device restarts', 'Restarts (total)', 'Device mailbox', 'Age'], tenants)),
      group('actor-writers', 'Telemetry', tree.spooling ? 'spooling: the telemetry store is unavailable' : 'writing to the store',
        h('div', {}, table('writer-actors', ['Telemetry writer', 'Queued / capacity', 'Messages', 'Batches', 'Age'], writers),
          h('p', { class: 'muted small', text: `Spool: ${fmtNumber(tree.spool?.points ?? 0)} points in ${fmtNumber(tree.spool?.batches ?? 0)} batches.` }))),
      group('actor-singletons', 'Services', 'one each per node',
        table('singleton-actors', ['Actor', 'State', 'Age / last pass'], singles)),
      group('actor-rules', 'Rule actors', `${fmtNumber(ruleActors.length)} tenant(s) with rules running`,
        ruleActors.length ? table('rule-actors', ['Rule actor', 'Queued', 'Events', 'Dropped', 'Mailbox', 'Age'], ruleActors)
          : h('p', { class: 'muted', text: 'No rule actor yet: one starts for a tenant at its first telemetry or rule change.' })),
      group('actor-sessions', 'Live sessions (/ws)', `${fmtNumber(sessions.length)} open`,
        table('session-actors', ['Session', 'Tenant', 'Watching', 'Frames sent', 'Skipped', 'Backlog', 'Age'], sessions)));
  });

  await Promise.all([loadUsers(), loadKeys(), loadAudit(), ctx.me.platformAdmin ? loadActors() : null]);
  const timer = ctx.me.platformAdmin ? setInterval(loadActors, 5000) : null;
  return () => clearInterval(timer);
}
