/**
 * Sessions end where their owner says: "Log out everywhere" in one browser ends the sessions of every other
 * browser of the account at once (they return to the sign-in screen, saying why), and none of their tokens
 * can resume any more; other accounts are untouched.
 */
import { aliceAndBob, expect, loggedIn, step, test } from '../fixtures/app';
import * as check from '../helpers/check';

test('log out everywhere ends every session of the account, in every browser', async ({ cluster, openPage }) => {
  const { primary, alice, bob } = await aliceAndBob(cluster, openPage);

  step('alice also logs in on a second browser (her phone)');
  const phone = await loggedIn(openPage, 'alice', { replica: primary });

  step('on her laptop she chooses "Log out everywhere"');
  await alice.getByRole('button', { name: 'Log out everywhere' }).click();
  await check.authScreen(alice);

  step('her phone is signed out at once, and says why');
  await check.authScreen(phone);
  await expect(phone.getByRole('status').filter({ hasText: 'You were logged out on every device.' })).toBeVisible();

  step('a reload does not bring the session back (its token was revoked)');
  await phone.reload();
  await check.authScreen(phone);

  step("bob's session is untouched");
  await check.loggedIn(bob, 'bob');
  await check.online(bob);
});
