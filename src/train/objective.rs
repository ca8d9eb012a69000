//! What a trainer optimises — pair loss and XBM memory — as one settings block shared by
//! `crossbatch train` (flags) and the online trainer (`[trainer]` in the config file).
use serde::{Deserialize, Serialize};

use super::loss::{MultiSimilarity, PairLoss, DEFAULT_MARGIN};
use super::offline::{MemorySettings, NormMode, NormSettings, Trainer};
use super::TrainError;

/// The pair loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Contrastive loss on cosine similarity (margin `--margin`).
    Contrastive,
    /// Multi-similarity loss (λ 0.5, ε 0.1, α 2, β 40).
    MultiSimilarity,
}

/// Most rows of the XBM memory: 2^24 rows of a 128-d fp32 embedding are 8 GiB, beyond any
/// useful memory (the paper's largest is 65,536).
pub const MAX_MEMORY_ROWS: usize = 1 << 24;

/// Loss and cross-batch memory settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// Pair loss (multi-similarity by default, as the online trainer: with an XBM memory the
    /// contrastive loss can collapse the embedding; README, "Cross-batch memory").
    #[arg(long, value_enum, default_value = "multi-similarity")]
    pub loss: LossKind,
    /// Margin of the contrastive loss on cosine similarity.
    #[arg(long, default_value_t = DEFAULT_MARGIN)]
    pub margin: f64,
    /// XBM memory rows (past embeddings); 0 turns XBM off.
    #[arg(long, default_value_t = 0)]
    pub memory_size: usize,
    /// Warm-up steps before the memory is filled and used (embeddings drift fast early on).
    #[arg(long, default_value_t = 0)]
    pub memory_start: usize,
    /// Weight of the batch-vs-memory loss term.
    #[arg(long, default_value_t = 1.0)]
    pub memory_weight: f64,
    /// Ignore memory rows older than this many steps (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub memory_max_age: u64,
    /// GradCache chunk size: batches larger than this are embedded in chunks at constant
    /// memory with identical gradients (0 = off; needs `--norm frozen`).
    #[arg(long, default_value_t = 0)]
    pub gradcache_chunk: usize,
    /// BatchNorm while training: `bn` (batch statistics), `cbn` (Cross-Iteration BatchNorm),
    /// `naive` (cross-iteration averaging without compensation) or `frozen` (the model's
    /// running statistics).
    #[arg(long, value_enum, default_value = "bn")]
    pub norm: NormMode,
    /// Iterations pooled by `cbn`/`naive`, the current one included.
    #[arg(long, default_value_t = 4)]
    pub cbn_window: usize,
    /// Steps of plain BatchNorm before `cbn`/`naive` start pooling.
    #[arg(long, default_value_t = 0)]
    pub cbn_burnin: usize,
}

impl Objective {
    /// The pair loss these settings select.
    pub fn pair_loss(&self) -> PairLoss {
        match self.loss {
            LossKind::Contrastive => PairLoss::Contrastive {
                margin: self.margin,
            },
            LossKind::MultiSimilarity => PairLoss::MultiSimilarity(MultiSimilarity::default()),
        }
    }

    /// Settings that could never train, named by their config keys (`crossbatch train` names
    /// its flags when the trainer refuses them).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.margin.is_finite() && self.memory_weight.is_finite() && self.memory_weight >= 0.0)
        {
            return Err("margin must be finite and memory_weight finite and at least 0".into());
        }
        if self.memory_size > MAX_MEMORY_ROWS {
            return Err(format!(
                "memory_size must be at most {MAX_MEMORY_ROWS} rows (0 = off)"
            ));
        }
        if self.gradcache_chunk > 0 && self.norm != NormMode::Frozen {
            return Err(
                "gradcache_chunk needs norm = \"frozen\" (batch statistics would differ per \
                 chunk)"
                    .into(),
            );
        }
        if self.norm.pools_across_iterations() && self.cbn_window == 0 {
            return Err("cbn_window must be at least 1".into());
        }
        Ok(())
    }

    /// Applies memory, BatchNorm and GradCache settings to a trainer.
    pub fn apply(&self, trainer: &mut Trainer) -> Result<(), TrainError> {
        trainer.set_memory(self.memory());
        trainer.set_norm(NormSettings {
            mode: self.norm,
            window: self.cbn_window,
            burnin: self.cbn_burnin,
        })?;
        trainer.set_gradcache(self.gradcache_chunk)
    }

    /// The XBM settings.
    pub fn memory(&self) -> MemorySettings {
        MemorySettings {
            size: self.memory_size,
            start_step: self.memory_start,
            weight: self.memory_weight,
            max_age: (self.memory_max_age > 0).then_some(self.memory_max_age),
        }
    }
}
