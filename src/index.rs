//! Approximate nearest-neighbour index over L2-normalised embeddings: an `hnsw_rs` graph
//! wrapped with string keys, label filtering, tombstones and online compaction.
//!
//! * `hnsw_rs` has no delete, so replacing or removing a key turns its point into a tombstone
//!   that searches skip. When tombstones exceed [`COMPACT_TOMBSTONE_RATIO`] of all points,
//!   [`VectorIndex::maybe_compact`] builds a fresh graph from the live vectors (kept in the
//!   wrapper) without blocking searches or writes, replays the writes that happened meanwhile
//!   and swaps it in.
//! * The distance is a clamped dot product, `max(0, 1 − a·b)` ([`ClampedDot`]): `hnsw_rs`
//!   asserts non-negative distances and panics on NaN, so inputs are checked for dimension and
//!   finiteness and renormalised defensively. Scores are cosine similarities `1 − distance`.
//! * Searches run on the graph unfiltered with a widened `ef` and drop tombstones and other
//!   labels afterwards, retrying with a larger `ef` when too few hits survive. Filters that
//!   match few points, and tiny indexes, are answered exactly by brute force. A search thus
//!   returns exactly `min(k, live matching points)` hits.
//!
//! The index is a cache derived from the store: rebuild it at start-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use hnsw_rs::prelude::{Distance, Hnsw};
use serde::{Deserialize, Serialize};

/// Compaction is due when tombstones exceed this fraction of all points in the graph.
pub const COMPACT_TOMBSTONE_RATIO: f64 = 0.3;

/// Filters matching at most this many live points are answered by exact brute force.
pub const BRUTE_FORCE_MAX_MATCHES: usize = 2048;

/// Filters matching less than `1 / BRUTE_FORCE_SELECTIVITY` of the graph's points are answered
/// by exact brute force (an unfiltered graph search would need a huge `ef`).
pub const BRUTE_FORCE_SELECTIVITY: usize = 20;

/// Maximum number of layers of the graph (`hnsw_rs` supports at most 16).
const MAX_LAYERS: usize = 16;

/// HNSW construction and search parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexParams {
    /// Maximum number of neighbours per node and layer (`M`); clamped to `2..=256`.
    pub m: usize,
    /// Candidate list size while building the graph.
    pub ef_construction: usize,
    /// Default candidate list size while searching (raised to `k` when smaller).
    pub ef_search: usize,
    /// Capacity hint: expected number of points.
    pub max_elements: usize,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    /// The item id.
    pub key: String,
    /// The item's label, if it has one.
    pub label: Option<String>,
    /// Cosine similarity to the query (`1 − distance`, at most 1).
    pub score: f32,
}

/// Errors returned by [`VectorIndex`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IndexError {
    /// The vector does not have the index's dimension.
    #[error("wrong vector dimension: expected {expected}, got {got}")]
    WrongDimension {
        /// The index's dimension.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// The vector contains NaN or an infinity.
    #[error("vector contains a non-finite value")]
    NonFinite,
    /// The vector has zero norm and cannot be normalised.
    #[error("vector has zero norm")]
    ZeroVector,
}

/// The L2 norm (in f64) of a vector the index can hold: every value finite and the norm
/// non-zero. A model can map an input to a zero or non-finite vector; such a vector has no
/// direction to search by, so every path that indexes embeddings checks it with this.
pub fn indexable_norm(v: &[f32]) -> Result<f64, IndexError> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(IndexError::NonFinite);
    }
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(IndexError::ZeroVector);
    }
    Ok(norm)
}

/// Dot-product distance for unit vectors, clamped to be non-negative: `max(0, 1 − a·b)`.
/// Never panics; returns NaN only for NaN input, which [`VectorIndex`] rejects.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClampedDot;

/// Dot product with eight independent accumulators (auto-vectorises in release builds).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let (rest_a, rest_b) = (chunks_a.remainder(), chunks_b.remainder());
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in rest_a.iter().zip(rest_b) {
        sum += x * y;
    }
    sum
}

impl Distance<f32> for ClampedDot {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - dot(va, vb)).max(0.0)
    }
}

/// Cosine similarity of unit vectors, consistent with `1 − ClampedDot` (at most 1).
#[inline]
fn score(a: &[f32], b: &[f32]) -> f32 {
    1.0 - (1.0 - dot(a, b)).max(0.0)
}

type Graph = Hnsw<'static, f32, ClampedDot>;

/// A live point copied out for compaction: key, label id, vector.
type LivePoint = (Arc<str>, Option<u32>, Arc<[f32]>);

/// One point of the graph; its position in `State::slots` is its `hnsw_rs` data id.
struct Slot {
    key: Arc<str>,
    label: Option<u32>,
    /// `None` once the point is a tombstone (replaced or removed).
    vector: Option<Arc<[f32]>>,
}

/// How many live points a label has, and the sum of their vectors (in `f64`, so that adding
/// and taking away points for the index's whole life drifts far below `f32` precision).
#[derive(Default)]
struct LabelTally {
    live: usize,
    sum: Vec<f64>,
}

impl LabelTally {
    fn add(&mut self, vector: &[f32]) {
        if self.sum.len() != vector.len() {
            self.sum = vec![0.0; vector.len()];
        }
        self.live += 1;
        for (s, x) in self.sum.iter_mut().zip(vector) {
            *s += f64::from(*x);
        }
    }

    fn take_away(&mut self, vector: &[f32]) {
        self.live = self.live.saturating_sub(1);
        if self.live == 0 {
            // Start the next point afresh: no rounding left over from the ones gone.
            self.sum.iter_mut().for_each(|s| *s = 0.0);
            return;
        }
        for (s, x) in self.sum.iter_mut().zip(vector) {
            *s -= f64::from(*x);
        }
    }

