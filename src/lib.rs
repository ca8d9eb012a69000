//! crossbatch — an embedding retrieval server that keeps learning.
//!
//! Data path of a search: [`api`] decodes and validates → [`registry`] hands out the live
//! generation (model + index) → its [`embed`] batcher embeds on the inference thread → its
//! [`index`] answers → [`api`] joins labels and metadata from [`store`].
//! Offline work (training, evaluation, dataset import) lives in [`train`], [`eval`], [`data`]
//! and is driven by the [`cli`].

pub mod api;
pub mod classify;
pub mod cli;
pub mod config;
pub mod data;
pub mod embed;
pub mod eval;
pub mod index;
pub mod metrics;
pub mod model;
pub mod panic;
pub mod registry;
pub mod server;
pub mod store;
pub mod train;
