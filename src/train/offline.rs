//! Offline training of the built-in network: P×K batches, augmentation, contrastive loss,
//! Adam with warm-up + cosine decay.
//!
//! [`Trainer`] holds the network and optimiser and performs one step on a prepared
//! [`Batch`]; [`TrainData`] + [`train`] drive it over a dataset. An online trainer can reuse
//! [`Trainer`] with its own batches (and, later, a memory term).
use std::cell::RefCell;
use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::augment::Augment;
use super::loss::{pair_stats, PairLoss, PairSide, PairStats};
use super::memory::CrossBatchMemory;
use super::sampler::PkSampler;
use super::TrainError;
use crate::model::builtin::{l2_normalize, ResNetSmall};
use crate::model::check_builtin_spec;
use crate::model::cross_iteration_norm::CrossIterationSettings;
use crate::model::spec::{ModelFormat, ModelSpec};

/// Name of the weights file written by the trainer.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// One training batch on any device.
#[derive(Debug)]
pub struct Batch {
    /// Preprocessed (and augmented) inputs `[B, C, H, W]` f32.
    pub inputs: Tensor,
    /// Class index per example `[B]` i64.
    pub labels: Tensor,
    /// Example id per example `[B]` i64 (globally unique per underlying example).
    pub ids: Tensor,
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Step number (1-based) after this step.
    pub step: usize,
    /// Loss value.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Positive pairs in the batch.
    pub positives: i64,
    /// Negatives above the margin in the batch.
    pub active_negatives: i64,
    /// Mean cosine similarity of positive pairs.
    pub mean_positive: f64,
    /// Mean cosine similarity of negative pairs.
    pub mean_negative: f64,
    /// Memory rows the batch was paired with (0 before XBM starts or without memory).
    pub memory_rows: usize,
}

/// An additional loss term on a batch's `(embeddings, labels)`, see [`Trainer::step_with`].
pub type ExtraLossFn<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Tensor, TrainError> + 'a;

/// A borrowed [`ExtraLossFn`].
pub type ExtraLoss<'a> = &'a mut ExtraLossFn<'a>;

/// XBM settings of a trainer (see [`super::memory`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemorySettings {
    /// Rows in the ring buffer; 0 turns XBM off.
    pub size: usize,
    /// Steps of warm-up before the memory is filled and used.
    pub start_step: usize,
    /// Weight of the batch-vs-memory loss term.
    pub weight: f64,
    /// Memory rows older than this many steps are ignored (`None`: no limit).
    pub max_age: Option<u64>,
}

impl MemorySettings {
    /// No cross-batch memory.
    pub fn off() -> MemorySettings {
        MemorySettings {
            size: 0,
            start_step: 0,
            weight: 1.0,
            max_age: None,
        }
    }
}

/// The network a trainer optimises.
enum Network {
    /// The built-in CNN (already L2-normalised).
    Builtin(Box<ResNetSmall>),
    /// A TorchScript module with trainable parameters; its train/eval mode is switched per
    /// call, hence the `RefCell` (a trainer lives on one thread).
    Script(RefCell<tch::TrainableCModule>),
}

impl Network {
    /// L2-normalised embeddings, in training (`train`) or evaluation mode.
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        match self {
            Network::Builtin(net) => Ok(net.forward_t(xs, train)?),
            Network::Script(module) => {
                let mut module = module.borrow_mut();
                if train {
                    module.f_set_train()?;
                } else {
                    module.f_set_eval()?;
                }
                Ok(l2_normalize(&module.forward_ts(&[xs])?)?)
            }
        }
    }
}

/// What [`Trainer::compute_gradients`] computed besides the gradients.
struct Gradients {
    /// The batch's loss.
    loss: f64,
    /// The batch's embeddings, detached.
    embeddings: Tensor,
    /// Memory rows the loss used.
    memory_rows: usize,
    /// The batch's pairs (batch against itself).
    pairs: PairStats,
}

/// The network, its weights and the optimiser.
pub struct Trainer {
    vs: nn::VarStore,
    net: Network,
    opt: nn::Optimizer,
    spec: ModelSpec,
    loss: PairLoss,
    memory: Option<CrossBatchMemory>,
    memory_settings: MemorySettings,
    gradcache_chunk: usize,
    norm: NormSettings,
    steps_done: usize,
    /// Each BatchNorm running statistic of the built-in network with a buffer of its value
    /// before the current step: a training-mode forward updates them in place, and a skipped
    /// step puts them back. Found once; the VarStore's tensors are updated in place.
    running_statistics: Vec<(Tensor, Tensor)>,
}

/// How BatchNorm layers behave while training.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum NormMode {
    /// Statistics of the current batch (plain BatchNorm); running averages are updated.
    #[value(name = "bn")]
    #[serde(rename = "bn")]
    Batch,
    /// Cross-Iteration BatchNorm: statistics of the last `window` iterations, compensated to
    /// the current weights (builtin network only; module `model::cross_iteration_norm`).
    #[value(name = "cbn")]
    #[serde(rename = "cbn")]
    CrossIteration,
    /// Cross-iteration averaging without compensation (the ablation of CBN).
    Naive,
    /// The running statistics of the loaded model, not updated (affine parameters still
    /// train). Suits GradCache and fine-tuning with small batches.
    Frozen,
}

impl NormMode {
    /// Whether the network runs in training mode (statistics from data, not the running ones).
    fn uses_batch_statistics(self) -> bool {
        self != NormMode::Frozen
    }

    /// Whether statistics are pooled over recent iterations (`cbn` and `naive`).
    pub fn pools_across_iterations(self) -> bool {
        matches!(self, NormMode::CrossIteration | NormMode::Naive)
    }
}

