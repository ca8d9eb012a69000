//! Building a generation beside the live one and swapping it in.
//!
//! 1. Start the new model's inference thread (loaded and warmed) and an empty index; from
//!    now on every write records its id as *touched* for the new generation.
//! 2. Re-embed every stored item with the new model, in batches and rate-limited, into the
//!    new index — skipping items touched meanwhile.
//! 3. Re-read the touched items from the store and embed them, until few remain; then, under
//!    the write lock, embed the last ones and swap: the new generation is live, requests in
//!    flight finish on the old one.
//! 4. Record the active version and refresh the stored embeddings (guarded by each item's
//!    sequence number, so newer writes are never overwritten).
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Building, Generation, Registry, WriteError, WriteState};
use crate::embed::preprocess::values_from_raw;
use crate::embed::{BatchingLimits, EmbedError, Embedder};
use crate::index::{indexable_norm, IndexParams, VectorIndex};
use crate::metrics::Metrics;
use crate::model::spec::InputSpec;
use crate::store::{EmbeddingRefresh, InputRow, Store, StoreError};

/// Store meta key holding the active model version.
pub const META_ACTIVE_VERSION: &str = "active_version";
/// Items re-embedded per batch while building.
const BUILD_BATCH: usize = 256;
/// Touched items left over that are embedded under the write lock at swap time.
const SWAP_REMAINDER: usize = 64;
/// Catch-up rounds before the swap takes whatever is left under the write lock: writes that
/// keep coming faster than one round re-embeds them must not hold the swap off for ever.
const MAX_CATCH_UP_ROUNDS: usize = 8;

/// What building a generation needs from the server.
#[derive(Clone)]
pub struct BuildContext {
    /// The durable store.
    pub store: Arc<Store>,
    /// Metrics (re-embedding progress, swap time).
    pub metrics: Arc<Metrics>,
    /// Batching limits of the new inference thread.
    pub limits: BatchingLimits,
    /// Device for the new model (`auto`, `cpu`, `cuda:N`).
    pub device: String,
    /// Index parameters of the new index.
    pub index: IndexParams,
    /// Most items re-embedded per second (0 = unlimited), so serving keeps its latency.
    pub reembed_rate: f64,
}

/// Progress of the current build, readable while it runs.
#[derive(Default)]
pub struct BuildProgress {
    /// Items re-embedded so far.
    pub done: AtomicU64,
    /// Items to re-embed in the first pass.
    pub total: AtomicU64,
}

/// Why a generation could not be built; the live generation is untouched.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Another generation is being built.
    #[error("generation {0} is already being built")]
    Busy(u64),
    /// Start-up has not made a generation live yet; builds start after it.
    #[error("no generation is live yet")]
    NotReady,
    /// A trainer's weights were overtaken by an activation (rollback or roll forward) that
    /// swapped in after the trainer last looked; they are not published over it.
    #[error("an activation swapped in generation {live}; the trainer's weights are superseded")]
    Superseded {
        /// The generation the activation made live.
        live: u64,
    },
    /// The build thread could not be started.
    #[error("cannot start a build thread: {0}")]
    Spawn(std::io::Error),
    /// The new model failed to load or to embed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A write-path step failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The index refused a vector.
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    /// The build panicked.
    #[error("the build panicked: {0}")]
    Panicked(String),
}

/// What a finished swap reports.
#[derive(Debug, Clone)]
pub struct SwapReport {
    /// The version now live.
    pub version: u64,
    /// The version it replaced.
    pub previous: Option<u64>,
    /// Items in the new index.
    pub items: usize,
    /// Seconds from start to swap.
    pub build_seconds: f64,
    /// Seconds the write lock was held for the final catch-up and the swap.
    pub swap_seconds: f64,
}

