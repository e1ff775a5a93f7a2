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

test('after a kill -9 the admin page shows the dead replica as last known, the elections, and a readable chart', async ({
  cluster,
  openPage,
}) => {
  test.setTimeout(90_000);
  const old = await cluster.primary();
  const backup = [0, 1, 2].find((id) => id !== old)!;

  step(`the admin page, served by backup ${backup} (it outlives the kill), and some traffic`);
  const admin = await openPage('admin', { replica: backup, path: '/admin' });
  const alice = await signedUp(openPage, 'alice', { replica: old });
  await check.online(alice, old);
  await cluster.appliedEqual();
  const termBefore = await cluster.term();
  const card0 = find.replicaCard(admin, old);
  await expect(card0.getByRole('heading')).toHaveText(new RegExp(`replica ${old} ★ primary`));
  await expect(find.cardValue(card0, 'term')).toHaveText(String(termBefore));
  const status0 = await cluster.status(old);
  const indexBefore = status0!.last_index;
  expect(indexBefore).toBeGreaterThan(0);
  await expect(find.cardValue(card0, 'last index')).toHaveText(String(indexBefore));

  step(`record every state the card of replica ${old} goes through`);
  await admin.evaluate((old) => {
    const w = window as unknown as { __card0: string[] };
    w.__card0 = [];
    const note = () => {
      const card = document.querySelector(`[data-testid="replica"][data-id="${old}"]`);
      const state = card ? `${card.getAttribute('data-role')}/${card.getAttribute('data-alive')}` : 'none';
      if (w.__card0[w.__card0.length - 1] !== state) w.__card0.push(state);
    };
    note();
    new MutationObserver(note).observe(document.body, { subtree: true, childList: true, attributes: true });
  }, old);

  step(`kill -9 replica ${old}: another takes over`);
  await cluster.kill(old);
  const next = await cluster.primary(20_000);
  expect(next).not.toBe(old);
  const termAfter = await cluster.term();
  await check.admin(admin, { primary: next, roles: { [next]: 'primary' }, alive: { [old]: false } }, check.FAILOVER_MS);

  step('the dead replica: not answering, its last known index and term, when it was last heard');
  await expect(card0.getByRole('heading')).toHaveText(new RegExp(`replica ${old} not answering`));
  await expect(card0).not.toContainText('primary');
  await expect(find.cardValue(card0, 'last known index')).toHaveText(String(indexBefore));
  await expect(find.cardValue(card0, 'term')).toHaveText(String(termBefore));
  await expect(find.cardValue(card0, 'state')).toHaveText(/^last heard \d+ s ago$/);
  const card1 = find.replicaCard(admin, next);
  await expect(card1.getByRole('heading')).toHaveText(new RegExp(`replica ${next} ★ primary`));
  await expect(find.cardValue(card1, 'term')).toHaveText(String(termAfter));
  const states = await admin.evaluate(() => (window as unknown as { __card0: string[] }).__card0);
  const firstDown = states.indexOf('unknown/false');
  expect(firstDown, `states of replica ${old}'s card: ${states.join(' → ')}`).toBeGreaterThanOrEqual(0);
  expect(
    states.slice(firstDown).filter((s) => s.endsWith('/true')),
    `once shown down, replica ${old} is never shown alive again while it is dead: ${states.join(' → ')}`,
  ).toEqual([]);

  step('the events: both elections (who won which term) and the replica that stopped answering');
  await expect(find.adminEvents(admin).filter({ hasText: `replica ${next} won the election of term ${termAfter}` })).toHaveCount(1);
  await expect(find.adminEvents(admin).filter({ hasText: `replica ${old} won the election of term ${termBefore}` })).toHaveCount(1);
  await expect(find.adminEvents(admin).filter({ hasText: `replica ${old} stopped answering` })).toHaveCount(1);
  await expect(find.adminEvents(admin).first()).toHaveText(/^\d\d:\d\d:\d\d /);

  step('the chart: a legend per replica, lines told apart (dashes, offset), the scale clear of the plot');
  const chart = find.adminChart(admin);
  await expect(chart).toHaveAccessibleName(/last log index/i);
  for (const id of [0, 1, 2]) {
    const label = id === old ? `replica ${id} (not answering)` : `replica ${id}`;
    await expect(chart.getByText(label, { exact: true })).toBeAttached();
  }
  const drawn = await chart.locator('polyline').evaluateAll((lines) =>
    lines.map((l) => ({ dashes: l.getAttribute('stroke-dasharray') ?? '', points: l.getAttribute('points') ?? '' })),
  );
  expect(drawn).toHaveLength(3);
  expect(new Set(drawn.map((d) => d.dashes)).size, 'each replica has its own dash pattern').toBe(3);
  expect(new Set(drawn.map((d) => d.points)).size, 'no two lines are drawn on the same points').toBe(3);
  const overlap = await chart.evaluate((svg) => {
    const plot = (svg.querySelector('rect.plot') as SVGGraphicsElement).getBBox();
    return [...svg.querySelectorAll('text.axis')].map((t) => {
      const b = (t as SVGGraphicsElement).getBBox();
      return b.x + b.width > plot.x;
    });
  });
  expect(overlap.length).toBeGreaterThan(0);
  expect(overlap, 'the scale labels sit left of the plot area').not.toContain(true);
  await check.accessible(admin, 'admin after a failover');
  await act.screenshot(admin, 'admin-failover');

  step('on a phone (390x844) the replicas are cards and no word is broken across lines');
  await admin.setViewportSize({ width: 390, height: 844 });
  await expect(card0).toBeVisible();
  const broken = await admin.evaluate(() => {
    const found: string[] = [];
    const list = document.querySelector('ul.replicas')!;
    const walker = document.createTreeWalker(list, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement?.closest('a')) continue; // URLs may wrap anywhere
      const text = node.textContent ?? '';
      for (const match of text.matchAll(/\S+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index!);
        range.setEnd(node, match.index! + match[0].length);
        const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
        if (lines.size > 1) found.push(match[0]);
      }
    }
    return found;
  });
  expect(broken, 'words broken across lines on a phone').toEqual([]);
  const overflowing = await find
    .replicaRows(admin)
    .evaluateAll((cards) => cards.filter((c) => c.scrollWidth > c.clientWidth + 1).length);
  expect(overflowing, 'cards fit the phone screen').toBe(0);
});

