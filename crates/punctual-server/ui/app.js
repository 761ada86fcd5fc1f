// The Punctual dashboard: plain JavaScript over the server's own /v1 API (docs/dashboard.md).
// No framework, no build step, no inline script (the page's CSP forbids it); charts by uPlot.
'use strict';

const TOKEN_KEY = 'punctual.token';
const STATES = ['scheduled', 'ready', 'leased', 'succeeded', 'dead'];
const POLL_MS = 2000;
const HISTORY = 300; // points kept by the live charts: 10 minutes at one every 2 s

// ---------------------------------------------------------------------------------------------
// Small helpers

/** Builds an element; text only (never HTML), so nothing from the API can inject markup. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmt = new Intl.NumberFormat();
const num = (n) => (n === undefined || n === null ? '–' : fmt.format(n));
const enc = encodeURIComponent;

function when(ms) {
  if (ms === undefined || ms === null) return '–';
  const d = new Date(ms);
  return d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

function relative(ms, now = Date.now()) {
  const s = Math.round((ms - now) / 1000);
  const a = Math.abs(s);
  const [v, u] = a < 90 ? [a, 's'] : a < 5400 ? [Math.round(a / 60), 'min'] : a < 172800 ? [Math.round(a / 3600), 'h'] : [Math.round(a / 86400), 'd'];
  return s >= 0 ? `in ${v} ${u}` : `${v} ${u} ago`;
}

function bytes(n) {
  if (n === undefined || n === null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function badge(state) { return h('span', { class: `badge ${state}` }, state); }

function say(message, kind) {
  const el = document.getElementById('status');
  el.textContent = message || '';
  el.className = kind === 'error' ? 'status error' : 'status';
}

// ---------------------------------------------------------------------------------------------
// The API, with the token asked for when the server wants one

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

let tokenAsked = null;

function askToken(wrong) {
  if (tokenAsked) return tokenAsked;
  const dialog = document.getElementById('token-dialog');
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  document.getElementById('token-error').textContent = wrong ? 'That token was not accepted.' : '';
  tokenAsked = new Promise((resolve) => {
    form.onsubmit = (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = '';
      dialog.close();
      tokenAsked = null;
      document.getElementById('sign-out').hidden = false;
      resolve();
    };
  });
  dialog.showModal();
  input.focus();
  return tokenAsked;
}

async function call(method, path, body, raw) {
  for (;;) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = `Bearer ${token}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (res.status === 401) {
      await askToken(Boolean(token));
      continue;
    }
    const text = await res.text();
    if (raw && res.ok) return text;
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!res.ok) {
      const err = data && data.error ? data.error : {};
      throw new ApiError(res.status, err.code || String(res.status), err.message || text || res.statusText);
    }
    return data;
  }
}

const api = {
  get: (p) => call('GET', p),
  post: (p, b) => call('POST', p, b === undefined ? {} : b),
  patch: (p, b) => call('PATCH', p, b),
  del: (p) => call('DELETE', p),
  text: (p) => call('GET', p, undefined, true),
};

function confirmAction(text) {
  const dialog = document.getElementById('confirm-dialog');
  document.getElementById('confirm-text').textContent = text;
  return new Promise((resolve) => {
    const done = (yes) => { dialog.close(); resolve(yes); };
    document.getElementById('confirm-form').onsubmit = (e) => { e.preventDefault(); done(true); };
    document.getElementById('confirm-cancel').onclick = () => done(false);
    dialog.oncancel = () => resolve(false);
    dialog.showModal();
    document.getElementById('confirm-cancel').focus();
  });
}

/** Runs one action per item, then says how many worked and what the first failure was. */
async function bulk(label, items, action) {
  let ok = 0;
  let failed = 0;
  let first = '';
  for (const item of items) {
    try { await action(item); ok++; } catch (e) { failed++; if (!first) first = e.message; }
  }
  say(`${label}: ${ok} done${failed ? `, ${failed} failed (${first})` : ''}.`, failed ? 'error' : undefined);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Live figures from /metrics (the Prometheus text), kept while the page is open

const live = { t: [], scheduled: [], delivered: [], acked: [], failed: [], p50: [], p99: [], last: null, snapshots: [], error: null, listeners: new Set() };

const COUNTERS = {
  scheduled: ['punctual_tasks_scheduled_total'],
  delivered: ['punctual_tasks_delivered_total'],
  acked: ['punctual_tasks_acked_total'],
  failed: ['punctual_tasks_nacked_total', 'punctual_leases_expired_total'],
};
const LATENESS = 'punctual_delivery_lateness_seconds_bucket';

function parseMetrics(text) {
  const sums = {};
  const buckets = new Map();
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const value = Number(m[3]);
    if (!Number.isFinite(value) && m[3] !== '+Inf') continue;
    if (m[1] === LATENESS) {
      const le = /le="([^"]+)"/.exec(m[2] || '');
      if (le) {
        const bound = le[1] === '+Inf' ? Infinity : Number(le[1]);
        buckets.set(bound, (buckets.get(bound) || 0) + value);
      }
    } else {
      sums[m[1]] = (sums[m[1]] || 0) + value;
    }
  }
  const counters = {};
  for (const [k, names] of Object.entries(COUNTERS)) counters[k] = names.reduce((a, n) => a + (sums[n] || 0), 0);
  return { counters, buckets: [...buckets.entries()].sort((a, b) => a[0] - b[0]) };
}

