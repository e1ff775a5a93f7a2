/**
 * Issue 9, item 8: every page and asset carries the browser security headers, and the app works under its own
 * Content-Security-Policy (scripts and wasm from the replica only, no inline script): no violation is reported
 * on the chat page (served by a backup, so the socket goes to another replica) nor on /admin (which polls every
 * replica's /api/cluster).
 */
import type { Page } from '@playwright/test';

import { expect, PASSWORD, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';

test('the app runs under its Content-Security-Policy without a violation', async ({ cluster, browser }) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const violations: string[] = [];
  // Listen before the first request: a violation during start-up is the likeliest one.
  const watch = (page: Page) => {
    page.on('console', (message) => {
      if (/content security policy|refused to/i.test(message.text())) violations.push(message.text());
    });
    page.on('pageerror', (error) => violations.push(`pageerror: ${error.message}`));
    page.on('response', (response) => {
      const headers = response.headers();
      if (!headers['content-security-policy']?.includes("frame-ancestors 'none'")) {
        violations.push(`no policy on ${response.url()}`);
      }
      if (headers['x-content-type-options'] !== 'nosniff') violations.push(`no nosniff on ${response.url()}`);
      if (headers['referrer-policy'] !== 'no-referrer') violations.push(`no referrer policy on ${response.url()}`);
    });
  };
  try {
    step('the chat page from a backup: the app starts, signs up, and talks to the primary');
    const primary = await cluster.primary();
    const backup = primary === 0 ? 1 : 0;
    const chat = await context.newPage();
    watch(chat);
    const response = await chat.goto(`${cluster.url(backup)}/`);
    expect(response?.headers()['content-security-policy']).toContain("script-src 'self' 'wasm-unsafe-eval'");
    await act.signUp(chat, 'alice', PASSWORD);
    await check.loggedIn(chat, 'alice');
    await check.online(chat, primary);

    step('the admin page polls every replica');
    const admin = await context.newPage();
    watch(admin);
    await admin.goto(`${cluster.url(backup)}/admin`);
    await check.admin(admin, { primary, alive: { 0: true, 1: true, 2: true } });
    expect(violations, violations.join('\n')).toEqual([]);
  } finally {
    await context.close().catch(() => undefined);
  }
});
