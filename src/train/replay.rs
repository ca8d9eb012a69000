//! Replay memory of low-fidelity exemplars under a byte budget (Zhao et al., TNNLS 2021).
//!
//! When users add classes at run time, the trainer replays exemplars of the old classes so
//! the model does not forget them. The memory is limited in *bytes*, not in exemplars, and
//! keeps exemplars at low fidelity (downsampled by a factor, then lossily JPEG-encoded), so
//! several times more exemplars fit in the same bytes than at full fidelity (lossless PNG).
//! The codec is fixed: it is never fitted on data, and [`ExemplarCodec::degrade`] gives the
//! low-fidelity twin of a full-fidelity example for duplet training.
//!
//! # Storage
//!
//! Every exemplar of one codec shares the same container header (JPEG: markers, JFIF,
//! quantisation and Huffman tables, frame and scan headers; PNG: signature and `IHDR`) and
//! trailer (JPEG `EOI`, PNG `IEND`), because the encoder, the size and the quality are
//! fixed. Each exemplar stores only the bytes in between (the JPEG abbreviated format of
//! ISO 10918-1 B.4, applied to PNG chunks likewise); the codec keeps the shared header once
//! and re-attaches it when decoding. Those shared bytes are charged to the budget once, as
//! soon as one exemplar is stored.
//!
//! # Budget rule
//!
//! After every mutating call ([`ReplayMemory::add_class`], [`ReplayMemory::load`]):
//!
//! 1. The total capacity is `C = floor((budget_bytes - shared) / mean)`, where `shared` is
//!    [`ExemplarCodec::shared_bytes`] and `mean` is the mean stored size of all exemplars
//!    currently held (including the ones just selected).
//! 2. With `K` classes in insertion order, class `i` has the quota
//!    `C / K + (1 if i < C % K else 0)`: quotas are equal up to one and shrink as classes are
//!    added. Each class is truncated to its quota by dropping its *last-selected* exemplars
//!    (selection order is a priority order, as in iCaRL's reduce step). A class holds fewer
//!    than its quota when it was given fewer candidates.
//! 3. While [`ReplayMemory::bytes_used`] still exceeds the budget (the mean grew because
//!    small exemplars were dropped), one tail exemplar is removed at a time from the class
//!    with the most exemplars (ties: the most bytes, then the latest added class).
//!
//! Hence `bytes_used() <= budget_bytes` always holds, and stored exemplar bytes are never
//! re-encoded or changed: they are only removed, from the tail of their class.
//!
//! # Selection
//!
//! [`Selection::Herding`] is iCaRL's herding on L2-normalised embeddings: the class mean
//! `mu` is the mean of the normalised embeddings of every candidate ever passed for the
//! class, and step `k` picks the candidate `x` minimising
//! `|| mu - (x + sum of the k - 1 already selected) / k ||` (ties: the earlier candidate).
//! Topping up a class continues from its stored exemplars (with the embeddings recorded when
//! they were selected). [`Selection::Random`] shuffles the new candidates with a generator
//! seeded from the configured seed, the label and the number of earlier additions.
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{DynamicImage, ExtendedColorType, GrayImage, ImageEncoder, ImageFormat, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::classify::normalised;
use crate::embed::preprocess::image_to_input;
use crate::model::spec::InputSpec;

/// How exemplars are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fidelity {
    /// Downsampled by [`ReplayConfig::downsample`] and JPEG-encoded at
    /// [`ReplayConfig::jpeg_quality`].
    #[default]
    Low,
    /// Lossless PNG at the model's input size.
    Full,
}

/// How exemplars are chosen among a class's candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// iCaRL herding on L2-normalised embeddings.
    #[default]
    Herding,
    /// A seeded random order.
    Random,
}

/// Settings of the replay memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Upper bound on [`ReplayMemory::bytes_used`].
    pub budget_bytes: usize,
    /// Storage fidelity of exemplars.
    pub fidelity: Fidelity,
    /// Downsampling factor (≥ 1) of low-fidelity exemplars; each side becomes
    /// `ceil(side / downsample)` pixels. Ignored at full fidelity.
    pub downsample: usize,
    /// JPEG quality (1..=100) of low-fidelity exemplars. Ignored at full fidelity.
    pub jpeg_quality: u8,
    /// How exemplars are chosen.
    pub selection: Selection,
    /// Seed of random selection.
    pub seed: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            budget_bytes: 2_000_000,
            fidelity: Fidelity::Full,
            downsample: 2,
            jpeg_quality: 75,
            selection: Selection::Herding,
            seed: 0,
        }
    }
}

impl ReplayConfig {
    /// Checks the values: a positive budget, a downsampling factor ≥ 1, a quality in 1..=100.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.budget_bytes == 0 {
            return Err(TrainError::Config(
                "replay.budget_bytes must be positive".into(),
            ));
        }
        if self.downsample == 0 {
            return Err(TrainError::Config(
                "replay.downsample must be at least 1 (1 keeps the model size)".into(),
            ));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(TrainError::Config(format!(
                "replay.jpeg_quality must be in 1..=100, got {}",
                self.jpeg_quality
            )));
        }
        Ok(())
    }
}

/// The fixed exemplar codec: model input values ↔ compact stored bytes.
#[derive(Debug, Clone)]
pub struct ExemplarCodec {
    spec: InputSpec,
    fidelity: Fidelity,
    quality: u8,
    stored_width: u32,
    stored_height: u32,
    /// Container bytes before each exemplar's payload, identical for all exemplars.
    header: Vec<u8>,
    /// Container bytes after each exemplar's payload, identical for all exemplars.
    trailer: Vec<u8>,
}

impl ExemplarCodec {
    /// A codec for inputs of `spec`, with the fidelity, factor and quality of `config`.
    pub fn new(spec: &InputSpec, config: &ReplayConfig) -> Result<Self, TrainError> {
        config.validate()?;
        check_spec(spec)?;
        let (stored_width, stored_height) = match config.fidelity {
            Fidelity::Low => (
                spec.width.div_ceil(config.downsample),
                spec.height.div_ceil(config.downsample),
            ),
            Fidelity::Full => (spec.width, spec.height),
        };
        let mut codec = ExemplarCodec {
            spec: spec.clone(),
            fidelity: config.fidelity,
            quality: config.jpeg_quality,
            stored_width: to_u32(stored_width)?,
            stored_height: to_u32(stored_height)?,
            header: Vec::new(),
            trailer: Vec::new(),
        };
        let reference = codec.encode_container(&vec![0.0; spec.numel()])?;
        let (header, trailer) = match codec.fidelity {
            Fidelity::Low => split_jpeg(&reference)?,
            Fidelity::Full => split_png(&reference)?,
        };
        codec.header = reference[..header].to_vec();
        codec.trailer = reference[reference.len() - trailer..].to_vec();
        Ok(codec)
    }

    /// The input geometry and normalisation of the model.
    pub fn input_spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Size in bytes of the container header and trailer shared by all exemplars.
    pub fn shared_bytes(&self) -> usize {
        self.header.len() + self.trailer.len()
    }

    /// Encodes normalised CHW model input to the stored payload: de-normalises to 8-bit
    /// gray/RGB; at low fidelity downsamples (Triangle filter) and JPEG-encodes at the
    /// quality, at full fidelity PNG-encodes losslessly at the model size; then strips the
    /// shared header and trailer.
    pub fn encode(&self, values: &[f32]) -> Result<Vec<u8>, TrainError> {
        let full = self.encode_container(values)?;
        let (h, t) = (self.header.len(), self.trailer.len());
        if full.len() < h + t || !full.starts_with(&self.header) || !full.ends_with(&self.trailer) {
            return Err(TrainError::Config(
                "the image encoder wrote a container header that differs from the codec's shared header"
                    .into(),
            ));
        }
        Ok(full[h..full.len() - t].to_vec())
    }

