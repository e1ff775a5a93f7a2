/**
 * Scenario 5: deleting an account asks for the password (cancel and a wrong password change nothing); then
 * the app returns to the sign-in screen, the account cannot log in any more, nobody finds it, and the other
 * user's messages to it fail with a clear error under the composer.
 */
import { aliceAndBob, expect, PASSWORD, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('delete account with confirmation; sends to the deleted account fail clearly', async ({ cluster, openPage }) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);

  step('alice and bob talk');
  await act.startChat(alice, 'b*', 'bob');
  await check.conversationOpen(alice, 'bob');
  const a1 = 'Are you leaving the chat?';
  await act.send(alice, a1);
  await check.unreadBadge(bob, 'alice', 1);
  await act.openConversation(bob, 'alice');
  const b1 = 'Yes, deleting my account now. Bye!';
  await act.send(bob, b1);
  await check.messages(alice, [a1, b1]);

  step('bob opens the delete dialog and cancels: still logged in');
  await find.deleteAccount(bob).click();
  await expect(find.deletePassword(bob)).toBeVisible();
  await find.deleteCancel(bob).click();
  await expect(find.deletePassword(bob)).toBeHidden();
  await check.loggedIn(bob, 'bob');

  step('a wrong password is refused in the dialog');
  await act.deleteAccount(bob, 'not my password');
  await expect(find.deleteError(bob)).toBeVisible();
  await expect(find.deleteError(bob)).toHaveText(/\S/);
  await check.loggedIn(bob, 'bob');

  step('the right password deletes the account: back to the sign-in screen');
  await find.deletePassword(bob).fill(PASSWORD);
  await find.deleteConfirm(bob).click();
  await check.authScreen(bob);

  step('the deleted account cannot log in');
  await act.logIn(bob, 'bob', PASSWORD);
  await check.authError(bob, /wrong/i);

  step("alice's messages to bob now fail with a clear error");
  const a2 = 'Bob? Are you still there?';
  await act.send(alice, a2);
  await check.composerError(alice, /deleted|no account/i);
  // Refused: never stored (no server id, never sent/delivered/read).
  await expect(find.message(alice, a2)).not.toHaveAttribute('data-status', /^(sent|delivered|read)$/);
  await expect(find.message(alice, a2)).not.toHaveAttribute('data-id', /\d/);
  // What bob wrote stays with alice.
  await check.once(alice, b1);

  step('nobody finds bob any more (a new user "bobby" is found, so the search did answer)');
  await act.signUp(bob, 'bobby', PASSWORD);
  await check.loggedIn(bob, 'bobby');
  await act.search(alice, 'b*');
  await check.searchFinds(alice, ['bobby']);
});
