//! LEO (Rusu et al., ICLR 2019): few-shot class proxies generated in a learned latent space.
//!
//! On fixed L2-normalised embeddings of dimension `D`, a new class with a handful of support
//! examples gets its proxy from LEO instead of the imprinted mean embedding:
//!
//! 1. the encoder (linear `D → L`) codes each support example; a relation network (MLP
//!    `2L → hidden → 2L`) over all ordered pairs of codes `(i, j)`, averaged over `j` and then
//!    over the examples `i` of each class, gives a Gaussian `(μ_z, log σ_z)` per new class; `z`
//!    is sampled with the reparameterisation trick during meta-training (the mean at inference);
//! 2. the decoder (linear `L → 2D`) gives a Gaussian (mean, log σ) over the class's proxy,
//!    sampled during meta-training (the mean at inference);
//! 3. the inner loop takes `inner_steps` steps `z ← z − α ⊙ ∇_z L_support` with a learned
//!    per-dimension `α`, where `L_support` is the cross-entropy of the support embeddings against
//!    the cosine logits of `[existing proxies ∪ decoded new proxies]`. The existing proxies are
//!    constants; they are what makes the loss informative for a single new class (with one
//!    class alone the softmax is constant and the gradient is zero);
//! 4. the outer (meta-training) loss is the query cross-entropy against `[existing ∪ adapted
//!    proxies]` + `β · KL(q(z) ‖ N(0, I))` + `γ · ‖stopgrad(z′) − z‖²` + the orthogonality
//!    penalty of the decoder, differentiated through the inner loop (second order).
//!
//! Not implemented from the paper: the final fine-tuning steps on the decoded weights with a
//! learned rate, dropout on the inputs and the L2 weight penalty.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::class_head::{cosine_logits, l2_normalize_rows};
use super::TrainError;
use crate::model::ModelError;

/// File name of the LEO parameters (safetensors) inside a LEO directory.
pub const WEIGHTS_FILE: &str = "leo.safetensors";
/// File name of the dimension and configuration (JSON) inside a LEO directory.
pub const META_FILE: &str = "leo.json";

/// An error about file `path`.
fn file_error(path: &Path, message: impl std::fmt::Display) -> TrainError {
    TrainError::Model(ModelError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    })
}

/// Writes `path` atomically: `write` fills a temporary file in the same directory, which is
/// synced and renamed over `path`.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    write(&tmp)?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| file_error(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

/// Syncs a directory so that renames inside it are durable.
fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| file_error(dir, e))
}

/// Writes `bytes` to `path` (helper for [`write_atomically`]).
fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| file_error(path, e))
}

/// Hyper-parameters of [`Leo`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeoConfig {
    /// Latent dimension `L`.
    pub latent_dim: i64,
    /// Hidden width of the relation network.
    pub relation_hidden: i64,
    /// Inner-loop steps on the latent codes.
    pub inner_steps: usize,
    /// Initial value of the learned per-dimension inner learning rate `α`.
    pub inner_lr_init: f64,
    /// Weight `β` of `KL(q(z) ‖ N(0, I))`, averaged over classes and latent dimensions.
    pub kl_weight: f64,
    /// Weight `γ` of the encoder penalty `mean((stopgrad(z′) − z)²)`.
    pub encoder_penalty: f64,
    /// Weight of the decoder orthogonality penalty.
    pub orthogonality_weight: f64,
    /// Adam learning rate of the outer loop.
    pub lr: f64,
    /// Gradient clipping threshold: each gradient is clipped by value to `±grad_clip`, then
    /// each tensor's gradient is rescaled to norm at most `grad_clip` (as the official code).
    pub grad_clip: f64,
    /// Scale of the cosine logits.
    pub scale: f64,
    /// Seed of the parameter initialisation and of the meta-training noise.
    pub seed: u64,
}

impl Default for LeoConfig {
    fn default() -> Self {
        LeoConfig {
            latent_dim: 32,
            relation_hidden: 64,
            inner_steps: 5,
            inner_lr_init: 1.0,
            kl_weight: 1e-3,
            encoder_penalty: 1e-9,
            orthogonality_weight: 1e-3,
            lr: 4e-4,
            grad_clip: 0.1,
            scale: super::class_head::DEFAULT_SCALE,
            seed: 0,
        }
    }
}

impl LeoConfig {
    /// Checks sizes, weights and rates.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.latent_dim <= 0 || self.relation_hidden <= 0 {
            return Err(TrainError::Config(format!(
                "LEO latent dimension and relation width must be positive, got {} and {}",
                self.latent_dim, self.relation_hidden
            )));
        }
        let non_negative = [
            ("inner_lr_init", self.inner_lr_init),
            ("kl_weight", self.kl_weight),
            ("encoder_penalty", self.encoder_penalty),
            ("orthogonality_weight", self.orthogonality_weight),
        ];
        for (name, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(TrainError::Config(format!(
                    "LEO {name} must be finite and non-negative, got {value}"
                )));
            }
        }
        for (name, value) in [
            ("lr", self.lr),
            ("grad_clip", self.grad_clip),
            ("scale", self.scale),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(TrainError::Config(format!(
                    "LEO {name} must be positive, got {value}"
                )));
            }
        }
        Ok(())
    }
}

/// A few-shot episode on fixed embeddings.
pub struct Episode {
    /// `[K, D]` support embeddings of the new classes.
    pub support: Tensor,
    /// New-class id (`0..n_new`) of each support row.
    pub support_labels: Vec<i64>,
    /// `[Q, D]` query embeddings of the new classes.
    pub query: Tensor,
    /// New-class id of each query row.
    pub query_labels: Vec<i64>,
    /// `[C0, D]` proxies of the classes already known (may have 0 rows).
    pub existing: Tensor,
}

