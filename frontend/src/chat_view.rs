//! The chat page: sign-in, header with the connection banner, sidebar (search, conversations), the open
//! conversation with its composer, and the delete-account dialog.

use leptos::prelude::*;
use replichat_shared::Request;
use wasm_bindgen::JsCast;

use crate::connection::{self, LinkState};
use crate::state::{key, Chat, Line, Status};

/// The whole chat page.
#[component]
pub fn ChatPage() -> impl IntoView {
    let chat = Chat::new();
    provide_context(chat);
    let conn = connection::get();
    {
        let handler_conn = conn.clone();
        conn.start(move |frame| chat.on_frame(&handler_conn, frame));
    }
    // Expire typing indicators.
    let tick = RwSignal::new(0u32);
    let _ =
        set_interval_with_handle(move || tick.update(|t| *t = t.wrapping_add(1)), std::time::Duration::from_secs(1));
    provide_context(tick);
    // Unread messages in the tab's title, so a background tab says there is something to read.
    Effect::new(move |_| {
        let unread: u64 = chat.conversations.with(|list| list.iter().map(|c| c.unread).sum());
        if let Some(document) = web_sys::window().and_then(|w| w.document()) {
            document.set_title(&if unread > 0 { format!("({unread}) replichat") } else { "replichat".to_owned() });
        }
    });
    let restoring = conn.token().is_some();
    view! {
        <div class="app">
            <Show
                when=move || chat.me.get().is_some()
                fallback=move || view! { <Auth restoring=restoring/> }
            >
                <Header/>
                // On a phone the list and the conversation are two screens (style.css).
                <main class="layout" class:conversation-open=move || chat.active.get().is_some()>
                    <Sidebar/>
                    <ConversationPane/>
                </main>
                <DeleteDialog/>
            </Show>
        </div>
    }
}

#[component]
fn Banner() -> impl IntoView {
    let state = connection::get().state;
    let data_state = move || match state.get() {
        LinkState::Online { .. } => "online",
        LinkState::Reconnecting { .. } => "reconnecting",
        LinkState::Connecting => "connecting",
    };
    let node = move || match state.get() {
        LinkState::Online { node, .. } => node.to_string(),
        _ => String::new(),
    };
    // Said for a person; the replica and term are for the curious (tooltip) and the admin page.
    let text = move || match state.get() {
        LinkState::Online { .. } => "Connected".to_owned(),
        LinkState::Reconnecting { .. } => "Reconnecting… your messages will be sent".to_owned(),
        LinkState::Connecting => "Connecting…".to_owned(),
    };
    let detail = move || match state.get() {
        LinkState::Online { node, term } => format!("Connected to replica {node} (term {term})"),
        LinkState::Reconnecting { attempt } => format!("Looking for the primary replica (attempt {attempt})"),
        LinkState::Connecting => "Looking for the primary replica".to_owned(),
    };
    view! {
        <div class="banner" data-testid="banner" role="status" data-state=data_state data-node=node title=detail>{text}</div>
    }
}

#[component]
fn Auth(restoring: bool) -> impl IntoView {
    let chat = expect_context::<Chat>();
    let username = RwSignal::new(String::new());
    let password = RwSignal::new(String::new());
    let submit = move |register: bool| {
        let (username, password) = (username.get_untracked().trim().to_owned(), password.get_untracked());
        chat.auth_error.set(None);
        if username.is_empty() || username.chars().any(char::is_whitespace) {
            chat.auth_error.set(Some("Invalid username: use 1 to 32 characters without spaces.".into()));
            return;
        }
        let request =
            if register { Request::Register { username, password } } else { Request::Login { username, password } };
        connection::get().request(request);
    };
    view! {
        <div class="auth">
            <Banner/>
            <h1>"replichat"</h1>
            <Show when=move || chat.notice.get().is_some()>
                <p class="notice" role="status" data-testid="notice">{move || chat.notice.get()}</p>
            </Show>
            <Show when=move || restoring && chat.auth_error.get().is_none() && chat.notice.get().is_none()>
                <p class="hint">"Restoring your session…"</p>
            </Show>
            <form class="auth-form" on:submit=move |ev| { ev.prevent_default(); submit(false); }>
                <label>"Username"
                    <input data-testid="auth-username" autocomplete="username" maxlength="64"
                        prop:value=username on:input=move |ev| username.set(event_target_value(&ev))/>
                </label>
                <label>"Password"
                    <input data-testid="auth-password" type="password" autocomplete="current-password"
                        prop:value=password on:input=move |ev| password.set(event_target_value(&ev))/>
                </label>
                <div class="auth-buttons">
                    <button data-testid="auth-login" type="submit">"Log in"</button>
                    <button data-testid="auth-register" type="button" on:click=move |_| submit(true)>"Sign up"</button>
                </div>
                <ErrorLine message=chat.auth_error testid="auth-error"/>
            </form>
        </div>
    }
}

