//! The online trainer's view of the store: the labelled examples it samples from, their
//! decoded inputs (cached by id and sequence number) and a P×K sampler over them.
use std::collections::{HashMap, HashSet};

use tch::Tensor;

use super::incremental::{ClassExamples, FlatBatch};
use super::offline::Trainer;
use super::sampler::PkSampler;
use super::TrainError;
use crate::config::TrainerConfig;
use crate::embed::preprocess::values_from_raw;
use crate::model::spec::InputSpec;
use crate::store::{LabelledExample, Store};

/// A fixed set of labelled inputs embedded by each published generation to measure drift.
pub struct Probe {
    /// The inputs `[N, C, H, W]`.
    pub inputs: Tensor,
    /// Their embeddings by the last published generation.
    pub last: Tensor,
}

/// The labelled examples the trainer samples from, with decoded inputs cached by id.
#[derive(Default)]
pub struct ExamplePool {
    /// `(id, label, seq)` of the current examples.
    pub examples: Vec<(String, String, u64)>,
    /// Stable numeric class per label (new labels get new numbers; never reused).
    pub class_of: HashMap<String, i64>,
    /// Stable numeric id per item id, for masking self-pairs in the memory.
    pub numeric_id: HashMap<String, i64>,
    /// Decoded inputs by id, with the seq they were read at.
    pub cache: HashMap<String, (u64, Vec<f32>)>,
    /// P×K sampler over the trainable labels; `None` while fewer than two labels qualify.
    pub sampler: Option<PkSampler>,
    /// Labels with at least two examples (the ones a P×K batch can use).
    pub trainable_labels: usize,
}

impl ExamplePool {
    /// Takes the store's labelled `examples` and rebuilds the sampler over labels with ≥ 2
    /// examples.
    pub fn refresh(&mut self, examples: &[LabelledExample], config: &TrainerConfig, seed: u64) {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for e in examples {
            *count.entry(e.label.as_str()).or_default() += 1;
        }
        let eligible: Vec<_> = examples
            .iter()
            .filter(|e| count[e.label.as_str()] >= 2)
            .map(|e| (e.id.clone(), e.label.clone(), e.seq))
            .collect();
        let current: HashSet<&str> = eligible.iter().map(|e| e.0.as_str()).collect();
        self.cache.retain(|id, _| current.contains(id.as_str()));
        for (id, label, _) in &eligible {
            let next = self.class_of.len() as i64;
            self.class_of.entry(label.clone()).or_insert(next);
            let next = self.numeric_id.len() as i64;
            self.numeric_id.entry(id.clone()).or_insert(next);
        }
        self.trainable_labels = count.values().filter(|c| **c >= 2).count();
        let classes: Vec<usize> = eligible
            .iter()
            .map(|e| self.class_of[&e.1] as usize)
            .collect();
        self.examples = eligible;
        let p = config.classes_per_batch.min(self.trainable_labels);
        self.sampler = if self.trainable_labels >= 2 {
            PkSampler::new(&classes, p, config.per_class.max(1), seed).ok()
        } else {
            None
        };
    }

    /// Appends the examples at `indices` (inputs, labels, numeric ids) to `out`; examples
    /// deleted since the last refresh are left out.
    pub fn push_batch(
        &mut self,
        store: &Store,
        indices: &[usize],
        input: &InputSpec,
        out: &mut FlatBatch,
    ) -> Result<(), TrainError> {
        let wanted: Vec<&(String, String, u64)> = indices
            .iter()
            .filter_map(|&i| self.examples.get(i))
            .collect();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(id, _, seq)| self.cache.get(id).is_none_or(|(cached, _)| cached != seq))
            .map(|(id, _, _)| id.clone())
            .collect();
        if !missing.is_empty() {
            let rows = store.inputs_of(&missing)?;
            for row in rows {
                // An input this model cannot take (stored for another model's input) is
                // cached as empty and never trained on, until the item changes.
                let values =
                    values_from_raw(&row.input, &row.input_kind, input).unwrap_or_else(|e| {
                        tracing::warn!(id = %row.id, "not trained on: {e}");
                        Vec::new()
                    });
                self.cache.insert(row.id, (row.seq, values));
            }
        }
        for (id, label, _) in wanted {
            if let Some(v) = self.usable(id) {
                out.push(v, label, self.numeric_id[id]);
            }
        }
        Ok(())
    }

    /// The cached input of example `id`, unless it is missing or unusable.
    fn usable(&self, id: &str) -> Option<&[f32]> {
        self.cache
            .get(id)
            .map(|(_, v)| v.as_slice())
            .filter(|v| !v.is_empty())
    }

    /// Up to `limit` examples of `label`, preprocessed.
    pub fn class_examples(
        &mut self,
        store: &Store,
        label: &str,
        limit: usize,
        input: &InputSpec,
    ) -> Result<ClassExamples, TrainError> {
        let indices: Vec<usize> = (0..self.examples.len())
            .filter(|&i| self.examples[i].1 == label)
            .take(limit)
            .collect();
        let mut batch = FlatBatch::default();
        self.push_batch(store, &indices, input, &mut batch)?;
        let ids = indices
            .iter()
            .filter(|&&i| self.usable(&self.examples[i].0).is_some())
            .map(|&i| self.examples[i].0.clone())
            .collect();
        Ok(ClassExamples {
            label: label.to_owned(),
            ids,
            values: batch
                .values
                .chunks_exact(input.numel().max(1))
                .map(<[f32]>::to_vec)
                .collect(),
        })
    }

    /// The drift probe: the first `size` examples, embedded by the current weights.
    pub fn probe(
        &mut self,
        store: &Store,
        trainer: &Trainer,
        size: usize,
    ) -> Result<Option<Probe>, TrainError> {
        let count = size.min(self.examples.len());
        if count == 0 {
            return Ok(None);
        }
        let input = trainer.spec().input.clone();
        let indices: Vec<usize> = (0..count).collect();
        let mut batch = FlatBatch::default();
        self.push_batch(store, &indices, &input, &mut batch)?;
        if batch.is_empty() {
            return Ok(None);
        }
        let [c, h, w] = input.shape().map(|d| d as i64);
        let inputs = Tensor::f_from_slice(&batch.values)?.f_view([batch.len() as i64, c, h, w])?;
        let last = trainer.embed_eval(&inputs)?;
        Ok(Some(Probe { inputs, last }))
    }
}