    /// Decodes a stored payload back to normalised CHW model input at the model's size
    /// (resized with a Triangle filter, normalised by [`image_to_input`]).
    pub fn decode(&self, payload: &[u8]) -> Result<Vec<f32>, TrainError> {
        let mut full = Vec::with_capacity(self.shared_bytes() + payload.len());
        full.extend_from_slice(&self.header);
        full.extend_from_slice(payload);
        full.extend_from_slice(&self.trailer);
        let format = match self.fidelity {
            Fidelity::Low => ImageFormat::Jpeg,
            Fidelity::Full => ImageFormat::Png,
        };
        let image = image::load_from_memory_with_format(&full, format)
            .map_err(|e| TrainError::Config(format!("stored exemplar does not decode: {e}")))?;
        Ok(image_to_input(&image, &self.spec))
    }

    /// `decode(encode(values))`: the input as the memory would replay it.
    pub fn degrade(&self, values: &[f32]) -> Result<Vec<f32>, TrainError> {
        self.decode(&self.encode(values)?)
    }

    /// The complete PNG or JPEG file for `values`.
    fn encode_container(&self, values: &[f32]) -> Result<Vec<u8>, TrainError> {
        let image = self.to_image(values)?;
        let (w, h) = (self.stored_width, self.stored_height);
        let image = if image.width() == w && image.height() == h {
            image
        } else {
            image.resize_exact(w, h, FilterType::Triangle)
        };
        let color = if self.spec.channels == 1 {
            ExtendedColorType::L8
        } else {
            ExtendedColorType::Rgb8
        };
        let mut out = Vec::new();
        let written = match self.fidelity {
            Fidelity::Low => JpegEncoder::new_with_quality(&mut out, self.quality).write_image(
                image.as_bytes(),
                w,
                h,
                color,
            ),
            Fidelity::Full => {
                PngEncoder::new_with_quality(&mut out, CompressionType::Best, PngFilter::Adaptive)
                    .write_image(image.as_bytes(), w, h, color)
            }
        };
        written.map_err(|e| TrainError::Config(format!("encoding an exemplar failed: {e}")))?;
        Ok(out)
    }

    /// De-normalises CHW values to an 8-bit image at the model size.
    fn to_image(&self, values: &[f32]) -> Result<DynamicImage, TrainError> {
        let spec = &self.spec;
        if values.len() != spec.numel() {
            return Err(TrainError::Shape(format!(
                "exemplar has {} values, the model input {:?} needs {}",
                values.len(),
                spec.shape(),
                spec.numel()
            )));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Config("exemplar values must be finite".into()));
        }
        let (w, h) = (to_u32(spec.width)?, to_u32(spec.height)?);
        let plane = spec.height * spec.width;
        let image = if spec.channels == 1 {
            let pixels = values
                .iter()
                .map(|v| to_pixel(*v, spec.mean[0], spec.std[0]))
                .collect();
            GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
        } else {
            let mut pixels = Vec::with_capacity(3 * plane);
            for i in 0..plane {
                for c in 0..3 {
                    pixels.push(to_pixel(values[c * plane + i], spec.mean[c], spec.std[c]));
                }
            }
            RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
        };
        image.ok_or_else(|| TrainError::Shape(format!("cannot form a {w}×{h} image")))
    }

    /// The parameters that decide how stored payloads decode, for the saved file.
    fn params(&self) -> CodecParams {
        let b64 = base64::engine::general_purpose::STANDARD;
        CodecParams {
            fidelity: self.fidelity,
            channels: self.spec.channels,
            width: self.stored_width,
            height: self.stored_height,
            jpeg_quality: match self.fidelity {
                Fidelity::Low => Some(self.quality),
                Fidelity::Full => None,
            },
            header: b64.encode(&self.header),
            trailer: b64.encode(&self.trailer),
        }
    }
}

/// One example offered as an exemplar of a class.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Stable example id; a class never stores two exemplars with the same id.
    pub id: String,
    /// Normalised CHW model input.
    pub values: Vec<f32>,
    /// The model's embedding of the input (normalised here, need not be unit length).
    pub embedding: Vec<f32>,
}

/// One stored exemplar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exemplar {
    /// Example id of the candidate it was made from.
    pub id: String,
    /// Class label.
    pub label: String,
    /// Stored payload (see [`ExemplarCodec::encode`]).
    pub bytes: Vec<u8>,
}

/// An exemplar drawn for a batch, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayDraw {
    /// Class label.
    pub label: String,
    /// Example id of the candidate the exemplar was made from.
    pub id: String,
    /// Decoded model input.
    pub values: Vec<f32>,
}

/// A class's share of the memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassShare {
    /// Class label.
    pub label: String,
    /// Exemplars held.
    pub exemplars: usize,
    /// Payload bytes of those exemplars.
    pub bytes: usize,
    /// Most exemplars the class may hold.
    pub quota: usize,
    /// Candidates given by the class's latest offer ([`ReplayMemory::add_class`]).
    pub offered: usize,
}

/// What [`ReplayMemory::add_class`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddReport {
    /// Class label.
    pub label: String,
    /// Whether the class was new (otherwise it was topped up).
    pub new_class: bool,
    /// Candidates of this call now stored as exemplars.
    pub added: usize,
    /// Candidates skipped because the class already stores an exemplar with their id.
    pub skipped: usize,
    /// Exemplars held before the call that were removed to respect quotas and budget.
    pub evicted: usize,
    /// The class's quota after the call.
    pub quota: usize,
    /// [`ReplayMemory::bytes_used`] after the call.
    pub bytes_used: usize,
}

/// One class's exemplars, in selection (priority) order.
#[derive(Debug, Clone)]
struct ClassSlot {
    label: String,
    exemplars: Vec<Exemplar>,
    /// L2-normalised embeddings recorded at selection, parallel to `exemplars`.
    embeddings: Vec<Vec<f32>>,
    /// Sum of the normalised embeddings of every candidate seen for the class.
    mean_sum: Vec<f64>,
    /// Number of candidates summed in `mean_sum`.
    seen: usize,
    /// Number of `add_class` calls for this class, to vary random selection.
    additions: u64,
    /// Candidates given by the latest `add_class` call.
    offered: usize,
    /// Payload bytes of `exemplars`.
    bytes: usize,
}

impl ClassSlot {
    fn truncate(&mut self, keep: usize) {
        if keep < self.exemplars.len() {
            self.bytes -= self.exemplars[keep..]
                .iter()
                .map(|e| e.bytes.len())
                .sum::<usize>();
            self.exemplars.truncate(keep);
            self.embeddings.truncate(keep);
        }
    }
}

/// Exemplars of old classes for replay, within a byte budget (see the module docs for the
/// exact budget rule).
#[derive(Debug, Clone)]
pub struct ReplayMemory {
    config: ReplayConfig,
    codec: ExemplarCodec,
    /// Classes in insertion order.
    classes: Vec<ClassSlot>,
    /// Total exemplar capacity `C` derived at the last rebalance.
    capacity: usize,
}