#[component]
fn Header() -> impl IntoView {
    let chat = expect_context::<Chat>();
    let logout = move |_| {
        connection::get().request(Request::Logout);
        chat.reset();
    };
    let logout_all = move |_| {
        connection::get().request(Request::LogoutAll);
        chat.reset();
    };
    view! {
        <header class="header">
            <Banner/>
            <span class="me" data-testid="me">{move || chat.me.get()}</span>
            <NotifyButton/>
            <button data-testid="logout" on:click=logout>"Log out"</button>
            <button data-testid="logout-all" title="End every session of this account, on every device"
                on:click=logout_all>"Log out everywhere"</button>
            <button data-testid="delete-account" class="danger" on:click=move |_| {
                chat.delete_error.set(None);
                chat.deleting.set(true);
            }>"Delete account"</button>
        </header>
    }
}

/// Asks for desktop notifications only when clicked (never on page load), and only while undecided.
#[component]
fn NotifyButton() -> impl IntoView {
    let permission = RwSignal::new(crate::state::notification_permission());
    let ask = move |_| {
        if let Ok(promise) = web_sys::Notification::request_permission() {
            leptos::task::spawn_local(async move {
                let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
                permission.set(crate::state::notification_permission());
            });
        }
    };
    view! {
        <Show when=move || permission.get() == Some("default")>
            <button data-testid="enable-notifications" on:click=ask
                title="Show a desktop notification when a message arrives while this tab is in the background">
                "Enable notifications"
            </button>
        </Show>
    }
}