    /// The normalised mean of the live points; `None` when there is none, or when their mean
    /// is too close to zero to have a direction.
    fn mean_direction(&self) -> Option<Vec<f32>> {
        if self.live == 0 {
            return None;
        }
        let norm = self.sum.iter().map(|s| s * s).sum::<f64>().sqrt();
        (norm.is_finite() && norm / self.live as f64 > MIN_MEAN_NORM)
            .then(|| self.sum.iter().map(|s| (s / norm) as f32).collect())
    }
}

/// A label's mean of unit vectors shorter than this has no direction (its vectors cancel).
const MIN_MEAN_NORM: f64 = 1e-6;

/// Everything searches read, swapped as a whole by compaction.
struct State {
    graph: Arc<Graph>,
    slots: Vec<Slot>,
    /// Live key → slot.
    by_key: HashMap<Arc<str>, usize>,
    /// Live points per label id, with the sum of their vectors.
    label_live: HashMap<u32, LabelTally>,
    tombstones: usize,
    /// Interned labels; ids are stable for the index's lifetime.
    labels: Vec<Arc<str>>,
    label_ids: HashMap<Arc<str>, u32>,
}

impl State {
    fn empty(graph: Graph) -> State {
        State {
            graph: Arc::new(graph),
            slots: Vec::new(),
            by_key: HashMap::new(),
            label_live: HashMap::new(),
            tombstones: 0,
            labels: Vec::new(),
            label_ids: HashMap::new(),
        }
    }

    fn intern(&mut self, label: &str) -> u32 {
        if let Some(&id) = self.label_ids.get(label) {
            return id;
        }
        let id = u32::try_from(self.labels.len()).unwrap_or(u32::MAX);
        let label: Arc<str> = Arc::from(label);
        self.labels.push(label.clone());
        self.label_ids.insert(label, id);
        id
    }

    fn label_name(&self, id: Option<u32>) -> Option<String> {
        id.and_then(|i| self.labels.get(i as usize))
            .map(|l| l.to_string())
    }

    /// Turns the live point at `slot` into a tombstone.
    fn kill(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            if let Some(vector) = s.vector.take() {
                self.tombstones += 1;
                if let Some(tally) = s.label.and_then(|l| self.label_live.get_mut(&l)) {
                    tally.take_away(&vector);
                }
            }
        }
    }

    /// Records a point already inserted into the graph under data id `slot`
    /// (which must be `self.slots.len()`), replacing any live point with the same key.
    fn publish(&mut self, slot: usize, key: Arc<str>, label: Option<u32>, vector: Arc<[f32]>) {
        debug_assert_eq!(slot, self.slots.len());
        if let Some(old) = self.by_key.insert(key.clone(), slot) {
            self.kill(old);
        }
        if let Some(l) = label {
            self.label_live.entry(l).or_default().add(&vector);
        }
        self.slots.push(Slot {
            key,
            label,
            vector: Some(vector),
        });
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.by_key.remove(key) {
            Some(slot) => {
                self.kill(slot);
                true
            }
            None => false,
        }
    }

    fn live(&self) -> usize {
        self.by_key.len()
    }
}

/// A write recorded while a compaction builds its new graph, replayed before the swap.
enum Op {
    Upsert {
        key: Arc<str>,
        label: Option<u32>,
        vector: Arc<[f32]>,
    },
    Remove {
        key: Arc<str>,
    },
}

/// Ends a compaction's journaling however the compaction ends: after the swap the journal is
/// already taken, and after a panic before it later writes must not pile up in a journal
/// nobody replays.
struct StopJournalOnExit<'a>(&'a VectorIndex);

impl Drop for StopJournalOnExit<'_> {
    fn drop(&mut self) {
        self.0.lock_writer().journal = None;
    }
}

/// Serialises writers; holds the journal of a compaction in progress.
struct Writer {
    journal: Option<Vec<Op>>,
}

/// Which live points a search considers.
#[derive(Clone, Copy)]
enum Filter {
    Any,
    Label(u32),
}

impl Filter {
    fn matches(self, slot: &Slot) -> bool {
        slot.vector.is_some()
            && match self {
                Filter::Any => true,
                Filter::Label(l) => slot.label == Some(l),
            }
    }
}

/// A thread-safe HNSW index keyed by item id, with label filtering and tombstones
/// (see the module documentation). All methods take `&self`; searches run concurrently,
/// writes are serialised internally.
pub struct VectorIndex {
    dim: usize,
    params: IndexParams,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    compacting: Mutex<()>,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("len", &self.len())
            .field("tombstones", &self.tombstones())
            .finish()
    }
}

