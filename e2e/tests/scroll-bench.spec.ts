/**
 * A benchmark, not a timed assertion: how smoothly a conversation of 10,000 messages scrolls from its newest
 * message to its first with the mouse wheel. Frame times come from requestAnimationFrame timestamps in the
 * page during scripted wheel scrolling (Playwright's `mouse.wheel`, one notch after another, as fast as the
 * page takes them); the spec prints p50/p95/p99, the frames over 33 ms (at least one 60 Hz refresh missed),
 * the refreshes missed in all ("dropped frames") and the DOM size, and writes them to
 * `test-results/.../scroll-bench-<count>.json`. It asserts only structure: the first message is reached and
 * the page stays bounded.
 *
 * Opt-in (seeding 10,000 messages and scrolling through them takes minutes):
 *   REPLICHAT_E2E_SCROLL_BENCH=10000 scripts/e2e.sh tests/scroll-bench.spec.ts --repeat-each 3
 * Figures in BENCHMARKS.md ("Scrolling 10,000 messages in the browser app").
 */
import * as fs from 'node:fs';

import type { Page } from '@playwright/test';

import { expect, loggedIn, PASSWORD, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

const COUNT = Number(process.env.REPLICHAT_E2E_SCROLL_BENCH || 0);
/** Pixels per wheel notch (a mouse's usual step). */
const NOTCH = 120;

test.use({ clusterTiming: act.SEEDING_TIMING });

interface Sample {
  /** requestAnimationFrame timestamps (ms). */
  frames: number[];
  /** Most elements in the whole document, and most message elements, seen at any frame. */
  maxNodes: number;
  maxMessages: number;
}

/** Start recording every animation frame's timestamp and the DOM size in `page`. */
async function startRecording(page: Page): Promise<void> {
  await page.evaluate(() => {
    const w = window as unknown as { __bench: Sample & { on: boolean } };
    w.__bench = { frames: [], maxNodes: 0, maxMessages: 0, on: true };
    const tick = (t: number) => {
      const b = w.__bench;
      if (!b.on) return;
      b.frames.push(t);
      // Counting every element each frame would itself cost frames: every 10th frame.
      if (b.frames.length % 10 === 0) {
        b.maxNodes = Math.max(b.maxNodes, document.getElementsByTagName('*').length);
        b.maxMessages = Math.max(b.maxMessages, document.querySelectorAll('[data-testid="message"]').length);
      }
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  });
}

async function stopRecording(page: Page): Promise<Sample> {
  return page.evaluate(() => {
    const w = window as unknown as { __bench: Sample & { on: boolean } };
    w.__bench.on = false;
    return { frames: w.__bench.frames, maxNodes: w.__bench.maxNodes, maxMessages: w.__bench.maxMessages };
  });
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

test('scrolling a conversation of 10,000 messages from the newest to the first: frame times', async ({
  cluster,
  openPage,
}, testInfo) => {
  test.skip(!COUNT, 'opt-in: REPLICHAT_E2E_SCROLL_BENCH=<messages>');
  test.setTimeout(Math.max(300_000, COUNT * 90));
  const primary = await cluster.primary();
  step(`seed ${COUNT} messages from alice to bob over the protocol`);
  const seeder = await openPage('seeder', { replica: primary });
  await act.seedConversation(seeder, COUNT, PASSWORD);
  await seeder.close();

  step('alice opens the conversation at its newest message');
  const alice = await loggedIn(openPage, 'alice', { replica: primary });
  await act.openConversation(alice, 'bob');
  await check.conversationOpen(alice, 'bob');
  await expect(find.message(alice, `seed ${String(COUNT).padStart(5, '0')}`)).toBeVisible();
  const box = await find.history(alice).boundingBox();
  if (!box) throw new Error('the history has no box');
  await alice.mouse.move(box.x + box.width / 2, box.y + box.height / 2);

  step('wheel up, notch after notch, until the first message is in view');
  const first = find.message(alice, 'seed 00001');
  await startRecording(alice);
  const started = Date.now();
  let notches = 0;
  while (!(await first.isVisible())) {
    for (let i = 0; i < 20; i++) await alice.mouse.wheel(0, -NOTCH);
    notches += 20;
    expect(Date.now() - started, 'reaching the first message').toBeLessThan(COUNT * 60);
  }
  const seconds = (Date.now() - started) / 1000;
  const sample = await stopRecording(alice);

  const deltas = sample.frames.slice(1).map((t, i) => t - sample.frames[i]);
  const sorted = [...deltas].sort((a, b) => a - b);
  const figures = {
    messages: COUNT,
    seconds: Number(seconds.toFixed(1)),
    notches,
    frames: deltas.length,
    p50_ms: Number(percentile(sorted, 50).toFixed(1)),
    p95_ms: Number(percentile(sorted, 95).toFixed(1)),
    p99_ms: Number(percentile(sorted, 99).toFixed(1)),
    max_ms: Number(sorted[sorted.length - 1].toFixed(1)),
    // A frame slower than 33 ms missed at least one 60 Hz refresh; dropped frames counts the refreshes missed.
    over_33ms: deltas.filter((d) => d > 33).length,
    over_50ms: deltas.filter((d) => d > 50).length,
    dropped_frames: deltas.reduce((n, d) => n + Math.max(0, Math.round(d / (1000 / 60)) - 1), 0),
    max_dom_elements: sample.maxNodes,
    max_message_elements: sample.maxMessages,
  };
  console.log(`scroll-bench ${JSON.stringify(figures)}`);
  const out = testInfo.outputPath(`scroll-bench-${COUNT}.json`);
  fs.writeFileSync(out, `${JSON.stringify(figures, null, 2)}\n`);
  await testInfo.attach(`scroll-bench-${COUNT}.json`, { path: out, contentType: 'application/json' });

  expect(figures.frames, 'frames were recorded while scrolling').toBeGreaterThan(0);
  expect(figures.max_message_elements).toBeLessThanOrEqual(find.MAX_MESSAGES_IN_PAGE);
  await expect(first).toBeVisible();
});