#[component]
fn Sidebar() -> impl IntoView {
    let chat = expect_context::<Chat>();
    let pattern = RwSignal::new(String::new());
    let search = move || {
        connection::get().request(Request::List { pattern: pattern.get_untracked(), after: None, limit: Some(50) });
    };
    let me = move || chat.me.get().unwrap_or_default();
    let link = connection::get().state;
    // Signed in with no conversation open: the keyboard starts in the search box.
    let search_input = NodeRef::<leptos::html::Input>::new();
    Effect::new(move |_| {
        if let Some(input) = search_input.get() {
            if chat.active.get_untracked().is_none() {
                let _ = input.focus();
            }
        }
    });
    view! {
        <aside class="sidebar">
            <form class="search" on:submit=move |ev| { ev.prevent_default(); search(); }>
                <input data-testid="search-input" node_ref=search_input aria-label="Find people (* is a wildcard)" placeholder="ali*, *son, bob"
                    prop:value=pattern on:input=move |ev| pattern.set(event_target_value(&ev))/>
                <button data-testid="search-button" type="submit">"Search"</button>
            </form>
            <Show when=move || chat.results.get().is_some()>
                <ul class="results">
                    <For each=move || chat.results.get().unwrap_or_default().into_iter().filter(move |u| key(u) != key(&me()))
                        key=|u| u.clone() let:user>
                        {
                            let name = user.clone();
                            view! {
                                <li><button data-testid="search-result" data-username=user.clone() on:click=move |_| {
                                    chat.results.set(None);
                                    pattern.set(String::new());
                                    chat.open(&name);
                                }>{user.clone()}</button></li>
                            }
                        }
                    </For>
                    <Show when=move || chat.results.get().is_some_and(|r| r.iter().all(|u| key(u) == key(&me())))>
                        <li class="hint">"Nobody matches."</li>
                    </Show>
                </ul>
            </Show>
            <ul class="conversations" aria-label="Conversations" on:keydown=move |ev| {
                // Up and down move between conversations (Tab reaches each as well).
                let step = match ev.key().as_str() { "ArrowDown" => 1, "ArrowUp" => -1, _ => return };
                ev.prevent_default();
                move_focus(&ev, step);
            }>
                <For each=move || chat.conversations.get() key=|c| (c.with.clone(), c.unread, c.last.id, c.deleted) let:c>
                    {
                        let with = c.with.clone();
                        let with_for_avatar = c.with.clone();
                        let presence_key = key(&c.with);
                        // Unknown while the app has no connection: it cannot know.
                        let online = Signal::derive(move || {
                            matches!(link.get(), LinkState::Online { .. })
                                .then(|| chat.online.with(|o| o.get(&presence_key).copied().unwrap_or(false)))
                        });
                        let presence_peer = c.with.clone();
                        let presence_text = move || presence_words(&chat, link, &presence_peer).0;
                        let active_key = key(&c.with);
                        let is_active = Signal::derive(move || chat.active.get().is_some_and(|a| key(&a) == active_key));
                        let preview: String = c.last.text.chars().take(40).collect();
                        let unread = c.unread;
                        let deleted = c.deleted;
                        view! {
                            <li class="conversation" class:active=move || is_active.get() data-testid="conversation" data-with=c.with.clone()>
                                <button class="conversation-button" aria-current=move || is_active.get().then_some("true")
                                    on:click=move |_| chat.open(&with)>
                                    <span class=format!("avatar c{}", avatar_colour(&with_for_avatar)) aria-hidden="true">
                                        {initials(&with_for_avatar)}
                                    </span>
                                    <span class="presence" data-testid="presence" role="img"
                                        data-online=move || online.get().unwrap_or(false).to_string()
                                        data-known=move || online.get().is_some().to_string()
                                        aria-label=presence_text.clone() title=presence_text></span>
                                    <span class="name" dir="auto">{c.with.clone()}{deleted.then_some(" (deleted)")}</span>
                                    <span class="preview" dir="auto">{preview}</span>
                                    <Show when=move || { unread > 0 }>
                                        <span class="unread" data-testid="unread" aria-label=format!("{unread} unread")>{unread}</span>
                                    </Show>
                                </button>
                            </li>
                        }
                    }
                </For>
            </ul>
        </aside>
    }
}

/// A peer's presence in words, and whether it is known: online, last seen (at HH:MM today, yesterday at
/// HH:MM, or on a date, as the server recorded it), offline (never recorded), account deleted, or unknown
/// while the app has no connection (it cannot know).
fn presence_words(chat: &Chat, link: RwSignal<LinkState>, peer: &str) -> (String, bool) {
    let peer = key(peer);
    if !matches!(link.get(), LinkState::Online { .. }) {
        return ("presence unknown while reconnecting".to_owned(), false);
    }
    if chat.conversations.with(|list| list.iter().any(|c| key(&c.with) == peer && c.deleted)) {
        return ("account deleted".to_owned(), true);
    }
    let text = match chat.online.with(|o| o.get(&peer).copied()) {
        Some(true) => "online".to_owned(),
        _ => match chat.last_seen.with(|seen| seen.get(&peer).copied()) {
            Some(at) => last_seen_words(at),
            None => "offline".to_owned(),
        },
    };
    (text, true)
}

/// "last seen at 14:05" (today), "last seen yesterday at 14:05", or "last seen 28/11/2026 at 14:05" (the
/// browser's date format and time zone).
fn last_seen_words(at: f64) -> String {
    let at = at as i64;
    let time = clock(at);
    match day_label(at).as_str() {
        "Today" => format!("last seen at {time}"),
        "Yesterday" => format!("last seen yesterday at {time}"),
        date => format!("last seen {date} at {time}"),
    }
}

/// "14:05": the hours and minutes of a time in ms since the epoch (the browser's time zone).
fn clock(at: i64) -> String {
    let time = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(at as f64));
    format!("{:02}:{:02}", time.get_hours(), time.get_minutes())
}

#[component]
fn ConversationPane() -> impl IntoView {
    let chat = expect_context::<Chat>();
    view! {
        <section class="conversation-pane">
            <Show when=move || chat.active.get().is_some()
                fallback=move || view! {
                    <p class="hint empty">{move || if chat.conversations.with(Vec::is_empty) {
                        "Search for someone with * as a wildcard, then say hello."
                    } else {
                        "Choose a conversation on the left, or search for someone new."
                    }}</p>
                }>
                <OpenConversation/>
            </Show>
        </section>
    }
}

