//! Request handlers, one file per resource.

mod classes;
mod embed;
mod items;
mod models;
mod search;
mod system;

pub use classes::{classify, create_class, list_classes};
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
use crate::registry::Generation;

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

/// Runs blocking store/index work off the async runtime.
async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}
