//! The admin page (`/admin`): every replica polled once a second, each shown as it reports itself (role, term,
//! last index); a replica that does not answer the page is shown as not answering, with the last index and
//! term known for it and when it was last heard (by the page or by a replica). Elections (who won which term,
//! when) and replicas going quiet or coming back are listed as events; a chart plots each replica's last log
//! index over the last minute.

use std::collections::{BTreeMap, VecDeque};

use leptos::prelude::*;
use replichat_shared::ClusterStatus;

use crate::chat_view::ErrorLine;
use crate::connection;

/// How many samples the chart keeps (one a second).
const SAMPLES: usize = 60;
/// How many events the page lists.
const EVENTS: usize = 12;

/// One replica as the page shows it.
#[derive(Clone, PartialEq)]
struct Row {
    id: u64,
    url: String,
    /// As it reports itself; "unknown" while it does not answer.
    role: String,
    /// Whether it answered the page's last poll.
    up: bool,
    term: Option<u64>,
    last_index: u64,
    lag: u64,
    /// While it does not answer: seconds since anyone (the page or a replica) last heard from it.
    heard_ago_s: Option<u64>,
    /// Replicas whose connection to it was refused in the handshake, and why (`replica 0: the peer speaks
    /// replication format 2, ...`): it may answer this page and still be out of the group.
    refused: Vec<String>,
}

/// What the page last learnt about a replica from the replica itself.
#[derive(Clone, Copy)]
struct Known {
    index: u64,
    term: u64,
    /// `Date.now()` when it last answered.
    at_ms: f64,
}

/// Something that happened, newest first in the list.
#[derive(Clone, PartialEq)]
struct Event {
    at_ms: f64,
    text: String,
}

#[derive(Default)]
struct Memory {
    /// Per replica: what it last said itself, and whether it answered the last poll. (Vectors, not maps: a
    /// map type per key and value costs the bundle kilobytes, and there are a handful of replicas.)
    replicas: Vec<(u64, Option<Known>, bool)>,
    /// (term, winner, earliest report of when).
    elections: Vec<(u64, u64, f64)>,
    changes: Vec<Event>,
}

impl Memory {
    fn replica(&mut self, id: u64) -> &mut (u64, Option<Known>, bool) {
        let at = match self.replicas.iter().position(|r| r.0 == id) {
            Some(at) => at,
            None => {
                self.replicas.push((id, None, false));
                self.replicas.len() - 1
            }
        };
        &mut self.replicas[at]
    }
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}

fn clock(ms: f64) -> String {
    js_sys::Date::new(&ms.into()).to_locale_time_string("en-GB").into()
}

