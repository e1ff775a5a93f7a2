/**
 * Presence said in words (the conversation header and the sidebar's accessible names), unknown while the app
 * has no connection; "last seen" as the server recorded it, so a page opened later knows it too; and a desktop
 * notification for a message that arrives while the tab is hidden, asked for with a button (never on page
 * load).
 */
import type { BrowserContext } from '@playwright/test';

import { expect, loggedIn, signedUp, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('presence is in words in the header and the sidebar, and unknown while disconnected', async ({
  cluster,
  openPage,
}) => {
  const primary = await cluster.primary();
  const alice = await signedUp(openPage, 'alice', { replica: primary });
  const bob = await signedUp(openPage, 'bob', { replica: primary });
  await act.startChat(alice, 'bo*', 'bob');
  await act.send(alice, 'Hello Bob');
  await check.unreadBadge(bob, 'alice', 1);

  step('bob is online: said in the header and named in the sidebar');
  const header = find.headerPresence(alice);
  await expect(header).toHaveText('online');
  await expect(find.conversation(alice, 'bob').getByRole('img', { name: 'online' })).toBeAttached();

  step('bob closes his tab: alice reads when she last saw him');
  await bob.close();
  await expect(header).toHaveText(/^last seen at \d\d:\d\d$/);
  await expect(find.conversation(alice, 'bob').getByRole('img', { name: /^last seen at \d\d:\d\d$/ })).toBeAttached();

  step('every replica stops: the app cannot know, and says so');
  await cluster.stopAll();
  await check.notOnline(alice);
  await expect(header).toHaveText('presence unknown while reconnecting');
  await expect(header).toHaveAttribute('data-known', 'false');
  await expect(
    find.conversation(alice, 'bob').getByRole('img', { name: 'presence unknown while reconnecting' }),
  ).toBeAttached();
});

test('a page opened after a peer left says when they were last seen, from the server', async ({ cluster, openPage }) => {
  const primary = await cluster.primary();
  const alice = await signedUp(openPage, 'alice', { replica: primary });
  const bob = await signedUp(openPage, 'bob', { replica: primary });
  await act.startChat(bob, 'al*', 'alice');
  await act.send(bob, 'Bye for now');
  await check.unreadBadge(alice, 'bob', 1);

  step('alice closes her browser; then bob logs out');
  await alice.context().close();
  const before = Date.now();
  await act.logOut(bob);
  await check.authScreen(bob);
  const after = Date.now();

  step('alice opens a new browser and logs in: bob was last seen when he logged out, at once');
  const fresh = await loggedIn(openPage, 'alice', { replica: primary });
  const hhmm = (ms: number) => new Date(ms).toTimeString().slice(0, 5);
  const words = new RegExp(`^last seen at (${hhmm(before)}|${hhmm(after)})$`);
  await expect(find.conversation(fresh, 'bob').getByRole('img', { name: words })).toBeAttached();
  await act.openConversation(fresh, 'bob');
  await expect(find.headerPresence(fresh)).toHaveText(words);

  step('bob comes back: online; he closes his tab: last seen again');
  const bobAgain = await loggedIn(openPage, 'bob', { replica: primary });
  await expect(find.headerPresence(fresh)).toHaveText('online');
  await bobAgain.close();
  await expect(find.headerPresence(fresh)).toHaveText(/^last seen at \d\d:\d\d$/);

  step('seen from a day later, and from three days later: "yesterday at", then the date');
  const DAY = 86_400_000;
  for (const [days, words] of [
    [1, /^last seen yesterday at \d\d:\d\d$/],
    [3, /^last seen \d{1,2}[/.]\d{1,2}[/.]\d{4} at \d\d:\d\d$/],
  ] as const) {
    const later = await loggedIn(openPage, 'alice', {
      replica: primary,
      setup: (context) => context.clock.setFixedTime(new Date(Date.now() + days * DAY)),
    });
    await expect(find.conversation(later, 'bob').getByRole('img', { name: words })).toBeAttached();
    await later.close();
  }
});

/** Replace window.Notification with a recorder; `document.hidden` follows `window.__e2eHidden`. */
async function recordNotifications(context: BrowserContext, permission: 'default' | 'granted'): Promise<void> {
  await context.addInitScript((initial) => {
    const w = window as unknown as {
      __notes: Array<{ title: string; body: string }>;
      __asked: number;
      __e2eHidden: boolean;
    };
    w.__notes = [];
    w.__asked = 0;
    w.__e2eHidden = false;
    let current = initial;
    class Recorder {
      static get permission() {
        return current;
      }
      static requestPermission() {
        w.__asked += 1;
        current = 'granted';
        return Promise.resolve(current);
      }
      constructor(title: string, options?: { body?: string }) {
        w.__notes.push({ title, body: options?.body ?? '' });
      }
      close() {}
    }
    Object.defineProperty(window, 'Notification', { value: Recorder, configurable: true, writable: true });
    Object.defineProperty(document, 'visibilityState', {
      configurable: true,
      get: () => (w.__e2eHidden ? 'hidden' : 'visible'),
    });
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => w.__e2eHidden });
  }, permission);
}

test('a message that arrives while the tab is hidden shows a desktop notification, once asked for', async ({
  cluster,
  openPage,
}) => {
  const primary = await cluster.primary();
  const alice = await signedUp(openPage, 'alice', {
    replica: primary,
    setup: (context) => recordNotifications(context, 'default'),
  });
  const bob = await signedUp(openPage, 'bob', { replica: primary });
  await act.startChat(bob, 'al*', 'alice');
  await act.send(bob, 'First, while alice has not decided');
  await check.unreadBadge(alice, 'bob', 1);

  step('nothing is asked on page load; the button asks');
  expect(await alice.evaluate(() => (window as unknown as { __asked: number }).__asked)).toBe(0);
  const enable = alice.getByRole('button', { name: 'Enable notifications' });
  await enable.click();
  await expect(enable).toBeHidden();
  expect(await alice.evaluate(() => (window as unknown as { __asked: number }).__asked)).toBe(1);

  step('a message while the tab is visible: no notification');
  await act.send(bob, 'Second, while alice looks');
  await check.unreadBadge(alice, 'bob', 2);

  step('alice hides the tab; bob writes: a notification with his name and the text');
  await alice.evaluate(() => {
    (window as unknown as { __e2eHidden: boolean }).__e2eHidden = true;
    document.dispatchEvent(new Event('visibilitychange'));
  });
  await act.send(bob, 'Third, while the tab is hidden');
  await check.unreadBadge(alice, 'bob', 3);
  const notes = await alice.evaluate(() => (window as unknown as { __notes: unknown[] }).__notes);
  expect(notes).toEqual([{ title: 'bob', body: 'Third, while the tab is hidden' }]);
});
