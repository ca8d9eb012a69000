//! P×K class-balanced batch sampling.
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::TrainError;

/// Draws batches of `p` distinct classes × `k` examples each, deterministically from a seed.
///
/// Examples of a class are drawn without replacement from a shuffled queue that is refilled
/// (reshuffled) when exhausted, so every example is seen once per pass over its class. A class
/// with fewer than `k` examples contributes repeats within a batch.
#[derive(Debug, Clone)]
pub struct PkSampler {
    by_class: Vec<Vec<usize>>,
    queues: Vec<Vec<usize>>,
    p: usize,
    k: usize,
    rng: StdRng,
}

impl PkSampler {
    /// Builds a sampler over `classes[i]` = class index of example `i`.
    pub fn new(classes: &[usize], p: usize, k: usize, seed: u64) -> Result<Self, TrainError> {
        if p == 0 || k == 0 {
            return Err(TrainError::Config(format!(
                "P×K batches need P, K ≥ 1, got {p}×{k}"
            )));
        }
        let n_classes = classes.iter().max().map_or(0, |m| m + 1);
        let mut by_class = vec![Vec::new(); n_classes];
        for (i, &c) in classes.iter().enumerate() {
            by_class[c].push(i);
        }
        by_class.retain(|v| !v.is_empty());
        if by_class.len() < p {
            return Err(TrainError::Config(format!(
                "P×K batches need at least P = {p} classes, the data has {}",
                by_class.len()
            )));
        }
        let queues = vec![Vec::new(); by_class.len()];
        Ok(PkSampler {
            by_class,
            queues,
            p,
            k,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Batch size P × K.
    pub fn batch_size(&self) -> usize {
        self.p * self.k
    }

    /// Example indices of the next batch, grouped by class (K consecutive per class).
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut class_ids: Vec<usize> = (0..self.by_class.len()).collect();
        class_ids.shuffle(&mut self.rng);
        let mut batch = Vec::with_capacity(self.p * self.k);
        for &c in &class_ids[..self.p] {
            if self.queues[c].len() < self.k {
                // Refill below the leftovers (popped first), leaving them out of the new pass
                // so that a class with ≥ K examples never repeats one within a batch.
                let leftover = std::mem::take(&mut self.queues[c]);
                let mut refill: Vec<usize> = self.by_class[c]
                    .iter()
                    .copied()
                    .filter(|i| !leftover.contains(i))
                    .collect();
                refill.shuffle(&mut self.rng);
                refill.extend(leftover);
                self.queues[c] = refill;
            }
            for _ in 0..self.k {
                if self.queues[c].is_empty() {
                    // Fewer than K examples in the class: repeat them.
                    let mut refill = self.by_class[c].clone();
                    refill.shuffle(&mut self.rng);
                    self.queues[c] = refill;
                }
                if let Some(i) = self.queues[c].pop() {
                    batch.push(i);
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn batches_are_p_by_k_and_deterministic() {
        // 5 classes of uneven size; class 4 has only 2 examples.
        let mut classes = Vec::new();
        for (c, count) in [(0, 30), (1, 20), (2, 25), (3, 10), (4, 2)] {
            classes.extend(std::iter::repeat_n(c, count));
        }
        let mut a = PkSampler::new(&classes, 3, 4, 42).unwrap();
        let mut b = PkSampler::new(&classes, 3, 4, 42).unwrap();
        let mut c = PkSampler::new(&classes, 3, 4, 43).unwrap();
        let mut differs = false;
        let mut seen = HashMap::new();
        for _ in 0..200 {
            let batch = a.next_batch();
            assert_eq!(batch, b.next_batch());
            differs |= batch != c.next_batch();
            assert_eq!(batch.len(), 12);
            let mut labels = Vec::new();
            for chunk in batch.chunks(4) {
                let l: HashSet<usize> = chunk.iter().map(|&i| classes[i]).collect();
                assert_eq!(l.len(), 1, "K consecutive examples share a class");
                let label = classes[chunk[0]];
                labels.push(label);
                if label != 4 {
                    let distinct: HashSet<_> = chunk.iter().collect();
                    assert_eq!(
                        distinct.len(),
                        4,
                        "no repeats when the class has ≥ K examples"
                    );
                }
            }
            let distinct: HashSet<_> = labels.iter().collect();
            assert_eq!(distinct.len(), 3, "P distinct classes");
            for i in batch {
                *seen.entry(i).or_insert(0) += 1;
            }
        }
        assert!(differs, "another seed gives other batches");
        assert_eq!(
            seen.len(),
            classes.len(),
            "every example is drawn eventually"
        );
    }

    #[test]
    fn too_few_classes_is_an_error() {
        assert!(PkSampler::new(&[0, 0, 1, 1], 3, 2, 0).is_err());
        assert!(PkSampler::new(&[0, 1], 2, 0, 0).is_err());
        assert!(PkSampler::new(&[], 1, 1, 0).is_err());
    }
}
