//! `PathParam`: the one path parameter of a route, whose every rejection is our JSON error
//! envelope (axum's own `Path` answers a plain-text 400).
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use super::error::ApiError;

/// A route's path parameter, percent-decoded; a segment that does not decode to UTF-8 is 400
/// `invalid_path`.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| PathParam(value))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}
