/**
 * A long conversation: only a window of it is in the page (bounded number of message elements), and scrolling
 * still reaches its first message (older lines come into the window, then older pages from the server) and
 * comes back down to the newest.
 */
import type { Page } from '@playwright/test';

import { expect, loggedIn, PASSWORD, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

/** Messages seeded (alice to bob); REPLICHAT_E2E_LONG_HISTORY=10000 for the size (about 3 minutes). */
const COUNT = Number(process.env.REPLICHAT_E2E_LONG_HISTORY || 3000);

test.use({ clusterTiming: act.SEEDING_TIMING });

/** How many message elements the page holds now. */
const inPage = (page: Page) => find.messages(page).count();

test('a conversation of thousands keeps a bounded window in the page and scrolls to its first message', async ({
  cluster,
  openPage,
}) => {
  test.setTimeout(Math.max(240_000, COUNT * 60));
  const primary = await cluster.primary();
  step(`seed ${COUNT} messages from alice to bob over the protocol`);
  const seeder = await openPage('seeder', { replica: primary });
  await act.seedConversation(seeder, COUNT, PASSWORD);

  step('alice logs in and opens the conversation: the newest message, and a bounded window');
  const alice = await loggedIn(openPage, 'alice', { replica: primary });
  await act.openConversation(alice, 'bob');
  await check.conversationOpen(alice, 'bob');
  const last = `seed ${String(COUNT).padStart(5, '0')}`;
  await expect(find.message(alice, last)).toBeVisible();

  step('scroll up until the first message: the window moves, older pages load, the page stays bounded');
  const first = find.message(alice, 'seed 00001');
  let most = 0;
  for (let round = 0; (await first.count()) === 0; round++) {
    expect(round, 'rounds of scrolling up').toBeLessThan(COUNT / 10);
    const top = await find.messages(alice).first().getAttribute('data-id');
    await find.history(alice).evaluate((el) => {
      el.scrollTop = 0;
    });
    await expect.poll(() => find.messages(alice).first().getAttribute('data-id')).not.toBe(top);
    most = Math.max(most, await inPage(alice));
  }
  await first.scrollIntoViewIfNeeded();
  await expect(first).toBeVisible();
  most = Math.max(most, await inPage(alice));
  console.log(`at most ${most} message elements in the page for a conversation of ${COUNT}`);
  expect(most).toBeLessThanOrEqual(find.MAX_MESSAGES_IN_PAGE);

  step('scroll back down to the newest: the window follows, still bounded');
  for (let round = 0; (await find.message(alice, last).count()) === 0; round++) {
    expect(round, 'rounds of scrolling down').toBeLessThan(COUNT / 10);
    const bottom = await find.messages(alice).last().getAttribute('data-id');
    await find.history(alice).evaluate((el) => {
      el.scrollTop = el.scrollHeight;
    });
    await expect.poll(() => find.messages(alice).last().getAttribute('data-id')).not.toBe(bottom);
    expect(await inPage(alice)).toBeLessThanOrEqual(find.MAX_MESSAGES_IN_PAGE);
  }
  await expect(find.message(alice, last)).toBeVisible();
});