impl VectorIndex {
    /// Creates an empty index for `dim`-dimensional vectors.
    pub fn new(dim: usize, params: IndexParams) -> VectorIndex {
        let mut params = params;
        params.m = params.m.clamp(2, 256);
        params.ef_construction = params.ef_construction.max(1);
        params.ef_search = params.ef_search.max(1);
        let graph = new_graph(&params, params.max_elements);
        VectorIndex {
            dim,
            params,
            state: RwLock::new(State::empty(graph)),
            writer: Mutex::new(Writer { journal: None }),
            compacting: Mutex::new(()),
        }
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The (sanitised) parameters of the index.
    pub fn params(&self) -> &IndexParams {
        &self.params
    }

    /// Number of live points.
    pub fn len(&self) -> usize {
        self.read().live()
    }

    /// Whether the index has no live point.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tombstones (replaced or removed points still in the graph).
    pub fn tombstones(&self) -> usize {
        self.read().tombstones
    }

    /// Whether a live point has this key.
    pub fn contains(&self, key: &str) -> bool {
        self.read().by_key.contains_key(key)
    }

    /// The (normalised) vector stored for a live key.
    pub fn vector(&self, key: &str) -> Option<Vec<f32>> {
        let state = self.read();
        let slot = *state.by_key.get(key)?;
        state.slots[slot].vector.as_ref().map(|v| v.to_vec())
    }

    /// The normalised mean of the live vectors of every label `wanted` accepts (a label whose
    /// vectors cancel out has none). Kept as running sums: O(labels × dim), no scan.
    pub fn label_means(&self, wanted: impl Fn(&str) -> bool) -> HashMap<String, Vec<f32>> {
        let state = self.read();
        state
            .label_live
            .iter()
            .filter(|(&label, tally)| tally.live > 0 && wanted(&state.labels[label as usize]))
            .filter_map(|(&label, tally)| {
                let mean = tally.mean_direction()?;
                Some((state.labels[label as usize].to_string(), mean))
            })
            .collect()
    }

    /// Live keys with their labels (a snapshot, in no particular order).
    pub fn keys(&self) -> Vec<(String, Option<String>)> {
        let state = self.read();
        state
            .by_key
            .iter()
            .map(|(key, slot)| {
                let label = state.slots[*slot]
                    .label
                    .map(|l| state.labels[l as usize].to_string());
                (key.to_string(), label)
            })
            .collect()
    }

    /// Inserts a point, or replaces the point with the same key (the old one becomes a
    /// tombstone). The vector is checked and renormalised; on error nothing changes.
    pub fn upsert(&self, key: &str, label: Option<&str>, vector: &[f32]) -> Result<(), IndexError> {
        self.upsert_batch(&[(key, label, vector)])
    }

    /// Inserts or replaces many points, building the graph in parallel (use it to load the
    /// index at start-up). All vectors are checked first: on error nothing changes. Later
    /// entries win over earlier ones with the same key.
    pub fn upsert_batch(&self, items: &[(&str, Option<&str>, &[f32])]) -> Result<(), IndexError> {
        let vectors = items
            .iter()
            .map(|(_, _, v)| self.prepare(v))
            .collect::<Result<Vec<_>, _>>()?;
        if items.is_empty() {
            return Ok(());
        }
        let mut writer = self.lock_writer();
        let (graph, base) = {
            let s = self.read();
            (Arc::clone(&s.graph), s.slots.len())
        };
        // Insert into the graph without holding the state lock: searches keep running and
        // ignore data ids not yet published in `slots`.
        if vectors.len() == 1 {
            graph.insert_slice((&vectors[0], base));
        } else {
            let data: Vec<(&[f32], usize)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (&v[..], base + i))
                .collect();
            graph.parallel_insert_slice(&data);
        }
        let mut s = self.write();
        for (i, ((key, label, _), vector)) in items.iter().zip(vectors).enumerate() {
            let key: Arc<str> = Arc::from(*key);
            let label = label.map(|l| s.intern(l));
            s.publish(base + i, key.clone(), label, vector.clone());
            if let Some(journal) = writer.journal.as_mut() {
                journal.push(Op::Upsert { key, label, vector });
            }
        }
        Ok(())
    }

    /// Removes the point with this key; returns `true` when it existed.
    pub fn remove(&self, key: &str) -> bool {
        let mut writer = self.lock_writer();
        let removed = self.write().remove(key);
        if removed {
            if let Some(journal) = writer.journal.as_mut() {
                journal.push(Op::Remove {
                    key: Arc::from(key),
                });
            }
        }
        removed
    }

