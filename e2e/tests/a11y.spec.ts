/**
 * axe-core on every view a person meets: sign-in, the chat with a conversation open, the delete dialog, the
 * chat while reconnecting, and the admin page. Any serious or critical WCAG 2 A/AA violation fails.
 */
import { aliceAndBob, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('no serious or critical accessibility violation on any view', async ({ cluster, openPage }) => {
  step('the sign-in view');
  const visitor = await openPage('visitor');
  await check.authScreen(visitor);
  await check.accessible(visitor, 'sign-in');

  step('the chat view, a conversation open with messages both ways');
  const { primary, alice, bob } = await aliceAndBob(cluster, openPage);
  await act.startChat(alice, 'bo*', 'bob');
  await act.send(alice, 'Hello Bob!');
  await act.openConversation(bob, 'alice');
  await act.send(bob, 'Hi Alice, all good?');
  await check.messages(alice, ['Hello Bob!', 'Hi Alice, all good?']);
  await check.accessible(alice, 'chat');

  step('the delete dialog');
  await find.deleteAccount(bob).click();
  await check.accessible(bob, 'delete dialog');
  await bob.keyboard.press('Escape');

  step('the admin page');
  const admin = await openPage('admin', { replica: primary, path: '/admin' });
  // Checked once it shows the cluster: axe on the page before its first poll checked only 5 rules (CI, loaded).
  await check.adminSourceIsOneOf(admin, cluster.urls);
  await check.accessible(admin, 'admin');

  step('the chat while reconnecting (the primary is down)');
  await cluster.kill(primary);
  await check.notOnline(alice);
  await check.accessible(alice, 'reconnecting');
});
