/**
 * act: what a user (or the test) does to the page. Actions only click, type and instrument; the waiting for an
 * outcome is left to check.ts (Playwright's auto-waiting expects), so a test reads find -> act -> check.
 */
import type { Page } from '@playwright/test';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { type ClusterTiming, ELECTION_TIMEOUT_MS, HEARTBEAT_MS, REPO_ROOT } from '../fixtures/cluster';
import * as find from './find';

/** Fill the auth form and click "Sign up". */
export async function signUp(page: Page, username: string, password: string): Promise<void> {
  await find.authUsername(page).fill(username);
  await find.authPassword(page).fill(password);
  await find.authRegister(page).click();
}

/** Fill the auth form and click "Log in". */
export async function logIn(page: Page, username: string, password: string): Promise<void> {
  await find.authUsername(page).fill(username);
  await find.authPassword(page).fill(password);
  await find.authLogin(page).click();
}

export async function logOut(page: Page): Promise<void> {
  await find.logout(page).click();
}

/** Search people with a wildcard pattern (`bo*`). */
export async function search(page: Page, pattern: string): Promise<void> {
  await find.searchInput(page).fill(pattern);
  await find.searchButton(page).click();
}

/** Click the search result `username`: opens the conversation with them. */
export async function pickResult(page: Page, username: string): Promise<void> {
  await find.searchResult(page, username).click();
}

/** Search with `pattern`, then click the result `username`: opens the conversation with them. */
export async function startChat(page: Page, pattern: string, username: string): Promise<void> {
  await search(page, pattern);
  await find.searchResult(page, username).click();
}

/** Open the conversation with `withUser` from the sidebar. */
export async function openConversation(page: Page, withUser: string): Promise<void> {
  await find.conversation(page, withUser).click();
}

/** Type `text` into the composer (fires the input events that send `typing`), without sending. */
export async function type(page: Page, text: string): Promise<void> {
  await find.composer(page).fill(text);
}

/** Type `text` into the composer and click "Send". */
export async function send(page: Page, text: string): Promise<void> {
  await find.composer(page).fill(text);
  await find.send(page).click();
}

/** Open the delete dialog, type the password and confirm. */
export async function deleteAccount(page: Page, password: string): Promise<void> {
  await find.deleteAccount(page).click();
  await find.deletePassword(page).fill(password);
  await find.deleteConfirm(page).click();
}

/** A page marked with `markPage`: a window property that only survives if the document is never reloaded. */
export interface PageMark {
  value: string;
  /** Main-frame navigations since the mark. */
  navigations: () => number;
}

/** Mark the page's current document and start counting main-frame navigations (reloads). */
export async function markPage(page: Page): Promise<PageMark> {
  const value = `e2e-${Date.now()}-${Math.random().toString(36).slice(2)}`;
  await page.evaluate((value) => {
    (window as unknown as { __e2eMark: string }).__e2eMark = value;
  }, value);
  let navigations = 0;
  page.on('framenavigated', (frame) => {
    if (frame === page.mainFrame()) navigations += 1;
  });
  return { value, navigations: () => navigations };
}

/**
 * Install a MutationObserver that records every data-status each message element goes through (a new element
 * per state counts too) together with the banner's state at that moment, and every banner state. States that
 * last only milliseconds (a message "sending" during a short outage) are seen this way without racing the app.
 * Read back with find.recordedStatuses / find.recordedBanner.
 */