    /// The `k` live points most similar to `query` (optionally only those with `label`),
    /// best first. `ef` overrides [`IndexParams::ef_search`]. Returns exactly
    /// `min(k, live matching points)` hits: when the graph search yields too few it is
    /// retried with a larger `ef`, then answered by brute force.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        label: Option<&str>,
    ) -> Result<Vec<SearchHit>, IndexError> {
        let q = self.prepare(query)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let s = self.read();
        let Some((filter, matching)) = resolve_filter(&s, label) else {
            return Ok(Vec::new());
        };
        if matching == 0 {
            return Ok(Vec::new());
        }
        let target = k.min(matching);
        let points = s.slots.len();
        if matching <= BRUTE_FORCE_MAX_MATCHES
            || matching.saturating_mul(BRUTE_FORCE_SELECTIVITY) < points
        {
            return Ok(brute_force(&s, &q, k, filter));
        }
        // Widen ef by the inverse selectivity (tombstones and other labels are dropped).
        let base_ef = ef.unwrap_or(self.params.ef_search).max(k);
        let mut ef_try = base_ef
            .saturating_mul(points)
            .div_ceil(matching)
            .max(base_ef);
        while ef_try < points {
            let found = s.graph.search(&q, ef_try, ef_try);
            let mut hits = Vec::with_capacity(target);
            for n in found {
                let Some(slot) = s.slots.get(n.d_id) else {
                    continue; // inserted into the graph but not yet published
                };
                if filter.matches(slot) {
                    hits.push(SearchHit {
                        key: slot.key.to_string(),
                        label: s.label_name(slot.label),
                        score: 1.0 - n.distance,
                    });
                    if hits.len() == k {
                        break;
                    }
                }
            }
            if hits.len() >= target {
                hits.sort_by(|a, b| b.score.total_cmp(&a.score));
                return Ok(hits);
            }
            ef_try = ef_try.saturating_mul(4);
        }
        Ok(brute_force(&s, &q, k, filter))
    }

    /// Exact search by brute force over the live vectors, with the same semantics as
    /// [`VectorIndex::search`] (the reference for tests and benchmarks).
    pub fn exact_search(
        &self,
        query: &[f32],
        k: usize,
        label: Option<&str>,
    ) -> Result<Vec<SearchHit>, IndexError> {
        let q = self.prepare(query)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let s = self.read();
        match resolve_filter(&s, label) {
            Some((filter, _)) => Ok(brute_force(&s, &q, k, filter)),
            None => Ok(Vec::new()),
        }
    }

    /// Whether tombstones exceed [`COMPACT_TOMBSTONE_RATIO`] of all points.
    pub fn needs_compaction(&self) -> bool {
        let s = self.read();
        s.tombstones > 0 && s.tombstones as f64 > COMPACT_TOMBSTONE_RATIO * s.slots.len() as f64
    }

    /// Compacts when [`VectorIndex::needs_compaction`]; returns whether it did. Meant to be
    /// called from a background thread.
    pub fn maybe_compact(&self) -> bool {
        self.needs_compaction() && self.compact()
    }

    /// Rebuilds the graph from the live vectors, dropping all tombstones, and swaps it in.
    /// Searches and writes keep working meanwhile: the graph is built from a snapshot outside
    /// the locks, writes made during the build are replayed onto it, then it is swapped in.
    /// Returns `false` without doing anything when another compaction is running.
    pub fn compact(&self) -> bool {
        self.compact_with(|| {})
    }

    /// [`VectorIndex::compact`], running `during_build` while the new graph is being built
    /// (tests use it to race writes against the build deterministically).
    fn compact_with(&self, during_build: impl FnOnce()) -> bool {
        let _compacting = match self.compacting.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        // 1. Snapshot the live points and start journaling writes (until the swap, or until
        // a panic ends the compaction: later writes must not pile up in a dead journal).
        let _journaling = StopJournalOnExit(self);
        let snapshot: Vec<LivePoint> = {
            let mut writer = self.lock_writer();
            let s = self.read();
            writer.journal = Some(Vec::new());
            s.slots
                .iter()
                .filter_map(|slot| {
                    slot.vector
                        .as_ref()
                        .map(|v| (slot.key.clone(), slot.label, v.clone()))
                })
                .collect()
        };
        during_build();
        // 2. Build the new graph and its tables without holding any lock.
        let graph = new_graph(&self.params, self.params.max_elements.max(snapshot.len()));
        let data: Vec<(&[f32], usize)> = snapshot
            .iter()
            .enumerate()
            .map(|(i, (_, _, v))| (&v[..], i))
            .collect();
        graph.parallel_insert_slice(&data);
        drop(data);
        let mut next = State::empty(graph);
        for (i, (key, label, vector)) in snapshot.into_iter().enumerate() {
            next.publish(i, key, label, vector);
        }
        // 3. Block writers, replay what they did meanwhile, swap.
        let mut writer = self.lock_writer();
        for op in writer.journal.take().unwrap_or_default() {
            match op {
                Op::Upsert { key, label, vector } => {
                    let slot = next.slots.len();
                    next.graph.insert_slice((&vector, slot));
                    next.publish(slot, key, label, vector);
                }
                Op::Remove { key } => {
                    next.remove(&key);
                }
            }
        }
        let old = {
            let mut s = self.write();
            next.labels = std::mem::take(&mut s.labels);
            next.label_ids = std::mem::take(&mut s.label_ids);
            std::mem::replace(&mut *s, next)
        };
        drop(writer);
        // Free the old graph outside the locks.
        drop(old);
        true
    }

    /// Checks dimension, finiteness and norm; returns the renormalised vector.
    fn prepare(&self, v: &[f32]) -> Result<Arc<[f32]>, IndexError> {
        if v.len() != self.dim {
            return Err(IndexError::WrongDimension {
                expected: self.dim,
                got: v.len(),
            });
        }
        let norm = indexable_norm(v)?;
        Ok(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
    }

    // Lock poisoning is recovered from: state updates cannot panic half-way through.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn new_graph(params: &IndexParams, capacity: usize) -> Graph {
    Hnsw::new(
        params.m,
        capacity.max(1),
        MAX_LAYERS,
        params.ef_construction,
        ClampedDot,
    )
}

/// The filter for `label` and how many live points match it; `None` for an unknown label.
fn resolve_filter(s: &State, label: Option<&str>) -> Option<(Filter, usize)> {
    match label {
        None => Some((Filter::Any, s.live())),
        Some(l) => {
            let id = *s.label_ids.get(l)?;
            Some((
                Filter::Label(id),
                s.label_live.get(&id).map_or(0, |tally| tally.live),
            ))
        }
    }
}

