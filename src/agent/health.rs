//! The seed's optional agent API at `agent_address`: `GET /api/health` and `GET /api/poke`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::stats::AgentStats;

/// Accepts `host:port` or the seed's `http://host:port`.
pub fn parse_agent_address(raw: &str) -> Option<SocketAddr> {
    let t = raw.trim();
    let t = t.strip_prefix("http://").unwrap_or(t).trim_end_matches('/');
    t.to_socket_addrs().ok()?.next()
}

#[derive(Clone)]
struct HealthState {
    stats: Arc<AgentStats>,
    poke: Arc<Notify>,
}

async fn health(State(s): State<HealthState>) -> Json<Value> {
    Json(json!(s.stats.snapshot()))
}

async fn poke(State(s): State<HealthState>) -> Json<Value> {
    s.poke.notify_one();
    Json(json!({}))
}

/// Binds the agent API; binding errors are returned so a busy port is a clear start-up error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the agent API until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<AgentStats>,
    poke_signal: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/api/health", get(health))
        .route("/api/poke", get(poke))
        .with_state(HealthState {
            stats,
            poke: poke_signal,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "agent API server stopped");
    }
}
