// Notification channels (the Rules page's second half): the tenant's named webhook, email and
// SMS destinations that rule actions name. Admins create, edit (JSON, the server's validation
// messages shown as it words them), test (one real notification) and delete them; everyone else
// reads the list. Secrets are write-only: the list says whether one is set.

import * as api from '../api.js';
import { h, clear, note, errorText, dialog, emptyState } from '../ui.js';

const TEMPLATE = { name: 'ops-webhook', type: 'webhook', url: 'https://alerts.example.com/drover', secret: 'shared-hmac-key' };

function destination(c) {
  if (c.type === 'webhook') return c.url || '—';
  return (c.to || []).join(', ') || '—';
}

/// Renders the channels section into `box`; returns its cleanup.
export function renderChannels(box, ctx, rulesUsing) {
  const canWrite = ctx.me.role === 'admin';
  const list = h('div', { id: 'channel-list' });
  const editor = h('div', { id: 'channel-editor' });
  const message = h('div', { id: 'channel-message', 'aria-live': 'polite' });
  clear(box,
    h('div', { class: 'title-row' }, h('h2', { text: 'Notification channels' }),
      canWrite ? h('button', { type: 'button', id: 'channel-new', onclick: () => edit(null) }, 'New channel') : null),
    h('p', { class: 'muted small' }, 'A rule action names a channel with {"type": "webhook", "channel": "<name>"}.'),
    message, editor, list);

  async function load() {
    try {
      const { channels } = await api.get('/api/channels');
      show(channels);
    } catch (error) {
      if (error.status !== 401) clear(list, note('error', errorText(error)));
    }
  }

  function show(channels) {
    if (channels.length === 0) {
      clear(list, emptyState('No channels yet.', canWrite
        ? 'Create one with "New channel", then name it in a rule\'s actions.'
        : 'An admin can create webhook, email and SMS channels for rules to notify.'));
      return;
    }
    const used = rulesUsing();
    clear(list, h('div', { class: 'table-wrap' }, h('table', { id: 'channels' },
      h('thead', {}, h('tr', {}, ['Name', 'Type', 'Destination', 'Secret', 'Used by', canWrite ? 'Actions' : null]
        .filter((t) => t !== null).map((t) => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, channels.map((c) => h('tr', { 'data-channel': c.name },
        h('td', { text: c.name }), h('td', { text: c.type }), h('td', { class: 'wrap mono', text: destination(c) }),
        h('td', { text: c.secretSet ? 'set' : '—' }),
        h('td', { class: 'wrap', text: (used.get(c.name) || []).join(', ') || '—' }),
        canWrite ? h('td', { class: 'actions' },
          h('button', { type: 'button', class: 'small', 'data-action': 'test', onclick: () => test(c) }, 'Test'),
          h('button', { type: 'button', class: 'small', 'data-action': 'edit', onclick: () => edit(c) }, 'Edit'),
          h('button', { type: 'button', class: 'small danger', 'data-action': 'delete', onclick: () => remove(c) }, 'Delete')) : null))))));
  }

  function edit(c) {
    const body = c ? Object.fromEntries(Object.entries(c).filter(([k]) => !['id', 'secretSet', 'createdAt', 'updatedAt'].includes(k))) : TEMPLATE;
    const text = h('textarea', { id: 'channel-json', rows: 9, class: 'mono', spellcheck: 'false', 'aria-label': 'Channel (JSON)' });
    text.value = JSON.stringify(body, null, 2);
    const problems = h('div', { id: 'channel-problems', 'aria-live': 'polite' });
    const save = async () => {
      let parsed;
      try { parsed = JSON.parse(text.value); } catch (e) { clear(problems, note('error', `Not JSON: ${e.message}`)); return; }
      try {
        if (c) await api.patch(`/api/channels/${encodeURIComponent(c.id)}`, parsed);
        else await api.post('/api/channels', parsed);
        editor.replaceChildren();
        clear(message, note('ok', c ? `Channel ${parsed.name} saved.` : `Channel ${parsed.name} created.`));
        load();
      } catch (error) {
        clear(problems, note('error', errorText(error)));
      }
    };
    clear(editor, h('section', { class: 'card inset' },
      h('h3', { text: c ? `Edit ${c.name}` : 'New channel' }),
      h('p', { class: 'muted small' }, 'name, type (webhook, email or sms), url (webhook), to (recipients), from and accountSid (sms), timeoutMs, secret (write-only: left out, the stored one is kept).'),
      text, problems,
      h('div', { class: 'actions-row' },
        h('button', { type: 'button', onclick: () => editor.replaceChildren() }, 'Cancel'),
        h('button', { type: 'button', class: 'primary', id: 'channel-save', onclick: save }, c ? 'Save' : 'Create'))));
    text.focus();
  }

  async function test(c) {
    clear(message, note('info', `Sending a test notification through ${c.name}…`));
    try {
      const answer = await api.post(`/api/channels/${encodeURIComponent(c.id)}/test`);
      clear(message, note(answer.delivered ? 'ok' : 'error',
        answer.delivered ? `Test notification delivered through ${c.name}: ${answer.detail}` : `Test notification through ${c.name} failed: ${answer.detail}`));
    } catch (error) {
      clear(message, note('error', errorText(error)));
    }
  }

  async function remove(c) {
    const answer = await dialog(`Delete channel ${c.name}?`,
      h('p', {}, 'Rule actions that name it fail from now on (recorded in their alarms\' delivery log).'),
      [{ label: 'Cancel', value: 'cancel' }, { label: 'Delete', value: 'delete', class: 'danger', testid: 'confirm-channel-delete' }]);
    if (answer !== 'delete') return;
    try {
      await api.del(`/api/channels/${encodeURIComponent(c.id)}`);
      clear(message, note('ok', `Channel ${c.name} deleted.`));
      load();
    } catch (error) {
      clear(message, note('error', errorText(error)));
    }
  }

  load();
  return { reload: load };
}
