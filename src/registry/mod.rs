//! Model generations: the live one, the one being built, the write path that keeps every
//! generation's index in step with the store, and the atomic swap.
//!
//! A generation is a model version together with the index of the gallery embedded by that
//! model. A request takes the live generation once ([`Registry::live`]) and keeps that `Arc`
//! until it answers, so it embeds and searches with one generation even if a newer one is
//! published meanwhile; the old generation (its inference thread and index) is freed when
//! its last request finishes. A query is never answered by one generation's model against
//! another generation's index.
//!
//! Writes go through [`Registry::write_items`], [`Registry::delete_item`] and
//! [`Registry::delete_class`], which hold the
//! registry's write lock (on a blocking thread, never across `.await`) while they commit to
//! the store and update the live index, and record the ids a generation under construction
//! must (re-)embed before it may be swapped in.

pub mod builder;
pub mod publisher;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwapOption;

pub use builder::{BuildContext, BuildError, BuildProgress, SwapReport};
pub use publisher::{BuildOrigin, LastBuild, Publisher};

use crate::classify::{HeadSnapshot, ServedHead};
use crate::embed::preprocess::values_from_raw;
use crate::embed::{EmbedError, Embedder, ModelInfo};
use crate::index::{indexable_norm, IndexError, VectorIndex};
use crate::model::spec::InputSpec;
use crate::store::{ClassDeletion, ClassRegistration, NewItem, Store, StoreError};

/// A model version together with the index of gallery embeddings made by that model.
pub struct Generation {
    /// Model version; every stored embedding records the version that made it.
    pub version: u64,
    /// The model's description and the device it runs on.
    pub info: ModelInfo,
    /// Handle to the model's inference thread.
    pub embedder: Embedder,
    /// The gallery embedded by this model.
    pub index: Arc<VectorIndex>,
    /// The class head published with the model, if the trainer learnt classes.
    pub head: Option<Arc<ServedHead>>,
}

impl Generation {
    /// Reads the class head of the generation whose model (inputs of `input`) lives in
    /// `model_dir`; a head that cannot be read or served is logged and left out
    /// (classification then falls back to class means).
    pub fn load_head(model_dir: &std::path::Path, input: &InputSpec) -> Option<Arc<ServedHead>> {
        let served = HeadSnapshot::load(model_dir)
            .map_err(|e| e.to_string())
            .and_then(|head| {
                head.map(|h| ServedHead::new(h, input).map_err(|e| e.to_string()))
                    .transpose()
            });
        match served {
            Ok(head) => head.map(Arc::new),
            Err(e) => {
                tracing::warn!("ignoring the class head: {e}");
                None
            }
        }
    }
}

/// A generation being built beside the live one.
struct Building {
    generation: Arc<Generation>,
    /// Items written or deleted since the build started: the builder (re-)reads them from
    /// the store before the swap instead of trusting what it read earlier.
    touched: HashSet<String>,
}

/// What the write lock protects.
#[derive(Default)]
struct WriteState {
    building: Option<Building>,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The server has no live generation yet.
    #[error("no live model generation yet")]
    NotReady,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The index refused a vector.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Re-embedding with a generation swapped in meanwhile failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// The model maps an item's input to a vector the index cannot hold (zero or
    /// non-finite); nothing was written.
    #[error("item {id}: the model maps this input to a vector that cannot be indexed ({problem})")]
    DegenerateEmbedding {
        /// Item id.
        id: String,
        /// What is wrong with the vector.
        problem: IndexError,
    },
    /// A stored input could not be re-embedded.
    #[error("item {id}: {message}")]
    Input {
        /// Item id.
        id: String,
        /// What is wrong.
        message: String,
    },
}

/// Holds the live generation (empty until start-up has loaded the model and the index) and
/// serialises writes.
#[derive(Default)]
pub struct Registry {
    live: ArcSwapOption<Generation>,
    /// Mirrors `WriteState::building` (set and cleared with the write lock held) so that
    /// status requests read it without waiting for a write.
    building: ArcSwapOption<Generation>,
    writes: Mutex<WriteState>,
}

