//! Metric learning: P×K sampling, augmentation, pair losses and the training loop.

pub mod augment;
pub mod class_head;
pub mod focus;
pub mod incremental;
pub mod leo;
pub mod loss;
pub mod memory;
pub mod objective;
pub mod offline;
pub mod online;
pub mod pool;
pub mod replay;
pub mod sampler;

/// Errors from training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Tensors or buffers with inconsistent shapes were passed in.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The configuration or data cannot be trained on.
    #[error("{0}")]
    Config(String),
    /// Loading or saving a model failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Writing `model.toml` failed.
    #[error(transparent)]
    Spec(#[from] crate::model::spec::SpecError),
    /// The store failed while the trainer read examples or classes.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A step's loss was NaN or infinite; the step was skipped and nothing changed.
    #[error("the loss is {loss} at step {step}; the step was skipped")]
    NonFiniteLoss {
        /// The loss value.
        loss: f64,
        /// The step it would have been.
        step: usize,
    },
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A step panicked (some tch operations report errors by panicking, such as running out
    /// of GPU memory); what it left half updated cannot be trusted.
    #[error("panicked: {0}")]
    Panicked(String),
}