impl Registry {
    /// Builds generation `version` from the model in `model_dir` beside the live one and
    /// swaps it in. Blocking; runs for as long as re-embedding the gallery takes. On error
    /// the live generation stays as it was.
    pub fn build_and_swap(
        &self,
        context: &BuildContext,
        version: u64,
        model_dir: &Path,
        progress: &BuildProgress,
    ) -> Result<SwapReport, BuildError> {
        let started = Instant::now();
        if let Some(busy) = self.building_version() {
            return Err(BuildError::Busy(busy));
        }
        let (embedder, info) = Embedder::start(
            model_dir,
            &context.device,
            context.limits,
            context.metrics.clone(),
        )?;
        let index = Arc::new(VectorIndex::new(
            info.spec.embedding_dim,
            context.index.clone(),
        ));
        let head = Generation::load_head(model_dir, &info.spec.input);
        let generation = Arc::new(Generation::new(version, info, embedder, index, head));
        {
            let mut writes = self.lock_writes();
            if let Some(busy) = &writes.building {
                return Err(BuildError::Busy(busy.generation.version));
            }
            self.set_building(
                &mut writes,
                Some(Building {
                    generation: generation.clone(),
                    touched: HashSet::new(),
                }),
            );
        }
        let result = self.fill_and_swap(context, &generation, progress, started);
        if result.is_err() {
            self.abandon_build();
        }
        result
    }

    /// Drops the generation under construction, if any (its build failed or panicked).
    pub(super) fn abandon_build(&self) {
        self.set_building(&mut self.lock_writes(), None);
    }

    fn fill_and_swap(
        &self,
        context: &BuildContext,
        generation: &Arc<Generation>,
        progress: &BuildProgress,
        started: Instant,
    ) -> Result<SwapReport, BuildError> {
        let store = &context.store;
        // Inputs are read a chunk at a time: the gallery's inputs can be far larger than
        // memory, and writes wait for the store only while one chunk is read. An item deleted
        // after the listing is simply missing from its chunk (and was recorded as touched).
        let ids = store.item_ids()?;
        progress.total.store(ids.len() as u64, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        let mut refreshes = Refreshes::with_capacity(ids.len());
        let chunks = ids.len().div_ceil(BUILD_BATCH);
        for (index, chunk) in ids.chunks(BUILD_BATCH).enumerate() {
            let batch_started = Instant::now();
            let rows = store.inputs_of(chunk)?;
            let embedded = embed_rows(generation, &rows)?;
            {
                let writes = self.lock_writes();
                let fresh = untouched(&writes, embedded);
                insert(generation, &rows, &fresh)?;
                refreshes.extend(fresh);
            }
            let done = progress
                .done
                .fetch_add(chunk.len() as u64, Ordering::Relaxed)
                + chunk.len() as u64;
            context.metrics.reembedded_items.inc_by(chunk.len() as u64);
            context
                .metrics
                .reembed_progress
                .set(done as f64 / ids.len() as f64);
            // No rest after the last chunk: no re-embedding follows that it would pace.
            if index + 1 < chunks {
                throttle(context.reembed_rate, chunk.len(), batch_started);
            }
        }
        // Catch up with writes made meanwhile until few remain (or the rounds run out).
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            let touched = {
                let mut writes = self.lock_writes();
                if writes.building.as_ref().map_or(0, |b| b.touched.len()) <= SWAP_REMAINDER {
                    break;
                }
                take_touched(&mut writes)
            };
            refreshes.extend(self.catch_up(store, generation, touched)?);
        }
        let swap_started = Instant::now();
        let previous = {
            let mut writes = self.lock_writes();
            let (ids, rows, embedded) = reread(store, generation, take_touched(&mut writes))?;
            apply(generation, &ids, &rows, &embedded)?;
            refreshes.extend(embedded);
            let previous = self.live().map(|g| g.version);
            super::set_withdrawn(store, generation);
            self.live.store(Some(generation.clone()));
            self.set_building(&mut writes, None);
            previous
        };
        let swap_seconds = swap_started.elapsed().as_secs_f64();
        // The swap has happened: a failure from here on is logged, not reported as a failed
        // build (the activation counts, and the trainer must not publish over it).
        if let Err(e) = store.set_meta(META_ACTIVE_VERSION, &generation.version.to_string()) {
            tracing::error!(
                version = generation.version,
                "generation is live but not recorded as active (a restart serves the one \
                 recorded before): {e}"
            );
        }
        // The generation is live and recorded; stored embeddings that stay stale are only a
        // cost (start-up re-embeds them), so a failed refresh does not fail the build.
        let refreshes = refreshes.into_rows();
        for chunk in refreshes.chunks(BUILD_BATCH * 4) {
            if let Err(e) = store.refresh_embeddings(chunk) {
                tracing::warn!(
                    version = generation.version,
                    "stored embeddings not refreshed (start-up re-embeds them): {e}"
                );
                break;
            }
        }
        Ok(SwapReport {
            version: generation.version,
            previous,
            items: generation.index.len(),
            build_seconds: started.elapsed().as_secs_f64(),
            swap_seconds,
        })
    }

