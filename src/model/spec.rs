//! `model.toml`: what a model directory contains and what input it expects.
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Name of the description file inside a model directory.
pub const SPEC_FILE: &str = "model.toml";

/// How the weights of a model are stored and executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A network defined in this crate (`tch::nn`), weights in safetensors.
    Builtin,
    /// A TorchScript module exported from PyTorch, loaded with `tch::CModule`.
    Torchscript,
}

/// The input a model expects: image geometry and per-channel normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Input height in pixels.
    pub height: usize,
    /// Input width in pixels.
    pub width: usize,
    /// Per-channel mean subtracted after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: Vec<f32>,
}

impl InputSpec {
    /// Number of f32 values in one preprocessed input (C × H × W).
    pub fn numel(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The tensor shape `[C, H, W]` of one input.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// A one-channel `side`×`side` input with mean 0.5 and std 0.25, for tests.
#[cfg(test)]
pub(crate) fn gray_test_spec(side: usize) -> InputSpec {
    InputSpec {
        channels: 1,
        height: side,
        width: side,
        mean: vec![0.5],
        std: vec![0.25],
    }
}

/// The contents of `model.toml` (unknown keys are errors, like the configuration's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Human-readable model name, reported by `/v1/info`.
    pub name: String,
    /// Storage and execution format.
    pub format: ModelFormat,
    /// Architecture name for builtin models (e.g. `"resnet-small"`); informative for TorchScript.
    pub architecture: String,
    /// Channel widths of the builtin network's stages (ignored for TorchScript).
    #[serde(default)]
    pub widths: Vec<i64>,
    /// Expected input.
    pub input: InputSpec,
    /// Dimension of the (L2-normalised) embedding the model outputs.
    pub embedding_dim: usize,
    /// Weights file, relative to the model directory.
    pub weights: String,
}

/// Errors reading or writing `model.toml`.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid model description.
    #[error("{path}: {message}")]
    Invalid {
        /// File involved.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The largest input height and width a model may declare.
const MAX_INPUT_SIDE: usize = 4096;
/// The largest embedding dimension a model may declare.
const MAX_EMBEDDING_DIM: usize = 65_536;
/// The smallest normalisation std: below it, preprocessing turns pixels into infinities.
const MIN_STD: f32 = 1e-6;

impl ModelSpec {
    /// Reads `DIR/model.toml` and checks that it is self-consistent and within bounds.
    pub fn load(dir: &Path) -> Result<Self, SpecError> {
        let path = dir.join(SPEC_FILE);
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| SpecError::Io {
            path: shown.clone(),
            source,
        })?;
        let spec: ModelSpec = toml::from_str(&text).map_err(|e| SpecError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        spec.validate().map_err(|message| SpecError::Invalid {
            path: shown,
            message,
        })?;
        Ok(spec)
    }

    /// Writes `DIR/model.toml`, creating the directory.
    pub fn save(&self, dir: &Path) -> Result<(), SpecError> {
        let path = dir.join(SPEC_FILE);
        let io = |source| SpecError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let text = toml::to_string_pretty(self).map_err(|e| SpecError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io)
    }

    /// Refuses a description no server could load (checked on load, and before training).
    pub fn validate(&self) -> Result<(), String> {
        let input = &self.input;
        if input.channels != 1 && input.channels != 3 {
            return Err(format!(
                "input.channels must be 1 or 3, got {}",
                input.channels
            ));
        }
        if !(1..=MAX_INPUT_SIDE).contains(&input.height)
            || !(1..=MAX_INPUT_SIDE).contains(&input.width)
        {
            return Err(format!(
                "input.height and input.width must be 1 to {MAX_INPUT_SIDE}, got {} and {}",
                input.height, input.width
            ));
        }
        if input.mean.len() != input.channels || input.std.len() != input.channels {
            return Err("input.mean and input.std need one value per channel".into());
        }
        if input.mean.iter().any(|m| !m.is_finite()) {
            return Err("input.mean values must be finite".into());
        }
        if input.std.iter().any(|s| !(s.is_finite() && *s >= MIN_STD)) {
            return Err(format!(
                "input.std values must be finite and at least {MIN_STD}"
            ));
        }
        if !(1..=MAX_EMBEDDING_DIM).contains(&self.embedding_dim) {
            return Err(format!(
                "embedding_dim must be 1 to {MAX_EMBEDDING_DIM}, got {}",
                self.embedding_dim
            ));
        }
        Ok(())
    }
}
