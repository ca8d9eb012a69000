//! `POST /v1/embed`: embeddings for images or tensors.
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{check_input_count, embed_inputs, live_generation};
use crate::api::body::JsonBody;
use crate::api::error::ApiError;
use crate::api::input::InputPayload;
use crate::api::AppState;

/// Request body of `POST /v1/embed`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    inputs: Vec<InputPayload>,
}

/// Response of `POST /v1/embed`.
#[derive(Serialize)]
pub struct EmbedResponse {
    model_version: u64,
    embeddings: Vec<Vec<f32>>,
}

/// Embeds every input with the live model, in request order.
pub async fn embed(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<EmbedRequest>,
) -> Result<Json<EmbedResponse>, ApiError> {
    check_input_count(&state, request.inputs.len(), "inputs")?;
    let generation = live_generation(&state)?;
    let embeddings = embed_inputs(&generation, request.inputs).await?;
    Ok(Json(EmbedResponse {
        model_version: generation.version,
        embeddings,
    }))
}
