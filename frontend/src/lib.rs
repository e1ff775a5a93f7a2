//! replichat's browser app: Leptos, client-side rendered, compiled to wasm32.
//!
//! # Layout
//! - [`connection`]: the failover-aware WebSocket connection (endpoints, backoff, `not_leader`, terms,
//!   resume, re-sending unacknowledged messages). No view code.
//! - [`state`]: the chat's reactive state and what each server frame does to it. No view code.
//! - [`chat_view`]: the chat page (`/`).
//! - [`admin_view`]: the admin page (`/admin`).

pub mod admin_view;
pub mod chat_view;
pub mod connection;
pub mod state;

use leptos::prelude::*;
use wasm_bindgen::prelude::wasm_bindgen;

/// Entry point, called by the wasm-bindgen glue when the module loads.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

/// `/admin` is the admin page; every other path is the chat.
#[component]
fn App() -> impl IntoView {
    let path = web_sys::window().and_then(|w| w.location().pathname().ok()).unwrap_or_default();
    if path.trim_end_matches('/') == "/admin" {
        view! { <admin_view::AdminPage/> }.into_any()
    } else {
        view! { <chat_view::ChatPage/> }.into_any()
    }
}
