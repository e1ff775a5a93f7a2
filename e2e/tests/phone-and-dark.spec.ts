/**
 * A phone-sized screen (390x844): the conversation list and the open conversation are two screens with a
 * back button between them. And the dark theme, which follows the system's preference, passes axe too.
 */
import { aliceAndBob, expect, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

const PHONE = { width: 390, height: 844 };

test('on a phone: list, then conversation, then back', async ({ cluster, openPage }) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);
  await alice.setViewportSize(PHONE);
  await act.startChat(bob, 'alice', 'alice');
  await act.send(bob, 'Are you on your phone?');

  step('the list fills the screen; opening a conversation replaces it');
  await expect(find.conversation(alice, 'bob')).toBeVisible();
  await act.openConversation(alice, 'bob');
  await check.conversationOpen(alice, 'bob');
  await expect(find.conversation(alice, 'bob')).toBeHidden();
  await act.send(alice, 'Yes! Two screens, one at a time.');
  await check.messages(alice, ['Are you on your phone?', 'Yes! Two screens, one at a time.']);
  await check.accessible(alice, 'phone conversation');
  await act.screenshot(alice, 'phone', PHONE);

  step('back to the list');
  await alice.getByRole('button', { name: 'Back to conversations' }).click();
  await expect(find.conversation(alice, 'bob')).toBeVisible();
  await expect(find.conversationTitle(alice)).toHaveCount(0);
  await check.accessible(alice, 'phone list');
});

test('the dark theme follows the system and stays readable', async ({ cluster, openPage }) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);
  await alice.emulateMedia({ colorScheme: 'dark' });
  await act.startChat(alice, 'bo*', 'bob');
  await act.send(alice, 'Hello from the dark side');
  await act.openConversation(bob, 'alice');
  await act.send(bob, 'Still readable?');
  await check.messages(alice, ['Hello from the dark side', 'Still readable?']);
  const background = await alice.evaluate(() => getComputedStyle(document.documentElement).backgroundColor);
  expect(background, 'a dark page background').toBe('rgb(23, 25, 35)');
  await check.accessible(alice, 'dark chat');
  await act.screenshot(alice, 'chat-dark');
});
