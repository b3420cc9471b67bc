// The tab's one WebSocket to /ws. Pages ask for the devices they show (counted, so two views of
// one device share it); after a reconnect the session subscribes again to what is still wanted.
// Reconnects back off from 0.5 s to 15 s with jitter. `lagged` frames and lost connections are
// reported to the status listeners, which show them as a banner.

import { token, actingTenant } from './api.js';

const listeners = { alarm: new Set(), telemetry: new Set(), status: new Set(), open: new Set() };
const wanted = new Map(); // deviceId -> count
let socket = null;
let attempt = 0;
let timer = null;
let stopped = true;
let state = 'idle';
let flushQueued = false;

export function on(kind, fn) {
  listeners[kind].add(fn);
  return () => listeners[kind].delete(fn);
}

function emit(kind, value) {
  for (const fn of listeners[kind]) {
    try { fn(value); } catch (e) { console.error(e); }
  }
}

function setState(next, detail) {
  state = next;
  emit('status', { state: next, ...detail });
}

export function status() { return state; }

export function start() {
  stopped = false;
  if (!socket) connect();
}

/// Opens a new session (after the acting tenant changed): subscriptions follow.
export function restart() {
  const was = !stopped;
  stop();
  if (was) start();
}

export function stop() {
  stopped = true;
  clearTimeout(timer);
  if (socket) {
    const s = socket;
    socket = null;
    s.close(1000);
  }
  setState('idle');
}

function connect() {
  const current = token();
  if (stopped || !current) return;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const tenant = actingTenant();
  const ws = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(current)}${tenant ? `&tenant=${encodeURIComponent(tenant)}` : ''}`);
  socket = ws;
  setState(attempt ? 'reconnecting' : 'connecting');
  ws.onopen = () => {
    if (socket !== ws) return;
    attempt = 0;
    // A new session watches nothing yet: subscribe again to what the pages want.
    sent = new Set();
    pending = 0;
    document.body.dataset.watching = '';
    setState('open');
    sendSubscriptions();
    emit('open');
  };
  ws.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    switch (frame.type) {
      case 'alarm': emit('alarm', frame); break;
      case 'telemetry': emit('telemetry', frame); break;
      case 'lagged': setState('lagged', { stream: frame.stream, missed: frame.missed }); setState('open'); break;
      case 'error':
        answered();
        // A device deleted meanwhile refuses the whole request: ask again without it.
        if (frame.code === 'unknown_device' && Array.isArray(frame.devices)) {
          for (const id of frame.devices) { wanted.delete(id); sent.delete(id); }
          for (const id of wanted.keys()) sent.delete(id);
          queueFlush();
        }
        break;
      case 'subscribed':
        answered();
        // What the session watches once every request is answered, readable by people
        // debugging and by the browser tests.
        if (pending === 0) document.body.dataset.watching = frame.all ? '*' : frame.devices.join(' ');
        break;
      default: break; // hello: nothing to show
    }
  };
  ws.onclose = () => {
    if (socket !== ws) return;
    socket = null;
    if (stopped) return;
    attempt += 1;
    const delay = Math.min(15000, 500 * 2 ** Math.min(attempt - 1, 5)) * (0.75 + Math.random() * 0.5);
    setState('reconnecting', { inMs: delay });
    timer = setTimeout(connect, delay);
  };
}

// What this session was asked to watch (a new session starts with nothing).
let sent = new Set();
// Requests sent and not answered yet (each is answered once, in order).
let pending = 0;

function answered() {
  pending = Math.max(0, pending - 1);
  document.body.dataset.watchPending = String(pending);
}

function request(body) {
  pending += 1;
  document.body.dataset.watchPending = String(pending);
  socket.send(JSON.stringify(body));
}

function sendSubscriptions() {
  flushQueued = false;
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  const gone = [...sent].filter((id) => !wanted.has(id));
  const fresh = [...wanted.keys()].filter((id) => !sent.has(id)).slice(0, 1000 - (sent.size - gone.length));
  if (gone.length) request({ type: 'unsubscribe', devices: gone });
  if (fresh.length) request({ type: 'subscribe', devices: fresh });
  for (const id of gone) sent.delete(id);
  for (const id of fresh) sent.add(id);
}

function queueFlush() {
  if (flushQueued) return;
  flushQueued = true;
  queueMicrotask(sendSubscriptions);
}

/// Watches the telemetry of `devices` until the returned function is called.
export function watch(devices) {
  const list = [...new Set(devices)];
  let added = false;
  for (const id of list) {
    wanted.set(id, (wanted.get(id) || 0) + 1);
    if (wanted.get(id) === 1) added = true;
  }
  if (added) queueFlush();
  return () => {
    let removed = false;
    for (const id of list) {
      const n = (wanted.get(id) || 0) - 1;
      if (n <= 0) { wanted.delete(id); removed = true; } else wanted.set(id, n);
    }
    if (removed) queueFlush();
  };
}