impl Registry {
    /// An empty registry (not ready).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The live generation, or `None` while starting up.
    pub fn live(&self) -> Option<Arc<Generation>> {
        self.live.load_full()
    }

    /// The version of the generation being built, if any.
    pub fn building_version(&self) -> Option<u64> {
        self.building.load().as_ref().map(|g| g.version)
    }

    /// Records the generation under construction (`None` when the build ends). Call with
    /// the write lock held.
    fn set_building(&self, writes: &mut WriteState, building: Option<Building>) {
        self.building
            .store(building.as_ref().map(|b| b.generation.clone()));
        writes.building = building;
    }

    /// Makes `generation` live at start-up (no build in progress, nothing to re-embed).
    pub fn publish_initial(&self, generation: Generation) {
        let _writes = self.lock_writes();
        self.live.store(Some(Arc::new(generation)));
    }

    fn lock_writes(&self) -> MutexGuard<'_, WriteState> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits items embedded by `embedded_by` to the store and makes them searchable in the
    /// live generation; returns the model version of the stored embeddings. Blocking: call
    /// from a blocking thread. If another generation went live after the items were
    /// embedded, they are re-embedded by it first, so the store and the live index never mix
    /// models. `class`, when given, is registered in the same transaction as the items.
    pub fn write_items(
        &self,
        store: &Store,
        embedded_by: &Generation,
        mut items: Vec<NewItem>,
        class: Option<&ClassRegistration>,
    ) -> Result<u64, WriteError> {
        let mut writes = self.lock_writes();
        let live = self.live().ok_or(WriteError::NotReady)?;
        if live.version != embedded_by.version {
            let spec = &live.info.spec.input;
            let values = items
                .iter()
                .map(|item| {
                    values_from_raw(&item.input, &item.input_kind, spec).map_err(|e| {
                        WriteError::Input {
                            id: item.id.clone(),
                            message: e.to_string(),
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let embeddings = live.embedder.embed_blocking(values)?;
            for (item, embedding) in items.iter_mut().zip(embeddings) {
                item.embedding = embedding;
                item.model_version = live.version;
            }
        }
        // Checked before the commit: an item the index refuses must not reach the store.
        for item in &items {
            indexable_norm(&item.embedding).map_err(|problem| WriteError::DegenerateEmbedding {
                id: item.id.clone(),
                problem,
            })?;
        }
        store.upsert_items_registering(&items, class)?;
        let batch: Vec<_> = items
            .iter()
            .map(|i| (i.id.as_str(), i.label.as_deref(), i.embedding.as_slice()))
            .collect();
        live.index.upsert_batch(&batch)?;
        if let Some(building) = writes.building.as_mut() {
            building.touched.extend(items.iter().map(|i| i.id.clone()));
        }
        Ok(live.version)
    }

    /// Deletes an item from the store and from every generation's index; returns whether it
    /// existed. Blocking.
    pub fn delete_item(&self, store: &Store, id: &str) -> Result<bool, WriteError> {
        let mut writes = self.lock_writes();
        let existed = store.delete_item(id)?;
        self.remove_from_indexes(&mut writes, std::slice::from_ref(&id.to_owned()));
        Ok(existed)
    }

    /// Deletes every item, training-only example and the registration of `label` from the
    /// store in one transaction, and its items from every generation's index. Blocking.
    pub fn delete_class(&self, store: &Store, label: &str) -> Result<ClassDeletion, WriteError> {
        let mut writes = self.lock_writes();
        let deletion = store.delete_class(label)?;
        self.remove_from_indexes(&mut writes, &deletion.item_ids);
        Ok(deletion)
    }

    /// Removes deleted items from the live index and the one being built (which re-reads them
    /// from the store before its swap). Called with the write lock held.
    fn remove_from_indexes(&self, writes: &mut WriteState, ids: &[String]) {
        if let Some(live) = self.live() {
            for id in ids {
                live.index.remove(id);
            }
        }
        if let Some(building) = writes.building.as_mut() {
            for id in ids {
                building.generation.index.remove(id);
            }
            building.touched.extend(ids.iter().cloned());
        }
    }
}