/** A quantile (ms) of the deliveries between two histogram snapshots, interpolated in its bucket. */
function quantile(q, newer, older) {
  const before = new Map(older);
  const rows = newer.map(([le, n]) => [le, n - (before.get(le) || 0)]);
  const total = rows.length ? rows[rows.length - 1][1] : 0;
  if (total <= 0) return null;
  const want = q * total;
  let prevLe = 0;
  let prevN = 0;
  for (const [le, n] of rows) {
    if (n >= want) {
      if (le === Infinity) return prevLe * 1000;
      const share = n === prevN ? 0 : (want - prevN) / (n - prevN);
      return (prevLe + (le - prevLe) * share) * 1000;
    }
    prevLe = le; prevN = n;
  }
  return prevLe * 1000;
}

async function pollMetrics() {
  try {
    const now = Date.now();
    const snap = { at: now, ...parseMetrics(await api.text('/metrics')) };
    const prev = live.last;
    live.last = snap;
    live.snapshots.push(snap);
    while (live.snapshots.length > 16) live.snapshots.shift();
    live.error = null;
    if (prev) {
      const dt = (snap.at - prev.at) / 1000;
      live.t.push(now / 1000);
      for (const k of Object.keys(COUNTERS)) live[k].push(Math.max(0, (snap.counters[k] - prev.counters[k]) / dt));
      // Lateness over the last ~30 s, so a quiet interval does not blank the line.
      const older = live.snapshots[0];
      live.p50.push(quantile(0.5, snap.buckets, older.buckets));
      live.p99.push(quantile(0.99, snap.buckets, older.buckets));
      for (const k of ['t', 'scheduled', 'delivered', 'acked', 'failed', 'p50', 'p99']) {
        while (live[k].length > HISTORY) live[k].shift();
      }
    }
  } catch (e) {
    live.error = e.message;
  }
  for (const f of live.listeners) f();
}

// ---------------------------------------------------------------------------------------------
// Charts

/** The width a chart's box has, or (before the view is on screen) about what it will have. */
function chartWidth(el) {
  const width = el.getBoundingClientRect().width || document.getElementById('main').clientWidth - 64;
  return Math.max(280, Math.floor(width) - 4);
}

function lineChart(el, title, series, data, yLabel) {
  const opts = {
    title,
    width: chartWidth(el),
    height: 220,
    scales: { x: { time: true } },
    legend: { live: false },
    axes: [{}, { label: yLabel, size: 60 }],
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: false }))],
  };
  return new uPlot(opts, data, el);
}

function barChart(el, title, xs, ys, yLabel) {
  const opts = {
    title,
    width: chartWidth(el),
    height: 240,
    scales: { x: { time: true } },
    legend: { live: false },
    axes: [{}, { label: yLabel, size: 60 }],
    series: [{}, { label: 'due', stroke: '#1f6feb', fill: '#1f6feb88', paths: uPlot.paths.bars({ size: [0.9, 60], align: 1 }), points: { show: false } }],
  };
  return new uPlot(opts, [xs, ys], el);
}