export async function recordStatuses(page: Page): Promise<void> {
  await page.evaluate(() => {
    interface Sample {
      status: string | null;
      banner: string | null;
      node: string | null;
      at: number;
    }
    interface BannerSample {
      state: string | null;
      node: string | null;
      at: number;
    }
    const w = window as unknown as {
      __e2eRecorder?: { messages: Record<string, Sample[]>; texts: Record<string, string>; banner: BannerSample[] };
    };
    if (w.__e2eRecorder) return;
    const recorder = { messages: {} as Record<string, Sample[]>, texts: {} as Record<string, string>, banner: [] as BannerSample[] };
    w.__e2eRecorder = recorder;
    const bannerNow = () => {
      const element = document.querySelector('[data-testid="banner"]');
      return { state: element?.getAttribute('data-state') ?? null, node: element?.getAttribute('data-node') ?? null };
    };
    const noteBanner = () => {
      const now = bannerNow();
      const last = recorder.banner[recorder.banner.length - 1];
      if (!last || last.state !== now.state || last.node !== now.node) recorder.banner.push({ ...now, at: Date.now() });
    };
    const noteMessage = (element: Element) => {
      const id = element.getAttribute('data-client-id') || '';
      const text = element.querySelector('[data-testid="message-text"]')?.textContent;
      if (text !== undefined && text !== null) recorder.texts[id] = text;
      const status = element.getAttribute('data-status');
      const list = (recorder.messages[id] ??= []);
      const last = list[list.length - 1];
      if (!last || last.status !== status) {
        const b = bannerNow();
        list.push({ status, banner: b.state, node: b.node, at: Date.now() });
      }
    };
    const visit = (node: Node) => {
      if (!(node instanceof Element)) return;
      if (node.matches('[data-testid="message"]')) noteMessage(node);
      node.querySelectorAll('[data-testid="message"]').forEach(noteMessage);
    };
    document.querySelectorAll('[data-testid="message"]').forEach(noteMessage);
    noteBanner();
    new MutationObserver((mutations) => {
      for (const mutation of mutations) {
        if (mutation.type === 'childList') {
          mutation.addedNodes.forEach(visit);
        } else if (mutation.target instanceof Element) {
          const message = mutation.target.closest('[data-testid="message"]');
          if (message) noteMessage(message);
        }
      }
      noteBanner();
    }).observe(document.body, {
      subtree: true,
      childList: true,
      attributes: true,
      attributeFilter: ['data-status', 'data-state', 'data-node', 'data-client-id', 'data-id'],
    });
  });
}

/** Save a screenshot of `page` at `size` (default 1280x800) to docs/screenshots/<name>.png (for the README). */
export async function screenshot(page: Page, name: string, size = { width: 1280, height: 800 }): Promise<string> {
  const dir = path.join(REPO_ROOT, 'docs', 'screenshots');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.png`);
  await page.setViewportSize(size);
  await page.screenshot({ path: file, fullPage: false, animations: 'disabled', caret: 'hide' });
  return file;
}

/** The cluster timing of a spec that seeds a long conversation: the usual timing, and a send rate high enough. */
export const SEEDING_TIMING: ClusterTiming = {
  heartbeatMs: HEARTBEAT_MS,
  electionTimeoutMs: ELECTION_TIMEOUT_MS,
  args: ['--send-rate', '100000', '--send-burst', '100000'],
};

/**
 * Register alice and bob and send `count` messages ("seed 00001", ...) from alice to bob over the protocol,
 * from `page`'s context (500 requests in flight at a time). The replicas need a high `--send-rate`
 * ([`SEEDING_TIMING`]).
 */
export async function seedConversation(page: Page, count: number, password: string): Promise<void> {
  await page.evaluate(
    async ({ count, password }) => {
      const url = `${location.origin.replace('http', 'ws')}/ws`;
      const open = () =>
        new Promise<WebSocket>((resolve, reject) => {
          const ws = new WebSocket(url);
          ws.onerror = () => reject(new Error('socket error'));
          ws.onmessage = (e) => {
            if (JSON.parse(e.data).type === 'welcome') resolve(ws);
          };
        });
      const ask = (ws: WebSocket, frames: object[]) =>
        new Promise<void>((resolve, reject) => {
          let left = frames.length;
          ws.onmessage = (e) => {
            const frame = JSON.parse(e.data);
            if (frame.type === 'error') reject(new Error(e.data));
            if (frame.req !== undefined && (frame.type === 'session' || frame.type === 'sent')) {
              left -= 1;
              if (left === 0) resolve();
            }
          };
          for (const f of frames) ws.send(JSON.stringify(f));
        });
      const bob = await open();
      await ask(bob, [{ type: 'register', req: 'r', username: 'bob', password }]);
      bob.close();
      const alice = await open();
      await ask(alice, [{ type: 'register', req: 'r', username: 'alice', password }]);
      for (let from = 1; from <= count; from += 500) {
        const frames = [];
        for (let i = from; i < Math.min(from + 500, count + 1); i++) {
          const n = String(i).padStart(5, '0');
          frames.push({ type: 'send', req: `s${i}`, to: 'bob', text: `seed ${n}`, client_id: `seed-${n}` });
        }
        await ask(alice, frames);
      }
      alice.close();
    },
    { count, password },
  );
}
