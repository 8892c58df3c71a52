// Browser end-to-end tests: Debian's Chromium (headless, driven by
// playwright-core, no browser download) opens chatgate's root URL and uses the
// Chainlit UI the way a person would.
//
// Environment (run.sh sets these):
//   E2E_BASE_URL     origin under test, e.g. http://127.0.0.1:PORT
//   E2E_OUT          directory for screenshots and the user-data dir
//   E2E_BACKEND_CTL  script whose `restart` argument restarts the backend
//   E2E_DIRECT=1     base URL is bare Chainlit: chatgate-only checks are skipped
//   E2E_CHROMIUM     browser binary (default /usr/bin/chromium)
//
// Prints one `PASS name` / `FAIL name: why` / `SKIP name: why` line per test.

import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.E2E_BASE_URL || '').replace(/\/+$/, '');
if (!BASE) {
  console.error('E2E_BASE_URL is required');
  process.exit(2);
}
const ORIGIN = new URL(BASE).origin;
const OUT = process.env.E2E_OUT || 'target/e2e';
const DIRECT = process.env.E2E_DIRECT === '1';
const BACKEND_CTL = process.env.E2E_BACKEND_CTL || '';
const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';

// Same rule as examples/chainlit/app.py.
const expectedReply = (text) => 'You said: ' + [...text.toUpperCase()].reverse().join('');

const sameOrigin = (url) => {
  try {
    return new URL(url).origin === ORIGIN;
  } catch {
    return false;
  }
};

// ---- what the page does, recorded from before the first navigation ----
const rec = {
  badResponses: [], // same-origin responses with status >= 400
  consoleErrors: [],
  pageErrors: [],
  failedRequests: [], // same-origin requests that failed at the network level
  sockets: [], // {url, createdAt, sent: [], received: [], closed}
  handshakes: new Map(), // CDP requestId -> {url, status}
  mainNavigations: [],
  authConfig: null,
};
let quiet = false; // true while errors are expected (backend restart window)