function keepSized(view, el, plot) {
  const resize = () => plot.setSize({ width: chartWidth(el), height: plot.height });
  window.addEventListener('resize', resize);
  // Views are built off screen: fit the chart to its box once the view is shown.
  requestAnimationFrame(resize);
  view.cleanup.push(() => { window.removeEventListener('resize', resize); plot.destroy(); });
}

// ---------------------------------------------------------------------------------------------
// Views

async function overview(view) {
  const [server, queues] = await Promise.all([api.get('/v1/server'), api.get('/v1/queues')]);
  const serverCards = h('div', { class: 'cards', id: 'server' },
    card('Store', server.store),
    card('Health', badge(server.status === 'ok' ? 'ok' : 'failing'), server.error),
    card('Disk used', bytes(server.disk_used_bytes), server.data_dir),
    card('Disk free', bytes(server.disk_free_bytes)),
    card('Up', relative(server.started_at_ms, server.now_ms).replace(' ago', ''), `version ${server.version}`));
  const rows = queues.queues.map((q) => h('tr', { 'data-queue': q.queue },
    h('td', {}, h('a', { href: `#/queue/${enc(q.queue)}` }, q.queue)),
    STATES.map((s) => h('td', { class: 'num', 'data-state': s }, s === 'dead' && q.dead ? h('a', { href: `#/queue/${enc(q.queue)}?state=dead` }, num(q[s])) : num(q[s]))),
    h('td', { class: 'num', 'data-state': 'total' }, num(q.total))));
  const table = h('div', { class: 'table-wrap' }, h('table', { id: 'queues' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Queue'), STATES.map((s) => h('th', { class: 'num' }, s)), h('th', { class: 'num' }, 'total'))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No queue holds a task yet.')))));
  const ratesEl = h('div', { class: 'chart', id: 'rates-chart' });
  const latenessEl = h('div', { class: 'chart', id: 'lateness-chart' });
  const note = h('p', { class: 'legend-note' });
  view.root.append(
    h('h1', {}, 'Overview'),
    serverCards,
    h('h2', {}, 'Queues'),
    table,
    h('h2', {}, 'Live'),
    h('div', { class: 'charts' }, h('div', { class: 'panel' }, ratesEl), h('div', { class: 'panel' }, latenessEl)),
    note);
  const rates = lineChart(ratesEl, 'Tasks per second', [['scheduled', '#1f6feb'], ['delivered', '#8250df'], ['acked', '#1a7f37'], ['failed', '#cf222e']], [[], [], [], [], []], 'per s');
  const lateness = lineChart(latenessEl, 'Delivery lateness (ms, last 30 s)', [['p50', '#1f6feb'], ['p99', '#cf222e']], [[], [], []], 'ms');
  keepSized(view, ratesEl, rates);
  keepSized(view, latenessEl, lateness);
  const update = () => {
    rates.setData([live.t, live.scheduled, live.delivered, live.acked, live.failed]);
    lateness.setData([live.t, live.p50, live.p99]);
    note.textContent = live.error
      ? `Live figures unavailable: ${live.error}`
      : `Since this page was opened, from /metrics every ${POLL_MS / 1000} s (${live.t.length} points). Lateness: how long after its due time a task was handed out.`;
  };
  update();
  live.listeners.add(update);
  view.cleanup.push(() => live.listeners.delete(update));
  view.every(5000, async () => {
    const fresh = await api.get('/v1/queues');
    for (const q of fresh.queues) {
      const row = table.querySelector(`tr[data-queue="${CSS.escape(q.queue)}"]`);
      if (!row) continue;
      for (const s of [...STATES, 'total']) {
        const cell = row.querySelector(`td[data-state="${s}"]`);
        if (cell && cell.textContent !== num(q[s])) cell.textContent = num(q[s]);
      }
    }
  });
}

function card(label, value, detail) {
  return h('div', { class: 'card' }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value), detail ? h('div', { class: 'muted mono' }, detail) : null);
}

