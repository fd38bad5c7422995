//! HTTP API: identity, health and metrics.
//!
//! The API never touches the swarm: it reads the event loop's published [`Snapshot`]
//! and the shared metrics registry.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

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

/// Connections of one HTTP server, counted per host so that no host can hold every slot.
///
/// A host is an IPv4 address or an IPv6 /64 (what one household or one VPS gets). The
/// table has one entry per host with a connection open, so it is bounded by the
/// server's connection cap.
#[derive(Clone)]
pub struct Slots {
    permits: Arc<Semaphore>,
    per_host: usize,
    hosts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Slots {
    /// `total` connections at once, at most `per_host` of them from one host.
    pub fn new(total: usize, per_host: usize) -> Self {
        Slots {
            permits: Arc::new(Semaphore::new(total)),
            per_host,
            hosts: Arc::default(),
        }
    }

    /// Count a connection from `ip`, or `None` if its host already has `per_host`.
    fn take(&self, ip: IpAddr) -> Option<HostSlot> {
        let host = host_of(ip);
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let open = hosts.entry(host).or_default();
        if *open >= self.per_host {
            return None;
        }
        *open += 1;
        Some(HostSlot {
            host,
            hosts: self.hosts.clone(),
        })
    }
}

/// One connection's place in its host's count; given back on drop.
struct HostSlot {
    host: IpAddr,
    hosts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = hosts.get_mut(&self.host) {
            *open -= 1;
            if *open == 0 {
                hosts.remove(&self.host);
            }
        }
    }
}

/// The host a connection counts against: the IPv4 address (also when it arrives
/// IPv4-mapped on an IPv6 socket) or the IPv6 /64.
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

/// Sent to a connection over its host's share, before closing it: a client sees why
/// instead of a bare reset.
const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n\
content-length: 39\r\nconnection: close\r\n\r\ntoo many connections from your address\n";

/// An accept error that will not go away: the listening socket itself is gone (closed,
/// or destroyed from outside, e.g. by `ss -K`). Everything else (no descriptors or
/// memory left, a connection aborted before it was accepted) passes.
fn listener_is_dead(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EBADF | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

/// Serve `app` on `listener` until `shutdown` becomes true, then give in-flight
/// requests [`defaults::SHUTDOWN_GRACE`] to finish. Returns an error only when the
/// listening socket has died; the caller stops the relay then.
///
/// Hardened against slow, idle and greedy clients:
/// - a connection that sends nothing within [`defaults::HTTP_FIRST_BYTE_TIMEOUT`] is
///   closed, and a request head must be complete within
///   [`defaults::HTTP_HEADER_TIMEOUT`] (also between keep-alive requests);
/// - `slots` caps the connections served at once (more wait in the kernel's accept
///   queue) and those of one host (more get a 429 and are closed at once), so a flood
///   of idle connections from one host leaves room for everyone else;
/// - request heads are capped at 16 KiB.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    slots: Slots,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    let mut refused_logged = tokio::time::Instant::now() - defaults::STATS_LOG_INTERVAL;
    let mut result = Ok(());
    loop {
        let permit = tokio::select! {
            permit = slots.permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, remote): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if listener_is_dead(&e) => {
                    result = Err(e);
                    break;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next() => continue,
        };
        let Some(host_slot) = slots.take(remote.ip()) else {
            let _ = stream.try_write(TOO_MANY);
            if refused_logged.elapsed() >= defaults::STATS_LOG_INTERVAL {
                refused_logged = tokio::time::Instant::now();
                tracing::info!(
                    host = %host_of(remote.ip()),
                    "HTTP: refusing connections over {} per host (logged once per {} s)",
                    slots.per_host,
                    defaults::STATS_LOG_INTERVAL.as_secs()
                );
            }
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slots = (permit, host_slot);
            // Nothing sent at all: a connection opened only to hold a slot.
            match tokio::time::timeout(defaults::HTTP_FIRST_BYTE_TIMEOUT, stream.readable()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "HTTP connection: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "HTTP connection sent nothing; closed");
                    return;
                }
            }
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
    result
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
        let server = tokio::spawn(serve(listener, app, Slots::new(8, 8), stop_rx));
        let get = || crate::client::request("GET", &url, Duration::from_secs(5));

        assert_eq!(get().await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stalled = get().await.unwrap();
        assert_eq!(stalled.status, 503);
        assert!(String::from_utf8_lossy(&stalled.body).contains("event loop stalled"));
        heartbeat.beat();
        assert_eq!(get().await.unwrap().status, 200);
        let _ = stop.send(true);
        server.await.unwrap().unwrap();
    }
}
