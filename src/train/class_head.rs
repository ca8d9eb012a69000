//! Class head: cosine proxies with a scale, trained with Balanced Softmax cross-entropy.
//!
//! Every class has a proxy (a unit vector in embedding space); the logit of an embedding for a
//! class is `scale · cos(embedding, proxy)`. During training the logits are shifted by the log
//! of each class's effective sampling frequency in the training mix (Balanced Softmax, Ren et
//! al. NeurIPS 2020; Jodelet et al. ICANN 2021), so that a long-tailed or exemplar-starved mix
//! does not bias the head towards frequent classes; prediction uses the unshifted logits.
//!
//! Cosine logits are bounded by `±scale`, so the scale must be large enough to absorb the prior:
//! a class that is `r` times rarer than another needs a cosine margin of about `ln r / scale`
//! to reach the same training probability. With the default scale 16 the logit range is 32,
//! comfortably above `ln 200 ≈ 5.3` (CIFAR-100-LT's imbalance); a scale near `ln r` leaves rare
//! classes unable to fit their own examples during training.
use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::TrainError;

/// Default scale of the cosine logits.
pub const DEFAULT_SCALE: f64 = 16.0;

/// Guard against division by a zero norm.
const NORM_EPS: f64 = 1e-12;
/// Adam first-moment decay.
const ADAM_BETA1: f64 = 0.9;
/// Adam second-moment decay.
const ADAM_BETA2: f64 = 0.999;
/// Adam denominator guard.
const ADAM_EPS: f64 = 1e-8;

/// Rows of `t` (`[N, D]`) divided by their L2 norm (differentiable).
pub(crate) fn l2_normalize_rows(t: &Tensor) -> Result<Tensor, TrainError> {
    let norm = t
        .f_norm_scalaropt_dim(2.0, [1i64].as_slice(), true)?
        .f_clamp_min(NORM_EPS)?;
    Ok(t.f_div(&norm)?)
}

/// Cosine logits `scale · ê_i · p̂_c` (`[N, C]`) of embeddings `[N, D]` against proxies
/// `[C, D]`; both sets of rows are L2-normalised here, and the result keeps the autograd graph
/// of both inputs.
pub fn cosine_logits(
    embeddings: &Tensor,
    proxies: &Tensor,
    scale: f64,
) -> Result<Tensor, TrainError> {
    let (e, p) = (embeddings.size(), proxies.size());
    if e.len() != 2 || p.len() != 2 || e[1] != p[1] {
        return Err(TrainError::Shape(format!(
            "cosine logits of embeddings {e:?} against proxies {p:?}, expected [N, D] and [C, D]"
        )));
    }
    let e = l2_normalize_rows(embeddings)?;
    let p = l2_normalize_rows(proxies)?;
    Ok(e.f_matmul(&p.f_tr()?)? * scale)
}

/// Balanced Softmax cross-entropy: the batch mean of `CE(z + log n, y)`.
///
/// `logits` are `[N, C]`, `targets` i64 `[N]` in `0..C`, `class_counts` (any float kind) `[C]`
/// the effective sampling frequency of each class in the training mix; only their ratios
/// matter, and uniform counts give plain cross-entropy. Classes with `n = 0` are masked: their
/// probability is exactly 0 and their logits get no gradient. A negative or non-finite count,
/// a target out of range and a target whose class has `n = 0` are errors. The gradient with
/// respect to the logits is `(softmax(z + log n) − onehot(y)) / N`. Use the prior for training
/// only; predict with `z` alone. An empty batch gives a zero loss (still attached to `logits`).
pub fn balanced_softmax_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    class_counts: &Tensor,
) -> Result<Tensor, TrainError> {
    let size = logits.size();
    if size.len() != 2 {
        return Err(TrainError::Shape(format!(
            "logits have shape {size:?}, expected [N, C]"
        )));
    }
    let (n, c) = (size[0], size[1]);
    if targets.size() != [n] || targets.kind() != Kind::Int64 {
        return Err(TrainError::Shape(format!(
            "targets are {:?} {:?}, expected Int64 [{n}]",
            targets.kind(),
            targets.size()
        )));
    }
    if class_counts.size() != [c] {
        return Err(TrainError::Shape(format!(
            "class counts have shape {:?}, expected [{c}]",
            class_counts.size()
        )));
    }
    let counts: Vec<f64> = Vec::try_from(
        &class_counts
            .f_detach()?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Double)?,
    )?;
    if let Some(bad) = counts.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(TrainError::Config(format!(
            "class counts must be finite and non-negative, got {bad}"
        )));
    }
    let target_values: Vec<i64> = Vec::try_from(&targets.f_to_device(Device::Cpu)?)?;
    for &t in &target_values {
        if t < 0 || t >= c {
            return Err(TrainError::Shape(format!(
                "target {t} out of range for {c} classes"
            )));
        }
        if counts[t as usize] == 0.0 {
            return Err(TrainError::Config(format!(
                "target class {t} has a zero count in the training mix"
            )));
        }
    }
    if n == 0 {
        return Ok(logits.f_sum(logits.kind())? * 0.0);
    }
    // log(n / max n): the shift by log max n cancels in the softmax and keeps values small.
    let max = counts.iter().cloned().fold(0.0, f64::max);
    let prior: Vec<f64> = counts
        .iter()
        .map(|&x| if x > 0.0 { (x / max).ln() } else { 0.0 })
        .collect();
    let masked: Vec<bool> = counts.iter().map(|&x| x == 0.0).collect();
    let device = logits.device();
    let prior = Tensor::from_slice(&prior)
        .f_to_device(device)?
        .f_to_kind(logits.kind())?
        .f_view([1, c])?;
    let mask = Tensor::from_slice(&masked)
        .f_to_device(device)?
        .f_view([1, c])?;
    let adjusted = logits
        .f_add(&prior)?
        .f_masked_fill(&mask, f64::NEG_INFINITY)?;
    let log_p = adjusted.f_log_softmax(1, logits.kind())?;
    let picked = log_p.f_gather(1, &targets.f_to_device(device)?.f_view([n, 1])?, false)?;
    Ok(picked.f_mean(logits.kind())?.f_neg()?)
}

