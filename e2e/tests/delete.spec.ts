/**
 * Scenario 5: deleting an account asks for the password in an accessible dialog (named, labelled, focused,
 * closed by Escape; cancel and a wrong password change nothing); then the app returns to the sign-in screen
 * saying why, the account cannot log in any more, nobody finds it, and the other user's conversation with it
 * says so and no longer offers a message box.
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

  step('bob opens the delete dialog: named, its password field labelled and focused; Escape closes it');
  await find.deleteAccount(bob).click();
  const dialog = bob.getByRole('dialog', { name: 'Delete your account?' });
  await expect(dialog).toBeVisible();
  await expect(dialog.getByLabel('Password')).toBeFocused();
  await bob.keyboard.press('Escape');
  await expect(dialog).toBeHidden();
  await check.loggedIn(bob, 'bob');

  step('cancel closes it too: still logged in');
  await find.deleteAccount(bob).click();
  await expect(find.deletePassword(bob)).toBeVisible();
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  await expect(find.deletePassword(bob)).toBeHidden();
  await check.loggedIn(bob, 'bob');

  step('a wrong password is refused in the dialog, in words about the password only');
  await act.deleteAccount(bob, 'not my password');
  await expect(find.deleteError(bob)).toHaveText('Wrong password.');
  await check.loggedIn(bob, 'bob');

  step('the right password deletes the account: back to the sign-in screen, which says so');
  await find.deletePassword(bob).fill(PASSWORD);
  await find.deleteConfirm(bob).click();
  await check.authScreen(bob);
  await expect(bob.getByRole('status').filter({ hasText: 'Your account was deleted.' })).toBeVisible();

  step('the deleted account cannot log in');
  await act.logIn(bob, 'bob', PASSWORD);
  await check.authError(bob, /wrong/i);

  step('alice sees that bob is gone: the conversation says so and offers no message box');
  await expect(alice.getByText('bob deleted their account. You can read your conversation, but not reply.')).toBeVisible();
  await expect(find.composer(alice)).toBeDisabled();
  await expect(find.send(alice)).toBeDisabled();
  // What bob wrote stays with alice.
  await check.once(alice, b1);

  step('nobody finds bob any more (a new user "bobby" is found, so the search did answer)');
  await act.signUp(bob, 'bobby', PASSWORD);
  await check.loggedIn(bob, 'bobby');
  await act.search(alice, 'b*');
  await check.searchFinds(alice, ['bobby']);
});
