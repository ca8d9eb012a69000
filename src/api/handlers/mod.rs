//! Request handlers, one file per resource.

mod classes;
mod embed;
mod items;
mod models;
mod search;
mod system;

pub use classes::{classify, create_class, delete_class, list_classes};
pub use embed::embed;
pub use items::{delete_item, get_item, upsert_items};
pub use models::{
    activate_model, list_models, trainer_pause, trainer_publish, trainer_resume, trainer_status,
};
pub use search::search;
pub use system::{healthz, info, metrics, readyz};

use std::sync::Arc;

use super::error::ApiError;
use super::AppState;
use crate::index::indexable_norm;
use crate::metrics::Metrics;
use crate::registry::{Generation, Registry};

/// Sets the `index_items` gauge from the live generation's index, after a write (the
/// generation a request started on may have been swapped out meanwhile).
fn report_index_items(registry: &Registry, metrics: &Metrics) {
    if let Some(live) = registry.live() {
        metrics.index_items.set(live.index.len() as i64);
    }
}

/// Longest accepted label (of an item or a class), in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

/// Refuses with 422 `invalid_label` a label that is empty, longer than [`MAX_LABEL_BYTES`] or
/// holds control characters; `what` names it in the message.
fn check_label(label: &str, what: &str) -> Result<(), ApiError> {
    let problem = if label.trim().is_empty() {
        "must not be empty".to_string()
    } else if label.len() > MAX_LABEL_BYTES {
        format!("is {} bytes; the limit is {MAX_LABEL_BYTES}", label.len())
    } else if label.chars().any(char::is_control) {
        "must not contain control characters".to_string()
    } else {
        return Ok(());
    };
    Err(ApiError::invalid(
        "invalid_label",
        format!("{what} {problem}"),
    ))
}

/// The live generation, or 503 while the server is starting.
fn live_generation(state: &AppState) -> Result<Arc<Generation>, ApiError> {
    state.registry.live().ok_or_else(ApiError::not_ready)
}

/// Refuses a request carrying more inputs than `batching.max_inputs_per_request`, or none.
fn check_input_count(state: &AppState, count: usize, what: &str) -> Result<(), ApiError> {
    let limit = state.config.batching.max_inputs_per_request;
    if count == 0 {
        return Err(ApiError::bad_request(
            "empty_request",
            format!("no {what} given"),
        ));
    }
    if count > limit {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_inputs",
            format!("{count} {what} in one request; the limit is {limit}"),
        ));
    }
    Ok(())
}

/// The requested `k` (or `default`), refused with 422 outside 1…`search.max_k`.
fn checked_k(state: &AppState, k: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let k = k.unwrap_or(default);
    let max_k = state.config.search.max_k;
    if k == 0 || k > max_k {
        return Err(ApiError::invalid(
            "invalid_k",
            format!("k must be between 1 and {max_k}, got {k}"),
        ));
    }
    Ok(k)
}

/// Validates `inputs` (named `inputs[i]` in errors) and embeds them with `generation`.
async fn embed_inputs(
    generation: &Generation,
    inputs: Vec<crate::api::input::InputPayload>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let values = prepare_inputs(generation, inputs).await?;
    let embeddings = generation.embedder.embed(values).await?;
    check_embeddings(&embeddings, |i| format!("inputs[{i}]"))?;
    Ok(embeddings)
}

/// Refuses (422 `degenerate_embedding`) an answer in which the model mapped an input to a
/// vector with no direction (zero or non-finite): it can be neither compared nor indexed.
/// `name(i)` names input `i` in the message.
fn check_embeddings(
    embeddings: &[Vec<f32>],
    name: impl Fn(usize) -> String,
) -> Result<(), ApiError> {
    for (i, embedding) in embeddings.iter().enumerate() {
        if let Err(problem) = indexable_norm(embedding) {
            return Err(ApiError::invalid(
                "degenerate_embedding",
                format!(
                    "{}: the model maps this input to a vector that cannot be compared ({problem})",
                    name(i)
                ),
            ));
        }
    }
    Ok(())
}

/// Validates `inputs` (named `inputs[i]` in errors) and turns them into `generation`'s model
/// input values.
async fn prepare_inputs(
    generation: &Generation,
    inputs: Vec<crate::api::input::InputPayload>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let payloads = inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| (input, format!("inputs[{i}]")))
        .collect();
    let prepared =
        crate::api::input::prepare_all(payloads, generation.info.spec.input.clone()).await?;
    Ok(prepared.into_iter().map(|p| p.values).collect())
}

/// Runs blocking work (store, index, large JSON bodies) off the async runtime.
pub(super) async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}