#[component]
pub fn AdminPage() -> impl IntoView {
    let status = RwSignal::new(None::<ClusterStatus>);
    let rows = RwSignal::new(Vec::<Row>::new());
    let events = RwSignal::new(Vec::<Event>::new());
    let source = RwSignal::new(None::<String>);
    let error = RwSignal::new(None::<String>);
    // replica id -> recent last index samples.
    let history = RwSignal::new(BTreeMap::<u64, VecDeque<u64>>::new());
    leptos::task::spawn_local(async move {
        let conn = connection::get();
        let mut memory = Memory::default();
        loop {
            let answers = poll(&conn).await;
            if answers.is_empty() {
                error.set(Some("No replica answers. Retrying every second…".into()));
                for r in rows.get_untracked() {
                    memory.replica(r.id).2 = false;
                }
                rows.update(|rows| {
                    for r in rows.iter_mut() {
                        r.up = false;
                        r.role = "unknown".into();
                    }
                });
            } else {
                let urls: Vec<String> =
                    answers.iter().flat_map(|(_, s)| s.replicas.iter().map(|r| r.url.clone())).collect();
                conn.remember_endpoints(&urls);
                let (shown, from) = pick(&answers);
                let new_rows = merge(&answers, shown, &mut memory);
                history.update(|h| {
                    for r in &new_rows {
                        let samples = h.entry(r.id).or_default();
                        samples.push_back(r.last_index);
                        if samples.len() > SAMPLES {
                            samples.pop_front();
                        }
                    }
                });
                source.set(Some(from));
                error.set(None);
                status.set(Some(shown.clone()));
                rows.set(new_rows);
            }
            events.set(list_events(&memory));
            gloo_timers::future::TimeoutFuture::new(1000).await;
        }
    });
    let primary = move || {
        rows.with(|rows| rows.iter().find(|r| r.up && r.role == "primary").map(|r| r.id.to_string()))
            .unwrap_or_else(|| "none".to_owned())
    };
    view! {
        <div class="admin">
            <h1>"replichat cluster"</h1>
            <p class="summary">
                "Primary: " <strong data-testid="admin-primary">{primary}</strong>
                " · term " <strong data-testid="admin-term">{move || status.with(|s| s.as_ref().map(|s| s.term.to_string()))}</strong>
                " · commit index " {move || status.with(|s| s.as_ref().map(|s| s.commit_index.to_string()))}
                " · as seen by " <span data-testid="admin-source">{move || source.get()}</span>
            </p>
            <ErrorLine message=error testid="admin-error"/>
            // Rendered as markup strings (escaped): a typed view per card, line and event costs the bundle kilobytes.
            <h2 id="replicas-heading">"Replicas"</h2>
            <ul class="replicas" aria-labelledby="replicas-heading"
                inner_html=move || rows.with(|rows| rows.iter().map(card).collect::<String>())></ul>
            <h2 id="chart-heading">"Last log index per replica (last 60 s)"</h2>
            <svg data-testid="admin-chart" class="chart" viewBox="0 0 780 180" width="780" height="180"
                role="img" aria-labelledby="chart-heading" inner_html=move || history.with(|h| rows.with(|r| chart(h, r)))></svg>
            <h2 id="events-heading">"Events"</h2>
            <ol class="events" aria-labelledby="events-heading" inner_html=move || events.with(|e| {
                e.iter()
                    .map(|e| format!("<li><time>{}</time> {}</li>", escape(&clock(e.at_ms)), escape(&e.text)))
                    .collect::<String>()
            })></ol>
            <p class="hint"><a href="/">"Back to the chat"</a></p>
        </div>
    }
}

/// Text made safe for markup.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A replica's card (a list item): role, state, term, index, lag, URL.
fn card(r: &Row) -> String {
    let role = if !r.up {
        "not answering".to_owned()
    } else if r.role == "primary" {
        "★ primary".to_owned()
    } else {
        escape(&r.role)
    };
    let state = match (r.up, r.heard_ago_s) {
        (true, _) => "answering".to_owned(),
        (false, Some(s)) => format!("last heard {s} s ago"),
        (false, None) => "not heard since this page opened".to_owned(),
    };
    let data_role = if r.up { escape(&r.role) } else { "unknown".to_owned() };
    let url = escape(&r.url);
    // A replica can answer this page and still be kept out of the group by the others.
    let refused: String = r
        .refused
        .iter()
        .map(|why| format!("<dt>refused by</dt><dd data-testid=\"refused\">{}</dd>", escape(why)))
        .collect();
    format!(
        "<li data-testid=\"replica\" data-id=\"{id}\" data-role=\"{data_role}\" data-alive=\"{up}\" class=\"card role-{data_role} {updown}\">\
         <h3>replica {id} <span class=\"role\">{role}</span></h3><dl>\
         <dt>state</dt><dd>{state}</dd><dt>term</dt><dd>{term}</dd>\
         <dt>{index_label}</dt><dd>{index}</dd><dt>lag</dt><dd>{lag}</dd>\
         <dt>url</dt><dd><a href=\"{url}/admin\">{url}</a></dd>{refused}</dl></li>",
        id = r.id,
        up = r.up,
        updown = if r.up { "up" } else { "down" },
        term = r.term.map_or("?".to_owned(), |t| t.to_string()),
        index_label = if r.up { "last index" } else { "last known index" },
        index = r.last_index,
        lag = r.lag,
    )
}

