// Measures the dashboard against a running `punctual serve` (scripts/measure-dashboard drives it):
// loads PENDING scheduled tasks into queue QUEUE (due uniformly over the next 30 days, unless the
// queue already holds them), then prints, as medians of RUNS:
// - the timeline query (GET /v1/queues/QUEUE/timeline) for the dashboard's three ranges, timed by the client;
// - the time to first render of the overview and of the queue view in Debian's chromium, from
//   navigation start until the queue's row, or the timeline chart and the first task rows, are on screen.
'use strict';
const { chromium } = require('playwright-core');

const env = process.env;
const base = env.BASE_URL;
const queue = env.QUEUE || 'load';
const pending = Number(env.PENDING || 1000000);
const runs = Number(env.RUNS || 5);

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

async function load() {
  const have = await (await fetch(`${base}/v1/queues/${queue}`)).json();
  let next = have.scheduled || 0;
  if (next >= pending) return;
  const started = Date.now();
  const now = Date.now();
  const month = 30 * 86400000;
  const inFlight = new Set();
  let lastPrint = 0;
  while (next < pending) {
    const n = Math.min(1000, pending - next);
    const first = next;
    next += n;
    const tasks = [];
    for (let i = first; i < first + n; i++) {
      // Uniform over the month ahead, by a fixed permutation of i.
      const offset = 120000 + Math.floor(((i * 2654435761) % 4294967296) / 4294967296 * month);
      tasks.push({ id: `t${i}`, run_at_ms: undefined, delay_ms: offset - (Date.now() - now) });
    }
    const p = fetch(`${base}/v1/queues/${queue}/batch`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', prefer: 'return=minimal' },
      body: JSON.stringify({ tasks: tasks.map(({ id, delay_ms }) => ({ id, delay_ms: Math.max(0, delay_ms) })) }),
    }).then(async (r) => { if (!r.ok) throw new Error(`batch: ${r.status} ${await r.text()}`); await r.arrayBuffer(); });
    inFlight.add(p);
    p.finally(() => inFlight.delete(p));
    if (inFlight.size >= 8) await Promise.race(inFlight);
    if (Date.now() - lastPrint > 10000) {
      lastPrint = Date.now();
      console.error(`loading: ${next} of ${pending}`);
    }
  }
  await Promise.all(inFlight);
  console.error(`loaded ${pending} tasks in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

async function timeline() {
  const ranges = { hour: [60000, 60000, 60], day: [900000, 900000, 96], month: [3600000, 86400000, 30] };
  const out = {};
  for (const [name, [align, width, count]] of Object.entries(ranges)) {
    const times = [];
    let total = 0;
    for (let i = 0; i < runs * 4; i++) {
      const now = Date.now();
      const from = now - (now % align);
      const t0 = performance.now();
      const r = await fetch(`${base}/v1/queues/${queue}/timeline?from=${from}&to=${from + width * count}&buckets=${count}`);
      const body = await r.json();
      times.push(performance.now() - t0);
      total = body.total;
    }
    out[name] = { ms: median(times), total };
  }
  return out;
}

/**
 * Median time of a page of 25 tasks in due order and in id order (all states); and the slowest of
 * the single schedules sent every 20 ms while each listing ran (does a listing hold up commits?).
 */
async function listing() {
  const out = {};
  for (const [name, query, n] of [['due order', 'order=due', runs * 4], ['id order, all states', '', 3]]) {
    const times = [];
    let slowest = 0;
    let running = true;
    const probe = (async () => {
      while (running) {
        const t0 = performance.now();
        await (await fetch(`${base}/v1/queues/probe/tasks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"delay_ms": 3600000}' })).arrayBuffer();
        slowest = Math.max(slowest, performance.now() - t0);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      const r = await fetch(`${base}/v1/queues/${queue}/tasks?limit=25&${query}`);
      await r.json();
      times.push(performance.now() - t0);
    }
    running = false;
    await probe;
    out[name] = { ms: median(times), n, slowest };
  }
  return out;
}

async function firstRender(page, hash, selector) {
  const times = [];
  for (let i = 0; i < runs; i++) {
    await page.goto('about:blank');
    const t0 = Date.now();
    await page.goto(`${base}/ui/${hash}`);
    await page.waitForSelector(selector, { timeout: 120000 });
    times.push(Date.now() - t0);
  }
  return median(times);
}

(async () => {
  await load();
  const counts = await (await fetch(`${base}/v1/queues/${queue}`)).json();
  const tl = await timeline();
  const lists = await listing();
  const browser = await chromium.launch({ executablePath: env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox'] });
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 860 } })).newPage();
  const overview = await firstRender(page, '#/', `#queues tr[data-queue="${queue}"]`);
  // The queue view renders its chart and its task list together, once both answers are in.
  const queueView = await firstRender(page, `#/queue/${queue}`, '#tasks tbody tr');
  await browser.close();
  console.log(`pending in ${queue}: ${counts.scheduled} scheduled (${counts.total} tasks)`);
  for (const [name, { ms, total }] of Object.entries(tl)) console.log(`timeline, next ${name}: ${ms.toFixed(1)} ms (median of ${runs * 4}; ${total} due)`);
  for (const [name, { ms, n, slowest }] of Object.entries(lists)) {
    console.log(`task list page of 25, ${name}: ${ms.toFixed(1)} ms (median of ${n}); slowest schedule meanwhile: ${slowest.toFixed(1)} ms`);
  }
  console.log(`first render, overview: ${overview} ms (median of ${runs})`);
  console.log(`first render, queue view with its task list: ${queueView} ms (median of ${runs})`);
})().catch((e) => { console.error(e); process.exit(1); });
