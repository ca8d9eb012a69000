//! The live generation: one model and the index its embeddings built, swapped as a unit.
//!
//! A request takes the live generation once ([`Registry::live`]) and keeps that `Arc` until it
//! answers, so it embeds and searches with the same generation even if a newer one is
//! published meanwhile; the old generation is freed when its last request finishes.
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::embed::{Embedder, ModelInfo};
use crate::index::VectorIndex;

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
}

/// Holds the live generation; empty until start-up has loaded the model and the index.
#[derive(Default)]
pub struct Registry {
    live: ArcSwapOption<Generation>,
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

    /// Makes `generation` live atomically; requests already running keep the old one.
    pub fn publish(&self, generation: Generation) {
        self.live.store(Some(Arc::new(generation)));
    }
}
