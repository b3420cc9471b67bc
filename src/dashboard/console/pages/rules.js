// Rules: the list with their evaluation figures, enable/disable, and an editor for a rule's
// JSON body that shows the server's validation messages, with an expression error marked at the
// line and column the server reports; below, the notification channels rules name.

import * as api from '../api.js';
import { h, clear, note, errorText, fmtNumber, emptyState, severityBadge } from '../ui.js';
import { renderChannels } from './channels.js';

const TEMPLATE = {
  name: 'High temperature',
  severity: 'major',
  metric: 'temperature',
  condition: 'temperature > 30',
  clear: 'temperature < 25',
  actions: [],
};

/// `{field, line, column}` from a message such as `condition (line 1, column 15): …`.
export function expressionPosition(message) {
  const m = /^([A-Za-z.]+) \(line (\d+), column (\d+)\)/.exec(message || '');
  return m ? { field: m[1], line: Number(m[2]), column: Number(m[3]) } : null;
}

function expressionText(body, field) {
  let value = body;
  for (const part of field.split('.')) value = value && typeof value === 'object' ? value[part] : undefined;
  if (value && typeof value === 'object' && typeof value.expression === 'string') return value.expression;
  return typeof value === 'string' ? value : null;
}

function channels(rule) {
  const names = new Set();
  for (const action of rule.actions || []) names.add(action.channel || action.type);
  for (const step of rule.escalation || []) for (const action of step.actions || []) names.add(action.channel || action.type);
  return [...names].join(', ') || '—';
}

export async function renderRules(main, ctx) {
  const list = h('div', { id: 'rule-list' });
  const editorBox = h('div', { id: 'rule-editor' });
  const message = h('div');
  const channelBox = h('section', { class: 'card', id: 'channels-section' });
  main.append(
    h('div', { class: 'title-row' }, h('h1', { text: 'Rules' }),
      ctx.me.canWrite ? h('button', { type: 'button', class: 'primary', id: 'rule-new', onclick: () => edit(null) }, 'New rule') : null),
    message, editorBox, list, channelBox);
  // Which rules name each channel, for the channel list.
  let usage = new Map();
  const channelNames = (rule) => {
    const names = new Set();
    for (const action of rule.actions || []) if (action.channel) names.add(action.channel);
    for (const step of rule.escalation || []) for (const action of step.actions || []) if (action.channel) names.add(action.channel);
    return names;
  };

  async function load() {
    try {
      const { rules } = await api.get('/api/rules');
      usage = new Map();
      for (const r of rules) for (const name of channelNames(r.rule)) usage.set(name, [...(usage.get(name) || []), r.rule.name]);
      show(rules);
    } catch (error) {
      if (error.status !== 401) clear(message, note('error', errorText(error)));
    }
  }

  function show(rules) {
    if (rules.length === 0) {
      clear(list, emptyState('No rules yet.', ctx.me.canWrite ? 'Create one with "New rule": a condition on a device\'s telemetry opens an alarm.' : 'An operator can create rules.'));
      return;
    }
    clear(list, h('div', { class: 'table-wrap' }, h('table', { id: 'rules' },
      h('thead', {}, h('tr', {}, ['Name', 'Severity', 'State', 'Evaluations', 'Fired', 'Skipped', 'Errors', 'Last error', 'Notifies', ctx.me.canWrite ? 'Actions' : null]
        .filter((t) => t !== null).map((t) => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, rules.map((r) => h('tr', { 'data-rule': r.id },
        h('td', { text: r.rule.name }),
        h('td', {}, severityBadge(r.rule.severity || 'major')),
        h('td', { class: r.stats.status === 'stopped' ? 'warn-text' : '', text: r.rule.enabled === false ? 'disabled' : r.stats.status }),
        h('td', { class: 'num', text: fmtNumber(r.stats.evaluations) }),
        h('td', { class: 'num', text: fmtNumber(r.stats.matches) }),
        h('td', { class: 'num', text: fmtNumber(r.stats.skipped) }),
        h('td', { class: 'num', text: fmtNumber(r.stats.errors) }),
        h('td', { class: 'wrap', text: r.stats.lastError || '—' }),
        h('td', { text: channels(r.rule) }),
        ctx.me.canWrite ? h('td', { class: 'actions' },
          h('button', { type: 'button', class: 'small', 'data-action': 'toggle', onclick: () => toggle(r) }, r.rule.enabled === false ? 'Enable' : 'Disable'),
          h('button', { type: 'button', class: 'small', 'data-action': 'edit', onclick: () => edit(r) }, 'Edit')) : null))))));
  }

  async function toggle(r) {
    try {
      await api.patch(`/api/rules/${encodeURIComponent(r.id)}`, { enabled: r.rule.enabled === false });
      load();
    } catch (error) {
      clear(message, note('error', errorText(error)));
    }
  }

  function edit(r) {
    const body = r ? { ...r.rule } : TEMPLATE;
    delete body.id;
    const text = h('textarea', { id: 'rule-json', rows: 14, class: 'mono', spellcheck: 'false', 'aria-label': 'Rule (JSON)' });
    text.value = JSON.stringify(body, null, 2);
    const problems = h('div', { id: 'rule-problems', 'aria-live': 'polite' });
    const save = async () => {
      let parsed;
      try { parsed = JSON.parse(text.value); } catch (e) { clear(problems, note('error', `Not JSON: ${e.message}`)); return; }
      try {
        if (r) await api.patch(`/api/rules/${encodeURIComponent(r.id)}`, parsed);
        else await api.post('/api/rules', parsed);
        editorBox.replaceChildren();
        clear(message, note('ok', r ? 'Rule saved.' : 'Rule created.'));
        load();
      } catch (error) {
        const at = expressionPosition(error.message);
        const source = at && expressionText(parsed, at.field);
        const lines = source ? source.split('\n') : [];
        clear(problems, note('error', errorText(error)),
          at && lines[at.line - 1] !== undefined
            ? h('pre', { class: 'marker', id: 'rule-marker' }, `${at.field}, line ${at.line}:\n${lines[at.line - 1]}\n${' '.repeat(Math.max(0, at.column - 1))}^`)
            : null);
      }
    };
    clear(editorBox, h('section', { class: 'card' },
      h('h2', { text: r ? `Edit ${r.rule.name}` : 'New rule' }),
      h('p', { class: 'muted small' }, 'The body of POST /api/rules: name, severity, scope, metric, condition, clear, actions, escalation, notify (see the README).'),
      text, problems,
      h('div', { class: 'actions-row' },
        h('button', { type: 'button', onclick: () => editorBox.replaceChildren() }, 'Cancel'),
        h('button', { type: 'button', class: 'primary', id: 'rule-save', onclick: save }, r ? 'Save' : 'Create'))));
    text.focus();
  }

  await load();
  renderChannels(channelBox, ctx, () => usage);
  const timer = setInterval(load, 10000);
  return () => clearInterval(timer);
}