test('the admin page says why a replica of another replication format is kept out of the group', async ({
  cluster,
  openPage,
}) => {
  test.setTimeout(60_000);
  expect(await cluster.primary()).toBe(0);
  const admin = await openPage('admin', { replica: 0, path: '/admin' });
  await check.admin(admin, {
    primary: 0,
    roles: { 0: 'primary', 1: 'backup', 2: 'backup' },
    alive: { 0: true, 1: true, 2: true },
  });
  const refused = find.replicaCard(admin, 2).getByTestId('refused');
  await expect(refused).toHaveCount(0);

  step('replica 2 restarted as a build of another replication format would be: it answers, the others refuse it');
  await cluster.stop(2);
  await cluster.restart(2, { REPLICHAT_TEST_REPLICATION_FORMAT: '99' });
  // Replicas 0 and 1 both dial it, and both say which formats met: its 99 and their own.
  await expect(refused.first()).toHaveText(/^replica [01]: the peer speaks replication format 99, this replica \d+$/, {
    timeout: check.FAILOVER_MS,
  });

  step("restarted on the group's format, it is back in the group and the note goes");
  await cluster.stop(2);
  await cluster.restart(2);
  await check.admin(
    admin,
    { primary: 0, roles: { 0: 'primary', 1: 'backup', 2: 'backup' }, alive: { 0: true, 1: true, 2: true } },
    check.FAILOVER_MS,
  );
  await expect(refused).toHaveCount(0, { timeout: check.FAILOVER_MS });
});