/// Configuration of a [`ClassHead`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassHeadConfig {
    /// Scale `s` of the cosine logits; must absorb `log` of the class-frequency ratios (see the
    /// module documentation).
    pub scale: f64,
    /// Learning rate of [`ClassHead::step`] (Adam on the proxies).
    pub lr: f64,
}

impl Default for ClassHeadConfig {
    fn default() -> Self {
        ClassHeadConfig {
            scale: DEFAULT_SCALE,
            lr: 1e-3,
        }
    }
}

impl ClassHeadConfig {
    /// Checks that the scale and the learning rate are positive and finite.
    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(TrainError::Config(format!(
                "class head scale must be positive, got {}",
                self.scale
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::Config(format!(
                "class head learning rate must be positive, got {}",
                self.lr
            )));
        }
        Ok(())
    }
}

/// Adam state of the proxy rows, with a step count per row.
///
/// Rows whose gradient is exactly zero (absent or masked classes) are skipped entirely: their
/// moments, step count and value stay unchanged ("lazy" Adam), so a masked class does not drift
/// on stale momentum. Per-row step counts keep the bias correction right for rows added later.
struct ProxyAdam {
    /// First moments `[C, D]`.
    m: Tensor,
    /// Second moments `[C, D]`.
    v: Tensor,
    /// Updates applied to each row `[C, 1]`.
    steps: Tensor,
}

impl ProxyAdam {
    /// Zero state for proxies shaped like `proxies`.
    fn new(proxies: &Tensor) -> Result<Self, TrainError> {
        let rows = proxies.size()[0];
        Ok(ProxyAdam {
            m: proxies.f_zeros_like()?,
            v: proxies.f_zeros_like()?,
            steps: Tensor::f_zeros([rows, 1], (proxies.kind(), proxies.device()))?,
        })
    }

    /// Appends zero state for `rows` new rows.
    fn grow(&mut self, rows: i64) -> Result<(), TrainError> {
        let dim = self.m.size()[1];
        let options = (self.m.kind(), self.m.device());
        let zeros = Tensor::f_zeros([rows, dim], options)?;
        self.m = Tensor::f_cat(&[&self.m, &zeros], 0)?;
        self.v = Tensor::f_cat(&[&self.v, &zeros], 0)?;
        self.steps = Tensor::f_cat(&[&self.steps, &Tensor::f_zeros([rows, 1], options)?], 0)?;
        Ok(())
    }

    /// Keeps the state of the rows `rows` (i64 `[R]`, in that order) only.
    fn select_rows(&mut self, rows: &Tensor) -> Result<(), TrainError> {
        for t in [&mut self.m, &mut self.v, &mut self.steps] {
            *t = t.f_index_select(0, rows)?;
        }
        Ok(())
    }

    /// Clears the state of one row.
    fn reset_row(&mut self, row: i64) -> Result<(), TrainError> {
        for t in [&mut self.m, &mut self.v, &mut self.steps] {
            let _ = t.f_get(row)?.f_zero_()?;
        }
        Ok(())
    }