/// BatchNorm settings of a trainer: the mode and, for the cross-iteration modes, the window
/// and burn-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormSettings {
    /// How BatchNorm layers behave while training.
    pub mode: NormMode,
    /// Iterations pooled by the cross-iteration modes, the current one included.
    pub window: usize,
    /// Steps of plain BatchNorm before the cross-iteration modes start pooling.
    pub burnin: usize,
}

impl NormSettings {
    /// Plain BatchNorm.
    pub fn batch() -> NormSettings {
        NormSettings {
            mode: NormMode::Batch,
            window: 1,
            burnin: 0,
        }
    }

    /// The cross-iteration layer settings of this mode (`None` unless `cbn` or `naive`).
    fn cross_iteration(&self) -> Option<CrossIterationSettings> {
        let compensate = match self.mode {
            NormMode::CrossIteration => true,
            NormMode::Naive => false,
            NormMode::Batch | NormMode::Frozen => return None,
        };
        Some(CrossIterationSettings {
            window: self.window,
            burnin: self.burnin,
            compensate,
        })
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("spec", &self.spec)
            .field("loss", &self.loss)
            .field("memory", &self.memory_settings)
            .field("steps_done", &self.steps_done)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl Trainer {
    /// Gives this trainer `other`'s weights and BatchNorm statistics, so that twins built in a
    /// test do not depend on libtorch's global generator (other tests draw from it in
    /// parallel).
    pub(crate) fn copy_weights_from(&mut self, other: &Trainer) {
        self.vs
            .copy(&other.vs)
            .expect("the twins have the same architecture");
    }
}

impl Trainer {
    /// A freshly initialised builtin network for `spec` (weights seeded by `tch::manual_seed`).
    pub fn new(
        spec: ModelSpec,
        device: Device,
        lr: f64,
        loss: PairLoss,
    ) -> Result<Self, TrainError> {
        if spec.format != ModelFormat::Builtin {
            return Err(TrainError::Config(
                "only builtin models can be trained".into(),
            ));
        }
        check_builtin_spec(&spec)?;
        // Refused before training, not when the trained model is loaded.
        spec.validate().map_err(TrainError::Config)?;
        let vs = nn::VarStore::new(device);
        let net = Network::Builtin(Box::new(ResNetSmall::from_spec(&vs.root(), &spec)));
        Trainer::assemble(vs, net, spec, lr, loss)
    }

    fn assemble(
        vs: nn::VarStore,
        net: Network,
        spec: ModelSpec,
        lr: f64,
        loss: PairLoss,
    ) -> Result<Self, TrainError> {
        let opt = nn::Adam::default().build(&vs, lr)?;
        let mut running_statistics = Vec::new();
        for (name, variable) in vs.variables() {
            if name.contains("running_") {
                let saved = variable.f_detach_copy()?;
                running_statistics.push((variable, saved));
            }
        }
        Ok(Trainer {
            vs,
            net,
            opt,
            spec,
            loss,
            memory: None,
            memory_settings: MemorySettings::off(),
            gradcache_chunk: 0,
            norm: NormSettings::batch(),
            steps_done: 0,
            running_statistics,
        })
    }

    /// Continues from the model in `dir` (fine-tuning): a builtin network, or a TorchScript
    /// module whose parameters become trainable (`tch::TrainableCModule`).
    pub fn from_dir(
        dir: &Path,
        device: Device,
        lr: f64,
        loss: PairLoss,
    ) -> Result<Self, TrainError> {
        let spec = ModelSpec::load(dir)?;
        let weights = dir.join(&spec.weights);
        if spec.format == ModelFormat::Torchscript {
            let vs = nn::VarStore::new(device);
            let module = tch::TrainableCModule::load(&weights, vs.root())?;
            let net = Network::Script(RefCell::new(module));
            return Trainer::assemble(vs, net, spec, lr, loss);
        }
        let mut trainer = Trainer::new(spec, device, lr, loss)?;
        crate::model::load_builtin_weights(&mut trainer.vs, &weights)?;
        Ok(trainer)
    }

    /// Enables (or, with size 0, disables) the XBM cross-batch memory.
    pub fn set_memory(&mut self, settings: MemorySettings) {
        self.memory = (settings.size > 0)
            .then(|| CrossBatchMemory::new(settings.size, self.spec.embedding_dim, self.device()));
        self.memory_settings = settings;
    }

    /// Empties the cross-batch memory (for when its labels no longer mean what they did); it
    /// refills from the next step on.
    pub fn clear_memory(&mut self) {
        self.set_memory(self.memory_settings);
    }

    /// Rows currently filled in the cross-batch memory (0 without one).
    pub fn memory_fill(&self) -> usize {
        self.memory.as_ref().map_or(0, CrossBatchMemory::len)
    }

    /// The model description the trainer writes.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Sets the model name written by [`Trainer::save`].
    pub fn set_name(&mut self, name: &str) {
        self.spec.name = name.to_string();
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    #[cfg(test)]
    /// Copies of every variable of the network, by name (for tests).
    pub fn variables(&self) -> Result<std::collections::HashMap<String, Tensor>, TrainError> {
        tch::no_grad(|| {
            self.vs
                .variables()
                .into_iter()
                .map(|(name, t)| Ok((name, t.f_detach_copy()?)))
                .collect()
        })
    }

    /// Whether every weight the trainer holds is finite, and every BatchNorm statistic of the
    /// built-in network (`tch` exposes no buffers of a TorchScript module).
    pub fn weights_finite(&self) -> Result<bool, TrainError> {
        for variable in self.vs.variables().values() {
            if variable.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// Sets the optimiser's learning rate for the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.opt.set_lr(lr);
    }

    /// Embeds in eval mode without gradients; returns `[N, D]` on the CPU.
    pub fn embed_eval(&self, inputs: &Tensor) -> Result<Tensor, TrainError> {
        tch::no_grad(|| {
            let xs = inputs.f_to_device(self.device())?.f_to_kind(Kind::Float)?;
            Ok(self.net.forward(&xs, false)?.f_to_device(Device::Cpu)?)
        })
    }

    /// One optimisation step with `lr`: pair loss of the batch against itself, plus (once
    /// XBM has started) `weight ×` the pair loss against a memory snapshot taken before the
    /// batch is enqueued. With GradCache on and a batch larger than a chunk, the same
    /// gradients are computed chunk by chunk ([`Trainer::set_gradcache`]).
    pub fn step(&mut self, batch: &Batch, lr: f64) -> Result<StepStats, TrainError> {
        self.step_with(batch, lr, None)
    }

    /// [`Trainer::step`] with `extra(embeddings, labels)` added to the loss (e.g. a class
    /// head's cross-entropy): its gradients reach the network and whatever else it depends on;
    /// stepping those other parameters is the caller's business.
    pub fn step_with(
        &mut self,
        batch: &Batch,
        lr: f64,
        extra: Option<ExtraLoss<'_>>,
    ) -> Result<StepStats, TrainError> {
        let device = self.device();
        let labels = batch.labels.f_to_device(device)?;
        let ids = batch.ids.f_to_device(device)?;
        let computed = self.compute_gradients(batch, &labels, &ids, extra)?;
        self.opt.set_lr(lr);
        self.opt.step();
        self.steps_done += 1;
        let pairs = computed.pairs;
        Ok(StepStats {
            step: self.steps_done,
            loss: computed.loss,
            lr,
            positives: pairs.positives,
            active_negatives: pairs.active_negatives,
            mean_positive: pairs.mean_positive,
            mean_negative: pairs.mean_negative,
            memory_rows: computed.memory_rows,
        })
    }

    /// Zeroes the parameter gradients and fills them with the gradients of the batch's loss;
    /// enqueues the batch into the memory. A step that fails, or whose loss is not finite,
    /// changes nothing: the forward pass moved the BatchNorm running statistics and the
    /// cross-iteration windows, which are put back, the gradients are zeroed (the optimiser
    /// would write them into the weights), and the memory is left as it was.
    fn compute_gradients(
        &mut self,
        batch: &Batch,
        labels: &Tensor,
        ids: &Tensor,
        extra: Option<ExtraLoss<'_>>,
    ) -> Result<Gradients, TrainError> {
        self.opt.zero_grad();
        let train = self.norm.mode.uses_batch_statistics();
        if train {
            self.save_running_statistics()?;
        }
        let attempt = self
            .backward(batch, labels, ids, extra, train)
            .and_then(|computed| {
                if computed.loss.is_finite() {
                    Ok(computed)
                } else {
                    Err(TrainError::NonFiniteLoss {
                        loss: computed.loss,
                        step: self.steps_done + 1,
                    })
                }
            });
        let computed = match attempt {
            Ok(computed) => computed,
            Err(e) => {
                if train {
                    self.restore_running_statistics()?;
                    if let Network::Builtin(net) = &self.net {
                        net.settle_cross_iteration_forward(false);
                    }
                }
                self.opt.zero_grad();
                return Err(e);
            }
        };
        if let Network::Builtin(net) = &self.net {
            net.settle_cross_iteration_forward(true);
        }
        if let Some(memory) = self
            .memory
            .as_mut()
            .filter(|_| self.steps_done >= self.memory_settings.start_step)
        {
            memory.enqueue(&computed.embeddings, labels, ids, self.steps_done as u64)?;
        }
        Ok(computed)
    }

    /// The forward and backward passes of [`Trainer::compute_gradients`], whole or chunk by
    /// chunk (GradCache), with the batch's pair statistics; changes nothing but the network's
    /// statistics and the gradients.
    fn backward(
        &self,
        batch: &Batch,
        labels: &Tensor,
        ids: &Tensor,
        mut extra: Option<ExtraLoss<'_>>,
        train: bool,
    ) -> Result<Gradients, TrainError> {
        let inputs = batch
            .inputs
            .f_to_device(self.device())?
            .f_to_kind(Kind::Float)?;
        let n = inputs.size().first().copied().unwrap_or(0);
        let chunk = self.gradcache_chunk as i64;
        let (loss, embeddings, memory_rows) = if chunk == 0 || n <= chunk {
            let emb = self.net.forward(&inputs, train)?;
            let (loss, rows) = self.objective(&emb, labels, ids, extra.as_deref_mut())?;
            loss.f_backward()?;
            (loss, emb.f_detach()?, rows)
        } else {
            // GradCache: 1. representations of every chunk without a graph; 2. the full loss
            // on them (batch and memory terms) and its gradient with respect to them; 3. each
            // chunk again with a graph, back-propagating the cached gradient through the
            // surrogate Σ emb ⊙ grad. Inputs are augmented once, before both passes, and the
            // networks have no dropout, so both passes see identical computations.
            let chunks = inputs.f_split(chunk, 0)?;
            let reps = tch::no_grad(|| -> Result<Tensor, TrainError> {
                let parts = chunks
                    .iter()
                    .map(|c| self.net.forward(c, train))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Tensor::f_cat(&parts, 0)?)
            })?
            .f_detach()?
            .set_requires_grad(true);
            let (loss, rows) = self.objective(&reps, labels, ids, extra)?;
            loss.f_backward()?;
            let cached = reps.grad();
            let mut offset = 0;
            for c in &chunks {
                let len = c.size()[0];
                let emb = self.net.forward(c, train)?;
                let surrogate = emb
                    .f_mul(&cached.f_narrow(0, offset, len)?)?
                    .f_sum(Kind::Float)?;
                surrogate.f_backward()?;
                offset += len;
            }
            (loss, reps.f_detach()?, rows)
        };
        let own = PairSide::new(&embeddings, labels, ids);
        let pairs = pair_stats(own, own, self.loss.negative_margin())?;
        Ok(Gradients {
            loss: loss.f_double_value(&[])?,
            embeddings,
            memory_rows,
            pairs,
        })
    }

    /// The loss of embeddings `emb`: batch against batch, plus (once XBM has started)
    /// `weight ×` batch against a memory snapshot. Returns it with the memory rows used.
    fn objective(
        &self,
        emb: &Tensor,
        labels: &Tensor,
        ids: &Tensor,
        extra: Option<&mut ExtraLossFn<'_>>,
    ) -> Result<(Tensor, usize), TrainError> {
        let batch = PairSide::new(emb, labels, ids);
        let mut loss = self.loss.compute(batch, batch)?;
        if let Some(extra) = extra {
            loss = loss.f_add(&extra(emb, labels)?)?;
        }
        let settings = self.memory_settings;
        let Some(memory) = self
            .memory
            .as_ref()
            .filter(|_| self.steps_done >= settings.start_step)
        else {
            return Ok((loss, 0));
        };
        let Some(snapshot) = memory.snapshot(self.steps_done as u64, settings.max_age)? else {
            return Ok((loss, 0));
        };
        let rows = snapshot.labels.size()[0] as usize;
        let reference = PairSide::new(&snapshot.embeddings, &snapshot.labels, &snapshot.ids);
        let memory_loss = self
            .loss
            .compute(batch, reference)?
            .f_mul_scalar(settings.weight)?;
        Ok((loss.f_add(&memory_loss)?, rows))
    }

    /// Sets how BatchNorm layers behave while training. The cross-iteration modes need the
    /// builtin network and a window of at least one iteration; they start with an empty window.
    pub fn set_norm(&mut self, norm: NormSettings) -> Result<(), TrainError> {
        let cross_iteration = norm.cross_iteration();
        if cross_iteration.is_some() && norm.window == 0 {
            return Err(TrainError::Config("--cbn-window must be at least 1".into()));
        }
        self.check_gradcache(self.gradcache_chunk, norm.mode)?;
        match &self.net {
            Network::Builtin(net) => net.set_cross_iteration(cross_iteration),
            Network::Script(_) if cross_iteration.is_some() => {
                return Err(TrainError::Config(
                    "cross-iteration BatchNorm needs the builtin network".into(),
                ))
            }
            Network::Script(_) => {}
        }
        self.norm = norm;
        Ok(())
    }

    /// Sets GradCache's chunk size (0 = off).
    pub fn set_gradcache(&mut self, chunk: usize) -> Result<(), TrainError> {
        self.check_gradcache(chunk, self.norm.mode)?;
        self.gradcache_chunk = chunk;
        Ok(())
    }

    /// Keeps a copy of the BatchNorm running statistics before a training-mode forward.
    fn save_running_statistics(&self) -> Result<(), TrainError> {
        copy_each(
            self.running_statistics
                .iter()
                .map(|(live, saved)| (saved, live)),
        )
    }

    /// Puts back the running statistics saved by [`Trainer::save_running_statistics`].
    fn restore_running_statistics(&self) -> Result<(), TrainError> {
        copy_each(
            self.running_statistics
                .iter()
                .map(|(live, saved)| (live, saved)),
        )
    }

    /// GradCache needs statistics that do not depend on the chunk, and its first pass runs
    /// without a graph: only frozen statistics qualify (batch statistics differ per chunk;
    /// cross-iteration layers would record every chunk as an iteration).
    fn check_gradcache(&self, chunk: usize, mode: NormMode) -> Result<(), TrainError> {
        if chunk > 0 && mode != NormMode::Frozen {
            return Err(TrainError::Config(
                "GradCache needs BatchNorm statistics that do not depend on the chunk: use --norm frozen".into(),
            ));
        }
        Ok(())
    }

    /// Iterations held by the fullest cross-iteration BatchNorm window (0 without one).
    pub fn cross_iteration_records(&self) -> usize {
        match &self.net {
            Network::Builtin(net) => net.cross_iteration_records(),
            Network::Script(_) => 0,
        }
    }

    /// Writes `DIR/model.toml` and `DIR/<weights>`: safetensors for the builtin network, a
    /// TorchScript file (with the trained parameters) for TorchScript models.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let mut spec = self.spec.clone();
        match &self.net {
            Network::Builtin(_) => {
                if !spec.weights.ends_with(".safetensors") {
                    spec.weights = WEIGHTS_FILE.into();
                }
                spec.save(dir)?;
                self.vs.save(dir.join(&spec.weights))?;
            }
            Network::Script(module) => {
                spec.save(dir)?;
                module.borrow().save(dir.join(&spec.weights))?;
            }
        }
        Ok(())
    }
}

/// A dataset preprocessed for training: normalised CHW values and class indices.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// `n × C × H × W` values.
    pub values: Vec<f32>,
    /// Input shape `[C, H, W]`.
    pub shape: [usize; 3],
    /// Class index per example.
    pub classes: Vec<usize>,
    /// Class names, indexed by class index.
    pub class_names: Vec<String>,
}

impl TrainData {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Gathers the examples `indices` into one buffer.
    pub fn gather(&self, indices: &[usize]) -> Vec<f32> {
        let numel: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(indices.len() * numel);
        for &i in indices {
            out.extend_from_slice(&self.values[i * numel..(i + 1) * numel]);
        }
        out
    }
}

/// Settings of an offline training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Number of optimisation steps.
    pub steps: usize,
    /// Classes per batch (P).
    pub classes_per_batch: usize,
    /// Examples per class (K).
    pub per_class: usize,
    /// Peak learning rate (Adam).
    pub lr: f64,
    /// Fraction of the steps used for linear warm-up, then cosine decay to 0.
    pub warmup_fraction: f64,
    /// Seed of sampling, augmentation and weight initialisation.
    pub seed: u64,
    /// Augmentation.
    pub augment: Augment,
    /// Show a progress bar.
    pub progress: bool,
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up then cosine decay.
pub fn lr_at(step: usize, total: usize, peak: f64, warmup_fraction: f64) -> f64 {
    let total = total.max(1) as f64;
    let warmup = (warmup_fraction * total).max(1.0);
    let t = step as f64;
    if t < warmup {
        peak * (t + 1.0) / warmup
    } else {
        let progress = ((t - warmup) / (total - warmup).max(1.0)).min(1.0);
        peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Summary of a training run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainSummary {
    /// Steps taken.
    pub steps: usize,
    /// Mean loss over the first 10 % of the steps.
    pub first_loss: f64,
    /// Mean loss over the last 10 % of the steps.
    pub last_loss: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Trains `trainer` on `data` for `config.steps` P×K steps.
pub fn train(
    trainer: &mut Trainer,
    data: &TrainData,
    config: &TrainConfig,
) -> Result<TrainSummary, TrainError> {
    let spec_shape = trainer.spec().input.shape();
    if data.shape != spec_shape {
        return Err(TrainError::Shape(format!(
            "data shape {:?} differs from the model input {:?}",
            data.shape, spec_shape
        )));
    }
    let mut sampler = PkSampler::new(
        &data.classes,
        config.classes_per_batch,
        config.per_class,
        config.seed,
    )?;
    let mut aug_rng = StdRng::seed_from_u64(config.seed.wrapping_add(0x9e37_79b9));
    let [c, h, w] = data.shape.map(|d| d as i64);
    let started = std::time::Instant::now();
    let bar = if config.progress {
        let bar = ProgressBar::new(config.steps as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {per_sec}  eta {eta}  {msg}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let window = (config.steps / 10).max(1);
    let (mut first, mut last) = (Vec::new(), std::collections::VecDeque::new());
    let mut ema = None;
    for step in 0..config.steps {
        let indices = sampler.next_batch();
        let raw = data.gather(&indices);
        let augmented = config.augment.apply(&raw, data.shape, &mut aug_rng)?;
        let b = indices.len() as i64;
        let batch = Batch {
            inputs: Tensor::f_from_slice(&augmented)?.f_view([b, c, h, w])?,
            labels: Tensor::f_from_slice(
                &indices
                    .iter()
                    .map(|&i| data.classes[i] as i64)
                    .collect::<Vec<_>>(),
            )?,
            ids: Tensor::f_from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>())?,
        };
        let lr = lr_at(step, config.steps, config.lr, config.warmup_fraction);
        let stats = trainer.step(&batch, lr)?;
        if first.len() < window {
            first.push(stats.loss);
        }
        last.push_back(stats.loss);
        if last.len() > window {
            last.pop_front();
        }
        let smoothed = match ema {
            None => stats.loss,
            Some(e) => 0.95 * e + 0.05 * stats.loss,
        };
        ema = Some(smoothed);
        bar.set_message(format!(
            "loss {smoothed:.4}  s+ {:.2}  s- {:.2}  memory {}  lr {lr:.2e}",
            stats.mean_positive, stats.mean_negative, stats.memory_rows
        ));
        bar.inc(1);
        if step % 100 == 0 || step + 1 == config.steps {
            tracing::debug!(step = stats.step, loss = stats.loss, lr, "train step");
            if config.progress && !std::io::stderr().is_terminal() {
                // No progress bar without a terminal: log a line instead.
                eprintln!(
                    "step {}/{}  loss {smoothed:.4}  s+ {:.2}  s- {:.2}  memory rows {}  lr {lr:.2e}  {:.0} s",
                    stats.step,
                    config.steps,
                    stats.mean_positive,
                    stats.mean_negative,
                    stats.memory_rows,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    bar.finish();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(TrainSummary {
        steps: config.steps,
        first_loss: mean(&first),
        last_loss: mean(&last.into_iter().collect::<Vec<_>>()),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A toy model and dataset shared by the trainer tests of several modules.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::model::spec::InputSpec;

    /// A tiny builtin network: 8×8 gray input (mean 0, std 1), widths [4, 8], dimension 8.
    pub(crate) fn spec() -> ModelSpec {
        ModelSpec {
            name: "toy".into(),
            format: ModelFormat::Builtin,
            architecture: crate::model::builtin::ARCHITECTURE.into(),
            widths: vec![4, 8],
            input: InputSpec {
                channels: 1,
                height: 8,
                width: 8,
                mean: vec![0.0],
                std: vec![1.0],
            },
            embedding_dim: 8,
            weights: WEIGHTS_FILE.into(),
        }
    }

    /// Four classes: a bright 3×3 square in one of the four quadrants, plus noise.
    pub(crate) fn toy_data(n_per_class: usize, seed: u64) -> TrainData {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut values = Vec::new();
        let mut classes = Vec::new();
        for i in 0..4 * n_per_class {
            let class = i % 4;
            let (oy, ox) = [(0, 0), (0, 5), (5, 0), (5, 5)][class];
            let mut img = [0f32; 64];
            for v in img.iter_mut() {
                *v = rng.gen_range(-0.3..0.3);
            }
            for y in 0..3 {
                for x in 0..3 {
                    img[(oy + y) * 8 + ox + x] += 2.0;
                }
            }
            values.extend_from_slice(&img);
            classes.push(class);
        }
        TrainData {
            values,
            shape: [1, 8, 8],
            classes,
            class_names: (0..4).map(|c| c.to_string()).collect(),
        }
    }
}

/// Copies each `(target, source)` pair in place, outside autograd.
fn copy_each<'a>(pairs: impl Iterator<Item = (&'a Tensor, &'a Tensor)>) -> Result<(), TrainError> {
    tch::no_grad(|| {
        for (target, source) in pairs {
            target.shallow_clone().f_copy_(source)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::test_support::{spec, toy_data};
    use super::*;
    use crate::model::test_support::test_device;
    use crate::model::LoadedModel;

    const CONTRASTIVE: PairLoss = PairLoss::Contrastive { margin: 0.5 };

    fn config(steps: usize) -> TrainConfig {
        TrainConfig {
            steps,
            classes_per_batch: 4,
            per_class: 4,
            lr: 3e-3,
            warmup_fraction: 0.1,
            seed: 5,
            augment: Augment {
                max_shift: 0,
                flip: false,
                fill: vec![0.0],
            },
            progress: false,
        }
    }

    #[test]
    fn learning_rate_schedule() {
        assert!((lr_at(0, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!(lr_at(99, 100, 1.0, 0.1) < 0.001);
        assert!((lr_at(55, 100, 1.0, 0.1) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn training_reduces_loss_is_deterministic_and_saves_a_loadable_model() {
        let data = toy_data(12, 1);
        // Same initial weights (copied, so that other tests drawing from libtorch's global
        // generator in parallel cannot interfere), same seed → same run.
        tch::manual_seed(3);
        let device = test_device();
        let mut trainer = Trainer::new(spec(), device, 3e-3, CONTRASTIVE).unwrap();
        let mut twin = Trainer::new(spec(), device, 3e-3, CONTRASTIVE).unwrap();
        twin.copy_weights_from(&trainer);
        let summary = train(&mut trainer, &data, &config(40)).unwrap();
        let again = train(&mut twin, &data, &config(40)).unwrap();
        // Bit-identical on the CPU. On CUDA, cuDNN's convolution backward may accumulate in
        // another order from run to run, so equal up to 1e-5 relative there.
        let tolerance = if device.is_cuda() { 1e-5 } else { 0.0 };
        let same = |a: f64, b: f64| (a - b).abs() <= tolerance * a.abs().max(b.abs());
        assert!(
            same(summary.first_loss, again.first_loss),
            "{summary:?} vs {again:?}"
        );
        assert!(
            same(summary.last_loss, again.last_loss),
            "{summary:?} vs {again:?}"
        );
        assert!(
            summary.last_loss < 0.5 * summary.first_loss,
            "loss {} → {}",
            summary.first_loss,
            summary.last_loss
        );

        let dir = tempfile::tempdir().unwrap();
        trainer.save(dir.path()).unwrap();
        let model = LoadedModel::load(dir.path(), device).unwrap();
        let direct = trainer
            .embed_eval(&Tensor::from_slice(&data.values[..64 * 8]).view([8, 1, 8, 8]))
            .unwrap();
        let direct: Vec<f32> = Vec::try_from(&direct.view([-1])).unwrap();
        let loaded = model
            .embed_values(&data.values[..64 * 8], 8)
            .unwrap()
            .concat();
        // Two forward passes through the same weights (unit-norm rows).
        let close = |a: &[f32], b: &[f32]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| f64::from((x - y).abs()) <= tolerance)
        };
        assert!(close(&direct, &loaded), "{direct:?} vs {loaded:?}");
        // Embeddings separate the classes: nearest other example shares the class.
        let all = model.embed_values(&data.values, data.len()).unwrap();
        let labels: Vec<String> = data.classes.iter().map(|c| c.to_string()).collect();
        let report = crate::eval::evaluate_vectors(&all, &labels).unwrap();
        assert!(report.recall_at["1"] > 0.95, "{report:?}");

        // Fine-tuning continues from the saved weights.
        let mut tuned = Trainer::from_dir(dir.path(), device, 1e-3, CONTRASTIVE).unwrap();
        let before = tuned
            .embed_eval(&Tensor::from_slice(&data.values[..64]).view([1, 1, 8, 8]))
            .unwrap();
        let expected = model.embed_values(&data.values[..64], 1).unwrap();
        let before: Vec<f32> = Vec::try_from(&before.view([-1])).unwrap();
        assert!(close(&before, &expected[0]), "{before:?} vs {expected:?}");
        train(&mut tuned, &data, &config(2)).unwrap();
        assert_eq!(tuned.steps_done(), 2);
    }

    /// Exports a tiny trainable TorchScript module (linear 64 → 8) with the project's
    /// Python; `None` (test skipped) when there is no venv Python.
    fn torchscript_dir() -> Option<tempfile::TempDir> {
        let dir = tempfile::tempdir().unwrap();
        let source = "import os, torch\n\
                      class M(torch.nn.Module):\n\
                      \x20   def __init__(self):\n\
                      \x20       super().__init__()\n\
                      \x20       self.fc = torch.nn.Linear(64, 8)\n\
                      \x20   def forward(self, x):\n\
                      \x20       return self.fc(x.flatten(1))\n\
                      torch.manual_seed(0)\n\
                      torch.jit.script(M()).save(os.environ['OUT'])\n";
        if !crate::model::test_support::export_torchscript(source, &dir.path().join("model.pt")) {
            return None;
        }
        let mut spec = spec();
        spec.format = ModelFormat::Torchscript;
        spec.architecture = "linear".into();
        spec.widths = vec![];
        spec.weights = "model.pt".into();
        spec.save(dir.path()).unwrap();
        Some(dir)
    }

    #[test]
    fn torchscript_models_fine_tune_and_save() {
        let Some(dir) = torchscript_dir() else {
            return;
        };
        let data = toy_data(12, 2);
        let device = test_device();
        let mut trainer = Trainer::from_dir(dir.path(), device, 1e-2, CONTRASTIVE).unwrap();
        let probe = Tensor::from_slice(&data.values[..64 * 4]).view([4, 1, 8, 8]);
        let before = trainer.embed_eval(&probe).unwrap();
        let summary = train(&mut trainer, &data, &config(30)).unwrap();
        assert!(summary.last_loss < summary.first_loss, "{summary:?}");
        let after = trainer.embed_eval(&probe).unwrap();
        let moved = (&after - &before).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "the TorchScript parameters were trained");
        let out = tempfile::tempdir().unwrap();
        trainer.save(out.path()).unwrap();
        let model = LoadedModel::load(out.path(), device).unwrap();
        let loaded = model
            .embed_values(&data.values[..64 * 4], 4)
            .unwrap()
            .concat();
        let direct: Vec<f32> = Vec::try_from(&after.view([-1])).unwrap();
        let diff = loaded
            .iter()
            .zip(&direct)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-5,
            "saved TorchScript reproduces the trained embeddings ({diff})"
        );
    }

    /// Flattened parameter gradients, in a fixed (name) order.
    fn gradients(trainer: &Trainer) -> Vec<f64> {
        let mut named: Vec<(String, Tensor)> = trainer.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .flat_map(|(_, t)| {
                Vec::<f64>::try_from(&t.grad().to_kind(Kind::Double).view([-1])).unwrap()
            })
            .collect()
    }

    fn frozen() -> NormSettings {
        NormSettings {
            mode: NormMode::Frozen,
            ..NormSettings::batch()
        }
    }

    fn toy_batch(data: &TrainData, n: usize) -> Batch {
        let indices: Vec<usize> = (0..n).collect();
        Batch {
            inputs: Tensor::from_slice(&data.gather(&indices)).view([n as i64, 1, 8, 8]),
            labels: Tensor::from_slice(
                &indices
                    .iter()
                    .map(|&i| data.classes[i] as i64)
                    .collect::<Vec<_>>(),
            ),
            ids: Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>()),
        }
    }

    #[test]
    fn a_failed_or_non_finite_step_changes_nothing() {
        let data = toy_data(6, 4);
        let batch = |round: i64| {
            let mut b = toy_batch(&data, 8);
            b.ids += round * 100;
            b
        };
        let mut nan_inputs = batch(99);
        nan_inputs.inputs = nan_inputs.inputs.fill(f64::NAN);
        // A loss term that is NaN although every activation is finite: each layer's
        // statistics look normal, only the loss tells.
        let mut nan_term = |emb: &Tensor, _: &Tensor| -> Result<Tensor, TrainError> {
            Ok(emb.f_sum(Kind::Float)?.f_mul_scalar(f64::NAN)?)
        };
        // A step that fails after the forward pass (as running out of memory would).
        let mut failing_term = |_: &Tensor, _: &Tensor| -> Result<Tensor, TrainError> {
            Err(TrainError::Config("the loss term failed".into()))
        };
        for mode in [NormMode::Batch, NormMode::CrossIteration] {
            for poison in ["NaN inputs", "NaN loss term", "failing loss term"] {
                // Twins: the first also sees a poisoned batch between its steps.
                let mut twins: Vec<Trainer> = (0..2)
                    .map(|_| {
                        tch::manual_seed(4);
                        let mut t = Trainer::new(spec(), test_device(), 1e-2, CONTRASTIVE).unwrap();
                        t.set_norm(NormSettings {
                            mode,
                            window: 3,
                            burnin: 1,
                        })
                        .unwrap();
                        t.set_memory(MemorySettings {
                            size: 64,
                            start_step: 0,
                            weight: 1.0,
                            max_age: None,
                        });
                        t
                    })
                    .collect();
                // Identical weights whatever other tests draw from libtorch's global generator.
                let (first, second) = twins.split_at_mut(1);
                second[0].copy_weights_from(&first[0]);
                for twin in &mut twins {
                    // Three steps: past burn-in, and the window is full (it drops a record
                    // on every further step).
                    for round in 0..3 {
                        twin.step(&batch(round), 1e-2).unwrap();
                    }
                }
                let (fill, records) = (twins[0].memory_fill(), twins[0].cross_iteration_records());
                let error = match poison {
                    "NaN inputs" => twins[0].step(&nan_inputs, 1e-2),
                    "NaN loss term" => twins[0].step_with(&batch(98), 1e-2, Some(&mut nan_term)),
                    _ => twins[0].step_with(&batch(97), 1e-2, Some(&mut failing_term)),
                }
                .unwrap_err();
                let case = format!("{mode:?}, {poison}");
                let expected = match poison {
                    "failing loss term" => matches!(error, TrainError::Config(_)),
                    _ => matches!(error, TrainError::NonFiniteLoss { .. }),
                };
                assert!(expected, "{case}: {error}");
                assert_eq!(twins[0].steps_done(), 3, "{case}");
                assert!(twins[0].weights_finite().unwrap(), "{case}");
                assert_eq!(
                    twins[0].memory_fill(),
                    fill,
                    "{case}: the memory kept nothing"
                );
                assert_eq!(twins[0].cross_iteration_records(), records, "{case}");
                // Both take the same next steps; everything must come out identical.
                for twin in &mut twins {
                    for round in 3..5 {
                        assert!(twin.step(&batch(round), 1e-2).unwrap().loss.is_finite());
                    }
                }
                let (a, b) = (twins[0].variables().unwrap(), twins[1].variables().unwrap());
                for (name, value) in &a {
                    assert!(
                        value.equal(&b[name]),
                        "{case}: {name} differs from the twin's"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_finite_sees_a_nan_statistic() {
        let trainer = Trainer::new(spec(), test_device(), 1e-2, CONTRASTIVE).unwrap();
        assert!(trainer.weights_finite().unwrap());
        let _ = tch::no_grad(|| {
            trainer.vs.variables()["stem_bn.running_var"]
                .shallow_clone()
                .fill_(f64::NAN)
        });
        assert!(!trainer.weights_finite().unwrap());
    }

    #[test]
    fn gradcache_gradients_equal_full_batch_gradients() {
        let data = toy_data(6, 4);
        let device = test_device();
        for loss in [CONTRASTIVE, PairLoss::MultiSimilarity(Default::default())] {
            let mut full = Trainer::new(spec(), device, 1e-3, loss).unwrap();
            let mut cached = Trainer::new(spec(), device, 1e-3, loss).unwrap();
            cached.vs.copy(&full.vs).unwrap();
            for trainer in [&mut full, &mut cached] {
                trainer.set_norm(frozen()).unwrap();
            }
            cached.set_gradcache(5).unwrap();
            let memory = MemorySettings {
                size: 64,
                start_step: 0,
                weight: 0.7,
                max_age: None,
            };
            full.set_memory(memory);
            cached.set_memory(memory);
            // Two steps, so the second one also has a memory term.
            for round in 0..2 {
                let batch = toy_batch(&data, 24);
                // On the trainer's device, as `step_with` passes them.
                let labels = batch.labels.to_device(device);
                let ids = (&batch.ids + round * 100).to_device(device);
                let full_pass = full.compute_gradients(&batch, &labels, &ids, None).unwrap();
                let chunked = cached
                    .compute_gradients(&batch, &labels, &ids, None)
                    .unwrap();
                let (a, rows_a) = (full_pass.loss, full_pass.memory_rows);
                let (b, rows_b) = (chunked.loss, chunked.memory_rows);
                assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
                assert_eq!(rows_a, rows_b);
                assert_eq!(rows_a, if round == 0 { 0 } else { 24 });
                let (ga, gb) = (gradients(&full), gradients(&cached));
                assert_eq!(ga.len(), gb.len());
                let scale = ga.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                assert!(scale > 1e-4, "non-trivial gradients");
                let worst = ga
                    .iter()
                    .zip(&gb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < 1e-4 * scale,
                    "GradCache gradient differs by {worst} (scale {scale})"
                );
                full.opt.step();
                cached.opt.step();
                full.steps_done += 1;
                cached.steps_done += 1;
            }
        }
        let mut plain = Trainer::new(spec(), device, 1e-3, CONTRASTIVE).unwrap();
        assert!(
            plain.set_gradcache(4).is_err(),
            "GradCache refuses batch statistics"
        );
    }

    /// Cross-iteration BatchNorm, compensated and naive, trains the builtin network (the
    /// window fills to k − 1 and the running statistics move), and a reloaded checkpoint starts
    /// with an empty window.
    #[test]
    fn cross_iteration_norm_trains_and_restarts_empty_after_reload() {
        tch::manual_seed(11);
        let data = toy_data(6, 8);
        let device = test_device();
        for mode in [NormMode::CrossIteration, NormMode::Naive] {
            let norm = NormSettings {
                mode,
                window: 3,
                burnin: 2,
            };
            let mut trainer = Trainer::new(spec(), device, 1e-3, CONTRASTIVE).unwrap();
            trainer.set_norm(norm).unwrap();
            let running = |t: &Trainer| t.vs.variables()["stem_bn.running_mean"].copy();
            let before = running(&trainer);
            for round in 0..6 {
                let mut batch = toy_batch(&data, 4);
                batch.ids += round * 100;
                let stats = trainer.step(&batch, 1e-3).unwrap();
                assert!(stats.loss.is_finite());
                assert_eq!(
                    trainer.cross_iteration_records(),
                    (round as usize + 1).min(2)
                );
            }
            assert!((running(&trainer) - before).abs().max().double_value(&[]) > 0.0);
            assert!(
                trainer.set_gradcache(2).is_err(),
                "GradCache refuses cross-iteration statistics"
            );

            let dir = tempfile::tempdir().unwrap();
            trainer.save(dir.path()).unwrap();
            let mut reloaded = Trainer::from_dir(dir.path(), device, 1e-3, CONTRASTIVE).unwrap();
            reloaded.set_norm(norm).unwrap();
            assert_eq!(reloaded.cross_iteration_records(), 0);
            trainer.set_norm(norm).unwrap();
            assert_eq!(
                trainer.cross_iteration_records(),
                0,
                "set_norm starts a new window"
            );
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut data = toy_data(2, 1);
        data.shape = [1, 4, 16];
        let mut trainer = Trainer::new(spec(), Device::Cpu, 1e-3, CONTRASTIVE).unwrap();
        assert!(matches!(
            train(&mut trainer, &data, &config(1)),
            Err(TrainError::Shape(_))
        ));
        let mut bad = spec();
        bad.widths = vec![];
        assert!(Trainer::new(bad, Device::Cpu, 1e-3, CONTRASTIVE).is_err());
    }
}