impl ReplayMemory {
    /// An empty memory; fails on an invalid configuration or input spec.
    pub fn new(config: ReplayConfig, input_spec: InputSpec) -> Result<Self, TrainError> {
        let codec = ExemplarCodec::new(&input_spec, &config)?;
        Ok(ReplayMemory {
            config,
            codec,
            classes: Vec::new(),
            capacity: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ReplayConfig {
        &self.config
    }

    /// The codec exemplars are stored with.
    pub fn codec(&self) -> &ExemplarCodec {
        &self.codec
    }

    /// Registers class `label` with exemplars chosen among `candidates`, or tops it up when it
    /// exists (its exemplars are kept, and herding continues from them). Candidates whose id
    /// the class already stores are skipped.
    ///
    /// Candidates are encoded one at a time in selection order while the class holds fewer
    /// than its quota, the capacity being re-derived from the observed mean size after each
    /// (the first candidate of an empty memory is always encoded, to observe a size). Then
    /// the budget rule of the module docs is applied to all classes. On error the memory is
    /// unchanged.
    pub fn add_class(
        &mut self,
        label: &str,
        candidates: &[Candidate],
    ) -> Result<AddReport, TrainError> {
        if label.is_empty() {
            return Err(TrainError::Config("a replay class needs a label".into()));
        }
        let Some(first) = candidates.first() else {
            return Err(TrainError::Config(format!(
                "class {label:?}: no candidates to choose exemplars from"
            )));
        };
        let existing = self.classes.iter().position(|s| s.label == label);
        let slot = existing.map(|i| &self.classes[i]);
        let dim = slot.map_or(first.embedding.len(), |s| s.mean_sum.len());
        let numel = self.codec.spec.numel();
        let stored: HashSet<&str> = slot
            .map(|s| s.exemplars.iter().map(|e| e.id.as_str()).collect())
            .unwrap_or_default();
        let mut ids = HashSet::new();
        let mut fresh = Vec::new();
        let mut fresh_embeddings = Vec::new();
        let mut skipped = 0;
        for c in candidates {
            if c.values.len() != numel {
                return Err(TrainError::Shape(format!(
                    "candidate {:?} has {} values, the model input needs {numel}",
                    c.id,
                    c.values.len()
                )));
            }
            if c.embedding.len() != dim {
                return Err(TrainError::Shape(format!(
                    "candidate {:?} has a {}-d embedding, class {label:?} uses {dim}-d",
                    c.id,
                    c.embedding.len()
                )));
            }
            if c.values.iter().any(|v| !v.is_finite()) {
                return Err(TrainError::Config(format!(
                    "candidate {:?} has non-finite values",
                    c.id
                )));
            }
            let embedding = normalised(&c.embedding).ok_or_else(|| {
                TrainError::Config(format!(
                    "candidate {:?} has a zero or non-finite embedding",
                    c.id
                ))
            })?;
            if !ids.insert(c.id.as_str()) {
                return Err(TrainError::Config(format!(
                    "candidate id {:?} appears twice",
                    c.id
                )));
            }
            if stored.contains(c.id.as_str()) {
                skipped += 1;
                continue;
            }
            fresh.push(c);
            fresh_embeddings.push(embedding);
        }

        let mut mean_sum = slot.map_or_else(|| vec![0.0; dim], |s| s.mean_sum.clone());
        for e in &fresh_embeddings {
            for (m, x) in mean_sum.iter_mut().zip(e) {
                *m += f64::from(*x);
            }
        }
        let seen = slot.map_or(0, |s| s.seen) + fresh.len();
        let additions = slot.map_or(0, |s| s.additions);
        let held = slot.map_or(0, |s| s.exemplars.len());
        let order: Box<dyn Iterator<Item = usize> + '_> = match self.config.selection {
            Selection::Herding => {
                let target = mean_sum.iter().map(|m| m / seen.max(1) as f64).collect();
                let mut selected_sum = vec![0.0; dim];
                for e in slot.map_or(&[][..], |s| &s.embeddings[..]) {
                    for (s, x) in selected_sum.iter_mut().zip(e) {
                        *s += f64::from(*x);
                    }
                }
                Box::new(Herding {
                    target,
                    selected_sum,
                    selected: held,
                    embeddings: &fresh_embeddings,
                    remaining: (0..fresh.len()).collect(),
                })
            }
            Selection::Random => {
                let mut order: Vec<usize> = (0..fresh.len()).collect();
                let seed = self.config.seed
                    ^ fnv1a(label.as_bytes())
                    ^ additions.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                order.shuffle(&mut StdRng::seed_from_u64(seed));
                Box::new(order.into_iter())
            }
        };

        let classes = self.classes.len() + usize::from(existing.is_none());
        let index = existing.unwrap_or(classes - 1);
        let before = self.len();
        let (mut count, mut bytes) = (before, self.payload_bytes());
        let mut picked = Vec::new();
        let mut picked_embeddings = Vec::new();
        for i in order {
            if let Some(capacity) = self.capacity_for(count, bytes) {
                if held + picked.len() >= quota(capacity, classes, index) {
                    break;
                }
            }
            let payload = self.codec.encode(&fresh[i].values)?;
            count += 1;
            bytes += payload.len();
            picked.push(Exemplar {
                id: fresh[i].id.clone(),
                label: label.to_string(),
                bytes: payload,
            });
            picked_embeddings.push(fresh_embeddings[i].clone());
        }

        let added_bytes = picked.iter().map(|e| e.bytes.len()).sum::<usize>();
        match existing {
            Some(i) => {
                let slot = &mut self.classes[i];
                slot.exemplars.extend(picked);
                slot.embeddings.extend(picked_embeddings);
                slot.mean_sum = mean_sum;
                slot.seen = seen;
                slot.additions += 1;
                slot.offered = candidates.len();
                slot.bytes += added_bytes;
            }
            None => self.classes.push(ClassSlot {
                label: label.to_string(),
                exemplars: picked,
                embeddings: picked_embeddings,
                mean_sum,
                seen,
                additions: 1,
                offered: candidates.len(),
                bytes: added_bytes,
            }),
        }
        let capacity = self
            .capacity_for(self.len(), self.payload_bytes())
            .unwrap_or(self.capacity);
        self.rebalance(capacity);
        let after = self.classes[index].exemplars.len();
        let added = after.saturating_sub(held);
        Ok(AddReport {
            label: label.to_string(),
            new_class: existing.is_none(),
            added,
            skipped,
            evicted: before + added - self.len(),
            quota: quota(self.capacity, self.classes.len(), index),
            bytes_used: self.bytes_used(),
        })
    }

    /// Drops every exemplar whose example no longer exists with its label (`exists(id,
    /// label)` is false: the item was deleted or relabelled), and classes left without one;
    /// returns how many were dropped. Only bytes are freed: the other exemplars keep their
    /// order, and the room is filled when classes are topped up.
    pub fn retain_existing(&mut self, exists: impl Fn(&str, &str) -> bool) -> usize {
        let before = self.len();
        for slot in &mut self.classes {
            let keep: Vec<bool> = slot
                .exemplars
                .iter()
                .map(|e| exists(&e.id, &e.label))
                .collect();
            if keep.iter().all(|&k| k) {
                continue;
            }
            let mut kept = keep.iter();
            slot.exemplars.retain(|_| kept.next() == Some(&true));
            let mut kept = keep.iter();
            slot.embeddings.retain(|_| kept.next() == Some(&true));
            slot.bytes = slot.exemplars.iter().map(|e| e.bytes.len()).sum();
        }
        self.classes.retain(|slot| !slot.exemplars.is_empty());
        before - self.len()
    }

    #[cfg(test)]
    /// Removes a class and its exemplars; returns whether it existed. The capacity is kept,
    /// so the remaining classes' quotas grow (they are filled when topped up).
    pub fn remove_class(&mut self, label: &str) -> bool {
        let before = self.classes.len();
        self.classes.retain(|s| s.label != label);
        self.classes.len() != before
    }

    /// Per-class counts, bytes and quotas, in insertion order.
    pub fn classes(&self) -> Vec<ClassShare> {
        let k = self.classes.len();
        self.classes
            .iter()
            .enumerate()
            .map(|(i, s)| ClassShare {
                label: s.label.clone(),
                exemplars: s.exemplars.len(),
                bytes: s.bytes,
                quota: quota(self.capacity, k, i),
                offered: s.offered,
            })
            .collect()
    }

    /// Bytes stored: all exemplar payloads, plus the codec's shared header and trailer once
    /// when at least one exemplar is stored. Never above `budget_bytes`.
    pub fn bytes_used(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            self.payload_bytes() + self.codec.shared_bytes()
        }
    }

    /// Number of exemplars stored.
    pub fn len(&self) -> usize {
        self.classes.iter().map(|s| s.exemplars.len()).sum()
    }

    /// Whether no exemplar is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The exemplars of a class in selection (priority) order; empty for an unknown label.
    pub fn exemplars(&self, label: &str) -> &[Exemplar] {
        self.classes
            .iter()
            .find(|s| s.label == label)
            .map_or(&[], |s| &s.exemplars[..])
    }

    /// `n` decoded exemplars, class-balanced: round-robin over the classes that hold
    /// exemplars, starting at a random class, with a uniformly random exemplar (with
    /// replacement) within each class. Empty when the memory is empty.
    pub fn sample_balanced(
        &self,
        n: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<ReplayDraw>, TrainError> {
        let filled: Vec<&ClassSlot> = self
            .classes
            .iter()
            .filter(|s| !s.exemplars.is_empty())
            .collect();
        if filled.is_empty() {
            return Ok(Vec::new());
        }
        let start = rng.gen_range(0..filled.len());
        (0..n)
            .map(|j| {
                let slot = filled[(start + j) % filled.len()];
                let exemplar = &slot.exemplars[rng.gen_range(0..slot.exemplars.len())];
                Ok(ReplayDraw {
                    label: slot.label.clone(),
                    id: exemplar.id.clone(),
                    values: self.codec.decode(&exemplar.bytes)?,
                })
            })
            .collect()
    }

    /// Writes the memory to `path` atomically: a temporary file beside it is written,
    /// fsynced and renamed over `path`, and the directory is fsynced.
    ///
    /// The format is JSON (`"format": "crossbatch-replay"`, `"version": 1`) with payloads
    /// and embeddings in base64 (embeddings as little-endian f32, class sums as f64).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let saved = SavedMemory {
            format: FORMAT.into(),
            version: VERSION,
            codec: self.codec.params(),
            capacity: self.capacity,
            classes: self
                .classes
                .iter()
                .map(|s| SavedClass {
                    label: s.label.clone(),
                    seen: s.seen,
                    additions: s.additions,
                    offered: s.offered,
                    mean_sum: b64.encode(
                        s.mean_sum
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect::<Vec<u8>>(),
                    ),
                    exemplars: s
                        .exemplars
                        .iter()
                        .zip(&s.embeddings)
                        .map(|(e, emb)| SavedExemplar {
                            id: e.id.clone(),
                            bytes: b64.encode(&e.bytes),
                            embedding: b64.encode(
                                emb.iter()
                                    .flat_map(|x| x.to_le_bytes())
                                    .collect::<Vec<u8>>(),
                            ),
                        })
                        .collect(),
                })
                .collect(),
        };
        let text = serde_json::to_vec(&saved)
            .map_err(|e| TrainError::Config(format!("serialising the replay memory: {e}")))?;
        write_atomically(path, &text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }

    /// Reads a memory written by [`ReplayMemory::save`]. The codec settings of `config` and
    /// `input_spec` must decode the stored payloads the same way (same fidelity, stored size,
    /// channels, quality and shared header); budget, selection and seed may differ. When the
    /// stored bytes exceed the new budget, the capacity is re-derived from it and the budget
    /// rule applied, so only tail exemplars are dropped.
    pub fn load(
        path: &Path,
        config: ReplayConfig,
        input_spec: InputSpec,
    ) -> Result<Self, TrainError> {
        let invalid =
            |message: String| TrainError::Config(format!("{}: {message}", path.display()));
        let text = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
        let saved: SavedMemory =
            serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        if saved.format != FORMAT || saved.version != VERSION {
            return Err(invalid(format!(
                "not a replay memory of version {VERSION} (format {:?}, version {})",
                saved.format, saved.version
            )));
        }
        let mut memory = ReplayMemory::new(config, input_spec)?;
        if saved.codec != memory.codec.params() {
            return Err(invalid(
                "the exemplars were stored with other codec settings (fidelity, size, channels or quality)"
                    .into(),
            ));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let bytes = |s: &str| {
            b64.decode(s)
                .map_err(|e| invalid(format!("bad base64: {e}")))
        };
        let floats = |s: &str, width: usize| {
            let raw = bytes(s)?;
            if raw.len() % width != 0 {
                return Err(invalid(format!(
                    "{} bytes are not a whole number of {width}-byte floats",
                    raw.len()
                )));
            }
            Ok(raw)
        };
        for class in saved.classes {
            if memory.classes.iter().any(|s| s.label == class.label) {
                return Err(invalid(format!("class {:?} appears twice", class.label)));
            }
            let mean_sum: Vec<f64> = floats(&class.mean_sum, 8)?
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect();
            let mut slot = ClassSlot {
                label: class.label,
                exemplars: Vec::new(),
                embeddings: Vec::new(),
                mean_sum,
                seen: class.seen,
                additions: class.additions,
                offered: class.offered,
                bytes: 0,
            };
            for e in class.exemplars {
                let embedding: Vec<f32> = floats(&e.embedding, 4)?
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if embedding.len() != slot.mean_sum.len() {
                    return Err(invalid(format!(
                        "class {:?}: exemplar {:?} has a {}-d embedding, the class {}-d",
                        slot.label,
                        e.id,
                        embedding.len(),
                        slot.mean_sum.len()
                    )));
                }
                if slot.exemplars.iter().any(|x| x.id == e.id) {
                    return Err(invalid(format!(
                        "class {:?}: exemplar {:?} appears twice",
                        slot.label, e.id
                    )));
                }
                let payload = bytes(&e.bytes)?;
                slot.bytes += payload.len();
                slot.exemplars.push(Exemplar {
                    id: e.id,
                    label: slot.label.clone(),
                    bytes: payload,
                });
                slot.embeddings.push(embedding);
            }
            memory.classes.push(slot);
        }
        let capacity = if memory.bytes_used() <= memory.config.budget_bytes {
            saved.capacity
        } else {
            memory
                .capacity_for(memory.len(), memory.payload_bytes())
                .map_or(0, |c| c.min(saved.capacity))
        };
        memory.rebalance(capacity);
        Ok(memory)
    }

    /// Sum of all exemplar payload sizes.
    fn payload_bytes(&self) -> usize {
        self.classes.iter().map(|s| s.bytes).sum()
    }

    /// `floor((budget - shared) / mean)` with `mean = bytes / count`; `None` when nothing
    /// is stored yet (no observed size).
    fn capacity_for(&self, count: usize, bytes: usize) -> Option<usize> {
        if count == 0 {
            return None;
        }
        let available = self
            .config
            .budget_bytes
            .saturating_sub(self.codec.shared_bytes()) as u128;
        let capacity = available * count as u128 / bytes.max(1) as u128;
        Some(usize::try_from(capacity).unwrap_or(usize::MAX))
    }

    /// Applies the budget rule with total capacity `capacity`: truncate each class to its
    /// quota, then trim the largest class's tail until within the budget.
    fn rebalance(&mut self, capacity: usize) {
        self.capacity = capacity;
        let k = self.classes.len();
        for (i, slot) in self.classes.iter_mut().enumerate() {
            slot.truncate(quota(capacity, k, i));
        }
        while self.bytes_used() > self.config.budget_bytes {
            let largest = self
                .classes
                .iter_mut()
                .enumerate()
                .filter(|(_, s)| !s.exemplars.is_empty())
                .max_by_key(|(i, s)| (s.exemplars.len(), s.bytes, *i));
            match largest {
                Some((_, slot)) => slot.truncate(slot.exemplars.len() - 1),
                None => break,
            }
        }
    }
}

/// Quota of class `index` among `classes` classes sharing `capacity` exemplars.
fn quota(capacity: usize, classes: usize, index: usize) -> usize {
    capacity
        .checked_div(classes)
        .map_or(0, |base| base + usize::from(index < capacity % classes))
}

/// iCaRL herding over normalised embeddings, continuing from an already selected set.
struct Herding<'a> {
    /// Class mean of normalised embeddings.
    target: Vec<f64>,
    /// Sum of the embeddings selected so far.
    selected_sum: Vec<f64>,
    /// Number of embeddings selected so far.
    selected: usize,
    /// The candidates' normalised embeddings.
    embeddings: &'a [Vec<f32>],
    /// Candidates not selected yet, in ascending order.
    remaining: Vec<usize>,
}

impl Iterator for Herding<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let k = (self.selected + 1) as f64;
        let mut best: Option<(f64, usize)> = None;
        for (pos, &i) in self.remaining.iter().enumerate() {
            let distance: f64 = self
                .target
                .iter()
                .zip(&self.selected_sum)
                .zip(&self.embeddings[i])
                .map(|((m, s), x)| {
                    let d = m - (s + f64::from(*x)) / k;
                    d * d
                })
                .sum();
            if best.is_none_or(|(b, _)| distance < b) {
                best = Some((distance, pos));
            }
        }
        let (_, pos) = best?;
        let i = self.remaining.remove(pos);
        for (s, x) in self.selected_sum.iter_mut().zip(&self.embeddings[i]) {
            *s += f64::from(*x);
        }
        self.selected += 1;
        Some(i)
    }
}

