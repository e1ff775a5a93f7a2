/**
 * What a person typed is never lost: a message written while no primary can be reached waits in the
 * browser's outbox, survives a reload, and is delivered exactly once when the cluster is back.
 */
import { expect, signedUp, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('a message written during an outage survives a reload and arrives exactly once', async ({ cluster, openPage }) => {
  const primary = await cluster.primary();
  const [host, other] = [0, 1, 2].filter((id) => id !== primary);

  step(`alice's page comes from backup ${host} (it stays up); bob's from the primary ${primary}`);
  const alice = await signedUp(openPage, 'alice', { replica: host });
  const bob = await signedUp(openPage, 'bob', { replica: primary });
  await act.startChat(alice, 'bob', 'bob');
  const hello = 'Hello Bob, before the outage.';
  await act.send(alice, hello);
  await check.status(alice, hello, 'delivered');

  step(`the primary ${primary} and replica ${other} stop: no majority, nobody can write`);
  await cluster.stop(primary);
  await cluster.stop(other);
  // When the primary's connection closes the lowest live id asks for votes at once: replica `host` may win with
  // `other`'s vote before `other` stops, and stays primary until it notices it lost its majority. Wait for that
  // (it took the resent message once, then answered it `unavailable`, and a reload found it still primary).
  await expect
    .poll(async () => (await cluster.status(host))?.role, { timeout: check.FAILOVER_MS })
    .not.toBe('primary');
  await check.notOnline(alice);

  step('alice writes anyway: it waits as "sending"');
  const during = 'Written during the outage, please do not lose me.';
  await act.send(alice, during);
  await check.status(alice, during, 'sending');

  step('alice reloads the page before the cluster is back: it waits to restore her session');
  await alice.reload();
  await expect(alice.getByText('Restoring your session…')).toBeVisible();

  step('the two replicas come back: her session, the open conversation and the message are back');
  await cluster.restart(primary);
  await cluster.restart(other);
  await check.loggedIn(alice, 'alice');
  await check.online(alice, undefined, check.FAILOVER_MS);
  await check.conversationOpen(alice, 'bob');

  step('the message written before the reload is sent once and reaches bob once');
  await check.status(alice, during, /^(sent|delivered|read)$/, check.FAILOVER_MS);
  await check.once(alice, during);
  await act.openConversation(bob, 'alice');
  await check.messages(bob, [hello, during], check.FAILOVER_MS);
  await check.once(bob, during);
  await expect(find.messages(alice)).toHaveCount(2);
});

test('a message the primary could not commit waits in the outbox and is sent once the cluster is back', async ({ cluster, openPage }) => {
  const primary = await cluster.primary();
  const backups = [0, 1, 2].filter((id) => id !== primary);

  step(`alice and bob talk through the primary ${primary}`);
  const alice = await signedUp(openPage, 'alice', { replica: primary });
  const bob = await signedUp(openPage, 'bob', { replica: primary });
  await act.startChat(alice, 'bob', 'bob');
  const hello = 'Hello Bob, while all is well.';
  await act.send(alice, hello);
  await check.status(alice, hello, 'delivered');

  step(`both backups (${backups.join(', ')}) stop: the primary takes the message but cannot commit it`);
  for (const id of backups) await cluster.stop(id);
  const during = 'Taken by a primary that lost its majority.';
  await act.send(alice, during);
  await check.status(alice, during, 'sending');

  step('the primary steps down and answers "unavailable": the message still waits, it is not marked failed');
  await expect
    .poll(async () => (await cluster.status(primary))?.role, { timeout: check.FAILOVER_MS })
    .not.toBe('primary');
  await check.notOnline(alice, check.FAILOVER_MS);
  await check.status(alice, during, 'sending');

  step('the backups come back: the message is sent once and reaches bob once');
  for (const id of backups) await cluster.restart(id);
  await check.online(alice, undefined, check.FAILOVER_MS);
  await check.status(alice, during, /^(sent|delivered|read)$/, check.FAILOVER_MS);
  await check.once(alice, during);
  await act.openConversation(bob, 'alice');
  await check.messages(bob, [hello, during], check.FAILOVER_MS);
  await check.once(bob, during);
});
