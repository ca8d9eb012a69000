//! Liveness, readiness, metrics and server information.
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::{blocking, live_generation};
use crate::api::error::ApiError;
use crate::api::AppState;

/// `GET /healthz`: 200 while the process serves HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 once the model is warm and the index loaded, else 503.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let generation = live_generation(&state)?;
    Ok(Json(
        json!({ "status": "ready", "model_version": generation.version }),
    ))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let text = state.metrics.render().map_err(ApiError::internal)?;
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    ))
}

/// `GET /v1/info`: model, device, input spec, item counts and the request limits.
pub async fn info(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let generation = live_generation(&state)?;
    let store = state.store.clone();
    let items = blocking(move || store.item_count().map_err(ApiError::internal)).await?;
    let spec = &generation.info.spec;
    Ok(Json(json!({
        "model": {
            "name": spec.name,
            "version": generation.version,
            "format": spec.format,
            "architecture": spec.architecture,
        },
        "model_version": generation.version,
        "device": generation.info.device,
        "embedding_dim": spec.embedding_dim,
        "input": spec.input,
        "items": items,
        "index_items": generation.index.len(),
        "limits": {
            "max_inputs_per_request": state.config.batching.max_inputs_per_request,
            "body_limit_bytes": state.config.server.body_limit_bytes,
            "max_k": state.config.search.max_k,
        },
    })))
}
