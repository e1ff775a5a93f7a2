/**
 * Scenario 6: bad input is refused in the UI with an inline error: a bad username, a short password, a taken
 * username, a wrong password and too many failed logins at sign-in; an empty, blank or over-long (4001
 * characters) message in the composer, while exactly 4000 characters go through.
 */
import { aliceAndBob, expect, PASSWORD, signedUp, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('bad sign-up and log-in input gets an inline auth error', async ({ cluster, openPage }) => {
  const primary = await cluster.primary();
  const alice = await signedUp(openPage, 'alice', { replica: primary });
  const other = await openPage('other', { replica: primary });
  await check.online(other, primary);

  step('a username with a space is refused');
  await act.signUp(other, 'has space', PASSWORD);
  await check.authError(other, /invalid/i);

  step('a username with * or over 32 characters is refused');
  await act.signUp(other, 'star*name', PASSWORD);
  await check.authError(other, /invalid/i);
  await act.signUp(other, 'x'.repeat(33), PASSWORD);
  await check.authError(other, /invalid/i);

  step('a short password is refused');
  await act.signUp(other, 'carol', 'short');
  await check.authError(other, /password|8/i);

  step('a taken username (in any case) is refused');
  await act.signUp(other, 'ALICE', PASSWORD);
  await check.authError(other, /taken/i);

  step('a wrong password is refused, and the sixth failed login within a minute is rate limited');
  for (let attempt = 1; attempt <= 5; attempt++) {
    await act.logIn(other, 'alice', `wrong password ${attempt}`);
    await check.authError(other, /wrong/i);
  }
  await act.logIn(other, 'alice', PASSWORD);
  await check.authError(other, /too many/i);

  step('nothing of that affected alice, and a good sign-up still works');
  await check.loggedIn(alice, 'alice');
  await act.signUp(other, 'carol', PASSWORD);
  await check.loggedIn(other, 'carol');
});

test('empty, blank and over-long messages are refused in the composer; 4000 characters are fine', async ({
  cluster,
  openPage,
}) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);
  await act.startChat(alice, 'bob', 'bob');
  await check.conversationOpen(alice, 'bob');

  step('an empty message is refused');
  await act.send(alice, '');
  await check.composerError(alice);
  await expect(find.messages(alice)).toHaveCount(0);

  step('a message of only whitespace is refused');
  await act.send(alice, '   \n  ');
  await check.composerError(alice);
  await expect(find.messages(alice)).toHaveCount(0);

  step('4001 characters are refused');
  await act.send(alice, 'x'.repeat(4001));
  await check.composerError(alice, /4000|too long/i);
  await expect(find.messages(alice)).toHaveCount(0);

  step('exactly 4000 characters go through, and the error goes away');
  const longest = `${'y'.repeat(3999)}!`;
  await act.send(alice, longest);
  await check.noComposerError(alice);
  await check.status(alice, longest, /^(sent|delivered|read)$/);
  await expect(find.messages(alice)).toHaveCount(1);

  step('bob received only that one message, intact');
  await check.unreadBadge(bob, 'alice', 1);
  await act.openConversation(bob, 'alice');
  await check.messages(bob, [longest]);
  await check.status(alice, longest, 'read');
});
