// Drives the dashboard of a running `punctual serve` in Debian's chromium (playwright-core), as an
// operator would, for crates/punctual/tests/dashboard.rs. Any console error or warning, page error,
// failed request or CSP violation fails the run. Prints "OK" and exits 0 when every check passed.
//
// Environment: BASE_URL; MODE (open | token); TOKEN (token mode); SHOTS (a directory for screenshots);
// QUEUE, SCHEDULED (its scheduled tasks due within a day, as the API counts them), DEAD_ID (a dead task
// of QUEUE to retry from the dead-letter view); CHROMIUM (default /usr/bin/chromium).
'use strict';
const { chromium } = require('playwright-core');
const path = require('path');

const env = process.env;
const base = env.BASE_URL;
const shots = env.SHOTS;
const problems = [];

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

async function shot(page, name, fullPage = true) {
  if (!shots) return;
  // No focus ring in the pictures.
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage });
}

/** Pixels of a canvas that are not blank: a chart that drew something. */
async function inked(page, selector) {
  return page.$eval(selector, (canvas) => {
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
    return n;
  });
}

/** Pixels of a canvas close to a colour (the bars' blue). */
async function colored(page, selector, [r, g, b]) {
  return page.$eval(selector, (canvas, rgb) => {
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i + 3] > 0 && Math.abs(data[i] - rgb[0]) < 60 && Math.abs(data[i + 1] - rgb[1]) < 60 && Math.abs(data[i + 2] - rgb[2]) < 60) n++;
    }
    return n;
  }, [r, g, b]);
}

async function open(page) {
  // `/` redirects to the dashboard.
  const response = await page.goto(`${base}/`);
  check(new URL(page.url()).pathname === '/ui/', `/ redirects to /ui/ (at ${page.url()})`);
  const csp = response.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `a strict CSP (${csp})`);

  // Keyboard: on a fresh page the first Tab reaches the skip link.
  await page.keyboard.press('Tab');
  check(await page.evaluate(() => document.activeElement.classList.contains('skip')), 'Tab reaches the skip link first');

  // Overview: the queue and its counts, the server, the live charts.
  const queue = env.QUEUE;
  const row = `#queues tr[data-queue="${queue}"]`;
  await page.waitForSelector(row);
  const scheduled = await page.textContent(`${row} td[data-state="scheduled"]`);
  check(Number(scheduled.replace(/\D/g, '')) >= Number(env.SCHEDULED), `${queue} shows ${scheduled} scheduled, at least ${env.SCHEDULED}`);
  const dead = await page.textContent(`${row} td[data-state="dead"]`);
  check(dead.trim() === '1', `${queue} shows 1 dead (${dead})`);
  check((await page.textContent('#server')).includes('journal'), 'the server card names the store');
  await page.waitForSelector('#rates-chart canvas');
  // Three polls of /metrics make two points of each line.
  await page.waitForFunction(() => /\((\d+) points\)/.test(document.querySelector('.legend-note')?.textContent || '')
    && Number(/\((\d+) points\)/.exec(document.querySelector('.legend-note').textContent)[1]) >= 4, null, { timeout: 20000 });
  check((await inked(page, '#rates-chart canvas')) > 500, 'the rates chart drew its lines');
  await shot(page, 'overview');

  // Keyboard: Enter on a focused queue link opens the queue.
  // Queue: the timeline chart, over a day by default, and the task list.
  await page.focus(`${row} a`);
  await page.keyboard.press('Enter');
  await page.waitForSelector('#timeline-chart canvas');
  const total = await page.textContent('#timeline-total');
  check(Number(total.replace(/,/g, '').match(/\d+/)[0]) === Number(env.SCHEDULED), `the timeline counts ${env.SCHEDULED} due within a day (${total})`);
  check((await colored(page, '#timeline-chart canvas', [0x1f, 0x6f, 0xeb])) > 200, 'the timeline chart drew bars');
  // The list shows what comes next: scheduled tasks in due order.
  const dues = await page.$$eval('#tasks tbody td[title]', (tds) => tds.map((td) => td.getAttribute('title')));
  check(dues.length === 25, `a page of 25 tasks (${dues.length})`);
  check(dues.every((d, i) => i === 0 || dues[i - 1] <= d), `in due order (${dues.slice(0, 5)})`);
  await page.selectOption('#state-filter', 'dead');
  await page.waitForSelector(`#tasks tr[data-id="${env.DEAD_ID}"]`);
  check((await page.$$('#tasks tbody tr')).length === 1, 'the dead filter shows the one dead task');
  await page.selectOption('#state-filter', '');
  await page.waitForFunction(() => document.querySelectorAll('#tasks tbody tr').length === 25);
  await shot(page, 'queue', false);
  await page.click('.seg a:nth-child(3)');
  await page.waitForFunction(() => location.hash.includes('range=month') && document.querySelector('#timeline-total')?.textContent.includes('30 days'));
  await page.waitForSelector('#timeline-chart canvas');
  check((await colored(page, '#timeline-chart canvas', [0x1f, 0x6f, 0xeb])) > 200, 'the 30-day timeline drew bars');

  // Find a task by id; its page shows every field and the payload pretty-printed.
  await page.fill('#id-search', 'welcome-7');
  await page.press('#id-search', 'Enter');
  await page.waitForSelector('#task-fields');
  check((await page.textContent('#payload')).includes('"user": 7'), 'the payload is pretty-printed');
  const fields = await page.$$eval('#task-fields dt', (dts) => dts.map((d) => d.textContent));
  check(['state', 'due', 'attempt', 'last error'].every((f) => fields.includes(f)), `the task's fields are listed (${fields})`);
  check((await page.textContent('#task-fields')).includes('0 of 5'), 'attempts are shown');
  await shot(page, 'task');
  // Reschedule it with the date-time picker (the browser runs in UTC): the API shows the new time.
  await page.fill('#reschedule-at', '2027-01-04T10:30');
  await page.click('#reschedule');
  await page.waitForFunction(() => document.getElementById('status').textContent.includes('Rescheduled: done'));
  await page.waitForFunction(() => document.getElementById('task-fields')?.textContent.includes('2027-01-04T10:30:00.000Z'));

  // Dead letters: the dead task is listed; retry it with its button.
  await page.goto(`${base}/ui/#/dead`);
  const deadRow = `#dead tr[data-id="${env.DEAD_ID}"]`;
  await page.waitForSelector(deadRow);
  check((await page.textContent(deadRow)).includes('smtp said 550'), 'the dead task shows its last error');
  await shot(page, 'dead-letters');
  await page.check(`${deadRow} input[type=checkbox]`);
  await page.click('#retry-selected');
  await page.waitForFunction(() => document.getElementById('status').textContent.includes('Retry: 1 done'));
  await page.waitForSelector(deadRow, { state: 'detached' });
  // Delete another dead task, through the confirmation.
  const doomed = '#dead tr[data-id="bounce-43"]';
  await page.check(`${doomed} input[type=checkbox]`);
  await page.click('#delete-selected');
  await page.waitForSelector('#confirm-dialog[open]');
  check((await page.textContent('#confirm-text')).includes('Delete 1 dead task'), 'the confirmation says what goes');
  await page.click('#confirm-ok');
  await page.waitForFunction(() => document.getElementById('status').textContent.includes('Delete: 1 done'));
  await page.waitForSelector(doomed, { state: 'detached' });

  // Schedules and webhook targets.
  await page.goto(`${base}/ui/#/schedules`);
  await page.waitForSelector('#schedules tr[data-name="digest"]');
  await page.click('#schedules tr[data-name="digest"] button[data-action="pause"]');
  await page.waitForSelector('#schedules tr[data-name="digest"] button[data-action="resume"]');
  await shot(page, 'schedules');
  await page.goto(`${base}/ui/#/targets`);
  await page.waitForFunction(() => document.querySelectorAll('#targets tbody tr').length >= 2, null, { timeout: 15000 });
  await shot(page, 'webhook-targets');

  // A phone's width.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/ui/#/queue/${encodeURIComponent(queue)}`);
  await page.waitForSelector('#timeline-chart canvas');
  await shot(page, 'phone-queue', false);
}

