/**
 * The conversation list as people use it: reachable and movable with the keyboard, reopened after a reload,
 * a typing indicator right after one's own send, and an empty pane that points at the list when there is one.
 */
import { aliceAndBob, expect, loggedIn, signedUp, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('conversations: keyboard, reload, typing after a send, the empty pane', async ({ cluster, openPage }) => {
  const { primary, alice, bob } = await aliceAndBob(cluster, openPage);
  const carol = await signedUp(openPage, 'carol', { replica: primary });

  step('signed in, the keyboard starts in the search box; picking a result clears it and focuses the message box');
  await expect(bob.getByRole('textbox', { name: 'Find people (* is a wildcard)' })).toBeFocused();
  await act.startChat(bob, 'ali*', 'alice');
  await expect(find.searchInput(bob)).toHaveValue('');
  await expect(bob.getByRole('textbox', { name: 'Message to alice' })).toBeFocused();

  step('bob and carol each write to alice: two conversations in her list');
  await act.send(bob, 'Hello from bob');
  await act.startChat(carol, 'alice', 'alice');
  await act.send(carol, 'Hello from carol');
  await expect(find.conversations(alice)).toHaveCount(2);
  // Two unread messages: the tab's title says so.
  await expect(alice).toHaveTitle('(2) replichat');

  step('alice reaches the list with Tab, moves with the arrows and opens a conversation with Enter');
  const first = find.conversations(alice).first().getByRole('button');
  const second = find.conversations(alice).nth(1).getByRole('button');
  await first.focus();
  await expect(first).toBeFocused();
  await alice.keyboard.press('ArrowDown');
  await expect(second).toBeFocused();
  await alice.keyboard.press('ArrowUp');
  await expect(first).toBeFocused();
  await alice.keyboard.press('Shift+Tab');
  await alice.keyboard.press('Tab');
  await expect(first).toBeFocused();
  await alice.keyboard.press('Enter');
  await check.conversationOpen(alice, 'carol');
  await expect(alice).toHaveTitle('(1) replichat');
  // Messages of a day come under its label.
  await expect(alice.getByRole('separator', { name: 'Today' })).toBeVisible();
  // Presence is in words for assistive technology, not only a colour.
  await expect(find.presence(alice, 'carol')).toHaveAttribute('aria-label', 'online');

  step('a reload reopens the conversation that was open');
  await alice.reload();
  await check.loggedIn(alice, 'alice');
  await check.conversationOpen(alice, 'carol');
  await check.messages(alice, ['Hello from carol']);

  step('right after sending, typing again shows the indicator to the peer');
  await act.openConversation(bob, 'alice');
  await act.openConversation(alice, 'bob');
  await act.send(bob, 'One more thing');
  await check.messages(alice, ['Hello from bob', 'One more thing']);
  await act.type(bob, 'and');
  await check.typingShown(alice, true);

  step('a new tab of the same browser is signed in already (the session belongs to the browser profile)');
  const tab = await alice.context().newPage();
  await tab.goto(alice.url());
  await check.loggedIn(tab, 'alice');
  await check.conversationOpen(tab, 'bob');

  step('on a new browser with conversations but none open, the empty pane points at the list');
  const tablet = await loggedIn(openPage, 'alice', { replica: primary });
  await expect(tablet.getByText('Choose a conversation on the left, or search for someone new.')).toBeVisible();
});
