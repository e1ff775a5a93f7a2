/**
 * find: where things are on the page. Every locator is written against the app's data-testid contract (the
 * `data-testid` attributes of frontend/src/*_view.rs); nothing here acts or asserts.
 */
import type { Locator, Page } from '@playwright/test';

/** A CSS attribute value, quoted (usernames and ids are plain, but be safe). */
function quoted(value: string | number): string {
  return JSON.stringify(String(value));
}

// ----- Auth screen -----

export const authUsername = (page: Page): Locator => page.getByTestId('auth-username');
export const authPassword = (page: Page): Locator => page.getByTestId('auth-password');
export const authLogin = (page: Page): Locator => page.getByTestId('auth-login');
export const authRegister = (page: Page): Locator => page.getByTestId('auth-register');
export const authError = (page: Page): Locator => page.getByTestId('auth-error');

// ----- Header -----

/** The connection banner: data-state online|reconnecting|connecting, data-node = replica id when online. */
export const banner = (page: Page): Locator => page.getByTestId('banner');
export const me = (page: Page): Locator => page.getByTestId('me');
export const logout = (page: Page): Locator => page.getByTestId('logout');
export const deleteAccount = (page: Page): Locator => page.getByTestId('delete-account');

// ----- Delete dialog -----

export const deletePassword = (page: Page): Locator => page.getByTestId('delete-password');
export const deleteConfirm = (page: Page): Locator => page.getByTestId('delete-confirm');
export const deleteCancel = (page: Page): Locator => page.getByTestId('delete-cancel');
export const deleteError = (page: Page): Locator => page.getByTestId('delete-error');

// ----- Search -----

export const searchInput = (page: Page): Locator => page.getByTestId('search-input');
export const searchButton = (page: Page): Locator => page.getByTestId('search-button');
export const searchResults = (page: Page): Locator => page.getByTestId('search-result');
export const searchResult = (page: Page, username: string): Locator =>
  page.locator(`[data-testid="search-result"][data-username=${quoted(username)}]`);

// ----- Sidebar -----

export const conversations = (page: Page): Locator => page.getByTestId('conversation');
export const conversation = (page: Page, withUser: string): Locator =>
  page.locator(`[data-testid="conversation"][data-with=${quoted(withUser)}]`);
/** The unread badge of the conversation with `withUser` (absent when there is nothing unread). */
export const unreadBadge = (page: Page, withUser: string): Locator => conversation(page, withUser).getByTestId('unread');
/** The presence dot of the conversation with `withUser` (data-online="true"|"false"). */
export const presence = (page: Page, withUser: string): Locator => conversation(page, withUser).getByTestId('presence');

// ----- Open conversation -----

export const conversationTitle = (page: Page): Locator => page.getByTestId('conversation-title');
/**
 * The open conversation's presence line, in words: online, last seen (at HH:MM, yesterday at HH:MM, or a date),
 * offline, or unknown.
 */
export const headerPresence = (page: Page): Locator => page.getByTestId('header-presence');
export const history = (page: Page): Locator => page.getByTestId('history');
export const loadOlder = (page: Page): Locator => page.getByTestId('load-older');
/** Every message of the open conversation, in display order. */
export const messages = (page: Page): Locator => history(page).getByTestId('message');
/** The app keeps at most this many message elements in the page (WINDOW in chat_view.rs). */
export const MAX_MESSAGES_IN_PAGE = 150;
/** The texts of the open conversation's messages, in display order. */
export const messageTexts = (page: Page): Locator => history(page).getByTestId('message-text');
/** The message(s) of the open conversation whose text is exactly `text`. */
export const message = (page: Page, text: string): Locator =>
  messages(page).filter({ has: page.getByTestId('message-text').and(page.getByText(text, { exact: true })) });
/** Messages of the open conversation sent by `from`. */
export const messagesFrom = (page: Page, from: string): Locator =>
  history(page).locator(`[data-testid="message"][data-from=${quoted(from)}]`);
export const typing = (page: Page): Locator => page.getByTestId('typing');
export const composer = (page: Page): Locator => page.getByTestId('composer');
export const send = (page: Page): Locator => page.getByTestId('send');
export const composerError = (page: Page): Locator => page.getByTestId('composer-error');

// ----- Admin page -----

export const replicaRows = (page: Page): Locator => page.getByTestId('replica');
/** The admin table's row of replica `id`: data-role primary|backup|candidate|unknown, data-alive true|false. */
export const replicaRow = (page: Page, id: number): Locator =>
  page.locator(`[data-testid="replica"][data-id=${quoted(id)}]`);
export const adminPrimary = (page: Page): Locator => page.getByTestId('admin-primary');
export const adminTerm = (page: Page): Locator => page.getByTestId('admin-term');
export const adminChart = (page: Page): Locator => page.getByTestId('admin-chart');
export const adminSource = (page: Page): Locator => page.getByTestId('admin-source');
/** The admin page's card of replica `id`, found by its heading ("replica 1 ★ primary"). */
export const replicaCard = (page: Page, id: number): Locator =>
  page
    .getByRole('list', { name: 'Replicas' })
    .getByRole('listitem')
    .filter({ has: page.getByRole('heading', { name: new RegExp(`^replica ${id}\\b`) }) });
/** A card's value for the term `label` (its <dt>): the <dd> that follows it. */
export const cardValue = (card: Locator, label: string): Locator =>
  card.locator('dt').filter({ hasText: new RegExp(`^${label}$`) }).locator('xpath=following-sibling::dd[1]');
/** The admin page's events (elections, replicas going quiet), newest first. */
export const adminEvents = (page: Page): Locator => page.getByRole('list', { name: 'Events' }).getByRole('listitem');

// ----- Page instrumentation (installed by act.recordStatuses) -----

/** One state of a message element as the recorder saw it, with the banner state at that moment. */
export interface StatusSample {
  status: string | null;
  banner: string | null;
  node: string | null;
  at: number;
}

export interface BannerSample {
  state: string | null;
  node: string | null;
  at: number;
}

/** Every data-status the message with exactly `text` went through since act.recordStatuses (oldest first). */
export async function recordedStatuses(page: Page, text: string): Promise<StatusSample[]> {
  return page.evaluate((text) => {
    const recorder = (
      window as unknown as {
        __e2eRecorder?: { messages: Record<string, StatusSample[]>; texts: Record<string, string> };
      }
    ).__e2eRecorder;
    if (!recorder) throw new Error('act.recordStatuses was not called on this page');
    const ids = new Set<string>();
    for (const element of Array.from(document.querySelectorAll('[data-testid="message"]'))) {
      const body = element.querySelector('[data-testid="message-text"]');
      if (body && body.textContent === text) ids.add(element.getAttribute('data-client-id') || '');
    }
    for (const [id, seen] of Object.entries(recorder.texts)) {
      if (seen === text) ids.add(id);
    }
    return Array.from(ids).flatMap((id) => recorder.messages[id] ?? []).sort((a, b) => a.at - b.at);
  }, text);
}

/** Every banner state since act.recordStatuses (oldest first). */
export async function recordedBanner(page: Page): Promise<BannerSample[]> {
  return page.evaluate(() => {
    const recorder = (window as unknown as { __e2eRecorder?: { banner: BannerSample[] } }).__e2eRecorder;
    if (!recorder) throw new Error('act.recordStatuses was not called on this page');
    return recorder.banner;
  });
}