async function token(page) {
  await page.goto(`${base}/ui/`);
  await page.waitForSelector('#token-dialog[open]');
  await shot(page, 'token');
  await page.fill('#token-input', 'not-the-token');
  await page.press('#token-input', 'Enter');
  await page.waitForFunction(() => document.querySelector('#token-dialog[open]') && document.getElementById('token-error').textContent.includes('not accepted'));
  await page.fill('#token-input', env.TOKEN);
  await page.click('#token-form button[type=submit]');
  await page.waitForSelector(`#queues tr[data-queue="${env.QUEUE}"]`);
  // Kept for the tab: a reload does not ask again.
  await page.reload();
  await page.waitForSelector(`#queues tr[data-queue="${env.QUEUE}"]`);
  check(!(await page.$('#token-dialog[open]')), 'no second prompt after a reload');
}

(async () => {
  const browser = await chromium.launch({ executablePath: env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox'] });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, locale: 'en-US', timezoneId: 'UTC' });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    page.on('console', (m) => {
      // The token flow's 401 answers are expected, and chromium logs each failed load.
      if (env.MODE === 'token' && /status of 401/.test(m.text())) return;
      if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`);
    });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()} ${r.failure() && r.failure().errorText}`));
    await page.addInitScript(() => {
      document.addEventListener('securitypolicyviolation', (e) => console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));
    });
    if (env.MODE === 'token') await token(page); else await open(page);
  } catch (e) {
    problems.push(e.stack || String(e));
  } finally {
    await browser.close();
  }
  if (problems.length) {
    console.error(problems.join('\n'));
    process.exit(1);
  }
  console.log('OK');
})();