#[component]
fn OpenConversation() -> impl IntoView {
    let chat = expect_context::<Chat>();
    let tick = expect_context::<RwSignal<u32>>();
    let peer = move || chat.active.get().unwrap_or_default();
    let more = move || chat.more.with(|m| m.get(&key(&peer())).copied().unwrap_or(false));
    let typing = move || {
        tick.track();
        chat.typing.with(|t| t.get(&key(&peer())).is_some_and(|until| *until > js_sys::Date::now()))
    };
    let peer_deleted = move || {
        let peer = key(&peer());
        chat.conversations.with(|list| list.iter().any(|c| key(&c.with) == peer && c.deleted))
    };
    // In words: online, offline, last seen (as the server recorded it), or unknown while disconnected.
    let link = connection::get().state;
    let presence = move || presence_words(&chat, link, &peer());
    let draft = RwSignal::new(String::new());
    let last_typing = StoredValue::new(0f64);
    let send = move || {
        if chat.send(&draft.get_untracked()) {
            draft.set(String::new());
            // The peer's indicator ended with the message: the next keystroke announces typing again.
            last_typing.set_value(0.0);
        }
    };
    let history = NodeRef::<leptos::html::Div>::new();
    // Opening a conversation puts the keyboard in its message box (not on the page body).
    let composer = NodeRef::<leptos::html::Textarea>::new();
    Effect::new(move |_| {
        let _ = chat.active.get();
        if let Some(composer) = composer.get() {
            let _ = composer.focus();
        }
    });
    // Only a window of the conversation is in the page (a long one would make every update and scroll slow):
    // `WINDOW` lines from `start`, or the newest `WINDOW` while `start` is `None` (following new messages).
    // Scrolling near either end moves the window by `STEP` lines, keeping the reading position.
    // (`NEWEST` for `None`, and the anchor below in a tuple type the page already has: each new signal type
    // costs the bundle about a kilobyte.)
    let start = RwSignal::new(NEWEST);
    let count = move || chat.lines.with(|l| l.get(&key(&peer())).map_or(0, Vec::len));
    let begin = move || match start.get() {
        NEWEST => count().saturating_sub(WINDOW),
        at => at,
    };
    let window = move || {
        let begin = begin();
        chat.lines.with(|l| {
            let all = l.get(&key(&peer())).map_or(&[][..], Vec::as_slice);
            let begin = begin.min(all.len());
            // One line before the window, for its grouping and day separator.
            let mut lines = grouped(all[begin.saturating_sub(1)..(begin + WINDOW).min(all.len())].to_vec());
            if begin > 0 {
                lines.remove(0);
            }
            lines
        })
    };
    // A message that stays in the page while the window moves (its server id: the element itself may be
    // re-created, its grouping changes), and its offset before: after the change the scroll moves by what was
    // added or removed above it.
    let anchor = StoredValue::new((String::new(), None::<u64>));
    let find = move |id: &str| {
        let found = history.get_untracked()?.query_selector(&format!("[data-id=\"{id}\"]")).ok()??;
        Some(found.unchecked_into::<web_sys::HtmlElement>().offset_top())
    };
    let mark = move |selector: &str| {
        let el = history.get_untracked()?;
        let found = if selector.is_empty() { el.last_element_child() } else { el.query_selector(selector).ok()? };
        let id = found?.get_attribute("data-id").filter(|id| !id.is_empty())?;
        let top = find(&id)?;
        anchor.set_value((id, Some(top as u64)));
        Some(())
    };
    let settle = move || {
        request_animation_frame(move || {
            if let ((id, Some(top)), Some(el)) = (anchor.get_value(), history.get_untracked()) {
                if let Some(now) = find(&id) {
                    el.set_scroll_top(el.scroll_top() + now - top as i32);
                }
            }
            anchor.set_value((String::new(), None));
        })
    };
    // While an older page is on its way (scrolling at the top asks for nothing more meanwhile).
    let loading_older = StoredValue::new(false);
    let older = move || {
        if mark(MESSAGE).is_some() || count() == 0 {
            loading_older.set_value(true);
            start.set(0);
            chat.load_older();
        }
    };
    // Keep the newest message in view when one arrives; keep the reading position when an older page is
    // prepended.
    // ...unless the reader has scrolled up to read older ones: then the position stays and a marker counts
    // what arrived below.
    let newest = StoredValue::new((String::new(), None::<u64>));
    let at_bottom = StoredValue::new(true);
    let unseen = RwSignal::new(0usize);
    let to_bottom = move || {
        start.set(NEWEST);
        let down = move || {
            if let Some(el) = history.get_untracked() {
                el.set_scroll_top(el.scroll_height());
            }
        };
        down();
        request_animation_frame(down);
        at_bottom.set_value(true);
        unseen.set(0);
    };
    Effect::new(move |_| {
        let shown = key(&peer());
        let (last, mine) = chat.lines.with(|l| {
            let last = l.get(&shown).and_then(|v| v.last());
            let me = chat.me.get_untracked();
            (last.and_then(|l| l.id.or(Some(u64::MAX))), last.is_some_and(|l| me.is_some_and(|me| me == l.from)))
        });
        if history.get().is_none() {
            return;
        }
        let (before_peer, before_last) = newest.get_value();
        if before_peer != shown || last != before_last {
            newest.set_value((shown.clone(), last));
            let following = at_bottom.get_value() && start.get_untracked() == NEWEST;
            if before_peer != shown || before_last.is_none() || following || mine {
                to_bottom();
            } else {
                unseen.update(|n| *n += 1);
            }
        } else if loading_older.get_value() {
            // An older page was prepended: the window starts at it.
            loading_older.set_value(false);
            settle();
        }
    });
    view! {
        <div class="conversation-view">
            <div class="conversation-header">
                <button class="back" aria-label="Back to conversations" on:click=move |_| chat.close()>"←"</button>
                <div class="title">
                    <h2 data-testid="conversation-title" dir="auto">{peer}</h2>
                    <p class="header-presence" data-testid="header-presence" role="status"
                        data-known=move || presence().1.to_string()>{move || presence().0}</p>
                </div>
            </div>
            <div class="history" data-testid="history" node_ref=history
                on:scroll=move |_| {
                    if let Some(el) = history.get_untracked() {
                        let bottom = el.scroll_height() - el.scroll_top() - el.client_height() < 48;
                        at_bottom.set_value(bottom);
                        if bottom {
                            unseen.set(0);
                        }
                    }
                    let Some(el) = history.get_untracked() else { return };
                    if anchor.with_value(|a| a.1.is_some()) || loading_older.get_value() {
                        return;
                    }
                    let begin = begin();
                    if el.scroll_top() < 400 && begin > 0 {
                        // Near the top of the window: older lines already here come in above.
                        if mark(MESSAGE).is_some() {
                            start.set(begin.saturating_sub(STEP));
                            settle();
                        }
                    } else if el.scroll_top() <= 0 && more() {
                        // At the top of what is here, with older messages on the server: fetch the page before.
                        older();
                    } else if el.scroll_height() - el.scroll_top() - el.client_height() < 400 && start.get_untracked() != NEWEST {
                        // Near the bottom of a window that is not the newest: newer lines come in below.
                        if mark("").is_some() {
                            let next = begin + STEP;
                            start.set(if next + WINDOW < count() { next } else { NEWEST });
                            settle();
                        }
                    }
                }>
                <Show when=more>
                    <button data-testid="load-older" class="load-older" on:click=move |_| older()>"Load older messages"</button>
                </Show>
                <For each=window
                    key=|(l, first, day): &(Line, bool, Option<String>)| (l.client_id.clone(), l.id, l.status.clone(), *first, day.clone())
                    let:entry>
                    <MessageLine line=entry.0 first=entry.1 day=entry.2/>
                </For>
            </div>
            <Show when=move || { unseen.get() > 0 }>
                <button class="new-below" aria-live="polite" on:click=move |_| to_bottom()>
                    {move || match unseen.get() { 1 => "1 new message ↓".to_owned(), n => format!("{n} new messages ↓") }}
                </button>
            </Show>
            <Show when=typing>
                <p class="typing" data-testid="typing">{move || format!("{} is typing…", peer())}</p>
            </Show>
            <Show when=peer_deleted>
                <p class="hint" data-testid="peer-deleted" role="status">
                    {move || format!("{} deleted their account. You can read your conversation, but not reply.", peer())}
                </p>
            </Show>
            <form class="composer-form" on:submit=move |ev| { ev.prevent_default(); send(); }>
                <textarea data-testid="composer" node_ref=composer rows="2" dir="auto" aria-label=move || format!("Message to {}", peer())
                    placeholder="Message (Enter to send, Shift+Enter for a new line)"
                    prop:disabled=peer_deleted
                    prop:value=draft
                    on:input=move |ev| {
                        draft.set(event_target_value(&ev));
                        let now = js_sys::Date::now();
                        if now - last_typing.get_value() > 2000.0 {
                            last_typing.set_value(now);
                            connection::get().request(Request::Typing { to: peer() });
                        }
                    }
                    on:keydown=move |ev| {
                        if ev.key() == "Enter" && !ev.shift_key() {
                            ev.prevent_default();
                            send();
                        }
                    }></textarea>
                <button data-testid="send" type="submit" prop:disabled=peer_deleted>"Send"</button>
            </form>
            <ErrorLine message=chat.composer_error testid="composer-error"/>
        </div>
    }
}

