//! `JsonBody<T>`: a JSON extractor whose every rejection is our JSON error envelope.
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::handlers::blocking;

/// A request body parsed as JSON into `T`; malformed JSON is 400 `invalid_json`, a body over
/// the limit 413 `payload_too_large`.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send + 'static,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "the request body is larger than server.body_limit_bytes",
                    )
                } else {
                    ApiError::bad_request("invalid_body", rejection.body_text())
                }
            })?;
        if bytes.len() <= INLINE_PARSE_BYTES {
            return parse(&bytes);
        }
        // Parsing megabytes takes milliseconds of CPU: off the async workers.
        blocking(move || parse(&bytes)).await
    }
}

/// Bodies up to this size are parsed on the async runtime; larger ones on a blocking thread.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<JsonBody<T>, ApiError> {
    serde_json::from_slice(bytes)
        .map(JsonBody)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}
