// The chat-aware edge in Chainlit's own UI: with a per-client chat message limit, the
// message over it is not answered and the page shows chatgate's notice (Chainlit's toast),
// and the chat answers again once the window has passed.
//
// Environment (run.sh sets these):
//   E2E_CHAT_URL    a chatgate with --chat-rate-limit 3/minute in front of the test's Chainlit
//   E2E_OUT         directory for the screenshot and the user-data dir
//   E2E_CHROMIUM    browser binary (default /usr/bin/chromium)
//
// Prints one `PASS name` / `FAIL name: why` line per test.

import { mkdtempSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.E2E_CHAT_URL || '').replace(/\/+$/, '');
if (!BASE) {
  console.error('E2E_CHAT_URL is required');
  process.exit(2);
}
const ORIGIN = new URL(BASE).origin;
const OUT = process.env.E2E_OUT || 'target/e2e';
const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';
const LIMIT = 3; // run.sh starts this chatgate with --chat-rate-limit 3/minute

const expectedReply = (text) => 'You said: ' + [...text.toUpperCase()].reverse().join('');
const bodyHas = (page, text, timeout) =>
  page.waitForFunction((t) => document.body.innerText.includes(t), text, { timeout });

async function send(page, text) {
  const input = page.locator('#chat-input');
  await input.waitFor({ state: 'visible', timeout: 30000 });
  const deadline = Date.now() + 30000;
  while (await input.isDisabled()) {
    if (Date.now() > deadline) throw new Error('the composer stayed disabled');
    await page.waitForTimeout(100);
  }
  await input.click();
  await input.fill(text);
  await input.press('Enter');
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  const context = await chromium.launchPersistentContext(mkdtempSync(join(OUT, 'chat-edge-profile-')), {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1280, height: 800 },
    timeout: 30000,
  });
  let ok = true;
  const name = 'browser_chat_limit_shows_the_notice_and_recovers';
  try {
    await context.route('**/*', (route) =>
      new URL(route.request().url()).origin === ORIGIN ? route.continue() : route.abort('blockedbyclient'));
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(30000);
    const frames = [];
    page.on('websocket', (ws) => ws.on('framereceived', (f) => frames.push(String(f.payload))));
    await page.goto(BASE + '/', { waitUntil: 'load' });
    // The chat is connected once the Engine.IO upgrade probe came back over the WebSocket
    // (the Socket.IO CONNECT was answered before, over polling).
    const connectedBy = Date.now() + 30000;
    while (!frames.includes('3probe')) {
      if (Date.now() > connectedBy) throw new Error('the chat never connected over WebSocket');
      await page.waitForTimeout(50);
    }

    for (let i = 1; i <= LIMIT; i++) {
      const text = `allowed message ${i}`;
      await send(page, text);
      await bodyHas(page, expectedReply(text), 20000);
    }
    const refusedText = 'one message too many';
    await send(page, refusedText);
    const toast = page.locator('[data-sonner-toast]').filter({ hasText: 'too fast' });
    await toast.first().waitFor({ state: 'visible', timeout: 10000 });
    const notice = (await toast.first().innerText()).trim();
    await page.screenshot({ path: join(OUT, 'chat-limit-notice.png') });
    // The refused message is never answered: no reply within a generous time.
    let answered = true;
    try {
      await bodyHas(page, expectedReply(refusedText), 3000);
    } catch {
      answered = false;
    }
    if (answered) throw new Error('the message over the limit was answered');
    if (!frames.some((f) => f.startsWith('42["toast"'))) throw new Error('no toast frame on the socket');

    // After the window (the notice says how long), the same chat answers again.
    const wait = Number((notice.match(/wait (\d+) s/) || [])[1] || 20);
    await page.waitForTimeout((wait + 1) * 1000);
    const again = 'after the window';
    await send(page, again);
    await bodyHas(page, expectedReply(again), 20000);
    console.log(`PASS ${name} (notice "${notice}" after ${LIMIT} messages; answered again after ${wait + 1} s)`);
  } catch (err) {
    ok = false;
    console.log(`FAIL ${name}: ${String(err.message || err).split('\n')[0]}`);
    try {
      await context.pages()[0]?.screenshot({ path: join(OUT, 'chat-limit-failure.png') });
    } catch {}
  } finally {
    await context.close();
  }
  process.exit(ok ? 0 : 1);
}

main();