const RANGES = {
  hour: { label: 'Next hour', align: 60_000, width: 60_000, count: 60 },
  day: { label: 'Next day', align: 900_000, width: 900_000, count: 96 },
  month: { label: 'Next 30 days', align: 3_600_000, width: 86_400_000, count: 30 },
};

async function queueView(view, queue, params) {
  const range = RANGES[params.get('range')] ? params.get('range') : 'day';
  // By default the scheduled tasks that come next (order=due: cheap however many are pending);
  // `all` and each state list by id.
  const state = [...STATES, 'all'].includes(params.get('state')) ? params.get('state') : '';
  const cursor = params.get('cursor') || '';
  const r = RANGES[range];
  const now = Date.now();
  const from = now - (now % r.align);
  const to = from + r.width * r.count;
  const base = `/v1/queues/${enc(queue)}`;
  const [counts, timeline, page] = await Promise.all([
    api.get(base),
    api.get(`${base}/timeline?from=${from}&to=${to}&buckets=${r.count}`),
    api.get(`${base}/tasks?limit=25${state === '' ? '&order=due' : state === 'all' ? '' : `&state=${state}`}${cursor ? `&cursor=${enc(cursor)}` : ''}`),
  ]);
  const link = (changes) => {
    const p = new URLSearchParams({ range, state, cursor, ...changes });
    for (const [k, v] of [...p.entries()]) if (!v) p.delete(k);
    const qs = p.toString();
    return `#/queue/${enc(queue)}${qs ? `?${qs}` : ''}`;
  };
  const chartEl = h('div', { class: 'chart', id: 'timeline-chart' });
  const seg = h('div', { class: 'seg', role: 'group', 'aria-label': 'Timeline range' },
    Object.entries(RANGES).map(([k, v]) => h('a', { href: link({ range: k }), 'aria-current': k === range ? 'true' : 'false' }, v.label)));
  view.root.append(
    h('p', { class: 'muted' }, h('a', { href: '#/' }, 'Overview'), ' / queue'),
    h('h1', {}, queue),
    h('div', { class: 'cards', id: 'counts' }, STATES.map((s) => card(s, num(counts[s])))),
    h('h2', {}, 'What is due'),
    h('div', { class: 'panel' }, seg,
      h('p', { class: 'legend-note', id: 'timeline-total' }, `${num(timeline.total)} scheduled tasks due ${r.label.toLowerCase()}`,
        timeline.resolution_ms > 1 ? ` (counted to within ${timeline.resolution_ms / 1000} s)` : ''),
      chartEl));
  const xs = timeline.buckets.map((b) => b.start_ms / 1000);
  const ys = timeline.buckets.map((b) => b.count);
  const plot = barChart(chartEl, `Scheduled tasks per ${r.width >= 86_400_000 ? 'day' : r.width >= 900_000 ? '15 min' : 'minute'}`, xs, ys, 'tasks');
  keepSized(view, chartEl, plot);

  // The task list: filter, find by id, page, and act on a selection.
  const stateSelect = h('select', { id: 'state-filter', onchange: () => { location.hash = link({ state: stateSelect.value, cursor: '' }); } },
    h('option', { value: '' }, 'scheduled, next due first'), h('option', { value: 'all', selected: state === 'all' }, 'all states, by id'),
    STATES.map((s) => h('option', { value: s, selected: s === state }, `${s}, by id`)));
  const idInput = h('input', { id: 'id-search', type: 'search', placeholder: 'task id', 'aria-label': 'Find a task by id' });
  const find = h('form', { class: 'toolbar', onsubmit: async (e) => {
    e.preventDefault();
    const id = idInput.value.trim();
    if (!id) return;
    try { await api.get(`${base}/tasks/${enc(id)}`); location.hash = `#/task/${enc(queue)}/${enc(id)}`; } catch (err) { say(err.status === 404 ? `No task ${id} in ${queue}.` : err.message, 'error'); }
  } }, h('label', {}, 'State', stateSelect), h('label', {}, 'Find by id', idInput), h('button', { type: 'submit' }, 'Find'));
  const tasks = page.tasks;
  const checks = tasks.map((t) => h('input', { type: 'checkbox', 'aria-label': `select ${t.id}`, 'data-id': t.id, onchange: () => refreshBar() }));
  const all = h('input', { type: 'checkbox', 'aria-label': 'select all on this page', onchange: () => { for (const c of checks) c.checked = all.checked; refreshBar(); } });
  const chosen = () => tasks.filter((_, i) => checks[i].checked);
  const runNow = h('button', { type: 'button', onclick: () => act('Run now', (t) => api.patch(`${base}/tasks/${enc(t.id)}`, { delay_ms: 0 })) }, 'Run now');
  const retry = h('button', { type: 'button', onclick: () => act('Retry', (t) => api.post(`${base}/tasks/${enc(t.id)}/retry`)) }, 'Retry');
  const cancel = h('button', { type: 'button', class: 'danger', onclick: async () => {
    const picked = chosen();
    if (await confirmAction(`Delete ${picked.length} task${picked.length === 1 ? '' : 's'} of ${queue}? This cannot be undone.`)) act('Delete', (t) => api.del(`${base}/tasks/${enc(t.id)}`));
  } }, 'Delete');
  const bar = h('div', { class: 'toolbar', id: 'bulk' }, h('span', { class: 'muted', id: 'selected' }, ''), runNow, retry, cancel);
  async function act(label, action) {
    const picked = chosen();
    if (picked.length && (await bulk(label, picked, action))) view.reload();
  }
  function refreshBar() {
    const picked = chosen();
    bar.querySelector('#selected').textContent = `${picked.length} selected`;
    runNow.disabled = !picked.some((t) => t.state === 'scheduled');
    retry.disabled = !picked.some((t) => t.state === 'dead');
    cancel.disabled = picked.length === 0;
  }
  refreshBar();
  const rows = tasks.map((t, i) => h('tr', { 'data-id': t.id },
    h('td', {}, checks[i]),
    h('td', { class: 'mono' }, h('a', { href: `#/task/${enc(queue)}/${enc(t.id)}` }, t.id)),
    h('td', {}, badge(t.state)),
    h('td', { title: t.run_at }, when(t.run_at_ms), h('div', { class: 'muted' }, relative(t.run_at_ms))),
    h('td', { class: 'num' }, `${t.attempt}/${t.max_attempts}`),
    h('td', { class: 'muted' }, t.last_error || '')));
  view.root.append(
    h('h2', {}, 'Tasks'),
    find,
    bar,
    h('div', { class: 'table-wrap' }, h('table', { id: 'tasks' },
      h('thead', {}, h('tr', {}, h('th', {}, all), h('th', {}, 'id'), h('th', {}, 'state'), h('th', {}, 'due'), h('th', { class: 'num' }, 'attempt'), h('th', {}, 'last error'))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, state && state !== 'all' ? `No ${state} tasks on this page.` : state === 'all' ? 'No tasks on this page.' : 'Nothing scheduled.'))))),
    h('div', { class: 'toolbar' },
      cursor ? h('a', { href: link({ cursor: '' }) }, 'First page') : null,
      page.next_cursor ? h('a', { href: link({ cursor: page.next_cursor }), id: 'next-page' }, 'Next page') : null));
  view.every(5000, async () => {
    const c = await api.get(base);
    const cards = view.root.querySelectorAll('#counts .value');
    STATES.forEach((s, i) => { if (cards[i]) cards[i].textContent = num(c[s]); });
  });
}

