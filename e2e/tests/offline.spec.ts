/**
 * Scenario 2: a user is offline (logged out, or their browser closed) while the other writes. At their next
 * login the messages are there, in order, counted in the sidebar's unread badge and marked unread; the sender
 * sees sent (while offline) -> delivered (at the login) -> read (when the conversation is opened).
 */
import type { Page } from '@playwright/test';

import { aliceAndBob, loggedIn, PASSWORD, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';

/** alice and bob, both online, who have already exchanged one message each (so they are contacts). */
async function contacts(alice: Page, bob: Page): Promise<string[]> {
  const hello = 'Hello Bob, are you around this week?';
  const reply = 'Hi Alice, mostly, yes.';
  await act.startChat(alice, 'bo*', 'bob');
  await check.conversationOpen(alice, 'bob');
  await act.send(alice, hello);
  await check.unreadBadge(bob, 'alice', 1);
  await act.openConversation(bob, 'alice');
  await check.conversationOpen(bob, 'alice');
  await check.status(alice, hello, 'read');
  await act.send(bob, reply);
  await check.messages(alice, [hello, reply]);
  await check.status(bob, reply, 'read');
  return [hello, reply];
}

/** alice writes `texts` while bob is offline: each is stored (sent, with an id) but not delivered. */
async function writeWhileOffline(alice: Page, texts: string[]): Promise<void> {
  for (const text of texts) {
    await act.send(alice, text);
    await check.status(alice, text, 'sent');
    await check.hasServerId(alice, text);
  }
}

/** bob, logged in again, finds `missed` from alice in order, counted and marked unread; alice sees read. */
async function findsMissedMessages(alice: Page, bob: Page, before: string[], missed: string[]): Promise<void> {
  step('bob is back: the sidebar counts the missed messages; alice sees them delivered');
  await check.unreadBadge(bob, 'alice', missed.length);
  for (const text of missed) await check.status(alice, text, 'delivered');
  await check.presence(alice, 'bob', true);

  step('bob opens the conversation: everything in order, the missed ones marked unread; alice sees read');
  await act.openConversation(bob, 'alice');
  await check.conversationOpen(bob, 'alice');
  await check.messages(bob, [...before, ...missed]);
  await check.unreadMarks(bob, 'alice', missed, true);
  await check.unreadMarks(bob, 'alice', before.slice(0, 1), false);
  for (const text of missed) await check.status(alice, text, 'read');
  await check.unreadBadge(bob, 'alice', 0);
  for (const text of missed) await check.statusSequence(alice, text, ['sent', 'delivered', 'read']);
}

test('messages sent while the recipient is logged out wait for their next login, unread', async ({
  cluster,
  openPage,
}) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);
  const before = await contacts(alice, bob);
  await act.recordStatuses(alice);

  step('bob logs out: back to the sign-in screen; alice sees him offline');
  await act.logOut(bob);
  await check.authScreen(bob);
  await check.presence(alice, 'bob', false);

  step('alice writes three messages while bob is away');
  const missed = ['First, the venue moved.', 'Second: it is now at 12:45.', 'Third — please confirm!'];
  await writeWhileOffline(alice, missed);

  step('bob logs in again on the same page');
  await act.logIn(bob, 'bob', PASSWORD);
  await check.loggedIn(bob, 'bob');
  await findsMissedMessages(alice, bob, before, missed);
});

test('messages sent while the recipient has closed the browser wait for their next login, unread', async ({
  cluster,
  openPage,
}) => {
  const { primary, alice, bob } = await aliceAndBob(cluster, openPage);
  const before = await contacts(alice, bob);
  await act.recordStatuses(alice);

  step('bob closes his browser (context): alice sees him offline');
  await bob.context().close();
  await check.presence(alice, 'bob', false);

  step('alice writes two messages while bob is away');
  const missed = ['Did you see my note?', 'Call me when you are back.'];
  await writeWhileOffline(alice, missed);

  step('bob opens the app in a fresh browser (no saved session) on another replica and logs in');
  const bobAgain = await loggedIn(openPage, 'bob', { replica: (primary + 2) % 3 });
  await check.online(bobAgain, primary);
  await findsMissedMessages(alice, bobAgain, before, missed);
});