    /// One Adam update of `proxies` (a leaf, modified in place) with gradient `grad`, followed
    /// by re-normalisation of the updated rows.
    fn update(&mut self, proxies: &mut Tensor, grad: &Tensor, lr: f64) -> Result<(), TrainError> {
        tch::no_grad(|| -> Result<(), TrainError> {
            let grad = grad.f_to_kind(proxies.kind())?;
            let active = grad
                .f_abs()?
                .f_sum_dim_intlist([1i64].as_slice(), true, grad.kind())?
                .f_gt(0.0)?;
            let m = (&self.m * ADAM_BETA1 + &grad * (1.0 - ADAM_BETA1))
                .f_where_self(&active, &self.m)?;
            let v = (&self.v * ADAM_BETA2 + grad.f_square()? * (1.0 - ADAM_BETA2))
                .f_where_self(&active, &self.v)?;
            let steps = (&self.steps + 1.0).f_where_self(&active, &self.steps)?;
            // Bias corrections 1 − β^t per row; rows never updated have t = 0 but m = 0 too.
            let c1 = (steps.f_mul_scalar(ADAM_BETA1.ln())?.f_exp()? * -1.0 + 1.0)
                .f_clamp_min(NORM_EPS)?;
            let c2 = (steps.f_mul_scalar(ADAM_BETA2.ln())?.f_exp()? * -1.0 + 1.0)
                .f_clamp_min(NORM_EPS)?;
            let update = (&m / c1) / ((&v / c2).f_sqrt()? + ADAM_EPS) * lr;
            let moved = l2_normalize_rows(&(&*proxies - update))?;
            let next = moved.f_where_self(&active, proxies)?;
            proxies.f_copy_(&next)?;
            self.m = m;
            self.v = v;
            self.steps = steps;
            Ok(())
        })
    }
}

/// A cosine class head: one trainable proxy per class label.
///
/// Proxies are kept at unit norm: they are normalised when added or set and after every
/// optimizer update (projected Adam on the sphere). The proxy tensor is a leaf that requires
/// gradients, so [`ClassHead::logits`] and [`ClassHead::loss`] can be added to the encoder's
/// metric loss; after `backward` on the joint loss, [`ClassHead::step`] updates the proxies from
/// their accumulated gradient. Grow the head ([`ClassHead::add_class`]) between steps, not
/// between `backward` and `step`: growing replaces the proxy tensor and drops its gradient.
pub struct ClassHead {
    config: ClassHeadConfig,
    dim: i64,
    device: Device,
    labels: Vec<String>,
    index: HashMap<String, i64>,
    /// `[C, D]` f32 leaf with `requires_grad`.
    proxies: Tensor,
    adam: ProxyAdam,
}

impl ClassHead {
    /// An empty head for embeddings of dimension `dim`, its proxies on `device`.
    pub fn new(dim: i64, config: ClassHeadConfig, device: Device) -> Result<Self, TrainError> {
        config.validate()?;
        if dim <= 0 {
            return Err(TrainError::Config(format!(
                "class head dimension must be positive, got {dim}"
            )));
        }
        let proxies =
            Tensor::f_zeros([0, dim], (Kind::Float, device))?.f_set_requires_grad(true)?;
        let adam = ProxyAdam::new(&proxies)?;
        Ok(ClassHead {
            config,
            dim,
            device,
            labels: Vec::new(),
            index: HashMap::new(),
            proxies,
            adam,
        })
    }

    /// The configuration.
    pub fn config(&self) -> ClassHeadConfig {
        self.config
    }

    /// Embedding dimension `D`.
    pub fn dim(&self) -> i64 {
        self.dim
    }

    /// Device of the proxies.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Number of classes `C`.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the head has no class yet.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Class labels in row order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Row index of `label`, if it is a class of the head.
    pub fn index_of(&self, label: &str) -> Option<i64> {
        self.index.get(label).copied()
    }

    /// A detached copy of the unit-norm proxies `[C, D]` (f32, on the head's device).
    pub fn proxies(&self) -> Result<Tensor, TrainError> {
        Ok(self.proxies.f_detach_copy()?)
    }