    /// Re-reads touched items and embeds them outside the write lock; items touched again
    /// meanwhile stay touched for the next round.
    fn catch_up(
        &self,
        store: &Store,
        generation: &Generation,
        touched: HashSet<String>,
    ) -> Result<Vec<EmbeddingRefresh>, BuildError> {
        let (ids, rows, embedded) = reread(store, generation, touched)?;
        let writes = self.lock_writes();
        let fresh = untouched(&writes, embedded);
        apply(generation, &ids, &rows, &fresh)?;
        Ok(fresh)
    }
}

/// The stored embeddings a build refreshes once it is live: one per item, the newest (an item
/// written during the build is embedded again by every catch-up round that sees it).
struct Refreshes(HashMap<String, EmbeddingRefresh>);

impl Refreshes {
    fn with_capacity(items: usize) -> Refreshes {
        Refreshes(HashMap::with_capacity(items))
    }

    /// Adds `rows`, each replacing an older refresh of its item.
    fn extend(&mut self, rows: impl IntoIterator<Item = EmbeddingRefresh>) {
        for row in rows {
            match self.0.get(&row.id) {
                Some(kept) if kept.seq > row.seq => {}
                _ => {
                    self.0.insert(row.id.clone(), row);
                }
            }
        }
    }

    fn into_rows(self) -> Vec<EmbeddingRefresh> {
        self.0.into_values().collect()
    }
}

/// Takes the ids written since the last catch-up. Call with the write lock held.
fn take_touched(writes: &mut WriteState) -> HashSet<String> {
    writes
        .building
        .as_mut()
        .map(|b| std::mem::take(&mut b.touched))
        .unwrap_or_default()
}

/// Keeps the embeddings of items not written since they were read; the others are re-read
/// by the next catch-up round. Call with the write lock held.
fn untouched(writes: &WriteState, embedded: Vec<EmbeddingRefresh>) -> Vec<EmbeddingRefresh> {
    let touched = writes.building.as_ref().map(|b| &b.touched);
    embedded
        .into_iter()
        .filter(|r| !touched.is_some_and(|t| t.contains(&r.id)))
        .collect()
}

/// Touched ids, their current inputs (deleted ones absent) and the new embeddings.
type Reread = (Vec<String>, Vec<InputRow>, Vec<EmbeddingRefresh>);

/// Reads the current inputs of touched ids and embeds them.
fn reread(
    store: &Store,
    generation: &Generation,
    touched: HashSet<String>,
) -> Result<Reread, BuildError> {
    let ids: Vec<String> = touched.into_iter().collect();
    let rows = store.inputs_of(&ids)?;
    let embedded = embed_rows(generation, &rows)?;
    Ok((ids, rows, embedded))
}

/// Removes from the new index the touched ids that were not embedded again (deleted since,
/// touched once more, or mapped to a vector the index cannot hold) and inserts the embedded
/// ones.
fn apply(
    generation: &Generation,
    ids: &[String],
    rows: &[InputRow],
    embedded: &[EmbeddingRefresh],
) -> Result<(), BuildError> {
    let fresh: HashSet<&str> = embedded.iter().map(|r| r.id.as_str()).collect();
    for id in ids.iter().filter(|id| !fresh.contains(id.as_str())) {
        generation.index.remove(id);
    }
    insert(generation, rows, embedded)
}