function recordPage(page) {
  page.on('response', (resp) => {
    const url = resp.url();
    if (!sameOrigin(url)) return;
    if (resp.status() >= 400 && !quiet) rec.badResponses.push(`${resp.status()} ${resp.request().method()} ${url}`);
    if (new URL(url).pathname === '/auth/config' && resp.status() === 200) {
      resp.json().then((j) => { rec.authConfig = j; }, () => {});
    }
  });
  page.on('requestfailed', (req) => {
    // Requests to other hosts are aborted on purpose (see route below).
    if (!sameOrigin(req.url()) || quiet) return;
    rec.failedRequests.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText}`);
  });
  page.on('console', (msg) => {
    if (msg.type() !== 'error' || quiet) return;
    const where = msg.location()?.url || '';
    // Chromium reports each aborted cross-origin load ("Failed to load
    // resource: net::ERR_FAILED") at the blocked URL: those are ours.
    if (where && !sameOrigin(where)) return;
    rec.consoleErrors.push(`${msg.text()} @ ${where}`);
  });
  page.on('pageerror', (err) => { if (!quiet) rec.pageErrors.push(String(err)); });
  page.on('framenavigated', (frame) => {
    if (frame === page.mainFrame()) rec.mainNavigations.push(frame.url());
  });
  page.on('websocket', (ws) => {
    const entry = { url: ws.url(), createdAt: Date.now(), sent: [], received: [], closed: false };
    rec.sockets.push(entry);
    ws.on('framesent', (f) => entry.sent.push(String(f.payload)));
    ws.on('framereceived', (f) => entry.received.push(String(f.payload)));
    ws.on('close', () => { entry.closed = true; entry.closedAt = Date.now(); });
  });
}

async function recordHandshakes(context, page) {
  // Playwright's websocket event has no status; the DevTools protocol does.
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  cdp.on('Network.webSocketCreated', (e) => {
    rec.handshakes.set(e.requestId, { url: e.url, status: null });
  });
  cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
    const h = rec.handshakes.get(e.requestId) || { url: '?', status: null };
    h.status = e.response.status;
    rec.handshakes.set(e.requestId, h);
  });
}

const isEngineIoSocket = (url) => {
  const u = new URL(url);
  return u.pathname.startsWith('/ws/socket.io') && u.searchParams.get('transport') === 'websocket';
};

// ---- tiny runner ----
const results = [];
async function test(name, fn) {
  try {
    const detail = await fn();
    if (detail && detail.skip) {
      console.log(`SKIP ${name}: ${detail.skip}`);
      return;
    }
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

// An open Engine.IO WebSocket created at or after `since`, whose handshake
// answered 101 and which carried the Engine.IO upgrade probe ("3probe").
async function waitForLiveSocket(since, timeoutMs) {
  return until('an upgraded Socket.IO WebSocket', () => {
    for (let i = rec.sockets.length - 1; i >= 0; i--) {
      const s = rec.sockets[i];
      if (s.createdAt >= since && !s.closed && isEngineIoSocket(s.url) && s.received.includes('3probe')) return s;
    }
    return null;
  }, timeoutMs);
}

function handshakeStatus(url) {
  for (const h of rec.handshakes.values()) if (h.url === url && h.status !== null) return h.status;
  return null;
}

// Type into the composer, press Enter, wait for the full streamed reply.
async function sendAndAwaitReply(page, text, timeoutMs = 20000) {
  const input = page.locator('#chat-input');
  await input.waitFor({ state: 'visible', timeout: 30000 });
  await until('an enabled composer', async () => !(await input.isDisabled()), 30000);
  await input.click();
  await input.fill(text);
  await input.press('Enter');
  const want = expectedReply(text);
  await page.waitForFunction((t) => document.body.innerText.includes(t), want, { timeout: timeoutMs });
  return want;
}

// The bundle through chatgate's asset cache: served compressed and `immutable`, then not
// asked for at all on the next visit. In a browser of its own: Playwright's request
// routing (used above to keep the page on loopback) turns Chromium's HTTP cache off, so
// here other hosts fail to resolve instead.
const isBundle = (url) => /^\/assets\/index-[^/]+\.js$/.test(new URL(url).pathname);

async function bundleCacheTest(launchArgs) {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [...launchArgs, `--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE ${new URL(BASE).hostname}`],
  });
  try {
    const page = await (await browser.newContext()).newPage();
    const cdp = await page.context().newCDPSession(page);
    await cdp.send('Network.enable');
    // Bundle responses that came over the network (not from the browser's cache), per load.
    const fetched = [];
    const cached = new Set();
    cdp.on('Network.requestServedFromCache', (e) => cached.add(e.requestId));
    cdp.on('Network.responseReceived', (e) => {
      const fromCache = e.response.fromDiskCache || e.response.fromPrefetchCache || cached.has(e.requestId);
      if (isBundle(e.response.url) && !fromCache) fetched.push(e.response.url);
    });
    const first = page.waitForResponse((r) => isBundle(r.url()));
    await page.goto(BASE + '/', { waitUntil: 'load' });
    const resp = await first;
    const h = await resp.allHeaders();
    check(resp.status() === 200, `${resp.url()} answered ${resp.status()}`);
    check((h['cache-control'] || '').includes('immutable'), `cache-control: ${h['cache-control']}`);
    check(['br', 'gzip'].includes(h['content-encoding']), `content-encoding: ${h['content-encoding']}`);
    check(h.etag, 'no etag');
    check(fetched.length === 1, `first load fetched the bundle ${fetched.length} times`);
    await page.goto('about:blank');
    await page.goto(BASE + '/', { waitUntil: 'load' });
    check(fetched.length === 1, `the second load fetched the bundle again (${fetched.slice(1).join(', ')})`);
    return `${new URL(resp.url()).pathname}: ${h['content-encoding']}, ${h['cache-control']}; ` +
      'second load took it from the browser cache';
  } finally {
    await browser.close().catch(() => {});
  }
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  const userDataDir = mkdtempSync(join(OUT, 'chromium-profile-'));
  const launchArgs = [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ];
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: launchArgs,
    // Prefer *light*: if the UI ends up dark it is because /auth/config said
    // so, not because "system" followed the browser.
    colorScheme: 'light',
    viewport: { width: 1280, height: 800 },
    timeout: 30000,
  });
  let failedToRun = false;
  try {
    // Only the origin under test is reachable; fonts/CSS from CDNs are aborted.
    await context.route('**/*', (route) =>
      sameOrigin(route.request().url()) ? route.continue() : route.abort('blockedbyclient'));
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(30000);
    recordPage(page);
    await recordHandshakes(context, page);

    const t0 = Date.now();
    let firstResponse = null;
    await test('browser_root_loads_at_slash_without_redirect', async () => {
      firstResponse = await page.goto(BASE + '/', { waitUntil: 'load' });
      check(firstResponse, 'no response for /');
      check(firstResponse.status() === 200, `GET / answered ${firstResponse.status()}`);
      check(firstResponse.request().redirectedFrom() === null,
        `GET / was redirected from ${firstResponse.request().redirectedFrom()?.url()}`);
      check(page.url() === BASE + '/', `landed on ${page.url()}, not ${BASE}/`);
      const ct = firstResponse.headers()['content-type'] || '';
      check(ct.startsWith('text/html'), `content-type of / is ${ct}`);
      await page.locator('#chat-input').waitFor({ state: 'visible', timeout: 30000 });
      return `200 text/html, composer visible after ${Date.now() - t0} ms`;
    });

    let liveSocket = null;
    await test('browser_websocket_opens_with_101', async () => {
      liveSocket = await waitForLiveSocket(t0, 20000);
      const status = await until('the handshake status', () => handshakeStatus(liveSocket.url), 5000);
      check(status === 101, `WebSocket handshake answered ${status}`);
      const path = new URL(liveSocket.url).pathname;
      return `101 on ${path}, Engine.IO probe exchanged`;
    });

    await test('browser_first_load_has_no_errors', async () => {
      // Let the first load settle: config, translations, settings, socket.
      await page.waitForTimeout(1500);
      const problems = [
        ...rec.badResponses.map((s) => `response ${s}`),
        ...rec.failedRequests.map((s) => `failed ${s}`),
        ...rec.consoleErrors.map((s) => `console ${s}`),
        ...rec.pageErrors.map((s) => `pageerror ${s}`),
      ];
      check(problems.length === 0, problems.join('; '));
      return `${rec.mainNavigations.length} navigation(s), no same-origin error`;
    });

    await test('browser_dark_theme_from_auth_config', async () => {
      const cls = await page.evaluate(() => document.documentElement.className);
      await page.screenshot({ path: join(OUT, 'browser-first-load.png') });
      if (DIRECT) return { skip: 'direct mode: the backend, not chatgate, answers /auth/config' };
      const problems = [];
      const classes = cls.split(/\s+/);
      if (!(classes.includes('dark') && !classes.includes('light'))) problems.push(`<html class="${cls}">`);
      if (!rec.authConfig) problems.push('/auth/config was not fetched (or not JSON)');
      else if (rec.authConfig.default_theme !== 'dark') {
        problems.push(`/auth/config default_theme is ${JSON.stringify(rec.authConfig.default_theme)}`);
      }
      check(problems.length === 0, problems.join('; '));
      return `<html class="${cls}">, /auth/config default_theme "dark"`;
    });

    await test('browser_message_streams_reply_over_websocket_without_reload', async () => {
      check(liveSocket, 'no live WebSocket from the first load');
      const navsBefore = rec.mainNavigations.length;
      const sentBefore = liveSocket.sent.length;
      const recvBefore = liveSocket.received.length;
      const text = 'hello from chromium';
      const want = await sendAndAwaitReply(page, text);
      await page.screenshot({ path: join(OUT, 'browser-chat-reply.png') });
      check(rec.mainNavigations.length === navsBefore, 'the page navigated/reloaded while chatting');
      const sent = liveSocket.sent.slice(sentBefore);
      check(sent.some((f) => f.includes('"client_message"') && f.includes(text)),
        'the client_message frame was not sent on the WebSocket');
      const received = liveSocket.received.slice(recvBefore);
      const starts = received.filter((f) => f.includes('"stream_start"')).length;
      const tokens = received.filter((f) => f.includes('"stream_token"')).length;
      check(starts >= 1 && tokens >= 2,
        `reply not streamed on the WebSocket (stream_start ${starts}, stream_token ${tokens})`);
      check(!liveSocket.closed, 'the WebSocket closed during the exchange');
      return `"${want}" shown, ${tokens} stream_token frames`;
    });

    await test('browser_chat_path_lands_on_chat_at_root', async () => {
      if (DIRECT) return { skip: 'direct mode: /chat redirect is chatgate\'s' };
      const resp = await page.goto(BASE + '/chat', { waitUntil: 'load' });
      check(resp, 'no response for /chat');
      const from = resp.request().redirectedFrom();
      check(from && new URL(from.url()).pathname === '/chat', '/chat was not redirected');
      const fromResp = await from.response();
      const status = fromResp ? fromResp.status() : null;
      check(status >= 300 && status < 400, `/chat answered ${status}`);
      check(page.url() === BASE + '/', `landed on ${page.url()}`);
      check(resp.status() === 200, `/ answered ${resp.status()}`);
      await page.locator('#chat-input').waitFor({ state: 'visible', timeout: 30000 });
      return `/chat -> ${status} -> / (200), composer visible`;
    });

    await test('browser_reconnects_after_backend_restart', async () => {
      if (!BACKEND_CTL) return { skip: 'E2E_BACKEND_CTL not set' };
      // A live session first (the /chat test navigated; make sure it's up).
      await waitForLiveSocket(0, 20000);
      const before = await waitForLiveSocket(0, 1000);
      await sendAndAwaitReply(page, 'before the restart');
      quiet = true; // errors while the backend is down are expected
      const restartAt = Date.now();
      // Asynchronously, so the page's events keep being recorded meanwhile.
      const ctl = await promisify(execFile)(BACKEND_CTL, ['restart'], { timeout: 90000 });
      process.stderr.write(ctl.stderr);
      const backAt = Date.now();
      // When the backend goes away its WebSocket must close on the browser's
      // side too, promptly: a relay left half-open would only be noticed at
      // Engine.IO's ping timeout (25 s + 20 s).
      await until('the old WebSocket to close', () => before.closed, Math.max(1000, restartAt + 15000 - Date.now()));
      const closedAfter = before.closedAt - restartAt;
      // The UI reconnects by itself (socket.io-client backoff, <= ~5 s).
      const socket = await waitForLiveSocket(restartAt, 20000);
      const status = await until('the handshake status', () => handshakeStatus(socket.url), 5000);
      check(status === 101, `reconnect handshake answered ${status}`);
      quiet = false;
      const navs = rec.mainNavigations.length;
      const sentBefore = socket.sent.length;
      const want = await sendAndAwaitReply(page, 'after the restart');
      check(rec.mainNavigations.length === navs, 'the page reloaded to recover');
      check(socket.sent.slice(sentBefore).some((f) => f.includes('"client_message"')),
        'the message after the restart did not travel on the new WebSocket');
      await page.screenshot({ path: join(OUT, 'browser-after-restart.png') });
      return `backend restarted in ${backAt - restartAt} ms, old socket closed at +${closedAfter} ms, ` +
        `new one live ${socket.createdAt - backAt} ms after the backend was back, "${want}" shown`;
    });

    await test('browser_no_errors_outside_the_restart_window', async () => {
      await page.waitForTimeout(500);
      const problems = [
        ...rec.badResponses.map((s) => `response ${s}`),
        ...rec.failedRequests.map((s) => `failed ${s}`),
        ...rec.consoleErrors.map((s) => `console ${s}`),
        ...rec.pageErrors.map((s) => `pageerror ${s}`),
      ];
      check(problems.length === 0, problems.join('; '));
      return `${rec.sockets.length} WebSocket(s) over the session`;
    });

    await test('browser_bundle_immutable_from_the_edge_then_from_the_browser_cache', async () => {
      if (DIRECT) return { skip: 'direct mode: the asset cache is chatgate\'s' };
      return bundleCacheTest(launchArgs);
    });
  } catch (err) {
    failedToRun = true;
    console.log(`FAIL browser_harness: ${(err && err.message) || err}`.replace(/\n/g, ' | '));
  } finally {
    await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  }
  process.exit(failedToRun || results.includes(false) ? 1 : 0);
}

main();
