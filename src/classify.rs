//! Classification of embeddings into labels, as `POST /v1/classify` answers it: the trainer's
//! class head (one unit-norm proxy per class, logits `scale · cos`) as published with a
//! generation, and the nearest class mean of the indexed items for labels the head has not
//! learnt yet. A head trained with low-fidelity replay classifies the low-fidelity rendering of
//! each input ([`LowFidelityInput`]). Plain `f32` arithmetic and image codecs, no tensors: it
//! runs on request threads.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::spec::InputSpec;
use crate::train::replay::{ExemplarCodec, Fidelity, ReplayConfig};
use crate::train::TrainError;

/// File of a generation's class head inside its model directory.
pub const HEAD_FILE: &str = "class_head.json";

/// Why a class head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid head.
    #[error("class head {path}: {message}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The rendering a head trained with low-fidelity replay classifies: each input downsampled by
/// `downsample` and JPEG-encoded at `jpeg_quality`, as the replay memory stores old classes.
/// Old classes are trained at that fidelity only, so their proxies fit its embeddings; on the
/// inputs as they are, old classes' images land on the new classes (README, "Class-incremental
/// benchmark").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowFidelityInput {
    /// Downsampling factor of each side.
    pub downsample: usize,
    /// JPEG quality (1..=100).
    pub jpeg_quality: u8,
}

/// A class head frozen for serving: labels, their unit-norm proxies and the logit scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadSnapshot {
    /// Class labels, one per proxy.
    pub labels: Vec<String>,
    /// Logit scale: logits are `scale · cos(embedding, proxy)`.
    pub scale: f32,
    /// One proxy per label, each of the embedding dimension.
    pub proxies: Vec<Vec<f32>>,
    /// Set when the head classifies the low-fidelity rendering of its inputs (absent: the
    /// inputs as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_fidelity_input: Option<LowFidelityInput>,
}

impl HeadSnapshot {
    /// Reads `DIR/class_head.json`; `Ok(None)` when the generation has no head.
    pub fn load(dir: &Path) -> Result<Option<HeadSnapshot>, HeadError> {
        let path = dir.join(HEAD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HeadError::Io { path, source }),
        };
        let invalid = |message: String| HeadError::Invalid {
            path: path.clone(),
            message,
        };
        let head: HeadSnapshot =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if head.labels.len() != head.proxies.len() {
            return Err(invalid(format!(
                "{} labels but {} proxies",
                head.labels.len(),
                head.proxies.len()
            )));
        }
        let dim = head.proxies.first().map_or(0, Vec::len);
        if head.proxies.iter().any(|p| p.len() != dim) || !head.scale.is_finite() {
            return Err(invalid("proxies of unequal length or a bad scale".into()));
        }
        Ok(Some(head))
    }

    /// Writes `DIR/class_head.json` (the caller syncs and renames the directory).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join(HEAD_FILE), serde_json::to_vec(self)?)
    }

    /// The head's classes as `(label, proxy)` pairs.
    pub fn classes(&self) -> impl Iterator<Item = (&str, &[f32])> {
        self.labels
            .iter()
            .map(String::as_str)
            .zip(self.proxies.iter().map(Vec::as_slice))
    }
}

/// A class head ready to serve: its snapshot and the codec that renders inputs for it.
#[derive(Debug)]
pub struct ServedHead {
    /// The published head.
    pub snapshot: HeadSnapshot,
    rendering: Option<ExemplarCodec>,
}

impl ServedHead {
    /// Prepares `snapshot` for model inputs of `input`; fails when its rendering cannot apply
    /// to them.
    pub fn new(snapshot: HeadSnapshot, input: &InputSpec) -> Result<Self, TrainError> {
        let rendering = snapshot
            .low_fidelity_input
            .map(|low| {
                let config = ReplayConfig {
                    fidelity: Fidelity::Low,
                    downsample: low.downsample,
                    jpeg_quality: low.jpeg_quality,
                    ..ReplayConfig::default()
                };
                ExemplarCodec::new(input, &config)
            })
            .transpose()?;
        Ok(ServedHead {
            snapshot,
            rendering,
        })
    }

    /// Whether the head classifies renderings of the inputs rather than the inputs.
    pub fn renders_inputs(&self) -> bool {
        self.rendering.is_some()
    }

    /// `values` (one prepared model input) as the head classifies it.
    pub fn render(&self, values: &[f32]) -> Result<Vec<f32>, TrainError> {
        match &self.rendering {
            Some(codec) => codec.degrade(values),
            None => Ok(values.to_vec()),
        }
    }
}

/// One predicted label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The label.
    pub label: String,
    /// Softmax probability over all candidate classes.
    pub probability: f64,
}