/// A normalised value back to an 8-bit pixel: `round((v * std + mean) * 255)`, clamped.
fn to_pixel(value: f32, mean: f32, std: f32) -> u8 {
    ((value * std + mean) * 255.0).round().clamp(0.0, 255.0) as u8
}

fn to_u32(side: usize) -> Result<u32, TrainError> {
    u32::try_from(side).map_err(|_| TrainError::Shape(format!("image side {side} is too large")))
}

/// FNV-1a, a hash that is stable across builds (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn check_spec(spec: &InputSpec) -> Result<(), TrainError> {
    if spec.channels != 1 && spec.channels != 3 {
        return Err(TrainError::Config(format!(
            "replay exemplars need 1 or 3 input channels, got {}",
            spec.channels
        )));
    }
    if spec.height == 0 || spec.width == 0 {
        return Err(TrainError::Config(
            "input height and width must be positive".into(),
        ));
    }
    if spec.mean.len() != spec.channels || spec.std.len() != spec.channels {
        return Err(TrainError::Config(
            "input mean and std need one value per channel".into(),
        ));
    }
    if spec.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        || spec.mean.iter().any(|m| !m.is_finite())
    {
        return Err(TrainError::Config(
            "input std must be positive and mean finite".into(),
        ));
    }
    Ok(())
}