/// Each line with whether it starts a group (a new sender, a new day, or five minutes of silence: only then
/// is the sender named) and, where the day changes, the day's label.
fn grouped(lines: Vec<Line>) -> Vec<(Line, bool, Option<String>)> {
    let mut out: Vec<(Line, bool, Option<String>)> = Vec::with_capacity(lines.len());
    let mut previous: Option<(String, i64, String)> = None;
    for line in lines {
        let day = day_label(line.sent_at);
        let (first, new_day) = match &previous {
            None => (true, true),
            Some((from, at, last_day)) => {
                let new_day = *last_day != day;
                (new_day || *from != line.from || line.sent_at - at > 5 * 60 * 1000, new_day)
            }
        };
        previous = Some((line.from.clone(), line.sent_at, day.clone()));
        out.push((line, first, new_day.then_some(day)));
    }
    out
}

/// "Today", "Yesterday", or the date, for a time in ms since the epoch (the browser's time zone).
fn day_label(at: i64) -> String {
    let date = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(at as f64));
    let ymd = |d: &js_sys::Date| (d.get_full_year(), d.get_month(), d.get_date());
    let today = js_sys::Date::new_0();
    let yesterday = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(js_sys::Date::now() - 86_400_000.0));
    if ymd(&date) == ymd(&today) {
        "Today".to_owned()
    } else if ymd(&date) == ymd(&yesterday) {
        "Yesterday".to_owned()
    } else {
        String::from(date.to_locale_date_string("default", &wasm_bindgen::JsValue::UNDEFINED))
    }
}