/// Ask every known replica in turn (a refused connection fails at once; a hung replica costs 800 ms); those
/// that answer, with where they answered.
async fn poll(conn: &connection::Connection) -> Vec<(String, ClusterStatus)> {
    let origin = web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default();
    let mut endpoints = conn.endpoints();
    if !endpoints.contains(&origin) {
        endpoints.insert(0, origin);
    }
    let mut answers: Vec<(String, ClusterStatus)> = Vec::new();
    for base in endpoints {
        let request = gloo_net::http::Request::get(&format!("{base}/api/cluster")).send();
        let answer =
            futures::future::select(Box::pin(request), Box::pin(gloo_timers::future::TimeoutFuture::new(800))).await;
        if let futures::future::Either::Left((Ok(response), _)) = answer {
            if response.ok() {
                if let Ok(status) = response.json::<ClusterStatus>().await {
                    if !answers.iter().any(|(_, s)| s.id == status.id) {
                        answers.push((base, status));
                    }
                }
            }
        }
    }
    answers
}

/// The answer the summary shows: the primary's (the highest term's, if two claim it), else the highest term's.
fn pick(answers: &[(String, ClusterStatus)]) -> (&ClusterStatus, String) {
    let best = answers
        .iter()
        .max_by_key(|(_, s)| (s.role == "primary", s.term, std::cmp::Reverse(s.id)))
        .expect("at least one answer");
    (&best.1, best.0.clone())
}

/// Every replica: as it reports itself when it answered, else as last known (to the page or to any replica).
fn merge(answers: &[(String, ClusterStatus)], shown: &ClusterStatus, memory: &mut Memory) -> Vec<Row> {
    let now = now_ms();
    let mut ids: Vec<(u64, String)> = Vec::new();
    for (_, s) in answers {
        for r in &s.replicas {
            // In id order (inserted in place: no sort code in the bundle for this).
            if !ids.iter().any(|(id, _)| *id == r.id) {
                let at = ids.iter().position(|(id, _)| *id > r.id).unwrap_or(ids.len());
                ids.insert(at, (r.id, r.url.clone()));
            }
        }
        for e in &s.elections {
            // Their clock, read against this page's.
            let at = e.at_ms as f64 - (s.now_ms as f64 - now);
            match memory.elections.iter_mut().find(|(term, _, _)| *term == e.term) {
                Some(known) => known.2 = known.2.min(at),
                None => memory.elections.push((e.term, e.leader, at)),
            }
        }
    }
    let rows: Vec<Row> = ids
        .into_iter()
        .map(|(id, url)| {
            let own = answers.iter().find(|(_, s)| s.id == id).map(|(_, s)| s);
            let refused: Vec<String> = answers
                .iter()
                .filter_map(|(_, s)| {
                    let why = s.replicas.iter().find(|r| r.id == id)?.refused.as_ref()?;
                    Some(format!("replica {}: {why}", s.id))
                })
                .collect();
            let seen = memory.replica(id);
            let was_up = std::mem::replace(&mut seen.2, own.is_some());
            if seen.1.is_some() && was_up != own.is_some() {
                let text =
                    format!("replica {id} {}", if own.is_some() { "answers again" } else { "stopped answering" });
                memory.changes.push(Event { at_ms: now, text });
            }
            if let Some(s) = own {
                memory.replica(id).1 = Some(Known { index: s.last_index, term: s.term, at_ms: now });
                return Row {
                    id,
                    url,
                    role: s.role.clone(),
                    up: true,
                    term: Some(s.term),
                    last_index: s.last_index,
                    lag: shown.last_index.saturating_sub(s.last_index),
                    heard_ago_s: None,
                    refused,
                };
            }
            let known = memory.replica(id).1;
            let views = answers.iter().filter_map(|(_, s)| s.replicas.iter().find(|r| r.id == id).map(|r| (s, r)));
            let mut last_index = known.map_or(0, |k| k.index);
            let mut term = known.map(|k| k.term);
            let mut ago = known.map(|k| (now - k.at_ms).max(0.0) / 1000.0);
            for (s, r) in views {
                last_index = last_index.max(r.last_index);
                term = term.max(r.term);
                if let Some(heard) = r.last_heard_ms {
                    let seconds = s.now_ms.saturating_sub(heard) as f64 / 1000.0;
                    ago = Some(ago.map_or(seconds, |a: f64| a.min(seconds)));
                }
            }
            Row {
                id,
                url,
                role: "unknown".into(),
                up: false,
                term,
                last_index,
                lag: shown.last_index.saturating_sub(last_index),
                heard_ago_s: ago.map(|a| a as u64),
                refused,
            }
        })
        .collect();
    rows
}

