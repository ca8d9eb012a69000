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
//!
//! Each generation also knows which labels of its class head no stored example has any more
//! ([`Generation::withdrawn_labels`]): a class deleted since the head was trained.
//! Classification leaves them out at once, as the trainer drops them from the head it trains;
//! the set is computed before a generation goes live and kept exact by the write paths (under
//! the write lock) while it is live.

pub mod builder;
pub mod publisher;
pub mod retention;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::{ArcSwap, ArcSwapOption};

pub use builder::{BuildContext, BuildError, BuildProgress, SwapReport};
pub use publisher::{BuildOrigin, BuildReservation, LastBuild, Publisher};

use crate::classify::{HeadSnapshot, ServedHead};
use crate::embed::preprocess::values_from_raw;
use crate::embed::{EmbedError, Embedder, ModelInfo};
use crate::index::{indexable_norm, IndexError, VectorIndex};
use crate::model::spec::InputSpec;
use crate::store::{
    ClassDeletion, ClassExample, ClassRegistration, InputKind, NewItem, Store, StoreError,
};

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
    /// Labels of `head` that no stored example has any more (a class deleted since the head
    /// was trained): classification leaves them out. Set when the generation goes live and
    /// kept exact by the write paths while it is live.
    withdrawn: ArcSwap<HashSet<String>>,
}

impl Generation {
    /// A generation not yet live (no head label withdrawn).
    pub fn new(
        version: u64,
        info: ModelInfo,
        embedder: Embedder,
        index: Arc<VectorIndex>,
        head: Option<Arc<ServedHead>>,
    ) -> Generation {
        Generation {
            version,
            info,
            embedder,
            index,
            head,
            withdrawn: ArcSwap::default(),
        }
    }

    /// Labels the class head knows but no stored item or training-only example has any more:
    /// classification leaves them out.
    pub fn withdrawn_labels(&self) -> Arc<HashSet<String>> {
        self.withdrawn.load_full()
    }

