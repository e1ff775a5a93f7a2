/**
 * check: what the user should see. Every check is a Playwright auto-waiting expect (or expect.poll), so it waits
 * for the app up to its timeout instead of sleeping.
 */
import { expect, type Page } from '@playwright/test';

import type { PageMark } from './act';
import * as find from './find';

/** How long a browser may take to find the new primary after a kill -9: election + the app's backoff. */
export const FAILOVER_MS = 30_000;

const STATUS_RANK: Record<string, number> = { sending: 0, sent: 1, delivered: 2, read: 3 };

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// ----- Auth -----

/** The sign-in screen is shown (nobody is logged in on this page). */
export async function authScreen(page: Page): Promise<void> {
  await expect(find.authUsername(page)).toBeVisible();
  await expect(find.authPassword(page)).toBeVisible();
  await expect(find.me(page)).toHaveCount(0);
}

/** Logged in as `username`: the header shows it and the auth form is gone. */
export async function loggedIn(page: Page, username: string): Promise<void> {
  await expect(find.me(page)).toHaveText(username);
  await expect(find.authUsername(page)).toHaveCount(0);
}

/** The auth form shows an error matching `pattern`, and nobody got logged in. */
export async function authError(page: Page, pattern: RegExp): Promise<void> {
  await expect(find.authError(page)).toBeVisible();
  await expect(find.authError(page)).toHaveText(pattern);
  await expect(find.me(page)).toHaveCount(0);
}

// ----- Connection banner -----

/** The banner says "Connected" to a person; on replica `node` if given (attribute and tooltip). */
export async function online(page: Page, node?: number, timeout?: number): Promise<void> {
  const banner = find.banner(page);
  await expect(banner).toHaveAttribute('data-state', 'online', { timeout });
  await expect(banner).toHaveText('Connected', { timeout });
  if (node !== undefined) {
    await expect(banner).toHaveAttribute('data-node', String(node), { timeout });
    await expect(banner).toHaveAttribute('title', new RegExp(`replica ${node}\\b`), { timeout });
  }
}

/** The banner no longer says online (the app noticed the lost connection). */
export async function notOnline(page: Page, timeout?: number): Promise<void> {
  await expect(find.banner(page)).not.toHaveAttribute('data-state', 'online', { timeout });
}

/** The page was never reloaded or navigated since `mark` (its window marker survives). */
export async function samePage(page: Page, mark: PageMark): Promise<void> {
  const value = await page.evaluate(() => (window as unknown as { __e2eMark?: string }).__e2eMark ?? null);
  expect(value, 'the window marker set before the failover is still there (no reload)').toBe(mark.value);
  expect(mark.navigations(), 'no main-frame navigation happened').toBe(0);
}

// ----- Search and sidebar -----

/** The search shows exactly `usernames` (in any order). */
export async function searchFinds(page: Page, usernames: string[]): Promise<void> {
  await expect(find.searchResults(page)).toHaveCount(usernames.length);
  for (const username of usernames) await expect(find.searchResult(page, username)).toBeVisible();
}

/** The conversation with `withUser` is open. */
export async function conversationOpen(page: Page, withUser: string): Promise<void> {
  await expect(find.conversationTitle(page)).toHaveText(withUser);
}

/** The sidebar's unread badge for `withUser` shows `count` (0: absent or "0"). */
export async function unreadBadge(page: Page, withUser: string, count: number): Promise<void> {
  await expect(find.conversation(page, withUser)).toBeVisible();
  if (count > 0) {
    await expect(find.unreadBadge(page, withUser)).toHaveText(String(count));
  } else {
    await expect
      .poll(
        async () => {
          const badge = find.unreadBadge(page, withUser);
          if ((await badge.count()) === 0 || !(await badge.first().isVisible())) return '0';
          return (await badge.first().innerText()).trim();
        },
        { message: `no unread badge for ${withUser}` },
      )
      .toBe('0');
  }
}

/** The sidebar shows `withUser` as online or offline. */
export async function presence(page: Page, withUser: string, isOnline: boolean, timeout?: number): Promise<void> {
  await expect(find.presence(page, withUser)).toHaveAttribute('data-online', String(isOnline), { timeout });
}

// ----- Conversation -----

/** The open conversation shows exactly `texts`, in this order (nothing missing, nothing doubled). */
export async function messages(page: Page, texts: string[], timeout?: number): Promise<void> {
  await expect(find.messageTexts(page)).toHaveText(texts, { timeout });
}

/** The message with text `text` is shown exactly once. */
export async function once(page: Page, text: string): Promise<void> {
  await expect(find.message(page, text)).toHaveCount(1);
}

/** My message `text` has data-status `status` (sending|sent|delivered|read). */
export async function status(page: Page, text: string, status: string | RegExp, timeout?: number): Promise<void> {
  await expect(find.message(page, text)).toHaveAttribute('data-status', status, { timeout });
}

/** My message `text` has a server id (data-id not empty). */
export async function hasServerId(page: Page, text: string, timeout?: number): Promise<void> {
  await expect(find.message(page, text)).toHaveAttribute('data-id', /^\d+$/, { timeout });
}

