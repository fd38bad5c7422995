//! HTTP API: identity, health and metrics.
//!
//! The API never touches the swarm: it reads the event loop's published [`Snapshot`]
//! and the shared metrics registry.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::defaults;
use crate::state::{Heartbeat, Snapshot, stopped};

#[derive(Clone)]
struct AppState {
    snapshot: watch::Receiver<Snapshot>,
    heartbeat: Heartbeat,
    stall_after: std::time::Duration,
}

/// Body of `GET /api/v1/identity` (SPEC §1).
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct IdentityResponse {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub protocol_version: String,
    pub agent_version: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    path: String,
}

/// The API's routes. `/healthz` fails when no QUIC listener is up or when the event
/// loop's `heartbeat` is older than `stall_after`.
pub fn router(
    snapshot: watch::Receiver<Snapshot>,
    heartbeat: Heartbeat,
    stall_after: std::time::Duration,
) -> Router {
    hardened(
        Router::new()
            .route("/api/v1/identity", get(identity))
            .route("/healthz", get(healthz)),
    )
    .with_state(AppState {
        snapshot,
        heartbeat,
        stall_after,
    })
}

/// What every router of the relay answers besides its routes (404 and 405 as JSON)
/// and the limits it serves them under (body size, request time).
fn hardened<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(RequestBodyLimitLayer::new(defaults::HTTP_MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            defaults::HTTP_REQUEST_TIMEOUT,
        ))
}

async fn identity(State(state): State<AppState>) -> Json<IdentityResponse> {
    let snap = state.snapshot.borrow().clone();
    Json(IdentityResponse {
        peer_id: snap.peer_id.to_string(),
        addresses: snap.addresses.iter().map(ToString::to_string).collect(),
        protocol_version: defaults::PROTOCOL_VERSION.to_owned(),
        agent_version: defaults::AGENT_VERSION.to_owned(),
    })
}

async fn healthz(State(state): State<AppState>) -> Response {
    let age = state.heartbeat.age();
    if !state.snapshot.borrow().listening {
        (StatusCode::SERVICE_UNAVAILABLE, "no QUIC listener\n").into_response()
    } else if age > state.stall_after {
        let body = format!(
            "event loop stalled: no turn for {:.1} s\n",
            age.as_secs_f64()
        );
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

/// The metrics endpoint's routes (`--metrics-address`): `/metrics` only.
pub fn metrics_router(registry: Arc<Registry>) -> Router {
    hardened(Router::new().route("/metrics", get(metrics))).with_state(registry)
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        tracing::error!("encoding metrics: {e}");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    let body = ErrorBody {
        error: "not found",
        path: uri.path().to_owned(),
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn method_not_allowed(uri: Uri) -> Response {
    let body = ErrorBody {
        error: "method not allowed",
        path: uri.path().to_owned(),
    };
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, HEAD")],
        Json(body),
    )
        .into_response()
}

/// Serve `app` on `listener` until `shutdown` becomes true, then give in-flight
/// requests [`defaults::SHUTDOWN_GRACE`] to finish.
///
/// Hardened against slow and greedy clients: the request head must arrive within
/// [`defaults::HTTP_HEADER_TIMEOUT`], at most [`defaults::HTTP_MAX_CONNECTIONS`] are
/// served at once (shared by all listeners through `permits`), and request heads are
/// capped at 16 KiB.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, remote): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(defaults::HTTP_HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%remote, "HTTP connection: {e}");
                    }
                    return;
                }
                _ = stopped(&mut shutdown) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(defaults::SHUTDOWN_GRACE, drain)
        .await
        .is_err()
    {
        tracing::debug!("HTTP connections still open after the grace period; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn healthz_fails_when_the_event_loop_stops_beating() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let (_tx, snapshot) = watch::channel(Snapshot {
            peer_id: key.public().to_peer_id(),
            addresses: Vec::new(),
            listening: true,
        });
        let heartbeat = Heartbeat::default();
        heartbeat.beat();
        let app = router(snapshot, heartbeat.clone(), Duration::from_millis(300));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, app, Arc::new(Semaphore::new(8)), stop_rx));
        let get = || crate::client::request("GET", &url, Duration::from_secs(5));

        assert_eq!(get().await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stalled = get().await.unwrap();
        assert_eq!(stalled.status, 503);
        assert!(String::from_utf8_lossy(&stalled.body).contains("event loop stalled"));
        heartbeat.beat();
        assert_eq!(get().await.unwrap().status, 200);
        let _ = stop.send(true);
        server.await.unwrap();
    }
}