/// L2-normalised copy of `v` (`None` for a zero or non-finite vector).
pub fn normalised(v: &[f32]) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    (norm > 0.0 && norm.is_finite())
        .then(|| v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

/// Cosine similarity of two unit vectors (their dot product, in `f64`).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// The `k` most probable of the `(label, cos)` candidates: softmax of `scale · cos` over all of
/// them, most probable first.
pub fn predict<'a>(
    candidates: impl IntoIterator<Item = (&'a str, f64)>,
    scale: f32,
    k: usize,
) -> Vec<Prediction> {
    let logits: Vec<(&str, f64)> = candidates
        .into_iter()
        .map(|(label, cos)| (label, f64::from(scale) * cos))
        .collect();
    let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = logits.iter().map(|l| (l.1 - max).exp()).sum();
    let mut out: Vec<Prediction> = logits
        .into_iter()
        .map(|(label, logit)| Prediction {
            label: label.to_owned(),
            probability: (logit - max).exp() / total,
        })
        .collect();
    out.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    out.truncate(k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_are_a_sorted_softmax_over_cosine_logits() {
        let a = normalised(&[1.0, 0.0]).unwrap();
        let b = normalised(&[1.0, 1.0]).unwrap();
        let c = normalised(&[-1.0, 0.2]).unwrap();
        let classes = [
            ("a", a.as_slice()),
            ("b", b.as_slice()),
            ("c", c.as_slice()),
        ];
        let e = normalised(&[0.9, 0.3]).unwrap();
        let scored = || classes.iter().map(|(l, p)| (*l, cosine(&e, p)));
        let all = predict(scored(), 10.0, 5);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].label, "a");
        let total: f64 = all.iter().map(|p| p.probability).sum();
        assert!((total - 1.0).abs() < 1e-12);
        // Independent check of one probability: exp(s·cos_b) / Σ exp(s·cos).
        let cos = |p: &[f32]| e.iter().zip(p).map(|(x, y)| f64::from(x * y)).sum::<f64>();
        let z: f64 = [&a, &b, &c].iter().map(|p| (10.0 * cos(p)).exp()).sum();
        let b_prob = all.iter().find(|p| p.label == "b").unwrap().probability;
        assert!((b_prob - (10.0 * cos(&b)).exp() / z).abs() < 1e-6);
        assert_eq!(predict(scored(), 10.0, 1).len(), 1);
    }

    #[test]
    fn normalising_and_head_files() {
        assert_eq!(normalised(&[0.0, 0.0]), None);

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HeadSnapshot::load(dir.path()).unwrap(), None);
        let mut head = HeadSnapshot {
            labels: vec!["x".into(), "y".into()],
            scale: 16.0,
            proxies: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            low_fidelity_input: None,
        };
        head.save(dir.path()).unwrap();
        assert_eq!(HeadSnapshot::load(dir.path()).unwrap(), Some(head.clone()));
        // Heads written before the field existed read as full-fidelity heads.
        assert!(!std::fs::read_to_string(dir.path().join(HEAD_FILE))
            .unwrap()
            .contains("low_fidelity_input"));
        head.low_fidelity_input = Some(LowFidelityInput {
            downsample: 2,
            jpeg_quality: 75,
        });
        head.save(dir.path()).unwrap();
        assert_eq!(HeadSnapshot::load(dir.path()).unwrap(), Some(head));
        std::fs::write(
            dir.path().join(HEAD_FILE),
            br#"{"labels":["x"],"scale":1,"proxies":[]}"#,
        )
        .unwrap();
        assert!(HeadSnapshot::load(dir.path()).is_err());
    }

    #[test]
    fn a_low_fidelity_head_renders_inputs_and_a_full_one_keeps_them() {
        let spec = crate::model::spec::gray_test_spec(28);
        // A smooth gradient, in normalised model units.
        let values: Vec<f32> = (0..spec.numel())
            .map(|i| ((i % spec.width) as f32 / spec.width as f32 - spec.mean[0]) / spec.std[0])
            .collect();
        let snapshot = |low| HeadSnapshot {
            labels: vec!["x".into()],
            scale: 16.0,
            proxies: vec![vec![1.0]],
            low_fidelity_input: low,
        };
        let full = ServedHead::new(snapshot(None), &spec).unwrap();
        assert!(!full.renders_inputs());
        assert_eq!(full.render(&values).unwrap(), values);

        let low = LowFidelityInput {
            downsample: 2,
            jpeg_quality: 50,
        };
        let served = ServedHead::new(snapshot(Some(low)), &spec).unwrap();
        assert!(served.renders_inputs());
        let rendered = served.render(&values).unwrap();
        assert_eq!(rendered.len(), values.len());
        assert_ne!(rendered, values, "a downsampled JPEG is not the input");
        // Close to the input (a smooth image survives 2× downsampling and JPEG) ...
        let max_gap = rendered
            .iter()
            .zip(&values)
            .map(|(a, b)| (a - b).abs() * spec.std[0])
            .fold(0.0f32, f32::max);
        assert!(max_gap < 0.1, "pixel gap {max_gap}");
        // ... and the same rendering every time.
        assert_eq!(served.render(&values).unwrap(), rendered);
        // A rendering that cannot apply to the inputs is refused.
        let zero = LowFidelityInput {
            downsample: 0,
            jpeg_quality: 50,
        };
        assert!(ServedHead::new(snapshot(Some(zero)), &spec).is_err());
    }
}
