//! The JSON error envelope: `{"error":{"code":"…","message":"…"}}` with the right status.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::embed::EmbedError;
use crate::registry::WriteError;
use crate::store::StoreError;

/// Why a request was refused, attached to the response so the metrics layer can count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectReason(pub &'static str);

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422: well-formed but invalid values.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 404: an unknown item.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503: the server is not ready yet.
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the model is loading or the index is being rebuilt",
        )
    }

    /// 500: a failure on our side; details go to the log.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {message}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {message}"),
        )
    }

    /// The metrics reason for this rejection, or `None` for server-side failures.
    fn reject_reason(&self) -> Option<&'static str> {
        match (self.status, self.code) {
            (StatusCode::TOO_MANY_REQUESTS, _) => Some("queue_full"),
            (_, "too_many_inputs") => Some("too_many_inputs"),
            (StatusCode::PAYLOAD_TOO_LARGE, _) => Some("body_too_large"),
            (StatusCode::SERVICE_UNAVAILABLE, _) => Some("not_ready"),
            (StatusCode::NOT_FOUND, _) => Some("not_found"),
            (StatusCode::CONFLICT, _) => Some("conflict"),
            (status, _) if status.is_client_error() => Some("bad_input"),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reason = self.reject_reason();
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(reason) = reason {
            response.extensions_mut().insert(RejectReason(reason));
        }
        response
    }
}

impl From<EmbedError> for ApiError {
    fn from(error: EmbedError) -> Self {
        match error {
            EmbedError::QueueFull { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                error.to_string(),
            ),
            EmbedError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_inputs",
                error.to_string(),
            ),
            EmbedError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                error.to_string(),
            ),
            EmbedError::Inference(_) | EmbedError::Load(_) => ApiError::internal(error),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::NotReady => ApiError::not_ready(),
            WriteError::Embed(e) => e.into(),
            degenerate @ WriteError::DegenerateEmbedding { .. } => {
                ApiError::invalid("degenerate_embedding", degenerate.to_string())
            }
            WriteError::Input { image, .. } => ApiError::invalid(
                if image {
                    "invalid_image"
                } else {
                    "invalid_tensor"
                },
                error.to_string(),
            ),
            WriteError::Store(taken @ StoreError::IdTaken { .. }) => {
                ApiError::invalid("duplicate_id", taken.to_string())
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        ApiError::internal(format!("worker task failed: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::REJECT_REASONS;

    #[test]
    fn write_errors_caused_by_the_request_are_4xx_with_their_code() {
        let cases = [
            (
                WriteError::Input {
                    id: "t".into(),
                    image: false,
                    message: "shape".into(),
                },
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_tensor",
            ),
            (
                WriteError::Store(StoreError::IdTaken {
                    id: "a#1".into(),
                    owner: "an item",
                }),
                StatusCode::UNPROCESSABLE_ENTITY,
                "duplicate_id",
            ),
            (
                WriteError::Store(StoreError::JournalMode("delete".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (error, status, code) in cases {
            let api = ApiError::from(error);
            assert_eq!((api.status, api.code), (status, code));
        }
    }

    #[test]
    fn every_rejection_reason_is_pre_registered() {
        let statuses = [
            (StatusCode::BAD_REQUEST, "invalid_json"),
            (StatusCode::NOT_FOUND, "not_found"),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            (StatusCode::CONFLICT, "build_in_progress"),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_many_inputs"),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_k"),
            (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        ];
        for (status, code) in statuses {
            let reason = ApiError::new(status, code, "").reject_reason();
            assert!(
                reason.is_some_and(|r| REJECT_REASONS.contains(&r)),
                "{status} {code}: {reason:?} is not pre-registered"
            );
        }
        let internal = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "");
        assert_eq!(
            internal.reject_reason(),
            None,
            "a server failure is no rejection"
        );
    }
}
