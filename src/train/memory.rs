//! XBM cross-batch memory (Wang et al., CVPR 2020): a ring buffer of past embeddings.
//!
//! After a short warm-up, embeddings drift slowly, so embeddings computed a few hundred steps
//! ago stand in for the current model's and give a small batch many more (hard) negatives.
//! The memory holds detached, L2-normalised fp32 embeddings with their labels, example ids
//! and the step that wrote them. Traps of the reference code avoided here: fullness is an
//! explicit counter (never "last label is non-zero"), wrap-around overwrites the oldest rows
//! (a true ring), and callers take a [`CrossBatchMemory::snapshot`] before enqueueing the
//! current batch so it never pairs with itself.
use tch::{Device, Kind, Tensor};

use super::TrainError;

/// The rows of the memory usable at one step.
pub struct MemorySnapshot {
    /// `[M, D]` embeddings (no gradient).
    pub embeddings: Tensor,
    /// `[M]` labels (i64).
    pub labels: Tensor,
    /// `[M]` example ids (i64), for masking self-pairs.
    pub ids: Tensor,
}

/// Ring buffer of the last `capacity` embeddings.
pub struct CrossBatchMemory {
    embeddings: Tensor,
    labels: Tensor,
    ids: Tensor,
    steps: Tensor,
    capacity: usize,
    /// Next row to write.
    head: usize,
    /// Rows written so far, at most `capacity`.
    filled: usize,
}

impl CrossBatchMemory {
    /// An empty memory of `capacity` rows of dimension `dim` on `device`.
    pub fn new(capacity: usize, dim: usize, device: Device) -> CrossBatchMemory {
        let rows = capacity as i64;
        CrossBatchMemory {
            embeddings: Tensor::zeros([rows, dim as i64], (Kind::Float, device)),
            labels: Tensor::zeros([rows], (Kind::Int64, device)),
            ids: Tensor::zeros([rows], (Kind::Int64, device)),
            steps: Tensor::zeros([rows], (Kind::Int64, device)),
            capacity,
            head: 0,
            filled: 0,
        }
    }

    /// Rows the memory can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows written so far (the fill counter), at most the capacity.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether nothing has been enqueued yet.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Writes a batch (detached, converted to fp32) over the oldest rows. A batch larger than
    /// the capacity keeps only its last `capacity` rows.
    pub fn enqueue(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ids: &Tensor,
        step: u64,
    ) -> Result<(), TrainError> {
        let n = embeddings.size().first().copied().unwrap_or(0) as usize;
        if labels.size() != [n as i64] || ids.size() != [n as i64] {
            return Err(TrainError::Shape(format!(
                "memory enqueue: {n} embeddings but labels {:?} and ids {:?}",
                labels.size(),
                ids.size()
            )));
        }
        if self.capacity == 0 || n == 0 {
            return Ok(());
        }
        let device = self.embeddings.device();
        let skip = n.saturating_sub(self.capacity) as i64;
        let kept = (n as i64 - skip) as usize;
        let rows: Vec<i64> = (0..kept)
            .map(|i| ((self.head + i) % self.capacity) as i64)
            .collect();
        let index = Tensor::f_from_slice(&rows)?.f_to_device(device)?;
        let take = |t: &Tensor, kind: Kind| -> Result<Tensor, TrainError> {
            Ok(t.f_detach()?
                .f_narrow(0, skip, kept as i64)?
                .f_to_kind(kind)?
                .f_to_device(device)?)
        };
        let emb = take(embeddings, Kind::Float)?;
        let lab = take(labels, Kind::Int64)?;
        let idx = take(ids, Kind::Int64)?;
        let written = Tensor::full([kept as i64], step as i64, (Kind::Int64, device));
        tch::no_grad(|| -> Result<(), TrainError> {
            let _ = self.embeddings.f_index_copy_(0, &index, &emb)?;
            let _ = self.labels.f_index_copy_(0, &index, &lab)?;
            let _ = self.ids.f_index_copy_(0, &index, &idx)?;
            let _ = self.steps.f_index_copy_(0, &index, &written)?;
            Ok(())
        })?;
        self.head = (self.head + kept) % self.capacity;
        self.filled = (self.filled + kept).min(self.capacity);
        Ok(())
    }

