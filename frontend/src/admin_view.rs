//! The admin page (`/admin`): the cluster as the replicas report it, polled every second from whichever
//! replica answers, with the commit index of each replica over time.

use std::collections::{BTreeMap, VecDeque};

use leptos::prelude::*;
use replichat_shared::ClusterStatus;

use crate::chat_view::ErrorLine;
use crate::connection;

/// How many samples the chart keeps (one a second).
const SAMPLES: usize = 60;

#[component]
pub fn AdminPage() -> impl IntoView {
    let status = RwSignal::new(None::<ClusterStatus>);
    let source = RwSignal::new(None::<String>);
    let error = RwSignal::new(None::<String>);
    // replica id -> recent (commit or last) index samples.
    let history = RwSignal::new(BTreeMap::<u64, VecDeque<u64>>::new());
    // Replicas currently down (drawn dashed).
    let down = RwSignal::new(Vec::<u64>::new());
    leptos::task::spawn_local(async move {
        let conn = connection::get();
        loop {
            match poll(&conn).await {
                Some((from, cluster)) => {
                    conn.remember_endpoints(&cluster.replicas.iter().map(|r| r.url.clone()).collect::<Vec<_>>());
                    history.update(|h| {
                        for r in &cluster.replicas {
                            let samples = h.entry(r.id).or_default();
                            // A replica that is down keeps its last known index (what the primary reports for it
                            // then is only what it has confirmed in this term).
                            let value = if r.alive { r.last_index } else { samples.back().copied().unwrap_or(0) };
                            samples.push_back(value);
                            if samples.len() > SAMPLES {
                                samples.pop_front();
                            }
                        }
                    });
                    down.set(cluster.replicas.iter().filter(|r| !r.alive).map(|r| r.id).collect());
                    source.set(Some(from));
                    error.set(None);
                    status.set(Some(cluster));
                }
                None => error.set(Some("No replica answers. Retrying every second…".into())),
            }
            gloo_timers::future::TimeoutFuture::new(1000).await;
        }
    });
    let primary = move || {
        status.with(|s| {
            s.as_ref().and_then(|s| s.replicas.iter().find(|r| r.role == "primary").map(|r| r.id).or(s.leader))
        })
    };
    view! {
        <div class="admin">
            <h1>"replichat cluster"</h1>
            <p class="summary">
                "Primary: " <strong data-testid="admin-primary">{move || primary().map_or("none".to_owned(), |p| p.to_string())}</strong>
                " · term " <strong data-testid="admin-term">{move || status.with(|s| s.as_ref().map(|s| s.term.to_string()))}</strong>
                " · commit index " {move || status.with(|s| s.as_ref().map(|s| s.commit_index.to_string()))}
                " · as seen by " <span data-testid="admin-source">{move || source.get()}</span>
            </p>
            <ErrorLine message=error testid="admin-error"/>
            <table class="replicas">
                <thead><tr><th>"id"</th><th>"url"</th><th>"role"</th><th>"alive"</th><th>"last index"</th><th>"lag"</th></tr></thead>
                <tbody>
                    <For each=move || status.get().map(|s| s.replicas).unwrap_or_default()
                        key=|r| (r.id, r.role.clone(), r.alive, r.last_index, r.lag) let:r>
                        <tr data-testid="replica" data-id=r.id.to_string() data-role=r.role.clone() data-alive=r.alive.to_string()
                            class=format!("role-{} {}", r.role, if r.alive { "alive" } else { "down" })>
                            <td>{r.id}</td>
                            <td><a href=format!("{}/admin", r.url)>{r.url.clone()}</a></td>
                            <td class="role">{if r.role == "primary" { "★ primary".to_owned() } else { r.role.clone() }}</td>
                            <td>{if r.alive { "yes" } else { "no" }}</td>
                            <td>{r.last_index}</td>
                            <td>{r.lag}</td>
                        </tr>
                    </For>
                </tbody>
            </table>
            <h2>"Last log index per replica (last 60 s)"</h2>
            <Chart history=history down=down/>
            <p class="hint"><a href="/">"Back to the chat"</a></p>
        </div>
    }
}

/// Ask the replicas in turn (the one that served the page first) until one answers.
async fn poll(conn: &connection::Connection) -> Option<(String, ClusterStatus)> {
    let origin = web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default();
    let mut endpoints = conn.endpoints();
    endpoints.sort_by_key(|e| *e != origin);
    for base in endpoints {
        let request = gloo_net::http::Request::get(&format!("{base}/api/cluster")).send();
        let answer =
            futures::future::select(Box::pin(request), Box::pin(gloo_timers::future::TimeoutFuture::new(800))).await;
        if let futures::future::Either::Left((Ok(response), _)) = answer {
            if response.ok() {
                if let Ok(status) = response.json::<ClusterStatus>().await {
                    return Some((base, status));
                }
            }
        }
    }
    None
}

#[component]
fn Chart(history: RwSignal<BTreeMap<u64, VecDeque<u64>>>, down: RwSignal<Vec<u64>>) -> impl IntoView {
    const WIDTH: f64 = 600.0;
    const HEIGHT: f64 = 160.0;
    const LEGEND: f64 = 110.0;
    const COLOURS: [&str; 5] = ["#2b6cb0", "#2f855a", "#c05621", "#6b46c1", "#b83280"];
    let lines = move || {
        let down = down.get();
        history.with(|h| {
            let (min, max) = h.values().flatten().fold((u64::MAX, 0u64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            let span = (max.saturating_sub(min)).max(1) as f64;
            h.iter()
                .map(|(id, samples)| {
                    let steps = samples.len().saturating_sub(1).max(1) as f64;
                    let points: Vec<String> = samples
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let x = WIDTH * i as f64 / steps;
                            let y = HEIGHT - 10.0 - (HEIGHT - 20.0) * (v.saturating_sub(min)) as f64 / span;
                            format!("{x:.1},{y:.1}")
                        })
                        .collect();
                    let label = format!("replica {id}{}", if down.contains(id) { " (down)" } else { "" });
                    (*id, points.join(" "), COLOURS[*id as usize % COLOURS.len()], down.contains(id), label)
                })
                .collect::<Vec<_>>()
        })
    };
    let range = move || {
        history.with(|h| {
            let (min, max) = h.values().flatten().fold((u64::MAX, 0u64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            if max == 0 {
                String::new()
            } else {
                format!("index {min} – {max}")
            }
        })
    };
    view! {
        <svg data-testid="admin-chart" class="chart" viewBox=format!("0 0 {} {HEIGHT}", WIDTH + LEGEND)
            width=WIDTH + LEGEND height=HEIGHT role="img" aria-label="last log index of each replica over the last minute">
            <rect x="0" y="0" width=WIDTH height=HEIGHT fill="#f7fafc" stroke="#cbd5e0"/>
            <text x=WIDTH - 6.0 y="14" text-anchor="end" fill="#718096" font-size="11">{range}</text>
            <For each=lines key=|l| l.clone() let:line>
                <polyline fill="none" stroke=line.2 stroke-width="2" points=line.1.clone()
                    stroke-dasharray=if line.3 { "5 4" } else { "" }/>
                <text x=WIDTH + 8.0 y=20.0 + 16.0 * line.0 as f64 fill=line.2 font-size="12">{line.4.clone()}</text>
            </For>
        </svg>
    }
}
