// DOM helpers: elements are built with textContent, never from HTML strings, so nothing the
// server returns (device ids, metadata, rule names) can become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 3 });

export function fmtTime(value) {
  if (!value) return '—';
  const date = value instanceof Date ? value : new Date(value);
  return Number.isNaN(date.getTime()) ? '—' : timeFormat.format(date);
}

export function fmtNumber(value, unit) {
  if (typeof value !== 'number') return value === undefined || value === null ? '—' : String(value);
  return unit ? `${numberFormat.format(value)} ${unit}` : numberFormat.format(value);
}

export function fmtAge(value) {
  if (!value) return '—';
  const seconds = Math.max(0, Math.round((Date.now() - new Date(value).getTime()) / 1000));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d`;
}

export function errorText(error) {
  if (!error) return '';
  if (error.code && error.message) return `${error.message} (${error.code})`;
  return error.message || String(error);
}

/// A message box under a form: `kind` is error, ok or info.
export function note(kind, text) {
  return h('p', { class: `note ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
}

/// A modal dialog; resolves with the value of the button pressed (or null when dismissed).
export function dialog(title, body, buttons) {
  return new Promise((resolve) => {
    const box = h('dialog', { class: 'dialog', 'aria-label': title },
      h('h2', { text: title }),
      body,
      h('div', { class: 'actions' }, buttons.map((b) => h('button', {
        type: 'button', class: b.class || '', 'data-value': b.value, 'data-testid': b.testid,
        onclick: () => { box.close(b.value); },
      }, b.label))));
    box.addEventListener('close', () => {
      const value = box.returnValue;
      box.remove();
      resolve(value && value !== 'cancel' ? value : null);
    });
    document.body.append(box);
    box.showModal();
  });
}

export function emptyState(title, ...lines) {
  return h('div', { class: 'empty' }, h('p', { class: 'empty-title', text: title }), lines.map((l) => h('p', {}, l)));
}

export function severityBadge(severity) {
  return h('span', { class: `badge sev-${severity}`, text: severity });
}

export function statusDot(online, label) {
  return h('span', { class: `dot ${online ? 'on' : 'off'}`, role: 'img', 'aria-label': label || (online ? 'online' : 'offline'), title: label || (online ? 'online' : 'offline') });
}
