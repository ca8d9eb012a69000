//! HTTP API (axum): routing, shared state, request metrics.
//!
//! Handlers validate and decode, then hand work to the embedder thread, the index and the
//! store; nothing below this module knows HTTP.

pub mod body;
pub mod error;
mod handlers;
pub mod input;
pub mod path;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::{Publisher, Registry};
use crate::store::Store;
use crate::train::online::TrainerHandle;
use error::{ApiError, RejectReason};

/// Everything a handler needs, shared by all requests.
#[derive(Clone)]
pub struct AppState {
    /// Settings read at start-up.
    pub config: Arc<Config>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The durable store.
    pub store: Arc<Store>,
    /// The live generation (model + index) and the write path.
    pub registry: Arc<Registry>,
    /// Builds and swaps generations in the background.
    pub publisher: Arc<Publisher>,
    /// The online trainer, when enabled.
    pub trainer: Option<TrainerHandle>,
}

/// Builds the router with every route, the body limit and the metrics layer.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.server.body_limit_bytes;
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/info", get(handlers::info))
        .route("/v1/embed", post(handlers::embed))
        .route("/v1/items", post(handlers::upsert_items))
        .route(
            "/v1/items/{id}",
            get(handlers::get_item).delete(handlers::delete_item),
        )
        .route("/v1/search", post(handlers::search))
        .route(
            "/v1/classes",
            get(handlers::list_classes).post(handlers::create_class),
        )
        .route("/v1/classes/{label}", delete(handlers::delete_class))
        .route("/v1/classify", post(handlers::classify))
        .route("/v1/trainer", get(handlers::trainer_status))
        .route("/v1/trainer/pause", post(handlers::trainer_pause))
        .route("/v1/trainer/resume", post(handlers::trainer_resume))
        .route("/v1/trainer/publish", post(handlers::trainer_publish))
        .route("/v1/models", get(handlers::list_models))
        .route(
            "/v1/models/{version}/activate",
            post(handlers::activate_model),
        )
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not answer that method",
            )
        })
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            track_request,
        ))
        .with_state(state)
}

/// Counts every request by route and status, times it, and counts rejections by reason.
async fn track_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let metrics = &state.metrics;
    metrics
        .http_requests
        .with_label_values(&[&route, method, &status])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[&route, &status])
        .observe(started.elapsed().as_secs_f64());
    if let Some(RejectReason(reason)) = response.extensions().get::<RejectReason>() {
        metrics.rejected.with_label_values(&[reason]).inc();
    }
    response.into_response()
}

/// The `method` label: the standard methods by name, anything else as `other` (a client can
/// send any token as a method, and every label value is a time series kept forever).
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN
        .iter()
        .find(|known| *known == method)
        .map_or("other", Method::as_str)
}
