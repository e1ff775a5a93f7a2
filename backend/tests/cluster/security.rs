//! The internal replication endpoint is only for replicas that know the cluster secret.

use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::harness::*;
use crate::step;

/// Try to open `/internal/replicate` with this `Authorization` header: `Ok(())` if the upgrade succeeded
/// (the socket is closed at once), else the HTTP status it was refused with.
async fn open_replicate(addr: &str, authorization: Option<&str>) -> Result<(), StatusCode> {
    let mut request = format!("ws://{addr}/internal/replicate").into_client_request().unwrap();
    if let Some(value) = authorization {
        request.headers_mut().insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await.expect("an answer") {
        Ok((mut ws, _)) => {
            let _ = ws.close(None).await;
            Ok(())
        }
        Err(WsError::Http(response)) => Err(response.status()),
        Err(other) => panic!("{addr}: expected an HTTP answer, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_secret_is_refused() {
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let backup = (leader + 1) % 3;
    let wrong = format!("Bearer {}x", cluster.secret);
    let cases: [(&str, Option<&str>); 5] = [
        ("no Authorization", None),
        ("a wrong secret", Some("Bearer not-the-secret")),
        ("the secret with one more character", Some(wrong.as_str())),
        ("the secret without Bearer", Some(cluster.secret.as_str())),
        ("an empty bearer", Some("Bearer ")),
    ];
    for id in [leader, backup] {
        let addr = &cluster.node(id).addr;
        for (what, header) in cases {
            step!("node {id}: /internal/replicate with {what} is refused with 401");
            assert_eq!(open_replicate(addr, header).await, Err(StatusCode::UNAUTHORIZED), "node {id}, {what}");
        }
    }

    step!("control: with the right secret the route exists and is not refused as unauthorised");
    let right = format!("Bearer {}", cluster.secret);
    for id in [leader, backup] {
        let result = open_replicate(&cluster.node(id).addr, Some(&right)).await;
        assert!(
            !matches!(result, Err(StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND)),
            "node {id}: the right secret got {result:?}"
        );
    }

    step!("the refused attempts did not disturb the cluster: same primary, writes still commit everywhere");
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(10)).await, leader);
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    cluster.wait_applied_equal(Duration::from_secs(10)).await;
    alice.close().await;
    cluster.finish().await;
}