/// Embeds stored inputs with the generation's model.
fn embed_rows(
    generation: &Generation,
    rows: &[InputRow],
) -> Result<Vec<EmbeddingRefresh>, BuildError> {
    Ok(embed_stored(
        &generation.embedder,
        &generation.info.spec.input,
        generation.version,
        rows,
    )?)
}

/// Embeds stored inputs with `embedder` (whose model has `input` and `version`), as
/// refreshes guarded by each row's sequence number. A row this model cannot take (an input
/// that does not fit its input, or that it maps to a vector the index cannot hold) is logged
/// and left out — it keeps its stored embedding and stays out of this model's index — instead
/// of failing the whole build or start-up.
pub fn embed_stored(
    embedder: &Embedder,
    input: &InputSpec,
    version: u64,
    rows: &[InputRow],
) -> Result<Vec<EmbeddingRefresh>, WriteError> {
    let left_out = |row: &InputRow, why: &dyn std::fmt::Display| {
        tracing::warn!(id = %row.id, version, "left out of this model's index: {why}");
    };
    let mut usable = Vec::with_capacity(rows.len());
    let mut values = Vec::with_capacity(rows.len());
    for row in rows {
        match values_from_raw(&row.input, &row.input_kind, input) {
            Ok(v) => {
                usable.push(row);
                values.push(v);
            }
            Err(e) => left_out(row, &e),
        }
    }
    let vectors = embedder.embed_background(values)?;
    Ok(usable
        .into_iter()
        .zip(vectors)
        .filter_map(|(row, embedding)| match indexable_norm(&embedding) {
            Ok(_) => Some(EmbeddingRefresh {
                id: row.id.clone(),
                seq: row.seq,
                embedding,
                model_version: version,
            }),
            Err(problem) => {
                left_out(
                    row,
                    &format!("the model maps it to a vector that cannot be indexed ({problem})"),
                );
                None
            }
        })
        .collect())
}

/// Adds embedded rows (a subset of `rows`, matched by id) to the generation's index.
fn insert(
    generation: &Generation,
    rows: &[InputRow],
    embedded: &[EmbeddingRefresh],
) -> Result<(), BuildError> {
    let labels: std::collections::HashMap<&str, Option<&str>> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.label.as_deref()))
        .collect();
    let batch: Vec<_> = embedded
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                labels.get(r.id.as_str()).copied().flatten(),
                r.embedding.as_slice(),
            )
        })
        .collect();
    generation.index.upsert_batch(&batch)?;
    Ok(())
}

/// Sleeps so that re-embedding stays under `rate` items per second.
fn throttle(rate: f64, items: usize, since: Instant) {
    if rate > 0.0 {
        let budget = Duration::from_secs_f64(items as f64 / rate);
        if let Some(rest) = budget.checked_sub(since.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refresh(id: &str, seq: u64) -> EmbeddingRefresh {
        EmbeddingRefresh {
            id: id.into(),
            seq,
            embedding: vec![seq as f32],
            model_version: 2,
        }
    }

    #[test]
    fn refreshes_keep_one_row_per_item_the_newest() {
        let mut refreshes = Refreshes::with_capacity(4);
        refreshes.extend([refresh("a", 1), refresh("b", 2)]);
        // Catch-up rounds embed written items again: the newer read wins, an older one never.
        refreshes.extend([refresh("a", 5), refresh("b", 1)]);
        refreshes.extend([refresh("a", 3)]);
        let mut rows = refreshes.into_rows();
        rows.sort_by(|x, y| x.id.cmp(&y.id));
        let kept: Vec<(&str, u64)> = rows.iter().map(|r| (r.id.as_str(), r.seq)).collect();
        assert_eq!(kept, [("a", 5), ("b", 2)]);
        assert_eq!(rows[0].embedding, [5.0]);
    }
}