/// Samples an `n_way`-way `k_shot`-shot episode with `n_query` queries per class.
///
/// `embeddings_by_class[c]` holds the `[n_c, D]` embeddings of class `c`. The `n_way` new
/// classes are drawn among those with at least `k_shot + n_query` examples; the normalised
/// means of all other non-empty classes are the existing proxies. Returns `None` when fewer than
/// `n_way` classes are eligible, a size is zero, or the tensors are not `[n, D]` with one `D`.
pub fn sample_episode<R: Rng + ?Sized>(
    embeddings_by_class: &[Tensor],
    n_way: usize,
    k_shot: usize,
    n_query: usize,
    rng: &mut R,
) -> Option<Episode> {
    if n_way == 0 || k_shot == 0 || n_query == 0 {
        return None;
    }
    let first = embeddings_by_class.first()?.size();
    let dim = *first.get(1)?;
    if embeddings_by_class
        .iter()
        .any(|t| t.size().len() != 2 || t.size()[1] != dim)
    {
        return None;
    }
    let rows = |c: usize| embeddings_by_class[c].size()[0] as usize;
    let eligible: Vec<usize> = (0..embeddings_by_class.len())
        .filter(|&c| rows(c) >= k_shot + n_query)
        .collect();
    let chosen: Vec<usize> = eligible.choose_multiple(rng, n_way).cloned().collect();
    if chosen.len() < n_way {
        return None;
    }
    let (mut support, mut support_labels, mut query, mut query_labels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (new_id, &c) in chosen.iter().enumerate() {
        let picks = rand::seq::index::sample(rng, rows(c), k_shot + n_query).into_vec();
        let idx: Vec<i64> = picks.iter().map(|&i| i as i64).collect();
        let t = &embeddings_by_class[c];
        let picked = t
            .f_index_select(0, &Tensor::from_slice(&idx).f_to_device(t.device()).ok()?)
            .ok()?;
        support.push(picked.f_narrow(0, 0, k_shot as i64).ok()?);
        query.push(picked.f_narrow(0, k_shot as i64, n_query as i64).ok()?);
        support_labels.extend(std::iter::repeat_n(new_id as i64, k_shot));
        query_labels.extend(std::iter::repeat_n(new_id as i64, n_query));
    }
    let means: Vec<Tensor> = (0..embeddings_by_class.len())
        .filter(|c| !chosen.contains(c) && rows(*c) > 0)
        .map(|c| {
            let t = &embeddings_by_class[c];
            t.f_mean_dim([0i64].as_slice(), true, t.kind())
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let existing = if means.is_empty() {
        let first = &embeddings_by_class[0];
        Tensor::f_zeros([0, dim], (first.kind(), first.device())).ok()?
    } else {
        l2_normalize_rows(&Tensor::f_cat(&means, 0).ok()?).ok()?
    };
    Some(Episode {
        support: Tensor::f_cat(&support, 0).ok()?,
        support_labels,
        query: Tensor::f_cat(&query, 0).ok()?,
        query_labels,
        existing,
    })
}

/// Number of new classes in `labels` (`max + 1`); every class in `0..n` must occur.
fn new_class_count(labels: &[i64]) -> Result<i64, TrainError> {
    let n = labels.iter().copied().max().map_or(0, |m| m + 1);
    if n == 0 || labels.iter().any(|&l| l < 0) {
        return Err(TrainError::Shape(format!(
            "new-class labels must be non-empty ids 0..n, got {labels:?}"
        )));
    }
    for c in 0..n {
        if !labels.contains(&c) {
            return Err(TrainError::Shape(format!(
                "new class {c} has no support example (labels {labels:?})"
            )));
        }
    }
    Ok(n)
}

/// The baseline: the normalised mean support embedding of each new class, `[n_new, D]`.
pub fn imprint(support: &Tensor, labels: &[i64], n_new: i64) -> Result<Tensor, TrainError> {
    let size = support.size();
    if size.len() != 2 || size[0] != labels.len() as i64 || n_new <= 0 {
        return Err(TrainError::Shape(format!(
            "imprinting {n_new} classes from support {size:?} with {} labels",
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l >= n_new) {
        return Err(TrainError::Shape(format!(
            "label {bad} out of range for {n_new} new classes"
        )));
    }
    let onehot = class_average_matrix(labels, n_new, support.kind(), support.device())?;
    l2_normalize_rows(&onehot.f_matmul(support)?)
}

/// `[n, K]` matrix whose row `c` averages the examples labelled `c` (zero rows for absent
/// classes).
fn class_average_matrix(
    labels: &[i64],
    n: i64,
    kind: Kind,
    device: Device,
) -> Result<Tensor, TrainError> {
    let k = labels.len();
    let mut m = vec![0.0f64; n as usize * k];
    for c in 0..n as usize {
        let count = labels.iter().filter(|&&l| l == c as i64).count();
        for (i, &l) in labels.iter().enumerate() {
            if l == c as i64 {
                m[c * k + i] = 1.0 / count as f64;
            }
        }
    }
    Ok(Tensor::from_slice(&m)
        .f_view([n, k as i64])?
        .f_to_kind(kind)?
        .f_to_device(device)?)
}

/// `x Wᵀ + b`.
fn linear(layer: &nn::Linear, x: &Tensor) -> Result<Tensor, TrainError> {
    Ok(x.f_linear(&layer.ws, layer.bs.as_ref())?)
}

/// Mean cross-entropy of `targets` under `logits`.
fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor, TrainError> {
    let log_p = logits.f_log_softmax(1, logits.kind())?;
    let picked = log_p.f_gather(1, &targets.f_view([-1, 1])?, false)?;
    Ok(picked.f_mean(logits.kind())?.f_neg()?)
}

/// LEO proxy generator with its own parameters and Adam optimizer.
pub struct Leo {
    dim: i64,
    config: LeoConfig,
    vs: nn::VarStore,
    encoder: nn::Linear,
    relation_in: nn::Linear,
    relation_out: nn::Linear,
    decoder: nn::Linear,
    /// Learned inner learning rate `α`, `[L]`.
    inner_lr: Tensor,
    optimizer: nn::Optimizer,
    /// Noise of the meta-training samples.
    rng: StdRng,
}

impl Leo {
    /// A freshly initialised LEO for embeddings of dimension `dim`, its parameters on `device`.
    /// Weights and biases are drawn uniformly in `±1/√fan_in` from a generator seeded by
    /// `config.seed` (libtorch's global generator is not touched); `α` starts at
    /// `inner_lr_init` in every latent dimension.
    pub fn new(dim: i64, config: &LeoConfig, device: Device) -> Result<Self, TrainError> {
        config.validate()?;
        if dim <= 0 {
            return Err(TrainError::Config(format!(
                "LEO embedding dimension must be positive, got {dim}"
            )));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l = config.latent_dim;
        let lin = Default::default();
        let encoder = nn::linear(&root / "encoder", dim, l, lin);
        let relation_in = nn::linear(&root / "relation_in", 2 * l, config.relation_hidden, lin);
        let relation_out = nn::linear(&root / "relation_out", config.relation_hidden, 2 * l, lin);
        let decoder = nn::linear(&root / "decoder", l, 2 * dim, lin);
        let inner_lr = root.var("inner_lr", &[l], nn::Init::Const(config.inner_lr_init));
        let mut rng = StdRng::seed_from_u64(config.seed);
        tch::no_grad(|| -> Result<(), TrainError> {
            for layer in [&encoder, &relation_in, &relation_out, &decoder] {
                let bound = 1.0 / (layer.ws.size()[1] as f64).sqrt();
                let biases = layer.bs.iter();
                for t in std::iter::once(&layer.ws).chain(biases) {
                    let values: Vec<f64> = (0..t.numel())
                        .map(|_| rng.gen_range(-bound..bound))
                        .collect();
                    let values = Tensor::from_slice(&values)
                        .f_view(t.size().as_slice())?
                        .f_to_kind(t.kind())?
                        .f_to_device(device)?;
                    t.shallow_clone().f_copy_(&values)?;
                }
            }
            Ok(())
        })?;
        let optimizer = nn::adam(0.9, 0.999, 0.0).build(&vs, config.lr)?;
        Ok(Leo {
            dim,
            config: config.clone(),
            vs,
            encoder,
            relation_in,
            relation_out,
            decoder,
            inner_lr,
            optimizer,
            rng,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LeoConfig {
        &self.config
    }

    /// Embedding dimension `D`.
    pub fn dim(&self) -> i64 {
        self.dim
    }

    /// Kind of the parameters.
    fn kind(&self) -> Kind {
        self.inner_lr.kind()
    }

    /// `t` on the parameters' device and kind, detached.
    fn input(&self, t: &Tensor) -> Result<Tensor, TrainError> {
        Ok(t.f_detach()?
            .f_to_device(self.vs.device())?
            .f_to_kind(self.kind())?)
    }

    /// Checks that `t` is `[n, D]` and returns `n`.
    fn check_rows(&self, t: &Tensor, what: &str) -> Result<i64, TrainError> {
        let size = t.size();
        if size.len() != 2 || size[1] != self.dim {
            return Err(TrainError::Shape(format!(
                "{what} has shape {size:?}, expected [n, {}]",
                self.dim
            )));
        }
        Ok(size[0])
    }

    /// Standard normal noise shaped like `like`, from the meta-training generator.
    fn noise(rng: &mut StdRng, like: &Tensor) -> Result<Tensor, TrainError> {
        let n = like.numel();
        let values: Vec<f64> = (0..n)
            .map(|_| {
                // Box–Muller.
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        Ok(Tensor::from_slice(&values)
            .f_view(like.size().as_slice())?
            .f_to_kind(like.kind())?
            .f_to_device(like.device())?)
    }

    /// `mean + exp(log_sigma) ⊙ ε` when sampling, else `mean`.
    fn sample(
        mean: &Tensor,
        log_sigma: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<Tensor, TrainError> {
        match rng {
            Some(rng) => Ok(mean + log_sigma.f_exp()? * Self::noise(rng, mean)?),
            None => Ok(mean.shallow_clone()),
        }
    }

    /// Gaussian `(μ_z, log σ_z)`, each `[n_new, L]`, of the latent code of each new class.
    fn encode(
        &self,
        support: &Tensor,
        labels: &[i64],
        n_new: i64,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let k = support.size()[0];
        let l = self.config.latent_dim;
        let codes = linear(&self.encoder, support)?;
        let left = codes.f_unsqueeze(1)?.f_expand([k, k, l], false)?;
        let right = codes.f_unsqueeze(0)?.f_expand([k, k, l], false)?;
        let pairs = Tensor::f_cat(&[left, right], 2)?;
        let hidden = linear(&self.relation_in, &pairs)?.f_relu()?;
        let related = linear(&self.relation_out, &hidden)?.f_mean_dim(
            [1i64].as_slice(),
            false,
            self.kind(),
        )?;
        let per_class = class_average_matrix(labels, n_new, self.kind(), self.vs.device())?
            .f_matmul(&related)?;
        Ok((per_class.f_narrow(1, 0, l)?, per_class.f_narrow(1, l, l)?))
    }

    /// Raw proxies `[n, D]` decoded from latents `[n, L]` (sampled when `rng` is given).
    fn decode(&self, z: &Tensor, rng: Option<&mut StdRng>) -> Result<Tensor, TrainError> {
        let out = linear(&self.decoder, z)?;
        let mean = out.f_narrow(1, 0, self.dim)?;
        let log_sigma = out.f_narrow(1, self.dim, self.dim)?;
        Self::sample(&mean, &log_sigma, rng)
    }

    /// Cross-entropy of `embeddings` (targets: new-class ids offset by the existing count)
    /// against the cosine logits of `[existing ∪ new]`.
    fn episode_loss(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        existing: &Tensor,
        new: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let proxies = Tensor::f_cat(&[existing, new], 0)?;
        cross_entropy(
            &cosine_logits(embeddings, &proxies, self.config.scale)?,
            targets,
        )
    }

    /// Runs the inner loop from `z` (`[n_new, L]`, requiring gradients) and returns `z′`.
    ///
    /// With `create_graph`, `z′` keeps the second-order graph to the parameters (meta-training);
    /// otherwise each step is detached.
    fn inner_loop(
        &self,
        z: &Tensor,
        support: &Tensor,
        targets: &Tensor,
        existing: &Tensor,
        mut rng: Option<&mut StdRng>,
        create_graph: bool,
    ) -> Result<Tensor, TrainError> {
        let mut z = z.shallow_clone();
        for _ in 0..self.config.inner_steps {
            let grad = self.support_gradient(
                &z,
                support,
                targets,
                existing,
                rng.as_deref_mut(),
                create_graph,
            )?;
            if create_graph {
                z = &z - &self.inner_lr * grad;
            } else {
                let alpha = self.inner_lr.f_detach()?;
                z = (&z - alpha * grad).f_detach()?.f_set_requires_grad(true)?;
            }
        }
        Ok(z)
    }

    /// `∇_z L_support` at `z` (zeros when the loss does not depend on `z`).
    fn support_gradient(
        &self,
        z: &Tensor,
        support: &Tensor,
        targets: &Tensor,
        existing: &Tensor,
        rng: Option<&mut StdRng>,
        create_graph: bool,
    ) -> Result<Tensor, TrainError> {
        let loss = self.episode_loss(support, targets, existing, &self.decode(z, rng)?)?;
        let grads = Tensor::f_run_backward(&[&loss], &[z], create_graph, create_graph)?;
        match grads.into_iter().next() {
            Some(g) if g.defined() => Ok(g),
            _ => Ok(z.f_zeros_like()?),
        }
    }

    /// Validated episode inputs on the parameters' device: `(support, support targets offset
    /// by C0, existing, n_new)`.
    fn prepare(
        &self,
        support: &Tensor,
        support_labels: &[i64],
        existing: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor, i64), TrainError> {
        let k = self.check_rows(support, "support")?;
        let c0 = self.check_rows(existing, "existing proxies")?;
        if k != support_labels.len() as i64 {
            return Err(TrainError::Shape(format!(
                "{k} support rows but {} labels",
                support_labels.len()
            )));
        }
        let n_new = new_class_count(support_labels)?;
        let targets = self.targets(support_labels, c0)?;
        Ok((self.input(support)?, targets, self.input(existing)?, n_new))
    }

    /// New-class ids offset by `c0` as an i64 tensor on the parameters' device.
    fn targets(&self, labels: &[i64], c0: i64) -> Result<Tensor, TrainError> {
        let shifted: Vec<i64> = labels.iter().map(|l| l + c0).collect();
        Ok(Tensor::from_slice(&shifted).f_to_device(self.vs.device())?)
    }

    /// Proxies `[n_new, D]` (unit rows, on the device and kind of `support`) for the new classes
    /// of `support` (`[K, D]`, labels `0..n_new`), next to the `existing` proxies (`[C0, D]`,
    /// possibly empty). Deterministic: mean latents, inner loop without second-order graph,
    /// mean decoded proxies.
    pub fn generate(
        &self,
        support: &Tensor,
        support_labels: &[i64],
        existing: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let (s, targets, e, n_new) = self.prepare(support, support_labels, existing)?;
        let mu = tch::no_grad(|| self.encode(&s, support_labels, n_new))?.0;
        let z = mu.f_detach()?.f_set_requires_grad(true)?;
        let z = self.inner_loop(&z, &s, &targets, &e, None, false)?;
        let proxies = tch::no_grad(|| self.decode(&z, None))?;
        Ok(l2_normalize_rows(&proxies)?
            .f_to_kind(support.kind())?
            .f_to_device(support.device())?)
    }

    #[cfg(test)]
    /// Query cross-entropy of `episode` with the proxies of [`Leo::generate`] (no gradients).
    pub fn query_loss(&self, episode: &Episode) -> Result<f64, TrainError> {
        let proxies =
            self.generate(&episode.support, &episode.support_labels, &episode.existing)?;
        self.check_rows(&episode.query, "query")?;
        let c0 = episode.existing.size()[0];
        let targets = self.targets(&episode.query_labels, c0)?;
        let loss = tch::no_grad(|| {
            self.episode_loss(
                &self.input(&episode.query)?,
                &targets,
                &self.input(&episode.existing)?,
                &self.input(&proxies)?,
            )
        })?;
        Ok(loss.f_double_value(&[])?)
    }

    /// Orthogonality penalty of the decoder: mean squared deviation of the correlation matrix
    /// of its `L` rows (one `2D`-vector per latent dimension) from the identity.
    fn orthogonality(&self) -> Result<Tensor, TrainError> {
        let rows = self.decoder.ws.f_tr()?;
        let normalized = l2_normalize_rows(&rows)?;
        let correlation = normalized.f_matmul(&normalized.f_tr()?)?;
        let identity = Tensor::f_eye(rows.size()[0], (self.kind(), self.vs.device()))?;
        Ok((correlation - identity).f_square()?.f_mean(self.kind())?)
    }

    /// The outer loss of `episode`, differentiable through the inner loop. Samples the latents
    /// and the proxies when `rng` is given.
    fn outer_loss(
        &self,
        episode: &Episode,
        mut rng: Option<&mut StdRng>,
    ) -> Result<Tensor, TrainError> {
        let (support, targets, existing, n_new) =
            self.prepare(&episode.support, &episode.support_labels, &episode.existing)?;
        self.check_rows(&episode.query, "query")?;
        if episode.query_labels.len() as i64 != episode.query.size()[0]
            || episode.query_labels.iter().any(|&l| l < 0 || l >= n_new)
        {
            return Err(TrainError::Shape(format!(
                "query labels {:?} do not match {} query rows and {n_new} new classes",
                episode.query_labels,
                episode.query.size()[0]
            )));
        }
        let (mu, log_sigma) = self.encode(&support, &episode.support_labels, n_new)?;
        let z = Self::sample(&mu, &log_sigma, rng.as_deref_mut())?;
        let adapted =
            self.inner_loop(&z, &support, &targets, &existing, rng.as_deref_mut(), true)?;
        let proxies = self.decode(&adapted, rng)?;
        let c0 = existing.size()[0];
        let query = self.episode_loss(
            &self.input(&episode.query)?,
            &self.targets(&episode.query_labels, c0)?,
            &existing,
            &proxies,
        )?;
        // Analytic KL(N(μ, σ²) ‖ N(0, 1)) per element, averaged over classes and latent
        // dimensions (the paper averages a one-sample estimate over the same elements).
        let sigma2 = (&log_sigma * 2.0).f_exp()?;
        let kl = ((mu.f_square()? + sigma2 - 1.0) * 0.5 - &log_sigma).f_mean(self.kind())?;
        let penalty = (adapted.f_detach()? - &z).f_square()?.f_mean(self.kind())?;
        Ok(query
            + kl * self.config.kl_weight
            + penalty * self.config.encoder_penalty
            + self.orthogonality()? * self.config.orthogonality_weight)
    }

    /// One meta-training step on `episode`: samples latents and proxies, runs the inner loop
    /// with second-order gradients, clips the outer gradients (by value, then each tensor by
    /// norm, both at `grad_clip`) and takes an Adam step. Returns the outer loss before the
    /// step, or `None` when the loss or a gradient is not finite: the step is skipped and the
    /// parameters and Adam state are left as they were.
    pub fn meta_train_step(&mut self, episode: &Episode) -> Result<Option<f64>, TrainError> {
        let mut rng = self.rng.clone();
        let loss = self.outer_loss(episode, Some(&mut rng))?;
        self.rng = rng;
        self.optimizer.zero_grad();
        let value = loss.f_double_value(&[])?;
        if !value.is_finite() {
            return Ok(None);
        }
        loss.f_backward()?;
        let clip = self.config.grad_clip;
        let finite = tch::no_grad(|| -> Result<bool, TrainError> {
            for var in self.vs.trainable_variables() {
                let grad = var.grad();
                if grad.defined() && grad.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                    return Ok(false);
                }
            }
            for var in self.vs.trainable_variables() {
                let mut grad = var.grad();
                if !grad.defined() {
                    continue;
                }
                let _ = grad.f_clamp_(-clip, clip)?;
                let norm = grad.f_norm()?.f_double_value(&[])?;
                if norm > clip {
                    let _ = grad.f_mul_scalar_(clip / norm)?;
                }
            }
            Ok(true)
        })?;
        if !finite {
            self.optimizer.zero_grad();
            return Ok(None);
        }
        self.optimizer.step();
        Ok(Some(value))
    }

    /// Writes `DIR/leo.safetensors` (the parameters) and `DIR/leo.json` (dimension and
    /// configuration), each atomically (the JSON last). The Adam state is not saved.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
        write_atomically(&dir.join(WEIGHTS_FILE), |tmp| {
            // VarStore::save picks the format from the extension; write safetensors directly.
            let variables = self.vs.variables();
            let mut named: Vec<(String, Tensor)> = variables
                .into_iter()
                .map(|(name, t)| Ok((name, t.f_detach()?.f_to_device(Device::Cpu)?)))
                .collect::<Result<_, TrainError>>()?;
            named.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Tensor::write_safetensors(&named, tmp)?)
        })?;
        let meta = LeoMeta {
            dim: self.dim,
            config: self.config.clone(),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| file_error(dir, e))?;
        write_atomically(&dir.join(META_FILE), |tmp| write_bytes(tmp, &json))?;
        sync_dir(dir)
    }

    /// Loads a LEO written by [`Leo::save`] onto `device` (exact parameter names and shapes),
    /// with a fresh Adam state and noise generator.
    pub fn load(dir: &Path, device: Device) -> Result<Self, TrainError> {
        let meta_path = dir.join(META_FILE);
        let bytes = fs::read(&meta_path).map_err(|e| file_error(&meta_path, e))?;
        let meta: LeoMeta =
            serde_json::from_slice(&bytes).map_err(|e| file_error(&meta_path, e))?;
        let mut leo = Leo::new(meta.dim, &meta.config, device)?;
        crate::model::load_builtin_weights(&mut leo.vs, &dir.join(WEIGHTS_FILE))?;
        Ok(leo)
    }
}

/// The JSON written beside the parameters.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeoMeta {
    dim: i64,
    config: LeoConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::test_device;

    fn rows(values: &[Vec<f64>]) -> Tensor {
        Tensor::from_slice(&values.concat()).view([values.len() as i64, -1])
    }

    fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
        let d = t.size()[1] as usize;
        let flat: Vec<f64> = Vec::try_from(&t.to_kind(Kind::Double).view([-1])).unwrap();
        flat.chunks(d).map(|r| r.to_vec()).collect()
    }

    fn random_rows(rng: &mut StdRng, n: usize, d: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|_| (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect()
    }

    fn set(t: &Tensor, values: &[f64]) {
        tch::no_grad(|| {
            let v = Tensor::from_slice(values)
                .view(t.size().as_slice())
                .to_kind(t.kind());
            t.shallow_clone().copy_(&v);
        });
    }

    fn small_config() -> LeoConfig {
        LeoConfig {
            latent_dim: 3,
            relation_hidden: 5,
            inner_steps: 2,
            scale: 4.0,
            seed: 3,
            ..LeoConfig::default()
        }
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn unit(a: &[f64]) -> Vec<f64> {
        let n = dot(a, a).sqrt();
        a.iter().map(|x| x / n).collect()
    }

    /// One inner step in plain f64: decoder mean `w = A z + b`, cosine logits, softmax
    /// cross-entropy and its gradient by the chain rule written out by hand.
    #[allow(clippy::too_many_arguments)]
    fn brute_force_step(
        a: &[Vec<f64>],
        b: &[f64],
        z: &[Vec<f64>],
        alpha: &[f64],
        support: &[Vec<f64>],
        targets: &[usize],
        existing: &[Vec<f64>],
        scale: f64,
    ) -> Vec<Vec<f64>> {
        let w: Vec<Vec<f64>> = z
            .iter()
            .map(|zc| a.iter().zip(b).map(|(row, bi)| dot(row, zc) + bi).collect())
            .collect();
        let proxies: Vec<Vec<f64>> = existing.iter().chain(&w).cloned().collect();
        let units: Vec<Vec<f64>> = proxies.iter().map(|p| unit(p)).collect();
        let d = b.len();
        let mut grad_units = vec![vec![0.0; d]; proxies.len()];
        for (x, &t) in support.iter().zip(targets) {
            let x = unit(x);
            let logits: Vec<f64> = units.iter().map(|p| scale * dot(&x, p)).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for (j, l) in logits.iter().enumerate() {
                let p = (l - max).exp() / denom;
                let g = (p - if j == t { 1.0 } else { 0.0 }) / support.len() as f64;
                for (gu, xi) in grad_units[j].iter_mut().zip(&x) {
                    *gu += g * scale * xi;
                }
            }
        }
        let c0 = existing.len();
        z.iter()
            .enumerate()
            .map(|(c, zc)| {
                let (wc, pc, gp) = (&w[c], &units[c0 + c], &grad_units[c0 + c]);
                let norm = dot(wc, wc).sqrt();
                let proj = dot(pc, gp);
                let gw: Vec<f64> = (0..d).map(|i| (gp[i] - proj * pc[i]) / norm).collect();
                (0..zc.len())
                    .map(|l| {
                        let gz: f64 = (0..d).map(|i| a[i][l] * gw[i]).sum();
                        zc[l] - alpha[l] * gz
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn inner_step_matches_hand_computation() {
        let (d, l) = (3usize, 2usize);
        let config = LeoConfig {
            latent_dim: l as i64,
            inner_steps: 1,
            scale: 3.0,
            ..small_config()
        };
        let mut leo = Leo::new(d as i64, &config, test_device()).unwrap();
        leo.vs.double();
        // The inner loop takes prepared inputs: on the parameters' device.
        let on_device = |t: Tensor| t.to_device(leo.vs.device());
        // Decoder rows 0..D give the mean, rows D..2D the log σ (unused at inference).
        let a = vec![vec![1.0, -0.5], vec![0.3, 0.8], vec![-0.7, 0.2]];
        let b = vec![0.1, -0.2, 0.05];
        let mut ws = a.concat();
        ws.extend([0.4, -0.1, 0.2, 0.3, -0.6, 0.9]);
        set(&leo.decoder.ws, &ws);
        let mut bs = b.clone();
        bs.extend([0.0, 0.0, 0.0]);
        set(leo.decoder.bs.as_ref().unwrap(), &bs);
        let alpha = [0.5, 2.0];
        set(&leo.inner_lr, &alpha);
        let z = vec![vec![0.6, -0.4], vec![-0.3, 0.9]];
        let support = vec![
            vec![0.9, 0.1, -0.3],
            vec![-0.2, 0.7, 0.5],
            vec![0.3, -0.8, 0.4],
        ];
        let labels = [0i64, 1, 1];
        let existing = vec![vec![0.0, 0.6, 0.8]];
        let targets = leo.targets(&labels, 1).unwrap();
        let zt = on_device(rows(&z)).set_requires_grad(true);
        let (support_t, existing_t) = (on_device(rows(&support)), on_device(rows(&existing)));
        let got = leo
            .inner_loop(&zt, &support_t, &targets, &existing_t, None, false)
            .unwrap();
        let want = brute_force_step(&a, &b, &z, &alpha, &support, &[1, 2, 2], &existing, 3.0);
        let got = to_rows(&got);
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        assert!((got[0][0] - z[0][0]).abs() > 1e-3, "the step moves z");
        // The second-order variant computes the same values.
        let second = leo
            .inner_loop(&zt, &support_t, &targets, &existing_t, None, true)
            .unwrap();
        assert!(
            (second - on_device(rows(&got)))
                .abs()
                .max()
                .double_value(&[])
                < 1e-12
        );
    }

    fn random_episode(
        rng: &mut StdRng,
        d: usize,
        n_way: i64,
        k: i64,
        q: i64,
        c0: usize,
    ) -> Episode {
        let support_labels: Vec<i64> = (0..n_way * k).map(|i| i % n_way).collect();
        let query_labels: Vec<i64> = (0..n_way * q).map(|i| i % n_way).collect();
        Episode {
            support: l2_normalize_rows(&rows(&random_rows(rng, support_labels.len(), d))).unwrap(),
            support_labels,
            query: l2_normalize_rows(&rows(&random_rows(rng, query_labels.len(), d))).unwrap(),
            query_labels,
            existing: if c0 == 0 {
                Tensor::zeros([0, d as i64], (Kind::Double, Device::Cpu))
            } else {
                l2_normalize_rows(&rows(&random_rows(rng, c0, d))).unwrap()
            },
        }
    }

    #[test]
    fn outer_gradient_through_the_inner_loop_matches_finite_differences() {
        let d = 4usize;
        let config = LeoConfig {
            kl_weight: 0.1,
            orthogonality_weight: 0.1,
            // The stop-gradient term depends on α through z′ numerically but not in autograd.
            encoder_penalty: 0.0,
            ..small_config()
        };
        let mut leo = Leo::new(d as i64, &config, test_device()).unwrap();
        leo.vs.double();
        let mut rng = StdRng::seed_from_u64(8);
        let episode = random_episode(&mut rng, d, 2, 2, 2, 2);
        // The same noise for every evaluation makes the sampled loss a deterministic function.
        let eval = |leo: &Leo| {
            leo.outer_loss(&episode, Some(&mut StdRng::seed_from_u64(5)))
                .unwrap()
        };
        let params = [
            leo.inner_lr.shallow_clone(),
            leo.decoder.ws.shallow_clone(),
            leo.encoder.ws.shallow_clone(),
        ];
        let grads = Tensor::run_backward(&[eval(&leo)], &params, false, false);
        let h = 1e-6;
        let mut checked = 0;
        for (param, grad) in params.iter().zip(&grads) {
            let flat = param.view([-1]);
            let grad: Vec<f64> = Vec::try_from(&grad.view([-1])).unwrap();
            for i in 0..flat.size()[0].min(6) {
                let original = flat.double_value(&[i]);
                let at = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(i).fill_(v);
                    });
                    eval(&leo).double_value(&[])
                };
                let fd = (at(original + h) - at(original - h)) / (2.0 * h);
                at(original);
                let g = grad[i as usize];
                assert!(
                    (fd - g).abs() < 1e-6 * (1.0 + g.abs()),
                    "parameter {:?}[{i}]: fd {fd} vs autograd {g}",
                    param.size()
                );
                checked += usize::from(g.abs() > 1e-6);
            }
        }
        assert!(checked >= 6, "only {checked} non-trivial gradients");
    }

    #[test]
    fn single_new_class_needs_existing_proxies() {
        let d = 6usize;
        let device = test_device();
        let leo = Leo::new(d as i64, &small_config(), device).unwrap();
        let mut rng = StdRng::seed_from_u64(4);
        // support_gradient takes prepared inputs, on the parameters' device.
        let support = l2_normalize_rows(&rows(&random_rows(&mut rng, 3, d)))
            .unwrap()
            .to_kind(Kind::Float)
            .to_device(device);
        let z = Tensor::randn([1, 3], (Kind::Float, device)).set_requires_grad(true);
        let grad_with = |existing: &Tensor| {
            let targets = leo.targets(&[0, 0, 0], existing.size()[0]).unwrap();
            leo.support_gradient(&z, &support, &targets, existing, None, false)
                .unwrap()
                .abs()
                .max()
                .double_value(&[])
        };
        let none = Tensor::zeros([0, d as i64], (Kind::Float, device));
        assert_eq!(grad_with(&none), 0.0);
        let existing = l2_normalize_rows(&rows(&random_rows(&mut rng, 2, d)))
            .unwrap()
            .to_kind(Kind::Float)
            .to_device(device);
        assert!(grad_with(&existing) > 1e-4);
        // generate() works in both cases, and only the informative one moves the latent.
        let alone = leo.generate(&support, &[0, 0, 0], &none).unwrap();
        let with = leo.generate(&support, &[0, 0, 0], &existing).unwrap();
        assert_eq!(alone.size(), [1, d as i64]);
        assert!((alone - with).abs().max().double_value(&[]) > 1e-5);
    }

    #[test]
    fn generate_returns_unit_rows_and_checks_shapes() {
        let d = 5usize;
        let leo = Leo::new(d as i64, &small_config(), test_device()).unwrap();
        let mut rng = StdRng::seed_from_u64(6);
        let ep = random_episode(&mut rng, d, 3, 2, 1, 4);
        let p = leo
            .generate(&ep.support, &ep.support_labels, &ep.existing)
            .unwrap();
        assert_eq!(p.size(), [3, d as i64]);
        assert_eq!(p.kind(), Kind::Double);
        let norms = p.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-6);
        // Deterministic at inference.
        let again = leo
            .generate(&ep.support, &ep.support_labels, &ep.existing)
            .unwrap();
        assert!(p.equal(&again));
        let gap = [0i64, 2, 0, 2, 0, 2];
        assert!(leo.generate(&ep.support, &gap, &ep.existing).is_err());
        assert!(leo.generate(&ep.support, &[0, 1], &ep.existing).is_err());
        let wrong = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        assert!(leo
            .generate(&ep.support, &ep.support_labels, &wrong)
            .is_err());
        assert!(Leo::new(0, &small_config(), Device::Cpu).is_err());
        let bad = LeoConfig {
            grad_clip: 0.0,
            ..small_config()
        };
        assert!(Leo::new(4, &bad, Device::Cpu).is_err());
    }

    #[test]
    fn imprint_is_the_normalised_class_mean() {
        let support = rows(&[
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![0.0, -2.0],
            vec![3.0, 4.0],
        ]);
        let got = imprint(&support, &[0, 0, 1, 1], 2).unwrap();
        // Means (0.5, 0.5) and (1.5, 1); (1.5, 1) / √3.25.
        let n = 3.25f64.sqrt();
        let want = rows(&[vec![0.5f64.sqrt(), 0.5f64.sqrt()], vec![1.5 / n, 1.0 / n]]);
        assert!((got - want).abs().max().double_value(&[]) < 1e-12);
        assert!(imprint(&support, &[0, 0, 2, 1], 2).is_err());
    }

    #[test]
    fn sample_episode_splits_new_and_existing_classes() {
        let mut rng = StdRng::seed_from_u64(2);
        let classes: Vec<Tensor> = (0..6)
            .map(|c| rows(&random_rows(&mut rng, if c == 0 { 2 } else { 5 }, 3)))
            .collect();
        let ep = sample_episode(&classes, 3, 2, 2, &mut rng).unwrap();
        assert_eq!(ep.support.size(), [6, 3]);
        assert_eq!(ep.query.size(), [6, 3]);
        assert_eq!(ep.support_labels, [0, 0, 1, 1, 2, 2]);
        assert_eq!(ep.query_labels, [0, 0, 1, 1, 2, 2]);
        // Three classes are new, the other three (including the small class 0) are existing.
        assert_eq!(ep.existing.size(), [3, 3]);
        let norms = ep
            .existing
            .norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-9);
        let mean0 =
            l2_normalize_rows(&classes[0].mean_dim([0i64].as_slice(), true, Kind::Double)).unwrap();
        let matches_class0 = (0..3).any(|r| {
            (ep.existing.get(r) - mean0.get(0))
                .abs()
                .max()
                .double_value(&[])
                < 1e-12
        });
        assert!(matches_class0);
        // Support and query rows are distinct examples of the same class.
        let all = &classes;
        let found = |row: Tensor| {
            all.iter()
                .position(|t| (0..t.size()[0]).any(|i| t.get(i).equal(&row)))
                .unwrap()
        };
        for new_id in 0..3 {
            let s = found(ep.support.get(2 * new_id));
            assert_ne!(s, 0, "class 0 has too few examples to be new");
            assert_eq!(found(ep.query.get(2 * new_id + 1)), s);
        }
        assert!(sample_episode(&classes, 6, 2, 2, &mut rng).is_none());
        assert!(sample_episode(&classes, 5, 2, 3, &mut rng).is_some());
    }

    /// 40 Gaussian clusters on the unit sphere of dimension 16.
    fn clustered(rng: &mut StdRng, classes: usize, per_class: usize, d: usize) -> Vec<Tensor> {
        (0..classes)
            .map(|_| {
                let centre = unit(&(0..d).map(|_| rng.gen_range(-1.0..1.0)).collect::<Vec<_>>());
                let points: Vec<Vec<f64>> = (0..per_class)
                    .map(|_| {
                        let p: Vec<f64> = centre
                            .iter()
                            .map(|c| c + 0.24 * (rng.gen::<f64>() + rng.gen::<f64>() - 1.0))
                            .collect();
                        unit(&p)
                    })
                    .collect();
                rows(&points).to_kind(Kind::Float)
            })
            .collect()
    }

    #[test]
    fn meta_training_reduces_held_out_query_loss() {
        let d = 16usize;
        let mut rng = StdRng::seed_from_u64(1);
        let data = clustered(&mut rng, 40, 20, d);
        let (train, held_out) = data.split_at(30);
        let held: Vec<Episode> = (0..20)
            .map(|_| sample_episode(held_out, 5, 3, 5, &mut rng).unwrap())
            .collect();
        let config = LeoConfig {
            latent_dim: 16,
            relation_hidden: 32,
            inner_steps: 3,
            lr: 2e-3,
            seed: 11,
            ..LeoConfig::default()
        };
        let mut leo = Leo::new(d as i64, &config, test_device()).unwrap();
        let mean_loss = |leo: &Leo| {
            held.iter()
                .map(|ep| leo.query_loss(ep).unwrap())
                .sum::<f64>()
                / held.len() as f64
        };
        let before = mean_loss(&leo);
        for _ in 0..300 {
            let ep = sample_episode(train, 5, 3, 5, &mut rng).unwrap();
            assert!(leo.meta_train_step(&ep).unwrap().unwrap().is_finite());
        }
        let after = mean_loss(&leo);
        let imprinted = held
            .iter()
            .map(|ep| {
                let p = imprint(&ep.support, &ep.support_labels, 5).unwrap();
                let t = leo
                    .targets(&ep.query_labels, ep.existing.size()[0])
                    .unwrap();
                let on_device = |x: &Tensor| leo.input(x).unwrap();
                leo.episode_loss(
                    &on_device(&ep.query),
                    &t,
                    &on_device(&ep.existing),
                    &on_device(&p),
                )
                .unwrap()
                .double_value(&[])
            })
            .sum::<f64>()
            / held.len() as f64;
        eprintln!(
            "held-out query loss: before {before:.4}, after {after:.4}, imprinting {imprinted:.4}"
        );
        assert!(after < 0.7 * before, "before {before}, after {after}");
    }

    #[test]
    fn a_non_finite_meta_training_loss_skips_the_step() {
        let d = 6usize;
        let mut leo = Leo::new(d as i64, &small_config(), test_device()).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let ep = random_episode(&mut rng, d, 2, 2, 2, 3);
        let poisoned = Episode {
            support: ep.support.fill(f64::NAN),
            ..random_episode(&mut rng, d, 2, 2, 2, 3)
        };
        let before: Vec<Tensor> = leo
            .vs
            .trainable_variables()
            .iter()
            .map(|v| v.copy())
            .collect();
        assert_eq!(leo.meta_train_step(&poisoned).unwrap(), None, "skipped");
        for (var, old) in leo.vs.trainable_variables().iter().zip(&before) {
            assert!(var.equal(old), "a skipped step changed the parameters");
        }
        assert!(
            leo.meta_train_step(&ep).unwrap().unwrap().is_finite(),
            "training goes on"
        );
    }

    #[test]
    fn save_load_round_trip_gives_identical_proxies() {
        let d = 6usize;
        let device = test_device();
        let mut leo = Leo::new(d as i64, &small_config(), device).unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        let ep = random_episode(&mut rng, d, 2, 2, 2, 3);
        let ep = Episode {
            support: ep.support.to_kind(Kind::Float),
            query: ep.query.to_kind(Kind::Float),
            existing: ep.existing.to_kind(Kind::Float),
            ..ep
        };
        for _ in 0..3 {
            leo.meta_train_step(&ep).unwrap().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        leo.save(dir.path()).unwrap();
        let loaded = Leo::load(dir.path(), device).unwrap();
        assert_eq!(loaded.config(), leo.config());
        let a = leo
            .generate(&ep.support, &ep.support_labels, &ep.existing)
            .unwrap();
        let b = loaded
            .generate(&ep.support, &ep.support_labels, &ep.existing)
            .unwrap();
        assert!(a.equal(&b));
        // A store with a different shape is refused.
        let other = Leo::new(d as i64 + 1, &small_config(), Device::Cpu).unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        other.save(dir2.path()).unwrap();
        std::fs::copy(dir.path().join(META_FILE), dir2.path().join(META_FILE)).unwrap();
        assert!(Leo::load(dir2.path(), Device::Cpu).is_err());
    }
}
