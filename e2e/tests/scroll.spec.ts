/**
 * Reading older messages is not interrupted: a message that arrives meanwhile keeps the reading position and
 * shows a "new message ↓" marker, which takes the reader down to it.
 */
import { aliceAndBob, expect, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('a new message does not scroll away from what one is reading', async ({ cluster, openPage }) => {
  const { alice, bob } = await aliceAndBob(cluster, openPage);
  step('bob writes alice a long conversation; she has it open');
  await act.startChat(bob, 'alice', 'alice');
  const many = Array.from({ length: 30 }, (_, i) => `Message number ${i + 1} of a long story.`);
  for (const text of many) await act.send(bob, text);
  await act.openConversation(alice, 'bob');
  await check.messages(alice, many);
  const history = find.history(alice);
  const atBottom = () => history.evaluate((el) => el.scrollHeight - el.scrollTop - el.clientHeight < 48);
  await expect.poll(atBottom).toBe(true);

  step('alice scrolls up to read the beginning; bob writes again: her position stays, a marker appears');
  await history.evaluate((el) => {
    el.scrollTop = 0;
  });
  await expect.poll(() => history.evaluate((el) => el.scrollTop)).toBe(0);
  await act.send(bob, 'Are you reading all this?');
  await check.messages(alice, [...many, 'Are you reading all this?']);
  const marker = alice.getByRole('button', { name: '1 new message ↓' });
  await expect(marker).toBeVisible();
  expect(await history.evaluate((el) => el.scrollTop), 'still at the top').toBe(0);

  step('the marker takes her down to the new message, and goes away');
  await marker.click();
  await expect.poll(atBottom).toBe(true);
  await expect(marker).toBeHidden();

  step('at the bottom, a new message simply shows (no marker)');
  await act.send(bob, 'Good.');
  await check.messages(alice, [...many, 'Are you reading all this?', 'Good.']);
  await expect.poll(atBottom).toBe(true);
  await expect(alice.getByRole('button', { name: /new message/ })).toHaveCount(0);
});