/** The messages with these texts come from `from` and are marked unread (data-unread="true") or not. */
export async function unreadMarks(page: Page, from: string, texts: string[], unread = true): Promise<void> {
  for (const text of texts) {
    const element = find.message(page, text);
    await expect(element).toHaveAttribute('data-from', from);
    if (unread) {
      await expect(element).toHaveAttribute('data-unread', 'true');
    } else {
      await expect(element).not.toHaveAttribute('data-unread', 'true');
    }
  }
}

/**
 * The states my message `text` went through (recorded by act.recordStatuses) never go backwards
 * (sending -> sent -> delivered -> read) and include `including` in this order. Returns them.
 */
export async function statusSequence(page: Page, text: string, including: string[] = []): Promise<string[]> {
  const samples = await find.recordedStatuses(page, text);
  const seen = samples.map((s) => s.status ?? '(none)');
  const ranks = seen.map((s) => STATUS_RANK[s] ?? -1);
  expect(ranks.every((r) => r >= 0), `only known states, saw ${seen.join(' -> ')}`).toBe(true);
  expect(
    ranks.every((r, i) => i === 0 || r >= ranks[i - 1]),
    `the status of "${text}" never goes backwards, saw ${seen.join(' -> ')}`,
  ).toBe(true);
  let from = 0;
  for (const wanted of including) {
    const at = seen.indexOf(wanted, from);
    expect(at, `"${text}" went through ${including.join(' -> ')}, saw ${seen.join(' -> ')}`).toBeGreaterThanOrEqual(0);
    from = at + 1;
  }
  return seen;
}

/** My message `text` first appeared as "sending" while the banner was not online (queued during an outage). */
export async function queuedWhileOffline(page: Page, text: string): Promise<void> {
  const samples = await find.recordedStatuses(page, text);
  expect(samples.length, `the recorder saw "${text}"`).toBeGreaterThan(0);
  const first = samples[0];
  expect(first.status, `"${text}" first showed as sending`).toBe('sending');
  expect(first.banner, `"${text}" was sent while the banner was not online`).not.toBe('online');
}

export async function typingShown(page: Page, shown: boolean): Promise<void> {
  if (shown) await expect(find.typing(page)).toBeVisible();
  else await expect(find.typing(page)).toBeHidden();
}

/** The composer shows an error matching `pattern` (any non-empty text when not given). */
export async function composerError(page: Page, pattern: RegExp = /\S/): Promise<void> {
  await expect(find.composerError(page)).toBeVisible();
  await expect(find.composerError(page)).toHaveText(pattern);
}

export async function noComposerError(page: Page): Promise<void> {
  await expect(find.composerError(page)).toBeHidden();
}

// ----- Admin page -----

export interface AdminExpectation {
  primary: number;
  /** data-role per replica id. */
  roles?: Record<number, string>;
  /** data-alive per replica id. */
  alive?: Record<number, boolean>;
}

/** The admin page shows `primary` as the primary, and these roles and liveness per replica. */
export async function admin(page: Page, expected: AdminExpectation, timeout?: number): Promise<void> {
  await expect(find.adminPrimary(page)).toHaveText(new RegExp(`^\\s*${expected.primary}\\s*$`), { timeout });
  for (const [id, role] of Object.entries(expected.roles ?? {})) {
    await expect(find.replicaRow(page, Number(id))).toHaveAttribute('data-role', role, { timeout });
  }
  for (const [id, alive] of Object.entries(expected.alive ?? {})) {
    await expect(find.replicaRow(page, Number(id))).toHaveAttribute('data-alive', String(alive), { timeout });
  }
}

/** The admin page's "as seen by" names one of `urls` (the replica that answered its last poll). */
export async function adminSourceIsOneOf(page: Page, urls: string[], timeout?: number): Promise<void> {
  const pattern = new RegExp(`(${urls.map(escapeRegExp).join('|')})(?!\\d)`);
  await expect(find.adminSource(page)).toHaveText(pattern, { timeout });
}

// ----- Accessibility -----

/** axe-core finds no serious or critical WCAG 2 A/AA violation on the page as it is now (`view` names it). */
export async function accessible(page: Page, view: string): Promise<void> {
  const { default: AxeBuilder } = await import('@axe-core/playwright');
  const results = await new AxeBuilder({ page }).withTags(['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']).analyze();
  // axe really looked: rules ran and some passed (an empty page or a failed injection passes nothing).
  expect(results.passes.length, `axe checked the ${view} view`).toBeGreaterThan(10);
  const bad = results.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  const minor = results.violations.filter((v) => !bad.includes(v)).map((v) => `${v.impact} ${v.id}`);
  if (minor.length) console.log(`axe on the ${view} view, minor or moderate: ${minor.join(', ')}`);
  const report = bad
    .map((v) => `${v.impact} ${v.id}: ${v.help}\n${v.nodes.map((n) => `    ${n.target.join(' ')}: ${n.failureSummary ?? ''}`).join('\n')}`)
    .join('\n');
  expect(bad.length, `axe on the ${view} view:\n${report}`).toBe(0);
}