    /// Whether every proxy is finite (an empty head is).
    pub fn is_finite(&self) -> Result<bool, TrainError> {
        Ok(self.proxies.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
    }

    /// A `[D]` vector normalised to unit length as an f32 `[1, D]` row on the head's device.
    fn proxy_row(&self, proxy: &Tensor) -> Result<Tensor, TrainError> {
        if proxy.size() != [self.dim] {
            return Err(TrainError::Shape(format!(
                "proxy has shape {:?}, expected [{}]",
                proxy.size(),
                self.dim
            )));
        }
        let row = proxy
            .f_detach()?
            .f_to_device(self.device)?
            .f_to_kind(Kind::Float)?
            .f_view([1, self.dim])?;
        let norm = row.f_norm()?.f_double_value(&[])?;
        if !(norm.is_finite() && norm > 0.0) {
            return Err(TrainError::Config(format!(
                "proxy must have a finite non-zero norm, got {norm}"
            )));
        }
        Ok(row / norm)
    }

    /// Adds a class with `initial_proxy` (`[D]`, normalised here) and returns its row index.
    ///
    /// Existing proxies and their optimizer state are unchanged. Re-adding an existing label
    /// returns its index and leaves its proxy as it is.
    pub fn add_class(&mut self, label: &str, initial_proxy: &Tensor) -> Result<i64, TrainError> {
        if let Some(i) = self.index_of(label) {
            return Ok(i);
        }
        let row = self.proxy_row(initial_proxy)?;
        let grown = Tensor::f_cat(&[&self.proxies.f_detach()?, &row], 0)?;
        self.proxies = grown.f_set_requires_grad(true)?;
        self.adam.grow(1)?;
        let i = self.labels.len() as i64;
        self.labels.push(label.to_string());
        self.index.insert(label.to_string(), i);
        Ok(i)
    }

    /// Keeps only the classes whose label `keep` accepts (in their order), with their proxies
    /// and optimizer state; returns the kept classes' former row indices. Call between steps.
    pub fn retain_classes(&mut self, keep: impl Fn(&str) -> bool) -> Result<Vec<i64>, TrainError> {
        let kept: Vec<i64> = (0..self.labels.len() as i64)
            .filter(|&i| keep(&self.labels[i as usize]))
            .collect();
        if kept.len() == self.labels.len() {
            return Ok(kept);
        }
        let rows = Tensor::f_from_slice(&kept)?.f_to_device(self.device)?;
        let proxies = self.proxies.f_detach()?.f_index_select(0, &rows)?;
        self.proxies = proxies.f_set_requires_grad(true)?;
        self.adam.select_rows(&rows)?;
        self.labels = kept
            .iter()
            .map(|&i| self.labels[i as usize].clone())
            .collect();
        self.index = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, label)| (label.clone(), i as i64))
            .collect();
        Ok(kept)
    }

    /// Replaces the proxy of `label` (normalised here) and clears its optimizer state.
    pub fn set_proxy(&mut self, label: &str, proxy: &Tensor) -> Result<(), TrainError> {
        let i = self
            .index_of(label)
            .ok_or_else(|| TrainError::Config(format!("unknown class label {label:?}")))?;
        let row = self.proxy_row(proxy)?;
        tch::no_grad(|| -> Result<(), TrainError> {
            self.proxies.f_get(i)?.f_copy_(&row.f_view([self.dim])?)?;
            Ok(())
        })?;
        self.adam.reset_row(i)
    }

    /// Cosine logits `[N, C]` of embeddings `[N, D]` (moved to the head's device and f32), with
    /// the autograd graph into both the embeddings and the proxies.
    pub fn logits(&self, embeddings: &Tensor) -> Result<Tensor, TrainError> {
        let e = embeddings
            .f_to_device(self.device)?
            .f_to_kind(Kind::Float)?;
        cosine_logits(&e, &self.proxies, self.config.scale)
    }

    /// Balanced Softmax cross-entropy of the cosine logits (see
    /// [`balanced_softmax_cross_entropy`]); `class_counts` has one entry per class.
    pub fn loss(
        &self,
        embeddings: &Tensor,
        targets: &Tensor,
        class_counts: &Tensor,
    ) -> Result<Tensor, TrainError> {
        balanced_softmax_cross_entropy(&self.logits(embeddings)?, targets, class_counts)
    }

    /// One Adam step (learning rate from the config) on the proxies' accumulated gradient, then
    /// clears it. Rows with a zero gradient are left untouched; without any gradient this does
    /// nothing. Moments are kept per row and extended with zeros when classes are added, so
    /// growing the head does not reset the state of the existing classes.
    pub fn step(&mut self) -> Result<(), TrainError> {
        let grad = self.proxies.grad();
        if !grad.defined() {
            return Ok(());
        }
        self.adam.update(&mut self.proxies, &grad, self.config.lr)?;
        self.clear_grad()
    }

    /// Drops the proxies' accumulated gradient without stepping (the trainer skipped the step
    /// it came from).
    pub fn clear_grad(&mut self) -> Result<(), TrainError> {
        let mut grad = self.proxies.grad();
        if grad.defined() {
            let _ = tch::no_grad(|| grad.f_zero_())?;
        }
        Ok(())
    }

    /// Class probabilities `[N, C]`: softmax of the cosine logits without any prior, no graph.
    pub fn predict(&self, embeddings: &Tensor) -> Result<Tensor, TrainError> {
        tch::no_grad(|| Ok(self.logits(embeddings)?.f_softmax(1, Kind::Float)?))
    }

    /// Classifier adaptation: retrains only the proxies with plain cross-entropy on fixed
    /// embeddings `[N, D]` (detached; e.g. a class-balanced exemplar set) and their targets
    /// (i64 `[N]`, row indices).
    ///
    /// Runs `epochs` shuffled passes (order from `seed`) in mini-batches of `batch` with a fresh
    /// Adam state at learning rate `lr`; the head's own [`ClassHead::step`] state is kept. No
    /// gradient reaches the embeddings. Returns the cross-entropy over all `N` examples after
    /// the last epoch.
    pub fn adapt(
        &mut self,
        embeddings: &Tensor,
        targets: &Tensor,
        epochs: usize,
        batch: usize,
        lr: f64,
        seed: u64,
    ) -> Result<f64, TrainError> {
        let size = embeddings.size();
        if size.len() != 2 || size[1] != self.dim || size[0] == 0 {
            return Err(TrainError::Shape(format!(
                "adaptation embeddings have shape {size:?}, expected non-empty [N, {}]",
                self.dim
            )));
        }
        if batch == 0 || !(lr.is_finite() && lr > 0.0) {
            return Err(TrainError::Config(format!(
                "adaptation needs a positive batch size and learning rate, got {batch} and {lr}"
            )));
        }
        let n = size[0];
        let ones = Tensor::f_ones([self.len() as i64], (Kind::Float, self.device))?;
        let embeddings = embeddings
            .f_detach()?
            .f_to_device(self.device)?
            .f_to_kind(Kind::Float)?;
        let targets = targets.f_to_device(self.device)?;
        // Validates targets against the classes before any update.
        let _ = tch::no_grad(|| self.loss(&embeddings, &targets, &ones))?;
        let mut adam = ProxyAdam::new(&self.proxies)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut order: Vec<i64> = (0..n).collect();
        for _ in 0..epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch) {
                let idx = Tensor::from_slice(chunk).f_to_device(self.device)?;
                let e = embeddings.f_index_select(0, &idx)?;
                let t = targets.f_index_select(0, &idx)?;
                let loss = self.loss(&e, &t, &ones)?;
                let grads = Tensor::f_run_backward(&[&loss], &[&self.proxies], false, false)?;
                if let Some(grad) = grads.first().filter(|g| g.defined()) {
                    adam.update(&mut self.proxies, grad, lr)?;
                }
            }
        }
        let loss = tch::no_grad(|| self.loss(&embeddings, &targets, &ones))?;
        Ok(loss.f_double_value(&[])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::test_device;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
    }

    /// Logits (or embeddings) on the device under test; targets and counts stay on the CPU,
    /// as the class learner passes them.
    fn matrix(values: &[f64], cols: usize) -> Tensor {
        Tensor::from_slice(values)
            .view([-1, cols as i64])
            .to_device(test_device())
    }

    /// Plain-Rust `mean_i −log softmax(z_i + log n)[y_i]`, skipping classes with `n = 0`.
    fn brute_force_loss(z: &[f64], c: usize, y: &[i64], counts: &[f64]) -> f64 {
        let mut total = 0.0;
        for (i, &t) in y.iter().enumerate() {
            let row = &z[i * c..(i + 1) * c];
            let denom: f64 = (0..c)
                .filter(|&j| counts[j] > 0.0)
                .map(|j| (row[j] + counts[j].ln()).exp())
                .sum();
            let t = t as usize;
            total -= row[t] + counts[t].ln() - denom.ln();
        }
        total / y.len() as f64
    }

    fn loss_value(z: &[f64], c: usize, y: &[i64], counts: &[f64]) -> f64 {
        balanced_softmax_cross_entropy(
            &matrix(z, c),
            &Tensor::from_slice(y),
            &Tensor::from_slice(counts),
        )
        .unwrap()
        .double_value(&[])
    }

    #[test]
    fn uniform_counts_give_plain_cross_entropy() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (n, c) = (6, 5);
        let z = random(&mut rng, n * c);
        let y = [0i64, 4, 2, 2, 1, 3];
        let got = loss_value(&z, c, &y, &[3.0; 5]);
        let plain = matrix(&z, c)
            .log_softmax(1, Kind::Double)
            .nll_loss(&Tensor::from_slice(&y).to_device(test_device()))
            .double_value(&[]);
        let brute = brute_force_loss(&z, c, &y, &[1.0; 5]);
        assert!((got - plain).abs() < 1e-12, "{got} vs tch {plain}");
        assert!((got - brute).abs() < 1e-12, "{got} vs brute force {brute}");
        // Non-uniform counts against the brute-force reference.
        let counts = [1.0, 20.0, 3.0, 0.5, 7.0];
        let got = loss_value(&z, c, &y, &counts);
        let want = brute_force_loss(&z, c, &y, &counts);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!((got - plain).abs() > 1e-3, "the prior changes the loss");
    }

    #[test]
    fn gradient_is_shifted_softmax_minus_onehot_and_matches_finite_differences() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (n, c) = (4, 5);
        let z = random(&mut rng, n * c);
        let y = [1i64, 0, 4, 1];
        let counts = [2.0, 9.0, 0.0, 1.0, 4.0];
        let logits = matrix(&z, c).set_requires_grad(true);
        balanced_softmax_cross_entropy(
            &logits,
            &Tensor::from_slice(&y),
            &Tensor::from_slice(&counts),
        )
        .unwrap()
        .backward();
        let grad: Vec<f64> = Vec::try_from(&logits.grad().view([-1])).unwrap();
        let h = 1e-6;
        for i in 0..n {
            let row = &z[i * c..(i + 1) * c];
            let denom: f64 = (0..c)
                .filter(|&j| counts[j] > 0.0)
                .map(|j| (row[j] + f64::ln(counts[j])).exp())
                .sum();
            for j in 0..c {
                let p = if counts[j] > 0.0 {
                    (row[j] + f64::ln(counts[j])).exp() / denom
                } else {
                    0.0
                };
                let onehot = if y[i] == j as i64 { 1.0 } else { 0.0 };
                let want = (p - onehot) / n as f64;
                let k = i * c + j;
                assert!(
                    (grad[k] - want).abs() < 1e-12,
                    "[{i},{j}] {} vs {want}",
                    grad[k]
                );
                let (mut plus, mut minus) = (z.clone(), z.clone());
                plus[k] += h;
                minus[k] -= h;
                let fd = (loss_value(&plus, c, &y, &counts) - loss_value(&minus, c, &y, &counts))
                    / (2.0 * h);
                assert!(
                    (grad[k] - fd).abs() < 1e-8,
                    "[{i},{j}] {} vs fd {fd}",
                    grad[k]
                );
            }
        }
    }

    #[test]
    fn zero_count_classes_get_zero_probability_and_zero_gradient() {
        let (c, y) = (3, [0i64, 2, 2]);
        let counts = [2.0, 0.0, 3.0];
        let mut z = vec![0.3, 5.0, -0.2, 1.0, 40.0, 0.5, -1.0, -3.0, 2.0];
        let base = loss_value(&z, c, &y, &counts);
        let want = brute_force_loss(&z, c, &y, &counts);
        assert!((base - want).abs() < 1e-12, "{base} vs {want}");
        // The masked class's logit does not matter at all: its probability is exactly 0.
        for v in [-100.0, 0.0, 1e3] {
            z[1] = v;
            z[4] = v;
            assert_eq!(loss_value(&z, c, &y, &counts), base);
        }
        let logits = matrix(&z, c).set_requires_grad(true);
        let loss = balanced_softmax_cross_entropy(
            &logits,
            &Tensor::from_slice(&y),
            &Tensor::from_slice(&counts),
        )
        .unwrap();
        assert!(loss.double_value(&[]).is_finite());
        loss.backward();
        let g = logits.grad();
        assert_eq!(
            g.select(1, 1).abs().sum(Kind::Double).double_value(&[]),
            0.0
        );
        assert!(g.select(1, 0).abs().sum(Kind::Double).double_value(&[]) > 1e-3);
    }

    #[test]
    fn only_count_ratios_matter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let z = random(&mut rng, 12);
        let y = [0i64, 1, 3];
        let counts = [5.0, 1.0, 0.0, 12.0];
        let base = loss_value(&z, 4, &y, &counts);
        for k in [1e-3, 7.0, 1e6] {
            let scaled: Vec<f64> = counts.iter().map(|x| x * k).collect();
            let got = loss_value(&z, 4, &y, &scaled);
            assert!((got - base).abs() < 1e-12, "×{k}: {got} vs {base}");
        }
        // f32 counts with f32 logits work too.
        let got = balanced_softmax_cross_entropy(
            &matrix(&z, 4).to_kind(Kind::Float),
            &Tensor::from_slice(&y),
            &Tensor::from_slice(&counts).to_kind(Kind::Float),
        )
        .unwrap()
        .double_value(&[]);
        assert!((got - base).abs() < 1e-5);
    }

    #[test]
    fn invalid_targets_and_counts_are_errors() {
        let z = matrix(&[0.0; 6], 3);
        let y = Tensor::from_slice(&[0i64, 1]);
        let zero_target =
            balanced_softmax_cross_entropy(&z, &y, &Tensor::from_slice(&[1.0, 0.0, 1.0]));
        assert!(matches!(zero_target, Err(TrainError::Config(_))));
        let negative =
            balanced_softmax_cross_entropy(&z, &y, &Tensor::from_slice(&[1.0, -1.0, 1.0]));
        assert!(matches!(negative, Err(TrainError::Config(_))));
        let out_of_range = balanced_softmax_cross_entropy(
            &z,
            &Tensor::from_slice(&[0i64, 3]),
            &Tensor::from_slice(&[1.0; 3]),
        );
        assert!(matches!(out_of_range, Err(TrainError::Shape(_))));
        let wrong_counts = balanced_softmax_cross_entropy(&z, &y, &Tensor::from_slice(&[1.0; 2]));
        assert!(matches!(wrong_counts, Err(TrainError::Shape(_))));
        let empty = balanced_softmax_cross_entropy(
            &matrix(&[], 3),
            &Tensor::from_slice::<i64>(&[]),
            &Tensor::from_slice(&[1.0; 3]),
        )
        .unwrap();
        assert_eq!(empty.double_value(&[]), 0.0);
    }

    #[test]
    fn cosine_logits_match_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (n, c, d) = (3, 4, 5);
        let e = random(&mut rng, n * d);
        let p = random(&mut rng, c * d);
        let got: Vec<f64> = Vec::try_from(
            &cosine_logits(&matrix(&e, d), &matrix(&p, d), 7.5)
                .unwrap()
                .view([-1]),
        )
        .unwrap();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..n {
            for j in 0..c {
                let (a, b) = (&e[i * d..(i + 1) * d], &p[j * d..(j + 1) * d]);
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                let want = 7.5 * dot / (norm(a) * norm(b));
                assert!((got[i * c + j] - want).abs() < 1e-12);
            }
        }
        assert!(cosine_logits(&matrix(&e, d), &matrix(&p[..16], 4), 1.0).is_err());
    }

    fn head_with(classes: usize, dim: i64, seed: i64) -> ClassHead {
        tch::manual_seed(seed);
        let mut head = ClassHead::new(dim, ClassHeadConfig::default(), test_device()).unwrap();
        for c in 0..classes {
            // Initial proxies come from the CPU (as imprinted ones do); the head moves them.
            head.add_class(
                &format!("class-{c}"),
                &Tensor::randn([dim], (Kind::Float, Device::Cpu)),
            )
            .unwrap();
        }
        head
    }

    #[test]
    fn add_class_keeps_old_proxies() {
        let mut head = head_with(3, 6, 5);
        let before = head.proxies().unwrap();
        let norms = before.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-6);
        let new = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 4.0, 0.0, 0.0]);
        assert_eq!(head.add_class("new", &new).unwrap(), 3);
        assert_eq!(head.add_class("class-1", &new).unwrap(), 1);
        let after = head.proxies().unwrap();
        assert_eq!(after.size(), [4, 6]);
        assert!(after.narrow(0, 0, 3).equal(&before));
        let want = Tensor::from_slice(&[0.6f32, 0.0, 0.0, 0.8, 0.0, 0.0]).to_device(head.device());
        assert!((after.get(3) - &want).abs().max().double_value(&[]) < 1e-7);
        assert_eq!(head.labels(), ["class-0", "class-1", "class-2", "new"]);
        assert_eq!(head.index_of("new"), Some(3));
        assert_eq!(head.index_of("absent"), None);
        assert!(head
            .add_class("bad", &Tensor::zeros([6], (Kind::Float, Device::Cpu)))
            .is_err());
        assert!(head
            .add_class("bad", &Tensor::ones([5], (Kind::Float, Device::Cpu)))
            .is_err());
        head.set_proxy("class-0", &new).unwrap();
        assert!(
            (head.proxies().unwrap().get(0) - want)
                .abs()
                .max()
                .double_value(&[])
                < 1e-7
        );
        assert!(head.set_proxy("absent", &new).is_err());
        assert!(head.is_finite().unwrap());
        let _ = tch::no_grad(|| head.proxies.get(2).fill_(f64::NAN));
        assert!(!head.is_finite().unwrap(), "a NaN proxy is seen");
    }

    #[test]
    fn removed_classes_leave_the_others_and_their_optimizer_state_as_they_were() {
        // Two twins take the same step; one then drops class-1. The next step, with the
        // gradient of class-1's column left out, must move the kept classes exactly as the
        // twin that kept class-1 (with no gradient on it: lazy Adam leaves it alone).
        let step = |head: &mut ClassHead, embeddings: &Tensor, targets: &[i64], counts: &[f32]| {
            let loss = head
                .loss(
                    embeddings,
                    &Tensor::from_slice(targets),
                    &Tensor::from_slice(counts),
                )
                .unwrap();
            loss.backward();
            head.step().unwrap();
        };
        let (mut kept_all, mut dropped) = (head_with(3, 4, 8), head_with(3, 4, 8));
        let embeddings = Tensor::randn([6, 4], (Kind::Float, kept_all.device()));
        for head in [&mut kept_all, &mut dropped] {
            step(head, &embeddings, &[0, 1, 2, 0, 1, 2], &[1.0, 1.0, 1.0]);
        }
        let before = dropped.proxies().unwrap();
        assert_eq!(dropped.retain_classes(|l| l != "class-1").unwrap(), [0, 2]);
        assert_eq!(dropped.labels(), ["class-0", "class-2"]);
        assert_eq!(
            (dropped.index_of("class-2"), dropped.index_of("class-1")),
            (Some(1), None)
        );
        let rows = Tensor::from_slice(&[0i64, 2]).to_device(dropped.device());
        assert!(dropped
            .proxies()
            .unwrap()
            .equal(&before.index_select(0, &rows)));
        // Targets of class-0 and class-2 only; class-1's zero count gives it zero probability
        // and zero gradient, so the kept classes see the softmax of the twin without it.
        let targets = [0i64, 2, 2, 0];
        let batch = embeddings.narrow(0, 0, 4);
        step(&mut kept_all, &batch, &targets, &[1.0, 0.0, 1.0]);
        step(&mut dropped, &batch, &[0, 1, 1, 0], &[1.0, 1.0]);
        let want = kept_all.proxies().unwrap().index_select(0, &rows);
        let got = dropped.proxies().unwrap();
        assert!((got - want).abs().max().double_value(&[]) < 1e-6);
        // Nothing to drop: nothing changes.
        assert_eq!(dropped.retain_classes(|_| true).unwrap(), [0, 1]);
    }

    #[test]
    fn joint_step_moves_proxies_and_passes_gradient_to_embeddings() {
        let mut head = head_with(3, 4, 6);
        let before = head.proxies().unwrap();
        let embeddings =
            Tensor::randn([5, 4], (Kind::Float, head.device())).set_requires_grad(true);
        let targets = Tensor::from_slice(&[0i64, 2, 2, 0, 0]);
        let counts = Tensor::from_slice(&[4.0f32, 0.0, 1.0]);
        let loss = head.loss(&embeddings, &targets, &counts).unwrap();
        loss.backward();
        assert!(embeddings.grad().abs().sum(Kind::Double).double_value(&[]) > 1e-4);
        head.step().unwrap();
        let after = head.proxies().unwrap();
        // The masked class has no gradient and stays put; the others move and stay unit-norm.
        assert!(after.get(1).equal(&before.get(1)));
        for row in [0, 2] {
            assert!(
                (after.get(row) - before.get(row))
                    .abs()
                    .max()
                    .double_value(&[])
                    > 1e-5
            );
            assert!((after.get(row).norm().double_value(&[]) - 1.0).abs() < 1e-6);
        }
        // The gradient was cleared; a step without a new backward changes nothing.
        head.step().unwrap();
        assert!(head.proxies().unwrap().equal(&after));
        // Prediction ignores the prior: rows are softmax of the plain cosine logits.
        let p = head.predict(&embeddings).unwrap();
        let want = head.logits(&embeddings).unwrap().softmax(1, Kind::Float);
        assert!(
            (p.sum_dim_intlist([1i64].as_slice(), false, Kind::Double) - 1.0)
                .abs()
                .max()
                .double_value(&[])
                < 1e-6
        );
        assert!((p - want).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn adapt_reduces_the_loss_and_changes_only_the_proxies() {
        let mut head = head_with(4, 8, 7);
        // Each class's examples cluster around a direction unrelated to its initial proxy. They
        // live on the CPU, as the class learner's embeddings do; the head moves them.
        let centres = Tensor::randn([4, 8], (Kind::Float, Device::Cpu)) * 3.0;
        let targets = Tensor::from_slice(&(0..40).map(|i| i % 4).collect::<Vec<i64>>());
        let embeddings = (centres.index_select(0, &targets)
            + Tensor::randn([40, 8], (Kind::Float, Device::Cpu)))
        .set_requires_grad(true);
        let snapshot = embeddings.detach().copy();
        let ones = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let before = head
            .loss(&embeddings, &targets, &ones)
            .unwrap()
            .double_value(&[]);
        let proxies_before = head.proxies().unwrap();
        let after = head.adapt(&embeddings, &targets, 30, 8, 0.05, 9).unwrap();
        assert!(after < 0.5 * before, "{before} → {after}");
        let check = tch::no_grad(|| head.loss(&embeddings, &targets, &ones))
            .unwrap()
            .double_value(&[]);
        assert!((check - after).abs() < 1e-5);
        assert!(!embeddings.grad().defined());
        assert!(embeddings.detach().equal(&snapshot));
        assert!(!head.proxies().unwrap().equal(&proxies_before));
        assert_eq!(head.len(), 4);
        // A target outside the head is rejected before anything changes.
        let proxies = head.proxies().unwrap();
        let bad = Tensor::from_slice(&(0..40).map(|i| i % 5).collect::<Vec<i64>>());
        assert!(head.adapt(&embeddings, &bad, 1, 8, 0.05, 9).is_err());
        assert!(head.proxies().unwrap().equal(&proxies));
    }
}