    /// The rows written at most `max_age` steps before `current_step` (all rows when
    /// `max_age` is `None`), copied so later enqueues do not change them. `None` when no row
    /// qualifies.
    pub fn snapshot(
        &self,
        current_step: u64,
        max_age: Option<u64>,
    ) -> Result<Option<MemorySnapshot>, TrainError> {
        if self.filled == 0 {
            return Ok(None);
        }
        let used = self.filled as i64;
        let steps = self.steps.f_narrow(0, 0, used)?;
        let keep = match max_age {
            Some(age) => steps.f_ge(current_step.saturating_sub(age) as i64)?,
            None => steps.f_ones_like()?.f_to_kind(Kind::Bool)?,
        };
        let rows = keep.f_nonzero()?.f_view([-1])?;
        if rows.size()[0] == 0 {
            return Ok(None);
        }
        Ok(Some(MemorySnapshot {
            embeddings: self.embeddings.f_index_select(0, &rows)?,
            labels: self.labels.f_index_select(0, &rows)?,
            ids: self.ids.f_index_select(0, &rows)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::test_device;

    fn batch(first_id: i64, n: i64, dim: i64) -> (Tensor, Tensor, Tensor) {
        let ids = Tensor::arange_start(first_id, first_id + n, (Kind::Int64, test_device()));
        let emb = ids.to_kind(Kind::Float).view([-1, 1]).repeat([1, dim]);
        let labels = ids.remainder(3);
        (emb, labels, ids)
    }

    fn ids_of(snapshot: &MemorySnapshot) -> Vec<i64> {
        let mut ids = Vec::<i64>::try_from(&snapshot.ids).unwrap();
        ids.sort();
        ids
    }

    #[test]
    fn fills_then_wraps_overwriting_the_oldest_rows() {
        let mut memory = CrossBatchMemory::new(5, 2, test_device());
        assert!(memory.snapshot(0, None).unwrap().is_none());
        let (e, l, i) = batch(0, 3, 2);
        memory.enqueue(&e, &l, &i, 1).unwrap();
        assert_eq!(memory.len(), 3);
        assert_eq!(
            ids_of(&memory.snapshot(1, None).unwrap().unwrap()),
            vec![0, 1, 2]
        );
        let (e, l, i) = batch(3, 4, 2);
        memory.enqueue(&e, &l, &i, 2).unwrap();
        assert_eq!(memory.len(), 5, "fill counter saturates at capacity");
        // Ids 0 and 1 were the oldest: they are the ones overwritten.
        let snap = memory.snapshot(2, None).unwrap().unwrap();
        assert_eq!(ids_of(&snap), vec![2, 3, 4, 5, 6]);
        // Embeddings and labels moved with their ids.
        let ids = Vec::<i64>::try_from(&snap.ids).unwrap();
        let labels = Vec::<i64>::try_from(&snap.labels).unwrap();
        let first_col = Vec::<f32>::try_from(&snap.embeddings.select(1, 0)).unwrap();
        for ((id, label), value) in ids.iter().zip(&labels).zip(&first_col) {
            assert_eq!(*label, id % 3);
            assert_eq!(*value, *id as f32);
        }
    }

    #[test]
    fn label_zero_does_not_confuse_fullness() {
        let mut memory = CrossBatchMemory::new(4, 1, test_device());
        let emb = Tensor::ones([2, 1], (Kind::Float, test_device()));
        let zeros = Tensor::zeros([2], (Kind::Int64, test_device()));
        // Ids on the CPU: enqueue moves every input to the memory's device.
        memory
            .enqueue(&emb, &zeros, &Tensor::from_slice(&[7i64, 8]), 0)
            .unwrap();
        assert_eq!(memory.len(), 2);
        assert_eq!(
            memory.snapshot(0, None).unwrap().unwrap().labels.size(),
            [2]
        );
    }

    #[test]
    fn a_batch_larger_than_the_memory_keeps_its_last_rows() {
        let mut memory = CrossBatchMemory::new(3, 1, test_device());
        let (e, l, i) = batch(10, 5, 1);
        memory.enqueue(&e, &l, &i, 0).unwrap();
        assert_eq!(
            ids_of(&memory.snapshot(0, None).unwrap().unwrap()),
            vec![12, 13, 14]
        );
    }

    #[test]
    fn old_entries_are_ignored() {
        let mut memory = CrossBatchMemory::new(10, 1, test_device());
        for step in 0..4u64 {
            let (e, l, i) = batch(step as i64 * 2, 2, 1);
            memory.enqueue(&e, &l, &i, step).unwrap();
        }
        // At step 5 with max age 2, only rows written at steps 3 (ids 6, 7) qualify.
        assert_eq!(
            ids_of(&memory.snapshot(5, Some(2)).unwrap().unwrap()),
            vec![6, 7]
        );
        assert!(memory.snapshot(100, Some(2)).unwrap().is_none());
        assert_eq!(memory.snapshot(5, None).unwrap().unwrap().ids.size(), [8]);
    }

    #[test]
    fn snapshots_are_detached_copies() {
        let mut memory = CrossBatchMemory::new(2, 1, test_device());
        let emb = Tensor::ones([2, 1], (Kind::Float, test_device())).set_requires_grad(true);
        let ids = Tensor::from_slice(&[1i64, 2]).to_device(test_device());
        memory.enqueue(&(&emb * 2.0), &ids, &ids, 0).unwrap();
        let snap = memory.snapshot(0, None).unwrap().unwrap();
        assert!(!snap.embeddings.requires_grad());
        let (e, l, i) = batch(5, 2, 1);
        memory.enqueue(&e, &l, &i, 1).unwrap();
        assert_eq!(
            ids_of(&snap),
            vec![1, 2],
            "a snapshot does not change after enqueue"
        );
    }
}
