/**
 * The conversation view loads older history when scrolled to the top (and with the "Load older" button),
 * keeping every message once and in order.
 */
import { expect } from '@playwright/test';

import { aliceAndBob, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('scrolling to the top of a long conversation loads the older pages', async ({ cluster, openPage }) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);
  const texts = Array.from({ length: 55 }, (_, i) => `history line ${String(i).padStart(2, '0')}`);

  step('alice writes 55 messages (one page is 50)');
  await act.startChat(alice, 'bob', 'bob');
  await check.conversationOpen(alice, 'bob');
  for (const text of texts) {
    await act.send(alice, text);
  }
  await check.hasServerId(alice, texts[texts.length - 1]);

  step('bob reloads the page (it resumes its session with a fresh view), then opens the conversation');
  await check.unreadBadge(bob, 'alice', 55);
  await bob.reload();
  await check.online(bob);
  await act.openConversation(bob, 'alice');
  await check.conversationOpen(bob, 'alice');
  // The newest 50, and a way to older ones.
  await expect(find.messages(bob)).toHaveCount(50);
  await expect(find.messageTexts(bob).first()).toHaveText(texts[5]);
  await expect(find.loadOlder(bob)).toBeVisible();

  step('bob scrolls to the top: the older page is loaded above, nothing twice');
  await find.history(bob).evaluate((el) => {
    el.scrollTop = 0;
    el.dispatchEvent(new Event('scroll'));
  });
  await expect(find.messages(bob)).toHaveCount(55);
  await expect(find.messageTexts(bob)).toHaveText(texts);
  await expect(find.loadOlder(bob)).toHaveCount(0);
});