/// Exact top-`k` over the live points matching `filter`, best first (ties by insertion order).
fn brute_force(s: &State, q: &[f32], k: usize, filter: Filter) -> Vec<SearchHit> {
    let mut scored: Vec<(f32, usize)> = s
        .slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| filter.matches(slot))
        .filter_map(|(i, slot)| slot.vector.as_ref().map(|v| (score(q, v), i)))
        .collect();
    let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if scored.len() > k {
        scored.select_nth_unstable_by(k - 1, order);
        scored.truncate(k);
    }
    scored.sort_by(order);
    scored
        .into_iter()
        .map(|(score, i)| SearchHit {
            key: s.slots[i].key.to_string(),
            label: s.label_name(s.slots[i].label),
            score,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

    fn unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn params() -> IndexParams {
        IndexParams {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
            max_elements: 5000,
        }
    }

    fn keys(h: &[SearchHit]) -> Vec<String> {
        h.iter().map(|h| h.key.clone()).collect()
    }

    /// Builds an index of `n` random unit vectors with labels `l0..l{labels}` (round robin).
    fn build(n: usize, dim: usize, labels: usize, seed: u64) -> (VectorIndex, Vec<Vec<f32>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let idx = VectorIndex::new(dim, params());
        let vecs: Vec<Vec<f32>> = (0..n).map(|_| unit(&mut rng, dim)).collect();
        let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
        let labs: Vec<String> = (0..n).map(|i| format!("l{}", i % labels)).collect();
        let items: Vec<(&str, Option<&str>, &[f32])> = (0..n)
            .map(|i| (keys[i].as_str(), Some(labs[i].as_str()), &vecs[i][..]))
            .collect();
        idx.upsert_batch(&items).unwrap();
        (idx, vecs)
    }

    /// The keys of the `k` vectors of a [`build`] index (`labels` round-robin labels, nothing
    /// changed since) most similar to `q`, among those labelled `label`: a plain `f64` loop over
    /// the test's own vectors, sharing no code with the index.
    fn reference_top_k(
        vecs: &[Vec<f32>],
        labels: usize,
        q: &[f32],
        k: usize,
        label: Option<&str>,
    ) -> Vec<String> {
        let mut scored: Vec<(f64, usize)> = vecs
            .iter()
            .enumerate()
            .filter(|(i, _)| label.is_none_or(|l| l == format!("l{}", i % labels)))
            .map(|(i, v)| {
                let dot: f64 = v
                    .iter()
                    .zip(q)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                (dot, i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(k)
            .map(|(_, i)| format!("k{i}"))
            .collect()
    }

    /// Recall@k of the index's searches against its exact search, for indexes changed since
    /// [`build`] (the exact search is checked against [`reference_top_k`] on its own).
    fn recall_vs_exact(idx: &VectorIndex, queries: &[Vec<f32>], k: usize) -> f64 {
        let mut found = 0;
        let mut total = 0;
        for q in queries {
            let exact: HashSet<String> = keys(&idx.exact_search(q, k, None).unwrap())
                .into_iter()
                .collect();
            let approx = idx.search(q, k, None, None).unwrap();
            assert_eq!(approx.len(), exact.len());
            assert!(approx.windows(2).all(|w| w[0].score >= w[1].score));
            found += approx.iter().filter(|h| exact.contains(&h.key)).count();
            total += exact.len();
        }
        found as f64 / total as f64
    }

    /// Recall@k of the index's searches against [`reference_top_k`].
    fn recall(
        idx: &VectorIndex,
        vecs: &[Vec<f32>],
        labels: usize,
        queries: &[Vec<f32>],
        k: usize,
        label: Option<&str>,
    ) -> f64 {
        let mut found = 0;
        let mut total = 0;
        for q in queries {
            let exact: HashSet<String> = reference_top_k(vecs, labels, q, k, label)
                .into_iter()
                .collect();
            let approx = idx.search(q, k, None, label).unwrap();
            assert_eq!(approx.len(), exact.len());
            assert!(approx.windows(2).all(|w| w[0].score >= w[1].score));
            found += approx.iter().filter(|h| exact.contains(&h.key)).count();
            total += exact.len();
        }
        found as f64 / total as f64
    }

    #[test]
    fn clamped_dot_never_negative() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let v = unit(&mut rng, 37);
            assert!(ClampedDot.eval(&v, &v) >= 0.0);
            assert!(ClampedDot.eval(&v, &v) < 1e-5);
            let w: Vec<f32> = v.iter().map(|x| -x).collect();
            assert!((ClampedDot.eval(&v, &w) - 2.0).abs() < 1e-5);
        }
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(dot(&a, &a), a.iter().map(|x| x * x).sum::<f32>());
    }

    #[test]
    fn recall_and_self_retrieval() {
        let dim = 32;
        let (idx, vecs) = build(6000, dim, 2, 7);
        assert_eq!(idx.len(), 6000);
        assert_eq!(idx.tombstones(), 0);
        let mut rng = StdRng::seed_from_u64(99);
        let queries: Vec<Vec<f32>> = (0..200).map(|_| unit(&mut rng, dim)).collect();
        let r = recall(&idx, &vecs, 2, &queries, 10, None);
        assert!(r >= 0.95, "recall@10 = {r}");
        // The exact search the server's small filters use agrees with the reference.
        for q in &queries[..20] {
            let exact = idx.exact_search(q, 10, Some("l0")).unwrap();
            assert_eq!(keys(&exact), reference_top_k(&vecs, 2, q, 10, Some("l0")));
        }
        for (i, v) in vecs.iter().enumerate() {
            let hits = idx.search(v, 1, None, None).unwrap();
            assert_eq!(hits[0].key, format!("k{i}"), "point {i} finds itself");
            assert!(hits[0].score > 0.999);
            assert_eq!(
                hits[0].label.as_deref(),
                Some(format!("l{}", i % 2).as_str())
            );
        }
        // Label filter through the graph path (3000 matches, selectivity 1/2).
        let r = recall(&idx, &vecs, 2, &queries[..50], 10, Some("l1"));
        assert!(r >= 0.95, "filtered recall@10 = {r}");
        for q in &queries[..20] {
            let hits = idx.search(q, 10, None, Some("l1")).unwrap();
            assert_eq!(hits.len(), 10);
            assert!(hits.iter().all(|h| h.label.as_deref() == Some("l1")));
        }
        // Large k: the first graph search yields too few matches, so it must retry / fall back.
        for k in [2500, 2999, 3000, 4000] {
            let hits = idx.search(&queries[0], k, None, Some("l1")).unwrap();
            assert_eq!(hits.len(), k.min(3000));
            let distinct: HashSet<&str> = hits.iter().map(|h| h.key.as_str()).collect();
            assert_eq!(distinct.len(), hits.len());
            assert!(hits.iter().all(|h| h.label.as_deref() == Some("l1")));
        }
        assert_eq!(
            idx.search(&queries[0], 5500, Some(8), None).unwrap().len(),
            5500
        );
    }

    #[test]
    fn upsert_replaces_and_remove() {
        let dim = 16;
        let (idx, vecs) = build(300, dim, 3, 3);
        let mut rng = StdRng::seed_from_u64(5);
        let fresh = unit(&mut rng, dim);
        idx.upsert("k10", Some("new"), &fresh).unwrap();
        assert_eq!(idx.len(), 300);
        assert_eq!(idx.tombstones(), 1);
        let hits = idx.search(&vecs[10], 300, None, None).unwrap();
        assert_eq!(hits.len(), 300);
        let k10 = hits.iter().find(|h| h.key == "k10").unwrap();
        assert!(k10.score < 0.999, "old vector no longer found for k10");
        assert_eq!(hits.iter().filter(|h| h.key == "k10").count(), 1);
        let top = idx.search(&fresh, 1, None, None).unwrap();
        assert_eq!(top[0].key, "k10");
        assert_eq!(top[0].label.as_deref(), Some("new"));
        let stored = idx.vector("k10").unwrap();
        let diff = stored
            .iter()
            .zip(&fresh)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-6, "vector() returns the replacing vector");
        let keys = idx.keys();
        assert_eq!(keys.len(), 300);
        assert!(keys.contains(&("k10".to_string(), Some("new".to_string()))));

        assert!(idx.remove("k11"));
        assert!(!idx.remove("k11"));
        assert!(!idx.contains("k11"));
        assert_eq!(idx.vector("k11"), None);
        assert_eq!(idx.len(), 299);
        assert_eq!(idx.tombstones(), 2);
        let top = idx.search(&vecs[11], 5, None, None).unwrap();
        assert!(top.iter().all(|h| h.key != "k11"));
        assert_eq!(idx.search(&vecs[0], 1000, None, None).unwrap().len(), 299);
    }

    /// Brute force: the normalised mean of `label`'s live vectors, from `keys()` and `vector()`.
    fn recomputed_mean(idx: &VectorIndex, label: &str) -> Vec<f32> {
        let mut sum = vec![0.0f64; idx.dim()];
        for (key, _) in idx
            .keys()
            .into_iter()
            .filter(|(_, l)| l.as_deref() == Some(label))
        {
            for (s, x) in sum.iter_mut().zip(idx.vector(&key).unwrap()) {
                *s += f64::from(x);
            }
        }
        let norm = sum.iter().map(|s| s * s).sum::<f64>().sqrt();
        sum.iter().map(|s| (s / norm) as f32).collect()
    }

    fn assert_close(got: &[f32], expected: &[f32], tolerance: f32, what: &str) {
        let worst = got
            .iter()
            .zip(expected)
            .map(|(g, e)| (g - e).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tolerance, "{what}: off by {worst}");
    }

    #[test]
    fn label_means_are_the_means_of_exactly_the_live_vectors_of_the_wanted_labels() {
        let dim = 8;
        let (idx, vecs) = build(30, dim, 3, 4);
        let mut rng = StdRng::seed_from_u64(6);
        let fresh = unit(&mut rng, dim);
        idx.upsert("k0", Some("l0"), &fresh).unwrap(); // replaced: the old vector is gone
        idx.upsert("k1", Some("l0"), &vecs[1]).unwrap(); // relabelled from l1
        assert!(idx.remove("k3")); // removed from l0
        assert!(idx.label_means(|label| label == "absent").is_empty());
        let means = idx.label_means(|label| label != "l2");
        assert_eq!(means.len(), 2, "l2 not wanted");
        for (label, mean) in &means {
            assert_close(mean, &recomputed_mean(&idx, label), 1e-6, label);
        }
        // A compaction rebuilds the tallies from the live points alone.
        for k in 10..20 {
            assert!(idx.remove(&format!("k{k}")));
        }
        assert!(idx.maybe_compact());
        for (label, mean) in idx.label_means(|_| true) {
            assert_close(&mean, &recomputed_mean(&idx, &label), 1e-6, &label);
        }
    }

    #[test]
    fn label_means_do_not_drift_over_many_replacements_and_forget_emptied_labels() {
        let dim = 16;
        let mut rng = StdRng::seed_from_u64(21);
        let idx = VectorIndex::new(dim, params());
        let anchor = unit(&mut rng, dim);
        idx.upsert("anchor", Some("a"), &anchor).unwrap();
        // Ten thousand points come and go through one label; one stays all along.
        for round in 0..10_000 {
            let key = format!("k{}", round % 7);
            idx.upsert(&key, Some("a"), &unit(&mut rng, dim)).unwrap();
            if round % 3 == 0 {
                idx.remove(&key);
            }
        }
        let means = idx.label_means(|_| true);
        assert_close(&means["a"], &recomputed_mean(&idx, "a"), 1e-6, "a");
        // Emptied, then one point again: its mean is that point, with no residue.
        for (key, _) in idx.keys() {
            idx.remove(&key);
        }
        assert!(idx.label_means(|_| true).is_empty());
        idx.upsert("again", Some("a"), &anchor).unwrap();
        assert_close(&idx.label_means(|_| true)["a"], &anchor, 1e-7, "refilled");
        // Two opposite points cancel: no direction.
        let opposite: Vec<f32> = anchor.iter().map(|x| -x).collect();
        idx.upsert("opposite", Some("a"), &opposite).unwrap();
        assert!(idx.label_means(|_| true).is_empty());
    }

    #[test]
    fn label_filter_counts() {
        let dim = 16;
        let (idx, vecs) = build(500, dim, 5, 11);
        let mut rng = StdRng::seed_from_u64(12);
        let q = unit(&mut rng, dim);
        for l in 0..5 {
            let label = format!("l{l}");
            let hits = idx.search(&q, 1000, None, Some(&label)).unwrap();
            assert_eq!(hits.len(), 100);
            assert!(hits
                .iter()
                .all(|h| h.label.as_deref() == Some(label.as_str())));
            let hits = idx.search(&q, 7, None, Some(&label)).unwrap();
            assert_eq!(keys(&hits), reference_top_k(&vecs, 5, &q, 7, Some(&label)));
        }
        assert!(idx.search(&q, 10, None, Some("nope")).unwrap().is_empty());
        assert!(idx.search(&q, 0, None, None).unwrap().is_empty());
        // Remove all of l0 except one.
        for i in (5..500).step_by(5) {
            assert!(idx.remove(&format!("k{i}")));
        }
        let hits = idx.search(&q, 10, None, Some("l0")).unwrap();
        assert_eq!(keys(&hits), vec!["k0".to_string()]);
    }

    #[test]
    fn rejects_bad_vectors_without_changes() {
        let idx = VectorIndex::new(4, params());
        idx.upsert("a", None, &[1.0, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(
            idx.upsert("b", None, &[1.0, 0.0, 0.0]),
            Err(IndexError::WrongDimension {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            idx.upsert("a", None, &[f32::NAN, 0.0, 0.0, 0.0]),
            Err(IndexError::NonFinite)
        );
        assert_eq!(
            idx.upsert("c", None, &[f32::INFINITY, 0.0, 0.0, 0.0]),
            Err(IndexError::NonFinite)
        );
        assert_eq!(
            idx.upsert("c", None, &[0.0; 4]),
            Err(IndexError::ZeroVector)
        );
        let batch: [(&str, Option<&str>, &[f32]); 2] =
            [("d", None, &[0.0, 1.0, 0.0, 0.0]), ("e", None, &[1.0, 2.0])];
        assert!(idx.upsert_batch(&batch).is_err());
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.tombstones(), 0);
        assert!(!idx.contains("d"));
        assert!(matches!(
            idx.search(&[1.0, f32::NAN, 0.0, 0.0], 1, None, None),
            Err(IndexError::NonFinite)
        ));
        assert!(matches!(
            idx.search(&[1.0], 1, None, None),
            Err(IndexError::WrongDimension { .. })
        ));
        // Unnormalised input is renormalised.
        idx.upsert("f", None, &[0.0, 3.0, 4.0, 0.0]).unwrap();
        let hits = idx.search(&[0.0, 0.6, 0.8, 0.0], 2, None, None).unwrap();
        assert_eq!(hits[0].key, "f");
        assert!((hits[0].score - 1.0).abs() < 1e-5);
        assert!(hits[1].score.abs() < 1e-6);
    }

    #[test]
    fn compaction_preserves_results() {
        let dim = 24;
        let n = 3000;
        let (idx, vecs) = build(n, dim, 3, 21);
        let mut rng = StdRng::seed_from_u64(22);
        // Replace a fifth and remove a fifth: 40 % tombstones.
        for i in 0..n / 5 {
            idx.upsert(&format!("k{i}"), Some("l0"), &unit(&mut rng, dim))
                .unwrap();
        }
        for i in n / 5..2 * n / 5 {
            assert!(idx.remove(&format!("k{i}")));
        }
        let live = n - n / 5;
        assert_eq!(idx.len(), live);
        assert!(idx.needs_compaction());
        let queries: Vec<Vec<f32>> = (0..100).map(|_| unit(&mut rng, dim)).collect();
        let r = recall_vs_exact(&idx, &queries, 10);
        assert!(r >= 0.95, "recall with 40 % tombstones {r}");
        for i in (2 * n / 5..n).step_by(37) {
            let hits = idx.search(&vecs[i], 10, None, None).unwrap();
            assert_eq!(hits[0].key, format!("k{i}"));
            assert!(hits.iter().all(|h| idx.contains(&h.key)));
        }
        let before: Vec<Vec<String>> = queries
            .iter()
            .map(|q| keys(&idx.exact_search(q, 10, None).unwrap()))
            .collect();
        assert!(idx.maybe_compact());
        assert_eq!(idx.len(), live);
        assert_eq!(idx.tombstones(), 0);
        assert!(!idx.needs_compaction());
        assert!(!idx.maybe_compact());
        for (q, b) in queries.iter().zip(&before) {
            assert_eq!(&keys(&idx.exact_search(q, 10, None).unwrap()), b);
        }
        let r = recall_vs_exact(&idx, &queries, 10);
        assert!(r >= 0.95, "recall after compaction {r}");
        for i in (2 * n / 5..n).step_by(37) {
            assert_eq!(
                idx.search(&vecs[i], 1, None, None).unwrap()[0].key,
                format!("k{i}")
            );
        }
        let l0 = idx.search(&queries[0], 5000, None, Some("l0")).unwrap();
        let expected_l0 = n / 5 + (2 * n / 5..n).filter(|i| i % 3 == 0).count();
        assert_eq!(l0.len(), expected_l0);
    }

    #[test]
    fn concurrent_search_and_writes_during_compaction() {
        let dim = 16;
        let n = 6000;
        let (idx, vecs) = build(n, dim, 2, 31);
        for i in 0..n / 2 {
            assert!(idx.remove(&format!("k{i}")));
        }
        assert!(idx.needs_compaction());
        let idx = Arc::new(idx);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut searchers = Vec::new();
        for t in 0..2 {
            let idx = Arc::clone(&idx);
            let stop = Arc::clone(&stop);
            let vecs = vecs.clone();
            searchers.push(std::thread::spawn(move || {
                let mut rounds = 0usize;
                // Keys below n / 2 + 200 are removed by this test.
                let base = n / 2 + 200;
                let mut i = base + t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 50 {
                    let hits = idx.search(&vecs[i], 10, None, None).unwrap();
                    assert_eq!(hits.len(), 10);
                    assert_eq!(hits[0].key, format!("k{i}"));
                    let ks: HashSet<&str> = hits.iter().map(|h| h.key.as_str()).collect();
                    assert_eq!(ks.len(), 10, "no duplicate keys");
                    i = base + (i + 7 - base) % (n - base);
                    rounds += 1;
                }
                rounds
            }));
        }
        // Writes racing the compaction must survive it (journal replay).
        let writer = {
            let idx = Arc::clone(&idx);
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(77);
                for j in 0..200 {
                    idx.upsert(&format!("w{j}"), Some("w"), &unit(&mut rng, dim))
                        .unwrap();
                    if j % 2 == 0 {
                        assert!(idx.remove(&format!("k{}", n / 2 + j)));
                    }
                }
            })
        };
        assert!(idx.compact());
        writer.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in searchers {
            assert!(s.join().unwrap() >= 50);
        }
        assert_eq!(idx.len(), n / 2 + 200 - 100);
        assert_eq!(
            idx.search(&vecs[0], 1000, None, Some("w")).unwrap().len(),
            200
        );
        assert!(!idx.contains(&format!("k{}", n / 2)));
        assert!(idx.contains(&format!("k{}", n / 2 + 1)));
        // Exact and approximate agree on the final state.
        let mut rng = StdRng::seed_from_u64(78);
        let queries: Vec<Vec<f32>> = (0..50).map(|_| unit(&mut rng, dim)).collect();
        assert!(recall_vs_exact(&idx, &queries, 10) >= 0.95);
        let all = idx.exact_search(&queries[0], usize::MAX, None).unwrap();
        assert_eq!(all.len(), idx.len());
    }

    #[test]
    fn writes_during_compaction_are_replayed() {
        let dim = 16;
        // More live points than brute force answers: the searches below go through the
        // rebuilt graph, so the journal's replayed inserts must be in it.
        let n = 6000;
        let (idx, vecs) = build(n, dim, 2, 41);
        for i in 0..n / 4 {
            assert!(idx.remove(&format!("k{i}")));
        }
        assert!(n - n / 4 > BRUTE_FORCE_MAX_MATCHES);
        let mut rng = StdRng::seed_from_u64(42);
        let fresh: Vec<Vec<f32>> = (0..3).map(|_| unit(&mut rng, dim)).collect();
        let keep = format!("k{}", n - 1);
        let replaced = format!("k{}", n - 2);
        let removed = format!("k{}", n - 3);
        assert!(idx.compact_with(|| {
            // A new key, a replaced key, a removed key, and a key added then removed.
            idx.upsert("new", Some("x"), &fresh[0]).unwrap();
            idx.upsert(&replaced, Some("y"), &fresh[1]).unwrap();
            assert!(idx.remove(&removed));
            idx.upsert("gone", None, &fresh[2]).unwrap();
            assert!(idx.remove("gone"));
            // Searches work while the new graph is built.
            assert_eq!(idx.search(&fresh[0], 1, None, None).unwrap()[0].key, "new");
        }));
        assert_eq!(idx.tombstones(), 3, "replaced, removed, added-then-removed");
        assert_eq!(idx.len(), n - n / 4 + 1 - 1);
        assert!(idx.contains("new") && idx.contains(&replaced) && idx.contains(&keep));
        assert!(!idx.contains(&removed) && !idx.contains("gone"));
        let top = idx.search(&fresh[0], 1, None, Some("x")).unwrap();
        assert_eq!(
            (top[0].key.as_str(), top[0].label.as_deref()),
            ("new", Some("x"))
        );
        assert_eq!(
            idx.search(&fresh[1], 1, None, None).unwrap()[0].key,
            replaced
        );
        assert_eq!(
            idx.search(&vecs[n - 1], 1, None, None).unwrap()[0].key,
            keep
        );
        let all = idx.search(&vecs[n - 3], n, None, None).unwrap();
        assert_eq!(all.len(), idx.len());
        assert!(all.iter().all(|h| h.key != removed && h.key != "gone"));
        assert_eq!(all.iter().filter(|h| h.key == replaced).count(), 1);
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<VectorIndex>();
    }
    #[test]
    fn a_compaction_that_panics_stops_journaling_and_leaves_the_index_working() {
        let dim = 8;
        let (idx, vecs) = build(200, dim, 2, 43);
        assert!(idx.remove("k0"));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            idx.compact_with(|| panic!("building the graph failed"))
        }));
        assert!(panicked.is_err());
        assert!(
            idx.lock_writer().journal.is_none(),
            "no dead journal keeps growing"
        );
        let mut rng = StdRng::seed_from_u64(44);
        let fresh = unit(&mut rng, dim);
        idx.upsert("after", None, &fresh).unwrap();
        assert_eq!(idx.search(&fresh, 1, None, None).unwrap()[0].key, "after");
        assert_eq!(idx.search(&vecs[5], 1, None, None).unwrap()[0].key, "k5");
        // The next compaction runs and keeps every point.
        assert!(idx.compact());
        assert_eq!(idx.tombstones(), 0);
        assert_eq!(idx.len(), 200);
    }
}
