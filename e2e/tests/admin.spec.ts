/**
 * Scenario 4: the admin page (/admin) shows the replicas' roles: replica 0 primary at the start, replica 1
 * after replica 0 is killed with -9, and the restarted replica 0 as a backup. The page is served by replica 0
 * itself, so after the kill it has to poll the other replicas (admin-source) without a reload.
 */
import { expect, signedUp, step, test } from '../fixtures/app';
import * as act from '../helpers/act';
import * as check from '../helpers/check';
import * as find from '../helpers/find';

test('the admin page follows the primary through a kill -9 and a restart', async ({ cluster, openPage }) => {
  test.setTimeout(90_000);
  expect(await cluster.primary(), 'the lowest id is elected first').toBe(0);

  step('the admin page, served by replica 0, and a chat user (some traffic for the chart)');
  const admin = await openPage('admin', { replica: 0, path: '/admin' });
  const alice = await signedUp(openPage, 'alice', { replica: 0 });
  await check.online(alice, 0);
  const adminMark = await act.markPage(admin);

  await check.admin(admin, {
    primary: 0,
    roles: { 0: 'primary', 1: 'backup', 2: 'backup' },
    alive: { 0: true, 1: true, 2: true },
  });
  await expect(find.replicaRows(admin)).toHaveCount(3);
  const termBefore = await cluster.term();
  await expect(find.adminTerm(admin)).toHaveText(new RegExp(`^\\s*${termBefore}\\s*$`));
  await expect(find.adminChart(admin)).toBeVisible();
  await expect(find.adminChart(admin).locator('polyline, path').first()).toBeAttached();
  await check.adminSourceIsOneOf(admin, cluster.urls);

  step('kill -9 replica 0: replica 1 takes over');
  await cluster.kill(0);
  expect(await cluster.primary(20_000), 'the next lowest id takes over').toBe(1);
  const termAfter = await cluster.term();
  expect(termAfter).toBeGreaterThan(termBefore);
  await check.admin(
    admin,
    { primary: 1, roles: { 1: 'primary', 2: 'backup' }, alive: { 0: false, 1: true, 2: true } },
    check.FAILOVER_MS,
  );
  await expect(find.adminTerm(admin)).toHaveText(new RegExp(`^\\s*${termAfter}\\s*$`));
  await check.adminSourceIsOneOf(admin, [cluster.url(1), cluster.url(2)], check.FAILOVER_MS);
  await check.online(alice, 1, check.FAILOVER_MS);

  step('restart replica 0: it rejoins as a backup of replica 1');
  await cluster.restart(0);
  expect(await cluster.primary(20_000), 'replica 1 stays primary').toBe(1);
  await check.admin(
    admin,
    { primary: 1, roles: { 0: 'backup', 1: 'primary', 2: 'backup' }, alive: { 0: true, 1: true, 2: true } },
    check.FAILOVER_MS,
  );
  await expect(find.replicaRows(admin)).toHaveCount(3);
  await check.samePage(admin, adminMark);

  step('the chart keeps a sample a second per replica: wait for a readable history, then take the screenshot');
  await expect
    .poll(
      async () =>
        find
          .adminChart(admin)
          .locator('polyline')
          .evaluateAll((lines) =>
            Math.min(...lines.map((l) => (l.getAttribute('points') ?? '').trim().split(/\s+/).length)),
          ),
      { timeout: 20_000, message: 'every replica has 10 samples in the chart' },
    )
    .toBeGreaterThanOrEqual(10);
  await expect(find.adminChart(admin).locator('polyline')).toHaveCount(3);
  await act.screenshot(admin, 'admin');
});
