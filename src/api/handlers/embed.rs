//! `POST /v1/embed`: embeddings for images or tensors.
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{check_input_count, live_generation};
use crate::api::body::JsonBody;
use crate::api::error::ApiError;
use crate::api::input::{prepare_all, InputPayload};
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
    let payloads = request
        .inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| (input, format!("inputs[{i}]")))
        .collect();
    let prepared = prepare_all(payloads, generation.info.spec.input.clone()).await?;
    let values = prepared.into_iter().map(|p| p.values).collect();
    let embeddings = generation.embedder.embed(values).await?;
    Ok(Json(EmbedResponse {
        model_version: generation.version,
        embeddings,
    }))
}
