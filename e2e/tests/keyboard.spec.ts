/**
 * Keyboard only, no mouse: sign up, search, open a chat from the sidebar, send, open the delete dialog and
 * cancel it with Escape.
 */
import { expect, signedUp, step, test } from '../fixtures/app';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('everything a person needs works from the keyboard alone', async ({ cluster, openPage }) => {
  const primary = await cluster.primary();
  await signedUp(openPage, 'bob', { replica: primary });
  const page = await openPage('alice', { replica: primary });
  const keys = page.keyboard;

  step('sign up: Tab to the username, type, Tab to the password, type, Tab to "Sign up", Enter');
  await check.authScreen(page);
  await keys.press('Tab');
  await expect(page.getByLabel('Username')).toBeFocused();
  await keys.type('alice');
  await keys.press('Tab');
  await expect(page.getByLabel('Password')).toBeFocused();
  await keys.type('correct horse battery');
  await keys.press('Tab');
  await expect(page.getByRole('button', { name: 'Log in' })).toBeFocused();
  await keys.press('Tab');
  await expect(page.getByRole('button', { name: 'Sign up' })).toBeFocused();
  await keys.press('Enter');
  await check.loggedIn(page, 'alice');

  step('search: the keyboard is in the search box; Enter searches; Tab to the result; Enter opens the chat');
  await expect(find.searchInput(page)).toBeFocused();
  await keys.type('bo*');
  await keys.press('Enter');
  await check.searchFinds(page, ['bob']);
  await keys.press('Tab');
  await keys.press('Tab');
  await expect(find.searchResult(page, 'bob')).toBeFocused();
  await keys.press('Enter');
  await check.conversationOpen(page, 'bob');

  step('send: the keyboard is in the message box; Enter sends');
  await expect(find.composer(page)).toBeFocused();
  await keys.type('Typed and sent without a mouse.');
  await keys.press('Enter');
  await check.status(page, 'Typed and sent without a mouse.', /^(sent|delivered|read)$/);

  step('the conversation is in the sidebar: Shift+Tab back to it, Enter reopens it');
  const item = find.conversation(page, 'bob').getByRole('button');
  for (let i = 0; i < 10 && !(await item.evaluate((el) => el === document.activeElement)); i++) {
    await keys.press('Shift+Tab');
  }
  await expect(item).toBeFocused();
  await keys.press('Enter');
  await check.conversationOpen(page, 'bob');

  step('the delete dialog: reach "Delete account" with Tab, open it with Enter, close it with Escape');
  const deleteButton = page.getByRole('button', { name: 'Delete account' });
  for (let i = 0; i < 20 && !(await deleteButton.evaluate((el) => el === document.activeElement)); i++) {
    await keys.press('Shift+Tab');
  }
  await expect(deleteButton).toBeFocused();
  await keys.press('Enter');
  const dialog = page.getByRole('dialog', { name: 'Delete your account?' });
  await expect(dialog).toBeVisible();
  await expect(dialog.getByLabel('Password')).toBeFocused();
  await keys.press('Escape');
  await expect(dialog).toBeHidden();
  await check.loggedIn(page, 'alice');
});
