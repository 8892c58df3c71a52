// Browser end-to-end tests with several Chainlit workers behind chatgate
// (supervised: chatgate --workers 2 -- chainlit run ...): Debian's Chromium,
// two browser contexts (two visitors, each with its own cookies) chatting at
// once, then one worker killed with SIGKILL under a visitor.
//
// Environment (run.sh sets these):
//   E2E_BASE_URL     chatgate's origin
//   E2E_OUT          directory for screenshots
//   E2E_CHROMIUM     browser binary (default /usr/bin/chromium)
//
// Prints one `PASS name` / `FAIL name: why` line per test.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.E2E_BASE_URL || '').replace(/\/+$/, '');
if (!BASE) {
  console.error('E2E_BASE_URL is required');
  process.exit(2);
}
const ORIGIN = new URL(BASE).origin;
const OUT = process.env.E2E_OUT || 'target/e2e';
const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';
const AFFINITY_COOKIE = 'chatgate_worker';

const expectedReply = (text) => 'You said: ' + [...text.toUpperCase()].reverse().join('');
const sameOrigin = (url) => {
  try {
    return new URL(url).origin === ORIGIN;
  } catch {
    return false;
  }
};

const results = [];
async function test(name, fn) {
  try {
    const detail = await fn();
    console.log(`PASS ${name}${detail ? ` (${detail})` : ''}`);
    results.push(true);
  } catch (err) {
    console.log(`FAIL ${name}: ${(err && err.message) || err}`.replace(/\n/g, ' | '));
    results.push(false);
  }
}
function check(cond, msg) {
  if (!cond) throw new Error(msg);
}
async function until(what, fn, timeoutMs, stepMs = 100) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, stepMs));
  }
}
const health = async () => (await fetch(BASE + '/monitor/health')).json();

// One visitor: its own browser context (cookie jar), page and socket record.
async function visitor(browser, name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  await context.route('**/*', (route) =>
    sameOrigin(route.request().url()) ? route.continue() : route.abort('blockedbyclient'));
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  const sockets = [];
  page.on('websocket', (ws) => {
    const entry = { url: ws.url(), createdAt: Date.now(), received: [], closed: false };
    sockets.push(entry);
    ws.on('framereceived', (f) => entry.received.push(String(f.payload)));
    ws.on('close', () => { entry.closed = true; entry.closedAt = Date.now(); });
  });
  const v = { name, context, page, sockets };
  v.worker = async () => {
    const cookie = (await context.cookies(BASE)).find((c) => c.name === AFFINITY_COOKIE);
    return cookie ? Number(cookie.value.split('.')[0]) : null;
  };
  v.liveSocket = (since) => until(`${name}: an upgraded Socket.IO WebSocket`, () => {
    for (let i = sockets.length - 1; i >= 0; i--) {
      const s = sockets[i];
      if (s.createdAt >= since && !s.closed && new URL(s.url).pathname.startsWith('/ws/socket.io')
        && s.received.includes('3probe')) return s;
    }
    return null;
  }, 30000);
  return v;
}

async function typeMessage(page, text) {
  const input = page.locator('#chat-input');
  await input.waitFor({ state: 'visible', timeout: 30000 });
  await until('an enabled composer', async () => !(await input.isDisabled()), 30000);
  await input.click();
  await input.fill(text);
  await input.press('Enter');
}

const shows = (page, text, timeout = 20000) =>
  page.waitForFunction((t) => document.body.innerText.includes(t), text, { timeout });

async function main() {
  mkdirSync(OUT, { recursive: true });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30000,
  });
  let failedToRun = false;
  try {
    const a = await visitor(browser, 'A');
    const b = await visitor(browser, 'B');

    await test('browser_workers_two_visitors_chat_at_once', async () => {
      const t0 = Date.now();
      await Promise.all([a, b].map((v) => v.page.goto(BASE + '/', { waitUntil: 'load' })));
      await Promise.all([a, b].map((v) => v.liveSocket(t0)));
      const textA = 'visitor a asks first';
      const textB = 'visitor b at the same time';
      await Promise.all([typeMessage(a.page, textA), typeMessage(b.page, textB)]);
      await Promise.all([shows(a.page, expectedReply(textA)), shows(b.page, expectedReply(textB))]);
      const crossA = await a.page.evaluate((t) => document.body.innerText.includes(t), expectedReply(textB));
      const crossB = await b.page.evaluate((t) => document.body.innerText.includes(t), expectedReply(textA));
      check(!crossA && !crossB, 'a reply showed up on the other visitor\'s page');
      await a.page.screenshot({ path: join(OUT, 'workers-visitor-a.png') });
      await b.page.screenshot({ path: join(OUT, 'workers-visitor-b.png') });
      const [wa, wb] = [await a.worker(), await b.worker()];
      check(wa !== null && wb !== null, `no affinity cookie (A ${wa}, B ${wb})`);
      // Two new visitors at once with two idle workers: least loaded, ties round the list.
      check(wa !== wb, `both visitors on worker ${wa}: not spread`);
      return `each reply on its own page; A on worker ${wa}, B on worker ${wb}`;
    });

    await test('browser_workers_sigkill_under_a_visitor_reconnects_and_worker_returns', async () => {
      const victim = await a.worker();
      const before = (await health()).workers[victim];
      check(before.pid, `worker ${victim} has no pid`);
      const old = await a.liveSocket(0);
      const killedAt = Date.now();
      process.kill(before.pid, 'SIGKILL');
      await until('the dead worker\'s WebSocket to close', () => old.closed, 15000);
      // socket.io-client reconnects by itself, to a live worker.
      const socket = await a.liveSocket(killedAt);
      const text = 'after the worker died';
      await typeMessage(a.page, text);
      await shows(a.page, expectedReply(text));
      const reconnected = socket.createdAt - killedAt;
      // The other visitor, on the other worker, never noticed.
      const textB = 'visitor b carries on';
      await typeMessage(b.page, textB);
      await shows(b.page, expectedReply(textB));
      await a.page.screenshot({ path: join(OUT, 'workers-after-kill.png') });
      const back = await until('the killed worker to be back', async () => {
        const w = (await health()).workers[victim];
        return w.reachable && w.restarts > before.restarts && w.pid !== before.pid ? w : null;
      }, 90000, 250);
      return `A's worker ${victim} killed: old socket closed at +${old.closedAt - killedAt} ms, ` +
        `reconnected at +${reconnected} ms (now worker ${await a.worker()}), chatted again; ` +
        `worker ${victim} back as pid ${back.pid} after ${Date.now() - killedAt} ms`;
    });
  } catch (err) {
    failedToRun = true;
    console.log(`FAIL browser_workers_harness: ${(err && err.message) || err}`.replace(/\n/g, ' | '));
  } finally {
    await browser.close().catch(() => {});
  }
  process.exit(failedToRun || results.includes(false) ? 1 : 0);
}

main();