/// How many lines of a conversation are in the page at once, and how far the window moves.
const WINDOW: usize = 150;
const STEP: usize = 50;
/// The window's start while it follows the newest lines.
const NEWEST: usize = usize::MAX;
/// The first message element of the history.
const MESSAGE: &str = "[data-testid=message]";

#[component]
fn MessageLine(line: Line, first: bool, day: Option<String>) -> impl IntoView {
    let chat = expect_context::<Chat>();
    let mine = chat.me.get_untracked().is_some_and(|me| me == line.from);
    let clock = clock(line.sent_at);
    // A compact tick for my messages, said in words to assistive technology and in the tooltip.
    let (tick, status_text) = match &line.status {
        Status::Sending => ("🕓", "Sending…".to_owned()),
        Status::Sent => ("✓", format!("Sent at {clock}")),
        Status::Delivered => ("✓✓", format!("Sent at {clock}, delivered")),
        Status::Read => ("✓✓", format!("Sent at {clock}, read")),
        Status::Failed(reason) => ("", format!("Not sent: {reason}")),
    };
    let failed = matches!(line.status, Status::Failed(_));
    let name =
        (first && !mine).then(|| format!("{}{}", line.from, if line.from_deleted { " (deleted account)" } else { "" }));
    view! {
        {day.map(|day| view! { <div class="day" role="separator" aria-label=day.clone()>{day.clone()}</div> })}
        <div class="message" class:mine=mine class:first=first class:unread=line.unread data-testid="message" data-from=line.from.clone()
            data-id=line.id.map(|i| i.to_string()).unwrap_or_default() data-client-id=line.client_id.clone()
            data-status=line.status.name() data-unread=line.unread.to_string()>
            {name.map(|name| view! { <span class="from">{name}</span> })}
            // Text is inserted as a text node: never parsed as HTML.
            <p class="text" dir="auto" data-testid="message-text">{line.text.clone()}</p>
            <span class="meta">
                {clock.clone()}
                {(mine && !failed).then(|| view! {
                    " "<span class="tick" class:read=matches!(line.status, Status::Read) role="img"
                        aria-label=status_text.clone() title=status_text.clone()>{tick}</span>
                })}
                {failed.then(|| format!(" · {status_text}"))}
            </span>
        </div>
    }
}