async function taskView(view, queue, id) {
  const base = `/v1/queues/${enc(queue)}/tasks/${enc(id)}`;
  let task;
  try { task = await api.get(base); } catch (e) {
    if (e.status !== 404) throw e;
    view.root.append(h('h1', {}, id), h('p', { class: 'error' }, `No task ${id} in queue ${queue}: it may have been deleted or purged after its retention.`), h('a', { href: `#/queue/${enc(queue)}` }, `Back to ${queue}`));
    return;
  }
  let payload = '';
  if (task.payload !== undefined) payload = JSON.stringify(task.payload, null, 2);
  const fields = [
    ['queue', h('a', { href: `#/queue/${enc(queue)}` }, queue)],
    ['state', badge(task.state)],
    ['due', `${when(task.run_at_ms)} (${relative(task.run_at_ms)}) · ${task.run_at}`],
    ['attempt', `${task.attempt} of ${task.max_attempts}`],
    ['backoff', task.backoff_ms ? task.backoff_ms.map((ms) => `${ms / 1000} s`).join(', ') : task.backoff ? JSON.stringify(task.backoff) : 'default'],
    ['last error', task.last_error || '–'],
    ['lease', task.lease_expires_at_ms ? `expires ${relative(task.lease_expires_at_ms)}` : task.lease_ms ? `${task.lease_ms} ms per attempt` : '–'],
    ['webhook', task.webhook ? task.webhook.url : '–'],
    ['created', when(task.created_at_ms)],
    ['updated', when(task.updated_at_ms)],
    ['purged', task.purge_at_ms ? when(task.purge_at_ms) : '–'],
  ];
  const picker = h('input', { type: 'datetime-local', id: 'reschedule-at', step: 1, 'aria-label': 'New due time (your local time)' });
  const local = new Date(Math.max(task.run_at_ms, Date.now()) - new Date().getTimezoneOffset() * 60000);
  picker.value = local.toISOString().slice(0, 19);
  const done = (label) => () => { say(`${label}: done.`); view.reload(); };
  const fail = (e) => say(e.message, 'error');
  const actions = h('div', { class: 'toolbar', id: 'task-actions' },
    task.state === 'scheduled' ? h('button', { type: 'button', id: 'run-now', onclick: () => api.patch(base, { delay_ms: 0 }).then(done('Run now'), fail) }, 'Run now') : null,
    ['scheduled', 'ready'].includes(task.state) ? h('form', { class: 'toolbar', onsubmit: (e) => {
      e.preventDefault();
      if (!picker.value) return;
      api.patch(base, { run_at: new Date(picker.value).toISOString() }).then(done('Rescheduled'), fail);
    } }, h('label', {}, 'Reschedule to', picker), h('button', { type: 'submit', id: 'reschedule' }, 'Reschedule')) : null,
    task.state === 'dead' ? h('button', { type: 'button', class: 'primary', id: 'retry', onclick: () => api.post(`${base}/retry`).then(done('Retry'), fail) }, 'Retry') : null,
    task.state !== 'leased' ? h('button', { type: 'button', class: 'danger', id: 'delete', onclick: async () => {
      if (!(await confirmAction(`Delete task ${id} of ${queue}? This cannot be undone.`))) return;
      api.del(base).then(() => { say(`Deleted ${id}.`); location.hash = `#/queue/${enc(queue)}`; }, fail);
    } }, 'Delete') : h('span', { class: 'muted' }, 'Leased: a consumer holds it until it acks, nacks or the lease runs out.'));
  view.root.append(
    h('p', { class: 'muted' }, h('a', { href: '#/' }, 'Overview'), ' / ', h('a', { href: `#/queue/${enc(queue)}` }, queue), ' / task'),
    h('h1', { class: 'mono' }, id),
    actions,
    h('div', { class: 'panel' }, h('dl', { class: 'fields', id: 'task-fields' }, fields.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]))),
    h('h2', {}, 'Payload'),
    task.payload === undefined ? h('p', { class: 'muted' }, 'No payload.') : h('pre', { class: 'payload', id: 'payload' }, payload));
}

