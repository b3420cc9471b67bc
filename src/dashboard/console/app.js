// The console's shell: hash routes (the server serves one page), the signed-in user, the live
// stream's banner, and each page's start and stop.

import * as api from './api.js';
import * as live from './live.js';
import { h, clear, note, errorText } from './ui.js';
import { renderSignIn } from './pages/signin.js';
import { renderOverview } from './pages/overview.js';
import { renderDevices } from './pages/devices.js';
import { renderDevice } from './pages/device.js';
import { renderAlarms } from './pages/alarms.js';
import { renderRules } from './pages/rules.js';
import { renderAdmin } from './pages/admin.js';

const routes = [
  { pattern: /^#\/signin$/, page: renderSignIn, nav: null, public: true },
  { pattern: /^#?\/?$/, page: renderOverview, nav: 'overview' },
  { pattern: /^#\/devices$/, page: renderDevices, nav: 'devices' },
  { pattern: /^#\/devices\/([^/]+)$/, page: renderDevice, nav: 'devices' },
  { pattern: /^#\/alarms$/, page: renderAlarms, nav: 'alarms' },
  { pattern: /^#\/rules$/, page: renderRules, nav: 'rules' },
  { pattern: /^#\/admin$/, page: renderAdmin, nav: 'admin' },
];

let me = null;
let cleanup = null;
let expiryTimer = null;
let bannerTimer = null;
let generation = 0;

const main = () => document.getElementById('main');

function banner(text, kind = 'warn', forMs = 0) {
  const el = document.getElementById('banner');
  clearTimeout(bannerTimer);
  if (!text) { el.hidden = true; el.textContent = ''; return; }
  el.hidden = false;
  el.className = `banner ${kind}`;
  el.textContent = text;
  if (forMs) bannerTimer = setTimeout(() => banner(null), forMs);
}

live.on('status', (s) => {
  document.body.dataset.live = s.state;
  if (s.state === 'reconnecting') banner('Live updates interrupted: reconnecting…', 'warn');
  else if (s.state === 'lagged') banner(`Live ${s.stream} fell behind: ${s.missed} update(s) skipped. Figures may be incomplete until the next refresh.`, 'warn', 10000);
  else if (s.state === 'open' && document.getElementById('banner').textContent.startsWith('Live updates interrupted')) banner('Live updates resumed.', 'ok', 3000);
});

async function loadMe() {
  if (me) return me;
  try {
    me = await api.get('/api/auth/me');
  } catch (error) {
    // The tenant a platform admin was acting in is gone: back to their own.
    if (error.status === 404 && api.actingTenant()) {
      api.setActingTenant(null);
      live.restart();
      me = await api.get('/api/auth/me');
    } else throw error;
  }
  const role = me.role;
  me.canWrite = role === 'operator' || role === 'admin';
  document.body.dataset.role = role;
  document.body.dataset.tenant = me.tenant;
  document.querySelector('[data-nav="admin"]').hidden = role !== 'admin';
  clear(document.getElementById('who'), `${me.name} · ${role}${me.platformAdmin ? '' : ` · ${me.tenant}`}`);
  await showTenants();
  return me;
}

// Platform admins choose the tenant they act in; everyone else sees their own.
async function showTenants() {
  const box = document.getElementById('tenant-box');
  const select = document.getElementById('tenant-switch');
  box.hidden = !me.platformAdmin;
  if (!me.platformAdmin) return;
  let tenants = [];
  try { ({ tenants } = await api.get('/api/tenants')); } catch { tenants = [{ id: me.tenant }]; }
  clear(select, tenants.map((t) => h('option', { value: t.id, selected: t.id === me.tenant }, t.name && t.name !== t.id ? `${t.name} (${t.id})` : t.id)));
  select.value = me.tenant;
}

document.getElementById('tenant-switch').addEventListener('change', (event) => {
  const tenant = event.target.value;
  api.setActingTenant(tenant);
  me = null;
  live.restart();
  banner(`Now acting in tenant ${tenant}.`, 'ok', 3000);
  // Another tenant's pages: start from its overview.
  if ((location.hash || '#/') === '#/') route(); else location.hash = '#/';
});

function scheduleExpiry() {
  clearTimeout(expiryTimer);
  const at = api.expiresAt();
  if (at) expiryTimer = setTimeout(() => { signOut(true); }, Math.max(0, at - Date.now()));
}

function signOut(keepPlace) {
  me = null;
  live.stop();
  clearTimeout(expiryTimer);
  api.toSignIn(keepPlace);
}

export async function route() {
  const mine = ++generation;
  if (cleanup) { try { cleanup(); } catch (e) { console.error(e); } cleanup = null; }
  const hash = (location.hash || '#/').split('?')[0];
  const match = routes.map((r) => ({ r, m: hash.match(r.pattern) })).find((x) => x.m);
  const header = document.getElementById('top');
  if (!match) { location.hash = '#/'; return; }
  if (!match.r.public && !api.token()) { signOut(true); return; }
  header.hidden = !!match.r.public;
  for (const link of document.querySelectorAll('[data-nav]')) {
    if (link.dataset.nav === match.r.nav) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const el = main();
  try {
    const ctx = { params: match.m.slice(1).map(decodeURIComponent), banner, rerender: route };
    if (!match.r.public) {
      ctx.me = await loadMe();
      live.start();
      scheduleExpiry();
    } else {
      me = null;
      live.stop();
      banner(null);
    }
    if (mine !== generation) return;
    clear(el);
    const stop = (await match.r.page(el, ctx)) || null;
    // Another route started while this page loaded: stop it at once.
    if (mine !== generation) { if (stop) stop(); return; }
    cleanup = stop;
  } catch (error) {
    if (error.status === 401) return; // on its way to sign-in
    clear(el, h('h1', { text: 'Something went wrong' }), note('error', errorText(error)));
  }
}

document.getElementById('signout').addEventListener('click', () => signOut(false));
window.addEventListener('hashchange', route);
route();
