//! Model inputs as clients send them (`{"image": base64}` or `{"tensor": […], "shape": […]}`)
//! and their validation into preprocessed values plus the raw form the store keeps.
use base64::Engine;

use super::error::ApiError;
use crate::embed::preprocess::{check_tensor, decode_image, SizeLimit};
use crate::index::{indexable_norm, IndexError};
use crate::model::spec::InputSpec;
use crate::store::InputKind;

/// One model input as sent by a client: exactly one of `image` or `tensor` (+ `shape`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputPayload {
    /// Base64-encoded PNG or JPEG bytes.
    pub image: Option<String>,
    /// Already normalised values in CHW order.
    pub tensor: Option<Vec<f32>>,
    /// Shape `[C, H, W]` of `tensor`.
    pub shape: Option<Vec<usize>>,
}

/// A validated input: the model-ready values and the raw form to store.
pub struct PreparedInput {
    /// Preprocessed `C×H×W` values.
    pub values: Vec<f32>,
    /// Raw bytes as stored: the image file, or the tensor as f32 little-endian.
    pub raw: Vec<u8>,
    /// What `raw` holds.
    pub kind: InputKind,
}

impl InputPayload {
    /// Whether the client sent any input field at all.
    pub fn is_present(&self) -> bool {
        self.image.is_some() || self.tensor.is_some() || self.shape.is_some()
    }

    /// Decodes and preprocesses the input for a model; `what` names it in error messages.
    pub fn prepare(self, spec: &InputSpec, what: &str) -> Result<PreparedInput, ApiError> {
        match (self.image, self.tensor, self.shape) {
            (Some(encoded), None, None) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|e| {
                        ApiError::bad_request(
                            "invalid_base64",
                            format!("{what}: image is not valid base64: {e}"),
                        )
                    })?;
                let values = decode_image(&raw, spec, SizeLimit::Upload)
                    .map_err(|e| ApiError::invalid("invalid_image", format!("{what}: {e}")))?;
                Ok(PreparedInput {
                    values,
                    raw,
                    kind: InputKind::Image,
                })
            }
            (None, Some(tensor), Some(shape)) => {
                let values = check_tensor(tensor, &shape, spec)
                    .map_err(|e| ApiError::invalid("invalid_tensor", format!("{what}: {e}")))?;
                let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Ok(PreparedInput {
                    values,
                    raw,
                    kind: InputKind::Tensor { shape },
                })
            }
            (None, Some(_), None) => Err(ApiError::invalid(
                "invalid_tensor",
                format!("{what}: a tensor needs its \"shape\" [C, H, W]"),
            )),
            _ => Err(ApiError::bad_request(
                "invalid_input",
                format!(
                    "{what}: give exactly one of \"image\" (base64) or \"tensor\" with \"shape\""
                ),
            )),
        }
    }
}

/// Prepares many inputs off the async runtime; fails on the first bad one.
pub async fn prepare_all(
    payloads: Vec<(InputPayload, String)>,
    spec: InputSpec,
) -> Result<Vec<PreparedInput>, ApiError> {
    tokio::task::spawn_blocking(move || {
        payloads
            .into_iter()
            .map(|(payload, what)| payload.prepare(&spec, &what))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?
}

/// Checks a client vector (dimension, finiteness, non-zero) and L2-normalises it.
pub fn normalised_vector(vector: Vec<f32>, dim: usize, what: &str) -> Result<Vec<f32>, ApiError> {
    if vector.len() != dim {
        return Err(ApiError::invalid(
            "wrong_dimension",
            format!(
                "{what}: vector has {} values, the model's embeddings have {dim}",
                vector.len()
            ),
        ));
    }
    let norm = indexable_norm(&vector).map_err(|e| {
        let problem = match e {
            IndexError::NonFinite => "non-finite values",
            _ => "zero norm",
        };
        ApiError::invalid("invalid_vector", format!("{what}: vector has {problem}"))
    })?;
    Ok(vector
        .into_iter()
        .map(|v| (f64::from(v) / norm) as f32)
        .collect())
}
