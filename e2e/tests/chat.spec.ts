/**
 * Scenario 1: two users sign up, one finds the other with a wildcard search, they chat both ways live, and the
 * sender sees its messages go sent -> delivered -> read once the recipient has the conversation open.
 */
import { expect, signedUp, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('sign up, find with a wildcard, chat live both ways, see delivered and read', async ({ cluster, openPage }) => {
  const primary = await cluster.primary();
  const backup = (primary + 1) % 3;

  step(`alice signs up on the primary (${primary}), bob on a backup (${backup}): the app finds the primary`);
  const alice = await signedUp(openPage, 'alice', { replica: primary });
  const bob = await signedUp(openPage, 'bob', { replica: backup });
  await check.online(alice, primary);
  await check.online(bob, primary);

  step('alice finds bob with "b*" and opens the conversation');
  await act.search(alice, 'b*');
  await check.searchFinds(alice, ['bob']);
  await act.pickResult(alice, 'bob');
  await check.conversationOpen(alice, 'bob');
  await act.recordStatuses(alice);
  await act.recordStatuses(bob);

  step('alice writes; bob is online but has not opened the conversation: delivered, unread badge 1');
  const a1 = 'Hi Bob! Lunch tomorrow?';
  await act.send(alice, a1);
  await check.status(alice, a1, 'delivered');
  await check.hasServerId(alice, a1);
  await check.unreadBadge(bob, 'alice', 1);

  step('bob finds alice with "*ice" and opens the conversation: alice sees read');
  await act.search(bob, '*ice');
  await check.searchFinds(bob, ['alice']);
  await act.pickResult(bob, 'alice');
  await check.conversationOpen(bob, 'alice');
  await check.messages(bob, [a1]);
  await check.status(alice, a1, 'read');
  await check.statusSequence(alice, a1, ['delivered', 'read']);
  await check.unreadBadge(bob, 'alice', 0);

  step('bob types: alice sees the typing indicator');
  await act.type(bob, 'Sure');
  await check.typingShown(alice, true);

  step('bob replies: it appears live at alice (conversation open), so bob sees read');
  const b1 = 'Sure! 12:30 at the usual place?';
  await act.send(bob, b1);
  await check.messages(alice, [a1, b1]);
  await check.unreadMarks(alice, 'bob', [b1], false);
  await check.status(bob, b1, 'read');
  await check.statusSequence(bob, b1, ['read']);
  // The status is a compact tick, said in words (with the time) to assistive technology and in its tooltip.
  await expect(find.message(bob, b1).getByRole('img', { name: /^Sent at \d\d:\d\d, read$/ })).toBeVisible();

  step('more messages both ways, each shown once, in order, on both sides');
  const a2 = 'Perfect, see you there.';
  const b2 = 'Bring an umbrella ☔ — the forecast says rain <b>not bold</b>';
  await act.send(alice, a2);
  await check.messages(bob, [a1, b1, a2]);
  await act.send(bob, b2);
  const all = [a1, b1, a2, b2];
  await check.messages(alice, all);
  await check.messages(bob, all);
  for (const text of [a1, a2]) await check.status(alice, text, 'read');
  for (const text of [b1, b2]) await check.status(bob, text, 'read');
  await check.statusSequence(alice, a2, ['read']);
  await check.statusSequence(bob, b2, ['read']);

  step('screenshot of the conversation for the README');
  await act.screenshot(alice, 'chat');
});