    /// Whether the head knows any label: only then do writes track withdrawn labels.
    fn head_has_labels(&self) -> bool {
        self.head
            .as_ref()
            .is_some_and(|h| !h.snapshot.labels.is_empty())
    }

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

/// Computes which labels of `generation`'s head no stored example has, before it goes live
/// (with the write lock held, so no write changes the answer meanwhile). A store that cannot
/// answer leaves the set empty (the head then names every class it knows) and is logged.
fn set_withdrawn(store: &Store, generation: &Generation) {
    if !generation.head_has_labels() {
        return;
    }
    let labels = generation
        .head
        .iter()
        .flat_map(|h| h.snapshot.labels.iter().map(String::as_str));
    match store.labels_without_examples(labels) {
        Ok(withdrawn) => generation.withdrawn.store(Arc::new(withdrawn)),
        Err(e) => tracing::warn!(
            version = generation.version,
            "cannot tell which head classes were deleted; the head serves all of them: {e}"
        ),
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
    /// An input the request's generation took does not suit the generation swapped in
    /// meanwhile (a tensor of another shape); nothing was written.
    #[error("item {id}: the live model, swapped in meanwhile, cannot take it: {message}")]
    Input {
        /// Item id.
        id: String,
        /// Whether the input is an image (else a tensor).
        image: bool,
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
    pub fn publish_initial(&self, store: &Store, generation: Generation) {
        let _writes = self.lock_writes();
        set_withdrawn(store, &generation);
        self.live.store(Some(Arc::new(generation)));
    }

    /// Labels among `changed` (whose examples a committed write added, deleted or
    /// re-labelled) that the live head knows: the store's answer says whether each is now
    /// withdrawn. Call with the write lock held, after the commit; a failed lookup is logged
    /// and leaves the set as it was (the write itself is durable).
    fn recheck_labels(&self, store: &Store, changed: HashSet<String>) {
        let Some(live) = self.live() else {
            return;
        };
        let known: Vec<&str> = live
            .head
            .iter()
            .flat_map(|h| h.snapshot.labels.iter().map(String::as_str))
            .filter(|label| changed.contains(*label))
            .collect();
        if known.is_empty() {
            return;
        }
        match store.labels_without_examples(known.iter().copied()) {
            Ok(without) => {
                let current = live.withdrawn.load();
                let mut next: HashSet<String> = current
                    .iter()
                    .filter(|label| !known.contains(&label.as_str()))
                    .cloned()
                    .collect();
                next.extend(without);
                if next != **current {
                    live.withdrawn.store(Arc::new(next));
                }
            }
            Err(e) => tracing::warn!("cannot tell whether a head class lost its examples: {e}"),
        }
    }

    /// Whether the live head knows any label: only then do writes track withdrawn labels.
    fn live_head_has_labels(&self) -> bool {
        self.live().is_some_and(|g| g.head_has_labels())
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
                            image: item.input_kind == InputKind::Image,
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
        // Labels the write takes examples from (re-labelled items) or gives examples to.
        let tracks_labels = self.live_head_has_labels();
        let mut changed = if tracks_labels {
            let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
            store.item_labels(&ids)?
        } else {
            HashSet::new()
        };
        store.upsert_items_registering(&items, class)?;
        // Committed: a build in progress re-reads these ids before its swap, whatever
        // happens to the live index below.
        if let Some(building) = writes.building.as_mut() {
            building.touched.extend(items.iter().map(|i| i.id.clone()));
        }
        if tracks_labels {
            changed.extend(items.iter().filter_map(|i| i.label.clone()));
            self.recheck_labels(store, changed);
        }
        let batch: Vec<_> = items
            .iter()
            .map(|i| (i.id.as_str(), i.label.as_deref(), i.embedding.as_slice()))
            .collect();
        live.index.upsert_batch(&batch)?;
        Ok(live.version)
    }

    /// Deletes an item from the store and from every generation's index; returns whether it
    /// existed. Blocking.
    pub fn delete_item(&self, store: &Store, id: &str) -> Result<bool, WriteError> {
        let mut writes = self.lock_writes();
        let labels = if self.live_head_has_labels() {
            store.item_labels(&[id])?
        } else {
            HashSet::new()
        };
        let existed = store.delete_item(id)?;
        self.remove_from_indexes(&mut writes, std::slice::from_ref(&id.to_owned()));
        self.recheck_labels(store, labels);
        Ok(existed)
    }

    /// Deletes every item, training-only example and the registration of `label` from the
    /// store in one transaction, and its items from every generation's index. Blocking.
    pub fn delete_class(&self, store: &Store, label: &str) -> Result<ClassDeletion, WriteError> {
        let mut writes = self.lock_writes();
        let deletion = store.delete_class(label)?;
        self.remove_from_indexes(&mut writes, &deletion.item_ids);
        self.recheck_labels(store, HashSet::from([label.to_owned()]));
        Ok(deletion)
    }

    /// Registers `class` and stores its training-only `examples` in one transaction
    /// ([`Store::add_class`]); a withdrawn label is served again. Blocking.
    pub fn add_training_examples(
        &self,
        store: &Store,
        class: &ClassRegistration,
        examples: &[ClassExample],
    ) -> Result<(), WriteError> {
        let _writes = self.lock_writes();
        store.add_class(class, examples)?;
        self.recheck_labels(store, HashSet::from([class.label.clone()]));
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::embed::BatchingLimits;
    use crate::index::IndexParams;
    use crate::metrics::Metrics;

    /// The default model's generation with a class head of `labels`, over an empty index.
    fn generation(labels: &[&str]) -> Generation {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let limits = BatchingLimits {
            max_batch: 4,
            max_wait: Duration::from_millis(1),
            queue_capacity: 16,
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let (embedder, info) = Embedder::start(&dir, "cpu", limits, metrics).unwrap();
        let dim = info.spec.embedding_dim;
        let snapshot = HeadSnapshot {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            scale: 16.0,
            proxies: labels.iter().map(|_| vec![1.0; dim]).collect(),
            low_fidelity_input: None,
        };
        let head = ServedHead::new(snapshot, &info.spec.input).unwrap();
        let params = IndexParams {
            m: 8,
            ef_construction: 32,
            ef_search: 16,
            max_elements: 64,
        };
        let index = Arc::new(VectorIndex::new(dim, params));
        Generation::new(1, info, embedder, index, Some(Arc::new(head)))
    }

    fn item(id: &str, label: &str, dim: usize) -> NewItem {
        NewItem {
            id: id.into(),
            label: Some(label.into()),
            metadata: json!({}),
            input: vec![0; 4],
            input_kind: InputKind::Tensor { shape: vec![4] },
            embedding: vec![1.0; dim],
            model_version: 1,
        }
    }

    fn example(id: &str) -> ClassExample {
        ClassExample {
            id: id.into(),
            input: vec![0; 4],
            input_kind: InputKind::Tensor { shape: vec![4] },
        }
    }

    fn class(label: &str) -> ClassRegistration {
        ClassRegistration {
            label: label.into(),
            expected_generation: None,
            now_unix: 0,
        }
    }

    /// The head's labels that `GET /v1/classes` counts no example for, computed apart from
    /// the registry's bookkeeping.
    fn head_labels_without_examples(store: &Store, head: &[&str]) -> HashSet<String> {
        let with_examples: HashSet<String> = store
            .classes()
            .unwrap()
            .into_iter()
            .filter(|c| c.indexed + c.training_only > 0)
            .map(|c| c.label)
            .collect();
        head.iter()
            .filter(|l| !with_examples.contains(**l))
            .map(|l| l.to_string())
            .collect()
    }

    #[test]
    fn a_build_reservation_holds_the_publisher_until_started_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = Arc::new(Registry::new());
        let live = generation(&[]);
        let context = BuildContext {
            store: store.clone(),
            metrics: Arc::new(Metrics::new().unwrap()),
            limits: BatchingLimits {
                max_batch: 4,
                max_wait: Duration::from_millis(1),
                queue_capacity: 16,
            },
            device: "cpu".into(),
            index: live.index.params().clone(),
            reembed_rate: 0.0,
        };
        registry.publish_initial(&store, live);
        let publisher = Publisher::new(registry, context);
        let trainer = BuildOrigin::Trainer {
            activations_seen: 0,
        };
        let reservation = publisher.reserve(2, trainer).unwrap();
        assert!(publisher.is_busy());
        assert!(matches!(
            publisher.reserve(3, BuildOrigin::Activation),
            Err(BuildError::Busy(2))
        ));
        drop(reservation);
        assert!(!publisher.is_busy(), "an unstarted reservation releases");
        // Weights that predate an activation are refused before anything is reserved.
        let stale = BuildOrigin::Trainer {
            activations_seen: 1,
        };
        assert!(matches!(
            publisher.reserve(2, stale),
            Err(BuildError::Superseded { live: 1 })
        ));
        assert!(!publisher.is_busy());
    }

    #[test]
    fn withdrawn_labels_follow_every_write_that_gives_or_takes_a_class_its_examples() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let head = ["a", "b", "c", "d"];
        let live = generation(&head);
        let dim = live.info.spec.embedding_dim;
        let registry = Registry::new();
        store
            .upsert_items(&[item("a1", "a", dim), item("b1", "b", dim)])
            .unwrap();
        store.add_class(&class("c"), &[example("c1")]).unwrap();
        registry.publish_initial(&store, live);
        let live = registry.live().unwrap();
        let check = |step: &str, expected: &[&str]| {
            let withdrawn = registry.live().unwrap().withdrawn_labels();
            let expected: HashSet<String> = expected.iter().map(|l| l.to_string()).collect();
            assert_eq!(*withdrawn, expected, "after {step}");
            assert_eq!(
                *withdrawn,
                head_labels_without_examples(&store, &head),
                "after {step}"
            );
        };
        check("start-up: d has no example", &["d"]);
        registry.delete_class(&store, "a").unwrap();
        check("deleting class a", &["a", "d"]);
        registry
            .write_items(&store, &live, vec![item("b1", "e", dim)], None)
            .unwrap();
        check("re-labelling b's only item", &["a", "b", "d"]);
        registry
            .add_training_examples(&store, &class("a"), &[example("a2")])
            .unwrap();
        check("a training-only example of a", &["b", "d"]);
        registry
            .write_items(&store, &live, vec![item("d1", "d", dim)], None)
            .unwrap();
        check("an item of d", &["b"]);
        assert!(registry.delete_item(&store, "d1").unwrap());
        check("deleting d's only item", &["b", "d"]);
        registry.delete_class(&store, "c").unwrap();
        check("deleting the training-only class c", &["b", "c", "d"]);
        // Labels the head does not know are never withdrawn.
        registry.delete_class(&store, "e").unwrap();
        check("deleting e, unknown to the head", &["b", "c", "d"]);
    }
}