fn list_events(memory: &Memory) -> Vec<Event> {
    let mut all: Vec<Event> = Vec::new();
    let events = memory
        .elections
        .iter()
        .map(|(term, leader, at)| Event {
            at_ms: *at,
            text: format!("replica {leader} won the election of term {term}"),
        })
        .chain(memory.changes.iter().cloned());
    // Newest first (inserted in place).
    for event in events {
        let at = all.iter().position(|e| e.at_ms < event.at_ms).unwrap_or(all.len());
        all.insert(at, event);
    }
    all.truncate(EVENTS);
    all
}

/// The chart's markup: the plot area, the scale in the margin to its left (clear of the lines), a line per
/// replica with its own colour and dash pattern and a marker at its newest sample, lines with the same values
/// drawn side by side (3 px apart), and a legend to the right. Whole pixels: no float formatting in the bundle.
fn chart(history: &BTreeMap<u64, VecDeque<u64>>, rows: &[Row]) -> String {
    const LEFT: i64 = 56;
    const RIGHT: i64 = 560;
    const TOP: i64 = 12;
    const BOTTOM: i64 = 168;
    const STYLES: [(&str, &str); 5] =
        [("#2b6cb0", "none"), ("#c05621", "9 4"), ("#2f855a", "2 3"), ("#6b46c1", "12 3 3 3"), ("#b83280", "6 6")];
    let (min, max) = history.values().flatten().fold((u64::MAX, 0u64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let min = min.min(max);
    let span = (max - min).max(1) as i64;
    let count = history.len() as i64;
    let mut out = format!(
        "<rect class=\"plot\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\"/>\
         <text class=\"axis\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{max}</text>\
         <text class=\"axis\" x=\"{}\" y=\"{BOTTOM}\" text-anchor=\"end\">{min}</text>",
        RIGHT - LEFT,
        BOTTOM - TOP,
        LEFT - 6,
        TOP + 10,
        LEFT - 6,
    );
    for (rank, (id, samples)) in history.iter().enumerate() {
        let offset = 3 * (2 * rank as i64 - (count - 1)) / 2;
        let steps = (samples.len() as i64 - 1).max(1);
        let point = |i: usize, v: u64| {
            let x = LEFT + (RIGHT - LEFT) * i as i64 / steps;
            let y = BOTTOM - 6 - (BOTTOM - TOP - 12) * (v - min) as i64 / span + offset;
            (x, y)
        };
        let points: Vec<String> = samples
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (x, y) = point(i, *v);
                format!("{x},{y}")
            })
            .collect();
        let (cx, cy) = samples.back().map_or((LEFT, BOTTOM), |v| point(samples.len() - 1, *v));
        let (colour, dashes) = STYLES[*id as usize % STYLES.len()];
        let down = rows.iter().any(|r| r.id == *id && !r.up);
        let legend_y = 24 + 20 * *id as i64;
        out.push_str(&format!(
            "<g class=\"series{}\" data-replica=\"{id}\">\
             <polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dashes}\" points=\"{}\"/>\
             <circle cx=\"{cx}\" cy=\"{cy}\" r=\"3.5\" fill=\"{colour}\"/>\
             <line x1=\"{}\" x2=\"{}\" y1=\"{legend_y}\" y2=\"{legend_y}\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dashes}\"/>\
             <text class=\"legend\" x=\"{}\" y=\"{}\">replica {id}{}</text></g>",
            if down { " down" } else { "" },
            points.join(" "),
            RIGHT + 12,
            RIGHT + 40,
            RIGHT + 46,
            legend_y + 4,
            if down { " (not answering)" } else { "" },
        ));
    }
    out
}
