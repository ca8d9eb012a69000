//! Embedding backend: preprocessing and the batching inference thread.

pub mod batcher;
pub mod preprocess;

pub use batcher::{BatchingLimits, EmbedError, Embedder, ModelInfo};