async function deadView(view) {
  const queues = (await api.get('/v1/queues')).queues.filter((q) => q.dead > 0);
  const dead = [];
  for (const q of queues) {
    let cursor = '';
    do {
      const page = await api.get(`/v1/queues/${enc(q.queue)}/tasks?state=dead&limit=1000${cursor ? `&cursor=${enc(cursor)}` : ''}`);
      dead.push(...page.tasks);
      cursor = page.next_cursor || '';
    } while (cursor && dead.length < 5000);
  }
  const checks = dead.map((t) => h('input', { type: 'checkbox', 'aria-label': `select ${t.queue}/${t.id}`, onchange: () => refresh() }));
  const all = h('input', { type: 'checkbox', 'aria-label': 'select all', onchange: () => { for (const c of checks) c.checked = all.checked; refresh(); } });
  const chosen = () => dead.filter((_, i) => checks[i].checked);
  const path = (t) => `/v1/queues/${enc(t.queue)}/tasks/${enc(t.id)}`;
  const retry = h('button', { type: 'button', class: 'primary', id: 'retry-selected', onclick: async () => { if (await bulk('Retry', chosen(), (t) => api.post(`${path(t)}/retry`))) view.reload(); } }, 'Retry selected');
  const del = h('button', { type: 'button', class: 'danger', id: 'delete-selected', onclick: async () => {
    const picked = chosen();
    if (await confirmAction(`Delete ${picked.length} dead task${picked.length === 1 ? '' : 's'}? This cannot be undone.`) && (await bulk('Delete', picked, (t) => api.del(path(t))))) view.reload();
  } }, 'Delete selected');
  const count = h('span', { class: 'muted' });
  function refresh() {
    const n = chosen().length;
    count.textContent = `${n} of ${dead.length} selected`;
    retry.disabled = del.disabled = n === 0;
  }
  refresh();
  view.root.append(
    h('h1', {}, 'Dead letters'),
    h('p', { class: 'muted' }, 'Tasks that used up their attempts, across every queue. Retry makes one ready again with fresh attempts.'),
    h('div', { class: 'toolbar' }, count, retry, del),
    h('div', { class: 'table-wrap' }, h('table', { id: 'dead' },
      h('thead', {}, h('tr', {}, h('th', {}, all), h('th', {}, 'queue'), h('th', {}, 'id'), h('th', {}, 'attempts'), h('th', {}, 'last error'), h('th', {}, 'died'))),
      h('tbody', {}, dead.length ? dead.map((t, i) => h('tr', { 'data-id': t.id },
        h('td', {}, checks[i]),
        h('td', {}, h('a', { href: `#/queue/${enc(t.queue)}?state=dead` }, t.queue)),
        h('td', { class: 'mono' }, h('a', { href: `#/task/${enc(t.queue)}/${enc(t.id)}` }, t.id)),
        h('td', { class: 'num' }, `${t.attempt}/${t.max_attempts}`),
        h('td', { class: 'muted' }, t.last_error || ''),
        h('td', {}, relative(t.updated_at_ms)))) : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No dead tasks.'))))));
}

async function schedulesView(view) {
  const { schedules } = await api.get('/v1/schedules');
  const path = (s) => `/v1/queues/${enc(s.queue)}/schedules/${enc(s.name)}`;
  const action = (label, s, verb) => h('button', { type: 'button', 'data-action': verb, onclick: () => api.post(`${path(s)}/${verb}`).then(() => { say(`${label} ${s.queue}/${s.name}: done.`); view.reload(); }, (e) => say(e.message, 'error')) }, label);
  view.root.append(
    h('h1', {}, 'Schedules'),
    h('p', { class: 'muted' }, 'Recurring schedules of every queue (docs/schedules.md).'),
    h('div', { class: 'table-wrap' }, h('table', { id: 'schedules' },
      h('thead', {}, h('tr', {}, ['queue', 'name', 'rule', 'next runs', 'runs', 'state', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, schedules.length ? schedules.map((s) => h('tr', { 'data-name': s.name },
        h('td', {}, h('a', { href: `#/queue/${enc(s.queue)}` }, s.queue)),
        h('td', { class: 'mono' }, s.name),
        h('td', { class: 'mono' }, s.cron ? `${s.cron} (${s.timezone})` : `every ${s.every_ms / 1000} s`),
        h('td', {}, (s.next_runs || []).slice(0, 3).map((r) => h('div', {}, `${when(r.run_at_ms)} (${relative(r.run_at_ms)})`))),
        h('td', { class: 'num' }, num(s.occurrences_created)),
        h('td', {}, badge(s.paused ? 'paused' : 'ok')),
        h('td', {}, h('div', { class: 'toolbar' }, s.paused ? action('Resume', s, 'resume') : action('Pause', s, 'pause'), action('Trigger now', s, 'trigger'))))) :
        h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No schedules. Create one with PUT /v1/queues/{queue}/schedules/{name} or `punctual every`.'))))));
}

async function targetsView(view) {
  const { targets, now_ms: now } = await api.get('/v1/webhooks/targets');
  view.root.append(
    h('h1', {}, 'Webhook targets'),
    h('p', { class: 'muted' }, 'Hosts the webhook sender has delivered to since the server started: a host is backed off after 5 failures in a row, for 1 s doubling up to 60 s, then probed with one delivery.'),
    h('div', { class: 'table-wrap' }, h('table', { id: 'targets' },
      h('thead', {}, h('tr', {}, ['host', 'in flight', 'failures in a row', 'state', 'recent outcomes (newest last)'].map((c) => h('th', {}, c)))),
      h('tbody', {}, targets.length ? targets.map((t) => {
        const ok = t.recent.filter((r) => r.ok).length;
        return h('tr', {},
          h('td', { class: 'mono' }, t.host),
          h('td', { class: 'num' }, num(t.in_flight)),
          h('td', { class: 'num' }, num(t.failures_in_a_row)),
          h('td', {}, t.backed_off_until_ms ? [badge('failing'), ` backed off, probed ${relative(t.backed_off_until_ms, now)}`] : badge(t.failures_in_a_row ? 'paused' : 'ok')),
          h('td', {}, h('span', { class: 'dots', 'aria-label': `${ok} of ${t.recent.length} succeeded` }, t.recent.map((r) => h('span', { class: r.ok ? 'dot' : 'dot bad', title: `${when(r.at_ms)}: ${r.ok ? 'delivered' : 'failed'}` }))), ` ${ok}/${t.recent.length}`));
      }) : h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No webhook deliveries yet.'))))));
}

// ---------------------------------------------------------------------------------------------
// Routing: every view has its own URL (the part after #), so it can be shared

let current = null;

function route() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query] = hash.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || '');
  if (parts[0] === 'queue' && parts[1]) return { nav: 'overview', title: parts[1], render: (v) => queueView(v, parts[1], params) };
  if (parts[0] === 'task' && parts[1] && parts[2]) return { nav: 'overview', title: parts[2], render: (v) => taskView(v, parts[1], parts.slice(2).join('/')) };
  if (parts[0] === 'dead') return { nav: 'dead', title: 'Dead letters', render: deadView };
  if (parts[0] === 'schedules') return { nav: 'schedules', title: 'Schedules', render: schedulesView };
  if (parts[0] === 'targets') return { nav: 'targets', title: 'Webhook targets', render: targetsView };
  return { nav: 'overview', title: 'Overview', render: overview };
}

let rendered = 0;

/** Renders the view of the current URL; focus moves to it on a change of view, not at page load. */
async function render(keepStatus) {
  if (current) for (const f of current.cleanup) f();
  const r = route();
  const main = document.getElementById('main');
  const root = h('div', {});
  const view = {
    root,
    cleanup: [],
    reload: () => render(true),
    every(ms, f) {
      const id = setInterval(() => f().catch((e) => say(e.message, 'error')), ms);
      this.cleanup.push(() => clearInterval(id));
    },
  };
  current = view;
  if (!keepStatus) say('');
  for (const a of document.querySelectorAll('.top nav a')) {
    if (a.dataset.nav === r.nav) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  document.title = `${r.title} · Punctual`;
  try {
    await r.render(view);
  } catch (e) {
    root.append(h('h1', {}, r.title), h('p', { class: 'error', id: 'view-error' }, `Could not load this view: ${e.message}`));
  }
  if (current !== view) { for (const f of view.cleanup) f(); return; }
  // The view is shown whole, once its data is in: no empty page while it loads.
  main.replaceChildren(root);
  if (!keepStatus && rendered++ > 0) main.focus({ preventScroll: true });
}

function start() {
  document.getElementById('sign-out').hidden = !sessionStorage.getItem(TOKEN_KEY);
  document.getElementById('sign-out').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  window.addEventListener('hashchange', () => render(false));
  render(false);
  pollMetrics();
  setInterval(pollMetrics, POLL_MS);
}

start();