#[component]
fn DeleteDialog() -> impl IntoView {
    let chat = expect_context::<Chat>();
    let password = RwSignal::new(String::new());
    let input = NodeRef::<leptos::html::Input>::new();
    // Focus moves into the dialog when it opens.
    Effect::new(move |_| {
        if chat.deleting.get() {
            if let Some(input) = input.get() {
                let _ = input.focus();
            }
        }
    });
    let close = move || {
        password.set(String::new());
        chat.deleting.set(false);
    };
    view! {
        <Show when=move || chat.deleting.get()>
            <div class="dialog-backdrop">
                <div class="dialog" role="dialog" aria-modal="true" aria-labelledby="delete-title"
                    aria-describedby="delete-explanation"
                    on:keydown=move |ev| if ev.key() == "Escape" { ev.prevent_default(); close(); }>
                    <h2 id="delete-title">"Delete your account?"</h2>
                    <p id="delete-explanation">"Your account, your sessions and the messages you received are removed \
                        for good. Messages you sent stay with their recipients, marked as from a deleted account. \
                        Enter your password to confirm."</p>
                    <label>"Password"
                        <input data-testid="delete-password" type="password" autocomplete="current-password" node_ref=input
                            prop:value=password on:input=move |ev| password.set(event_target_value(&ev))/>
                    </label>
                    <div class="dialog-buttons">
                        <button data-testid="delete-cancel" on:click=move |_| close()>"Cancel"</button>
                        <button data-testid="delete-confirm" class="danger" on:click=move |_| {
                            chat.delete_error.set(None);
                            connection::get().request(Request::DeleteAccount { password: password.get_untracked() });
                        }>"Delete my account"</button>
                    </div>
                    <ErrorLine message=chat.delete_error testid="delete-error"/>
                </div>
            </div>
        </Show>
    }
}

/// Up to two letters standing for a username: its first character, and the first after a `_`, `.` or `-`
/// (ASCII letters upper-cased; no Unicode case tables in the bundle for this).
fn initials(name: &str) -> String {
    let mut parts = name.split(['_', '.', '-']).filter(|part| !part.is_empty());
    parts.by_ref().take(2).filter_map(|part| part.chars().next()).map(|c| c.to_ascii_uppercase()).collect()
}

/// One of the stylesheet's eight avatar colours, the same for a name everywhere (FNV-1a of its key).
fn avatar_colour(name: &str) -> u32 {
    key(name).bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193)) % 8
}

/// Move the keyboard focus from the conversation button the key was pressed on to the one `step` away.
fn move_focus(ev: &leptos::ev::KeyboardEvent, step: i32) {
    use wasm_bindgen::JsCast;
    let Some(item) = ev
        .target()
        .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
        .and_then(|e| e.closest("li.conversation").ok().flatten())
    else {
        return;
    };
    let next = if step > 0 { item.next_element_sibling() } else { item.previous_element_sibling() };
    if let Some(button) = next.and_then(|li| li.query_selector("button").ok().flatten()) {
        if let Ok(button) = button.dyn_into::<web_sys::HtmlElement>() {
            let _ = button.focus();
        }
    }
}

/// An error message under a form, shown while `message` holds one. Shared with the admin page.
#[component]
pub fn ErrorLine(message: RwSignal<Option<String>>, testid: &'static str) -> impl IntoView {
    view! {
        <Show when=move || message.get().is_some()>
            <p class="error" data-testid=testid role="alert">{move || message.get()}</p>
        </Show>
    }
}