/// Length of the JPEG header (through the start-of-scan segment) and of the trailer (`EOI`).
fn split_jpeg(bytes: &[u8]) -> Result<(usize, usize), TrainError> {
    let bad = || TrainError::Config("the JPEG encoder wrote an unexpected stream".into());
    if !bytes.starts_with(&[0xFF, 0xD8]) || !bytes.ends_with(&[0xFF, 0xD9]) {
        return Err(bad());
    }
    let mut pos = 2;
    loop {
        let segment = bytes.get(pos..pos + 4).ok_or_else(bad)?;
        if segment[0] != 0xFF {
            return Err(bad());
        }
        pos += 2 + usize::from(u16::from_be_bytes([segment[2], segment[3]]));
        if segment[1] == 0xDA {
            break;
        }
    }
    if pos + 2 > bytes.len() {
        return Err(bad());
    }
    Ok((pos, 2))
}

/// Length of the PNG header (signature and chunks before the first `IDAT`) and of the
/// trailer (the `IEND` chunk).
fn split_png(bytes: &[u8]) -> Result<(usize, usize), TrainError> {
    let bad = || TrainError::Config("the PNG encoder wrote an unexpected stream".into());
    const IEND: usize = 12;
    if bytes.len() < 8 + IEND || &bytes[bytes.len() - 8..bytes.len() - 4] != b"IEND" {
        return Err(bad());
    }
    let mut pos = 8;
    loop {
        let chunk = bytes.get(pos..pos + 8).ok_or_else(bad)?;
        if &chunk[4..8] == b"IDAT" {
            break;
        }
        pos += 12 + u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
    }
    if pos + IEND > bytes.len() {
        return Err(bad());
    }
    Ok((pos, IEND))
}

/// Writes `path` through a fsynced temporary file in the same directory and a rename.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file path"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

const FORMAT: &str = "crossbatch-replay";
const VERSION: u32 = 1;

