//! Classification of embeddings into labels, as `POST /v1/classify` answers it: the trainer's
//! class head (one unit-norm proxy per class, logits `scale · cos`) as published with a
//! generation, and the nearest class mean of the indexed items for labels the head has not
//! learnt yet. Plain `f32` arithmetic, no tensors: it runs on request threads.
use std::path::Path;

use serde::{Deserialize, Serialize};

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

/// A class head frozen for serving: labels, their unit-norm proxies and the logit scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadSnapshot {
    /// Class labels, one per proxy.
    pub labels: Vec<String>,
    /// Logit scale: logits are `scale · cos(embedding, proxy)`.
    pub scale: f32,
    /// One proxy per label, each of the embedding dimension.
    pub proxies: Vec<Vec<f32>>,
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

/// The normalised mean of `vectors` (`None` when empty or the mean is zero).
pub fn class_mean<'a>(vectors: impl IntoIterator<Item = &'a [f32]>) -> Option<Vec<f32>> {
    let mut sum: Vec<f64> = Vec::new();
    for v in vectors {
        if sum.is_empty() {
            sum = vec![0.0; v.len()];
        }
        for (s, x) in sum.iter_mut().zip(v) {
            *s += f64::from(*x);
        }
    }
    let mean: Vec<f32> = sum.iter().map(|s| *s as f32).collect();
    normalised(&mean)
}

/// The `k` most probable of `classes` (`(label, unit-norm proxy)`) for `embedding` (unit norm):
/// softmax of `scale · cos` over all of them, most probable first.
pub fn predict<'a>(
    embedding: &[f32],
    classes: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    scale: f32,
    k: usize,
) -> Vec<Prediction> {
    let logits: Vec<(&str, f64)> = classes
        .into_iter()
        .map(|(label, proxy)| {
            let cos: f64 = embedding
                .iter()
                .zip(proxy)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            (label, f64::from(scale) * cos)
        })
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
        let all = predict(&e, classes, 10.0, 5);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].label, "a");
        let total: f64 = all.iter().map(|p| p.probability).sum();
        assert!((total - 1.0).abs() < 1e-12);
        // Independent check of one probability: exp(s·cos_b) / Σ exp(s·cos).
        let cos = |p: &[f32]| e.iter().zip(p).map(|(x, y)| f64::from(x * y)).sum::<f64>();
        let z: f64 = [&a, &b, &c].iter().map(|p| (10.0 * cos(p)).exp()).sum();
        let b_prob = all.iter().find(|p| p.label == "b").unwrap().probability;
        assert!((b_prob - (10.0 * cos(&b)).exp() / z).abs() < 1e-6);
        assert_eq!(predict(&e, classes, 10.0, 1).len(), 1);
    }

    #[test]
    fn class_means_and_head_files() {
        let mean = class_mean([[2.0f32, 0.0].as_slice(), [0.0, 2.0].as_slice()]).unwrap();
        assert!((mean[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(class_mean(std::iter::empty()), None);
        assert_eq!(normalised(&[0.0, 0.0]), None);

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HeadSnapshot::load(dir.path()).unwrap(), None);
        let head = HeadSnapshot {
            labels: vec!["x".into(), "y".into()],
            scale: 16.0,
            proxies: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        };
        head.save(dir.path()).unwrap();
        assert_eq!(HeadSnapshot::load(dir.path()).unwrap(), Some(head));
        std::fs::write(
            dir.path().join(HEAD_FILE),
            br#"{"labels":["x"],"scale":1,"proxies":[]}"#,
        )
        .unwrap();
        assert!(HeadSnapshot::load(dir.path()).is_err());
    }
}
