// The REST API: the login token lives in sessionStorage (one tab, gone with it). A 401 that says
// the token is no longer good sends the user to sign-in, remembering where they were. A platform
// admin may act in another tenant: every request then names it (X-Tenant-Id, and ?tenant= on the
// live stream); the server refuses that to anyone else.

const TOKEN = 'drover.token';
const EXPIRES = 'drover.expires';
const RETURN = 'drover.return';
const TENANT = 'drover.tenant';

export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

export function token() {
  const value = sessionStorage.getItem(TOKEN);
  const expires = Number(sessionStorage.getItem(EXPIRES) || 0);
  if (!value || (expires && Date.now() >= expires)) return null;
  return value;
}

export function expiresAt() {
  return Number(sessionStorage.getItem(EXPIRES) || 0);
}

export function storeLogin(answer) {
  sessionStorage.setItem(TOKEN, answer.token);
  sessionStorage.setItem(EXPIRES, String(Date.parse(answer.expiresAt) || 0));
}

export function forget() {
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(EXPIRES);
  sessionStorage.removeItem(TENANT);
}

/// The tenant a platform admin chose to act in (null: their own).
export function actingTenant() {
  return sessionStorage.getItem(TENANT);
}

export function setActingTenant(tenant) {
  if (tenant) sessionStorage.setItem(TENANT, tenant);
  else sessionStorage.removeItem(TENANT);
}

/// Back to sign-in; `keep` remembers the page to return to afterwards.
export function toSignIn(keep = true) {
  const here = location.hash;
  forget();
  if (keep && here && !here.startsWith('#/signin')) sessionStorage.setItem(RETURN, here);
  if (location.hash !== '#/signin') location.hash = '#/signin';
}

export function takeReturn() {
  const back = sessionStorage.getItem(RETURN);
  sessionStorage.removeItem(RETURN);
  return back || '#/';
}

const SIGNED_OUT = new Set(['token_expired', 'token_revoked', 'invalid_token', 'unauthenticated']);

function authHeaders(accept) {
  const headers = { Accept: accept };
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  const tenant = actingTenant();
  if (tenant) headers['X-Tenant-Id'] = tenant;
  return headers;
}

/// An image (or any non-JSON body) with the bearer token: `{status, blob}`; network failures
/// answer status 0. Images cannot be loaded by URL since <img> sends no Authorization.
export async function blob(path, accept = 'image/svg+xml') {
  try {
    const response = await fetch(path, { headers: authHeaders(accept) });
    return { status: response.status, blob: response.ok ? await response.blob() : null };
  } catch {
    return { status: 0, blob: null };
  }
}

export async function api(method, path, body) {
  const headers = authHeaders('application/json');
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network', 'The server cannot be reached.');
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    if (response.status === 401 && (SIGNED_OUT.has(error.code) || !error.code) && path !== '/api/auth/login') {
      toSignIn(true);
    }
    throw new ApiError(response.status, error.code, error.message, data);
  }
  return data;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body);
export const patch = (path, body) => api('PATCH', path, body);
export const del = (path) => api('DELETE', path);

/// A query string from an object, leaving out empty values.
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') search.append(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}