/// How stored payloads decode; must match between save and load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodecParams {
    fidelity: Fidelity,
    channels: usize,
    width: u32,
    height: u32,
    jpeg_quality: Option<u8>,
    /// Shared container header, base64.
    header: String,
    /// Shared container trailer, base64.
    trailer: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedMemory {
    format: String,
    version: u32,
    codec: CodecParams,
    capacity: usize,
    classes: Vec<SavedClass>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedClass {
    label: String,
    seen: usize,
    additions: u64,
    /// Absent in files written before it was kept (read as 0: the label is offered again).
    #[serde(default)]
    offered: usize,
    /// Little-endian f64 values, base64.
    mean_sum: String,
    exemplars: Vec<SavedExemplar>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedExemplar {
    id: String,
    /// Payload, base64.
    bytes: String,
    /// Little-endian f32 values, base64.
    embedding: String,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const FASHION: &str = "/usr/share/datasets/fashion-mnist";

    use crate::model::spec::gray_test_spec as gray_spec;

    /// A smooth synthetic image (values come from 8-bit pixels).
    fn smooth(seed: u64, spec: &InputSpec) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (fx, fy, phase): (f32, f32, f32) = (
            rng.gen_range(0.1..0.6),
            rng.gen_range(0.1..0.6),
            rng.gen_range(0.0..6.0),
        );
        let mut out = Vec::with_capacity(spec.numel());
        for c in 0..spec.channels {
            for y in 0..spec.height {
                for x in 0..spec.width {
                    let wave = (fx * x as f32 + phase + c as f32).sin() * (fy * y as f32).cos();
                    let pixel = (128.0 + 100.0 * wave).round() / 255.0;
                    out.push((pixel - spec.mean[c]) / spec.std[c]);
                }
            }
        }
        out
    }

    fn candidates(prefix: &str, n: usize, spec: &InputSpec, seed: u64) -> Vec<Candidate> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xABCD);
        (0..n)
            .map(|i| Candidate {
                id: format!("{prefix}-{i}"),
                values: smooth(seed * 1000 + i as u64, spec),
                embedding: (0..8).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            })
            .collect()
    }

    /// Low-fidelity settings (the codec most of these tests exercise) with `budget_bytes`.
    fn config(budget_bytes: usize) -> ReplayConfig {
        ReplayConfig {
            budget_bytes,
            fidelity: Fidelity::Low,
            ..ReplayConfig::default()
        }
    }

    const COUNTS: [usize; 10] = [30, 4, 55, 12, 40, 2, 25, 60, 9, 35];

    #[test]
    fn budget_and_equal_quotas_hold_after_every_addition() {
        let spec = gray_spec(16);
        let budget = 2_500;
        let mut memory = ReplayMemory::new(config(budget), spec.clone()).unwrap();
        let mut first_quota = None;
        for (c, &given) in COUNTS.iter().enumerate() {
            let label = format!("class{c}");
            let report = memory
                .add_class(&label, &candidates(&label, given, &spec, c as u64))
                .unwrap();
            assert!(report.new_class);
            assert!(memory.bytes_used() <= budget, "{}", memory.bytes_used());
            assert_eq!(report.bytes_used, memory.bytes_used());
            let shares = memory.classes();
            assert_eq!(shares.len(), c + 1);
            let quotas: Vec<usize> = shares.iter().map(|s| s.quota).collect();
            let (qmin, qmax) = (quotas.iter().min().unwrap(), quotas.iter().max().unwrap());
            assert!(qmax - qmin <= 1, "quotas {quotas:?}");
            first_quota.get_or_insert(*qmax);
            for (share, given) in shares.iter().zip(COUNTS) {
                assert!(share.exemplars <= share.quota, "{share:?}");
                assert!(share.exemplars <= given, "{share:?}");
            }
            // Classes given at least a quota's worth of candidates are within one.
            let full: Vec<usize> = shares
                .iter()
                .zip(COUNTS)
                .filter(|(_, given)| given >= qmax)
                .map(|(s, _)| s.exemplars)
                .collect();
            if let (Some(lo), Some(hi)) = (full.iter().min(), full.iter().max()) {
                assert!(hi - lo <= 1, "counts {full:?}");
            }
            let payload: usize = shares.iter().map(|s| s.bytes).sum();
            assert_eq!(payload + memory.codec().shared_bytes(), memory.bytes_used());
            assert_eq!(
                memory.len(),
                shares.iter().map(|s| s.exemplars).sum::<usize>()
            );
        }
        // The budget binds and the quotas shrank as classes arrived.
        let total: usize = COUNTS.iter().sum();
        assert!(memory.len() < total);
        let shares = memory.classes();
        let allowed: usize = shares.iter().zip(COUNTS).map(|(s, g)| s.quota.min(g)).sum();
        assert!(memory.len() + shares.len() >= allowed);
        let last = memory.classes().iter().map(|s| s.quota).max().unwrap();
        assert!(last < first_quota.unwrap(), "{last} vs {first_quota:?}");
    }

    #[test]
    fn over_budget_trims_the_tail_of_the_largest_class() {
        let spec = gray_spec(16);
        let mut memory = ReplayMemory::new(config(1_000_000), spec.clone()).unwrap();
        for (c, given) in [(0, 20), (1, 20), (2, 6)] {
            let label = format!("class{c}");
            memory
                .add_class(&label, &candidates(&label, given, &spec, c))
                .unwrap();
        }
        let before: Vec<Vec<Exemplar>> = (0..3)
            .map(|c| memory.exemplars(&format!("class{c}")).to_vec())
            .collect();
        // Quotas do not bind (same capacity); only step 3 of the rule removes exemplars.
        let shared = memory.codec().shared_bytes();
        let budget = shared + (memory.bytes_used() - shared) * 2 / 3;
        memory.config.budget_bytes = budget;
        memory.rebalance(memory.capacity);
        assert!(memory.bytes_used() <= budget);
        let counts: Vec<usize> = memory.classes().iter().map(|s| s.exemplars).collect();
        assert!(counts[0].abs_diff(counts[1]) <= 1, "{counts:?}");
        assert!(counts[0] < 20 && counts[1] < 20, "{counts:?}");
        assert_eq!(
            counts[2], 6,
            "the small class is not the largest: {counts:?}"
        );
        for (c, old) in before.iter().enumerate() {
            let now = memory.exemplars(&format!("class{c}"));
            assert_eq!(now, &old[..now.len()]);
        }
        // Trimming stopped as soon as the budget was met.
        let last = if counts[0] > counts[1] { 1 } else { 0 };
        let restored = &before[last][counts[last]];
        assert!(memory.bytes_used() + restored.bytes.len() > budget);
    }

    #[test]
    fn stored_bytes_never_change_when_classes_are_added() {
        let spec = gray_spec(16);
        let mut memory = ReplayMemory::new(config(2_500), spec.clone()).unwrap();
        let mut snapshot: HashMap<String, Vec<Exemplar>> = HashMap::new();
        let mut shrank = false;
        for (c, &given) in COUNTS.iter().enumerate() {
            let label = format!("class{c}");
            let report = memory
                .add_class(&label, &candidates(&label, given, &spec, c as u64))
                .unwrap();
            for (old_label, old) in &snapshot {
                let now = memory.exemplars(old_label);
                assert!(now.len() <= old.len());
                assert_eq!(now, &old[..now.len()], "class {old_label} changed");
                shrank |= now.len() < old.len();
            }
            assert_eq!(
                report.evicted,
                snapshot.values().map(|v| v.len()).sum::<usize>() + report.added - memory.len()
            );
            for share in memory.classes() {
                snapshot.insert(share.label.clone(), memory.exemplars(&share.label).to_vec());
            }
        }
        assert!(shrank, "the test never evicted anything");
    }

    /// Greedy herding recomputing each candidate set's mean from scratch.
    fn brute_force_herding(all: &[Vec<f32>], initial: &[usize], pool: &[usize]) -> Vec<usize> {
        let unit: Vec<Vec<f64>> = all
            .iter()
            .map(|e| {
                let n = e.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                e.iter().map(|x| f64::from(*x) / n).collect()
            })
            .collect();
        let dim = unit[0].len();
        let mu: Vec<f64> = (0..dim)
            .map(|d| unit.iter().map(|u| u[d]).sum::<f64>() / unit.len() as f64)
            .collect();
        let mut selected = initial.to_vec();
        let mut order = Vec::new();
        while order.len() < pool.len() {
            let mut best = (f64::INFINITY, usize::MAX);
            for &i in pool.iter().filter(|i| !selected.contains(i)) {
                let mut set = selected.clone();
                set.push(i);
                let dist: f64 = (0..dim)
                    .map(|d| {
                        let mean = set.iter().map(|&j| unit[j][d]).sum::<f64>() / set.len() as f64;
                        (mu[d] - mean).powi(2)
                    })
                    .sum();
                if dist < best.0 {
                    best = (dist, i);
                }
            }
            selected.push(best.1);
            order.push(best.1);
        }
        order
    }

    #[test]
    fn herding_matches_brute_force_and_continues_on_top_up() {
        let spec = gray_spec(4);
        let mut rng = StdRng::seed_from_u64(7);
        let all: Vec<Candidate> = (0..12)
            .map(|i| Candidate {
                id: format!("c{i}"),
                values: smooth(i, &spec),
                embedding: (0..3).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
            })
            .collect();
        let embeddings: Vec<Vec<f32>> = all.iter().map(|c| c.embedding.clone()).collect();
        let id_of =
            |order: &[usize]| -> Vec<String> { order.iter().map(|&i| all[i].id.clone()).collect() };
        let ids = |memory: &ReplayMemory| -> Vec<String> {
            memory.exemplars("a").iter().map(|e| e.id.clone()).collect()
        };
        let mut memory = ReplayMemory::new(config(1_000_000), spec).unwrap();
        memory.add_class("a", &all[..6]).unwrap();
        let first: Vec<usize> = (0..6).collect();
        let expected = brute_force_herding(&embeddings[..6], &[], &first);
        assert_eq!(ids(&memory), id_of(&expected));

        // The first pick is the candidate nearest the class mean.
        let unit: Vec<Vec<f32>> = embeddings[..6]
            .iter()
            .map(|e| normalised(e).unwrap())
            .collect();
        let mu: Vec<f32> = (0..3)
            .map(|d| unit.iter().map(|u| u[d]).sum::<f32>() / 6.0)
            .collect();
        let nearest = (0..6)
            .min_by(|&a, &b| {
                let dist = |i: usize| -> f32 {
                    unit[i].iter().zip(&mu).map(|(x, m)| (x - m).powi(2)).sum()
                };
                dist(a).total_cmp(&dist(b))
            })
            .unwrap();
        assert_eq!(memory.exemplars("a")[0].id, all[nearest].id);

        // Topping up continues from the stored six with the mean over all twelve.
        memory.add_class("a", &all[6..]).unwrap();
        let later: Vec<usize> = (6..12).collect();
        let continued = brute_force_herding(&embeddings, &expected, &later);
        let mut both = expected.clone();
        both.extend(continued);
        assert_eq!(ids(&memory), id_of(&both));

        // Random selection is a seeded permutation.
        let random = ReplayConfig {
            selection: Selection::Random,
            ..config(1_000_000)
        };
        let pick = || {
            let mut m = ReplayMemory::new(random.clone(), gray_spec(4)).unwrap();
            m.add_class("a", &all).unwrap();
            ids(&m)
        };
        let (x, y) = (pick(), pick());
        assert_eq!(x, y);
        let mut sorted = x.clone();
        sorted.sort();
        let mut all_ids: Vec<String> = all.iter().map(|c| c.id.clone()).collect();
        all_ids.sort();
        assert_eq!(sorted, all_ids);
    }

    /// Images grouped by class label.
    type Groups = Vec<(String, Vec<Vec<f32>>)>;

    /// Fashion-MNIST test images when installed, else smooth synthetic images, grouped by
    /// class: `(spec, label → normalised values)`.
    fn realistic_images(per_class: usize) -> (InputSpec, Groups) {
        let images = Path::new(FASHION).join("t10k-images-idx3-ubyte.gz");
        let labels = Path::new(FASHION).join("t10k-labels-idx1-ubyte.gz");
        let spec = InputSpec {
            channels: 1,
            height: 28,
            width: 28,
            mean: vec![0.2860],
            std: vec![0.3530],
        };
        let mut groups: Groups = Vec::new();
        if images.exists() && labels.exists() {
            let data = crate::data::load_idx(&images, &labels, Some(20 * per_class)).unwrap();
            for sample in &data.samples {
                let values = image_to_input(&sample.image, &spec);
                match groups.iter_mut().find(|(l, _)| *l == sample.label) {
                    Some((_, v)) if v.len() < per_class => v.push(values),
                    Some(_) => {}
                    None => groups.push((sample.label.clone(), vec![values])),
                }
            }
        } else {
            eprintln!("{FASHION} not found: using synthetic images");
            for c in 0..10u64 {
                let v = (0..per_class as u64)
                    .map(|i| smooth(c * 10_000 + i, &spec))
                    .collect();
                groups.push((c.to_string(), v));
            }
        }
        (spec, groups)
    }

    /// 7×7 average pooling of a 28×28 image: a stand-in embedding.
    fn pooled(values: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; 49];
        for (i, v) in values.iter().enumerate() {
            let (y, x) = (i / 28, i % 28);
            out[(y / 4) * 7 + x / 4] += v / 16.0 + 1e-3;
        }
        out
    }

    #[test]
    fn low_fidelity_stores_several_times_more_than_full() {
        let (spec, groups) = realistic_images(100);
        let budget = 40_000;
        let mut held = Vec::new();
        for fidelity in [Fidelity::Low, Fidelity::Full] {
            let cfg = ReplayConfig {
                fidelity,
                ..config(budget)
            };
            let mut memory = ReplayMemory::new(cfg, spec.clone()).unwrap();
            for (label, images) in &groups {
                let cands: Vec<Candidate> = images
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Candidate {
                        id: format!("{label}-{i}"),
                        values: v.clone(),
                        embedding: pooled(v),
                    })
                    .collect();
                memory.add_class(label, &cands).unwrap();
                assert!(memory.bytes_used() <= budget);
            }
            let payload = memory.bytes_used() - memory.codec().shared_bytes();
            eprintln!(
                "{fidelity:?}: {} exemplars in {} bytes ({} per exemplar, {} shared)",
                memory.len(),
                memory.bytes_used(),
                payload / memory.len().max(1),
                memory.codec().shared_bytes()
            );
            held.push(memory.len());
        }
        let total: usize = groups.iter().map(|(_, v)| v.len()).sum();
        assert!(held[0] < total, "the budget must bind for low fidelity too");
        assert!(
            held[0] >= 3 * held[1],
            "low {} vs full {}",
            held[0],
            held[1]
        );
    }

    #[test]
    fn degrade_keeps_shape_with_bounded_error() {
        let (spec, groups) = realistic_images(1);
        let values = &groups[0].1[0];
        let low = ExemplarCodec::new(&spec, &config(1)).unwrap();
        let out = low.degrade(values).unwrap();
        assert_eq!(out.len(), values.len());
        let err = |a: &[f32], b: &[f32], std: f32| -> f32 {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() * std)
                .sum::<f32>()
                / a.len() as f32
        };
        let mae = err(values, &out, spec.std[0]);
        assert!(
            mae > 0.0 && mae < 0.1,
            "mean absolute error {mae} of [0, 1] pixels"
        );
        // The stripped payload plus the shared header and trailer is the complete JPEG.
        let payload = low.encode(values).unwrap();
        let container = low.encode_container(values).unwrap();
        assert_eq!(payload.len() + low.shared_bytes(), container.len());
        let standalone =
            image::load_from_memory_with_format(&container, ImageFormat::Jpeg).unwrap();
        assert_eq!((standalone.width(), standalone.height()), (14, 14));
        assert_eq!(
            image_to_input(&standalone, &spec),
            low.decode(&payload).unwrap()
        );

        // Full fidelity is exact for inputs that came from 8-bit pixels.
        let full_cfg = ReplayConfig {
            fidelity: Fidelity::Full,
            ..ReplayConfig::default()
        };
        let full = ExemplarCodec::new(&spec, &full_cfg).unwrap();
        let same = full.degrade(values).unwrap();
        assert!(values.iter().zip(&same).all(|(a, b)| (a - b).abs() < 1e-5));

        // RGB with odd, non-square sides (ceil division when downsampling).
        let rgb = InputSpec {
            channels: 3,
            height: 13,
            width: 10,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        };
        let codec = ExemplarCodec::new(&rgb, &config(1)).unwrap();
        assert_eq!((codec.stored_width, codec.stored_height), (5, 7));
        let x = smooth(3, &rgb);
        let y = codec.degrade(&x).unwrap();
        assert_eq!(y.len(), rgb.numel());
        assert!(err(&x, &y, 0.225) < 0.1);

        assert!(matches!(
            low.encode(&values[1..]),
            Err(TrainError::Shape(_))
        ));
        let mut nan = values.clone();
        nan[0] = f32::NAN;
        assert!(matches!(low.encode(&nan), Err(TrainError::Config(_))));
        assert!(full.decode(b"not a scan").is_err());
    }

    fn filled_memory(budget: usize) -> (InputSpec, ReplayMemory) {
        let spec = gray_spec(16);
        let mut memory = ReplayMemory::new(config(budget), spec.clone()).unwrap();
        for (c, &given) in COUNTS[..5].iter().enumerate() {
            let label = format!("class{c}");
            memory
                .add_class(&label, &candidates(&label, given, &spec, c as u64))
                .unwrap();
        }
        (spec, memory)
    }

    #[test]
    fn save_load_round_trips() {
        let (spec, mut memory) = filled_memory(4_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.json");
        memory.save(&path).unwrap();
        memory.save(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["replay.json"], "temporary files left behind");

        let mut loaded = ReplayMemory::load(&path, config(4_000), spec.clone()).unwrap();
        assert_eq!(loaded.classes(), memory.classes());
        assert_eq!(loaded.bytes_used(), memory.bytes_used());
        for share in memory.classes() {
            assert_eq!(
                loaded.exemplars(&share.label),
                memory.exemplars(&share.label)
            );
        }
        // Embeddings and class means were kept: the same top-up gives the same result.
        let more = candidates("class2", 30, &spec, 99);
        let a = memory.add_class("class2", &more).unwrap();
        let b = loaded.add_class("class2", &more).unwrap();
        assert_eq!(a, b);
        assert_eq!(loaded.exemplars("class2"), memory.exemplars("class2"));

        // A smaller budget trims tails only.
        let (_, original) = filled_memory(4_000);
        original.save(&path).unwrap();
        let small = ReplayMemory::load(&path, config(2_000), spec.clone()).unwrap();
        assert!(small.bytes_used() <= 2_000);
        assert!(small.len() < original.len());
        for share in original.classes() {
            let now = small.exemplars(&share.label);
            assert_eq!(now, &original.exemplars(&share.label)[..now.len()]);
        }

        // A file written before `offered` was kept still loads; its labels read as offered
        // nothing, so they are offered again.
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for class in json["classes"].as_array_mut().unwrap() {
            assert!(class["offered"].as_u64().unwrap() > 0);
            class.as_object_mut().unwrap().remove("offered");
        }
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let older = ReplayMemory::load(&path, config(4_000), spec.clone()).unwrap();
        assert!(older.classes().iter().all(|c| c.offered == 0));
        assert_eq!(older.len(), original.len());
        original.save(&path).unwrap();

        // Other codec settings or a broken file are refused.
        let full = ReplayConfig {
            fidelity: Fidelity::Full,
            ..config(4_000)
        };
        assert!(ReplayMemory::load(&path, full, spec.clone()).is_err());
        let quality = ReplayConfig {
            jpeg_quality: 50,
            ..config(4_000)
        };
        assert!(ReplayMemory::load(&path, quality, spec.clone()).is_err());
        std::fs::write(&path, b"{\"format\": \"x\"}").unwrap();
        assert!(ReplayMemory::load(&path, config(4_000), spec).is_err());
    }

    #[test]
    fn topping_up_keeps_old_exemplars() {
        let spec = gray_spec(16);
        let mut memory = ReplayMemory::new(config(1_000_000), spec.clone()).unwrap();
        let cands = candidates("shoe", 13, &spec, 5);
        memory.add_class("shoe", &cands[..5]).unwrap();
        let before = memory.exemplars("shoe").to_vec();
        assert_eq!(before.len(), 5);
        let report = memory.add_class("shoe", &cands[3..]).unwrap();
        assert!(!report.new_class);
        assert_eq!((report.added, report.skipped, report.evicted), (8, 2, 0));
        assert_eq!(&memory.exemplars("shoe")[..5], &before[..]);
        assert_eq!(memory.exemplars("shoe").len(), 13);

        // A rejected top-up leaves the memory unchanged.
        let mut wrong = candidates("shoe-x", 2, &spec, 6);
        wrong[1].embedding.push(0.0);
        assert!(matches!(
            memory.add_class("shoe", &wrong),
            Err(TrainError::Shape(_))
        ));
        assert_eq!(memory.exemplars("shoe").len(), 13);
        assert_eq!(memory.classes().len(), 1);
    }

    #[test]
    fn bad_config_and_candidates_are_rejected() {
        let spec = gray_spec(8);
        let bad = [
            config(0),
            ReplayConfig {
                downsample: 0,
                ..config(1000)
            },
            ReplayConfig {
                jpeg_quality: 0,
                ..config(1000)
            },
            ReplayConfig {
                jpeg_quality: 101,
                ..config(1000)
            },
        ];
        for cfg in bad {
            assert!(
                matches!(cfg.validate(), Err(TrainError::Config(_))),
                "{cfg:?}"
            );
            assert!(ReplayMemory::new(cfg, spec.clone()).is_err());
        }
        let parse = serde_json::from_str::<ReplayConfig>;
        assert_eq!(parse("{}").unwrap(), ReplayConfig::default());
        let cfg = parse(r#"{"fidelity": "full", "selection": "random", "seed": 3}"#).unwrap();
        assert_eq!(
            (cfg.fidelity, cfg.selection, cfg.seed),
            (Fidelity::Full, Selection::Random, 3)
        );
        assert!(parse(r#"{"budget": 5}"#).is_err());
        assert!(parse(r#"{"fidelity": "medium"}"#).is_err());
        let mut two = spec.clone();
        two.channels = 2;
        assert!(ReplayMemory::new(ReplayConfig::default(), two).is_err());

        let mut memory = ReplayMemory::new(ReplayConfig::default(), spec.clone()).unwrap();
        assert!(memory.add_class("a", &[]).is_err());
        let mut c = candidates("a", 2, &spec, 1);
        c[0].values.pop();
        assert!(matches!(
            memory.add_class("a", &c),
            Err(TrainError::Shape(_))
        ));
        let mut c = candidates("a", 2, &spec, 1);
        c[1].embedding = vec![0.0; 8];
        assert!(matches!(
            memory.add_class("a", &c),
            Err(TrainError::Config(_))
        ));
        let mut c = candidates("a", 2, &spec, 1);
        c[1].id = c[0].id.clone();
        assert!(matches!(
            memory.add_class("a", &c),
            Err(TrainError::Config(_))
        ));
        assert!(memory.is_empty() && memory.classes().is_empty());
    }

    #[test]
    fn balanced_sampling_and_removal() {
        let spec = gray_spec(8);
        let mut memory = ReplayMemory::new(config(1_000_000), spec.clone()).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(memory.sample_balanced(5, &mut rng).unwrap().is_empty());
        for (label, n) in [("a", 2), ("b", 9), ("c", 4)] {
            memory
                .add_class(label, &candidates(label, n, &spec, n as u64))
                .unwrap();
        }
        let count =
            |batch: &[ReplayDraw], label: &str| batch.iter().filter(|d| d.label == label).count();
        let batch = memory.sample_balanced(30, &mut rng).unwrap();
        assert_eq!(batch.len(), 30);
        assert!(batch.iter().all(|d| d.values.len() == spec.numel()));
        // Each draw names the exemplar it decodes.
        for draw in &batch {
            let exemplar = memory
                .exemplars(&draw.label)
                .iter()
                .find(|e| e.id == draw.id);
            let decoded = memory.codec().decode(&exemplar.unwrap().bytes).unwrap();
            assert_eq!(decoded, draw.values);
        }
        assert_eq!(
            [count(&batch, "a"), count(&batch, "b"), count(&batch, "c")],
            [10; 3]
        );
        assert!(memory.remove_class("b"));
        assert!(!memory.remove_class("b"));
        assert!(memory.exemplars("b").is_empty());
        let batch = memory.sample_balanced(7, &mut rng).unwrap();
        let (a, c) = (count(&batch, "a"), count(&batch, "c"));
        assert_eq!(a + c, 7);
        assert!(a.abs_diff(c) == 1);
    }

    #[test]
    fn exemplars_of_deleted_or_relabelled_examples_are_dropped() {
        let spec = gray_spec(8);
        let mut memory = ReplayMemory::new(config(1_000_000), spec.clone()).unwrap();
        for (label, n) in [("a", 2), ("b", 9), ("c", 4)] {
            memory
                .add_class(label, &candidates(label, n, &spec, n as u64))
                .unwrap();
        }
        let b_before: Vec<Exemplar> = memory.exemplars("b").to_vec();
        let c_before: Vec<Exemplar> = memory.exemplars("c").to_vec();
        assert!(b_before.len() > 3);
        // Every "a" example deleted; "b-…" ids but the first two exemplars' deleted; "c-0"
        // relabelled to "x".
        let kept_b: Vec<&str> = b_before[..2].iter().map(|e| e.id.as_str()).collect();
        let exists = |id: &str, label: &str| match label {
            "a" => false,
            "b" => kept_b.contains(&id),
            _ => id != "c-0",
        };
        let dropped = memory.retain_existing(exists);
        let c_after: Vec<Exemplar> = c_before.iter().filter(|e| e.id != "c-0").cloned().collect();
        assert_eq!(
            dropped,
            2 + (b_before.len() - 2) + (c_before.len() - c_after.len())
        );
        assert!(memory.exemplars("a").is_empty());
        assert_eq!(memory.exemplars("b"), &b_before[..2], "order kept");
        assert_eq!(memory.exemplars("c"), &c_after[..]);
        let labels: Vec<String> = memory.classes().into_iter().map(|s| s.label).collect();
        assert_eq!(labels, ["b", "c"], "a class left without exemplars is gone");
        // Bytes recomputed from what is left (brute force over the exemplars).
        let payload: usize = [&b_before[..2], &c_after[..]]
            .concat()
            .iter()
            .map(|e| e.bytes.len())
            .sum();
        assert_eq!(memory.bytes_used(), payload + memory.codec().shared_bytes());
        for share in memory.classes() {
            let bytes: usize = memory
                .exemplars(&share.label)
                .iter()
                .map(|e| e.bytes.len())
                .sum();
            assert_eq!(share.bytes, bytes, "{}", share.label);
        }
        assert_eq!(memory.retain_existing(|_, _| true), 0);
    }
}
