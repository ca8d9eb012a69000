//! Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for tiny training batches.
//!
//! A BatchNorm layer that follows a conv or linear layer with weights θ normalises with
//! statistics pooled over the last `window` iterations instead of the current batch alone.
//! Statistics of an earlier iteration t−τ were computed under the weights of that time; they
//! are compensated to the current weights by the first-order Taylor term
//!
//! ```text
//! μ_{t−τ}(θ_t) ≈ μ_{t−τ} + ⟨∂μ_{t−τ}/∂θ, θ_t − θ_{t−τ}⟩      (same for ν = E[x²])
//! ```
//!
//! The gradients ∂μ/∂θ and ∂ν/∂θ come from autograd when the statistics are recorded. Every
//! channel's statistic depends only on its own slice of θ (the leading dimension), so one
//! backward pass of Σ_c μ_c yields all of them. Instead of a snapshot of θ_{t−τ} a record keeps
//! `a = ⟨g, θ_{t−τ}⟩` per channel, so the compensation is `⟨g, θ_t⟩ − a`.
//!
//! The pooled statistics are averaged with weights by example count; the mean of squares of
//! each record is first raised to at least μ² (a compensated record can violate ν ≥ μ²); the
//! variance is `ν̄ − μ̄²` (biased, as BatchNorm normalises with). Gradients flow only through
//! the current iteration's statistics. During burn-in the layer is plain BatchNorm (it records
//! statistics all the same, so the window is full when burn-in ends). `naive` averaging skips
//! the compensation. The records live in memory only: a reloaded model starts with an empty
//! window.
use std::collections::VecDeque;

use tch::nn;
use tch::{TchError, Tensor};

/// How a cross-iteration layer pools statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossIterationSettings {
    /// Iterations pooled, the current one included (k ≥ 1; 1 is plain BatchNorm).
    pub window: usize,
    /// Training steps of plain BatchNorm before pooling starts.
    pub burnin: usize,
    /// Compensate earlier statistics to the current weights (CBN); `false` averages them
    /// as they were recorded (naive cross-iteration averaging).
    pub compensate: bool,
}

/// BatchNorm hyper-parameters shared with the layer the statistics replace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormConstants {
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Weight of the new value in the running-average update.
    pub momentum: f64,
}

/// First-order compensation data of one record: per-parameter gradients of the summed
/// statistic and their per-channel dot products with the weights at record time.
#[derive(Debug)]
struct Taylor {
    grads: Vec<Tensor>,
    at_record: Tensor,
}

impl Taylor {
    /// `g` for every weight tensor and `⟨g, θ⟩` per channel, of the summed `statistic`.
    fn of(statistic: &Tensor, weights: &[&Tensor]) -> Result<Taylor, TchError> {
        let grads =
            Tensor::f_run_backward(&[statistic.f_sum(statistic.kind())?], weights, true, false)?;
        let at_record = per_channel_dot(&grads, weights)?;
        Ok(Taylor { grads, at_record })
    }

    /// The statistic's change from the recorded weights to `weights`: `⟨g, θ_t⟩ − a`.
    fn shift(&self, weights: &[&Tensor]) -> Result<Tensor, TchError> {
        per_channel_dot(&self.grads, weights)?.f_sub(&self.at_record)
    }
}

/// Σ over each weight tensor's non-leading dimensions of `grad ⊙ weight`, summed over tensors:
/// a `[C]` vector of per-channel dot products.
fn per_channel_dot(grads: &[Tensor], weights: &[&Tensor]) -> Result<Tensor, TchError> {
    let mut total: Option<Tensor> = None;
    for (g, w) in grads.iter().zip(weights) {
        let channels = w.size().first().copied().unwrap_or(0);
        let dot = (g * w.f_detach()?)
            .f_reshape([channels, -1])?
            .f_sum_dim_intlist(1, false, g.kind())?;
        total = Some(match total {
            Some(t) => t.f_add(&dot)?,
            None => dot,
        });
    }
    total.ok_or_else(|| TchError::Kind("cross-iteration norm needs at least one weight".into()))
}

/// Statistics of one earlier iteration.
#[derive(Debug)]
struct Record {
    mean: Tensor,
    sq_mean: Tensor,
    count: f64,
    mean_taylor: Option<Taylor>,
    sq_taylor: Option<Taylor>,
}

/// Per-channel statistics of the current batch (with graph) and its example count.
#[derive(Debug)]
pub struct BatchStatistics {
    /// E\[x\] per channel `[C]`.
    pub mean: Tensor,
    /// E\[x²\] per channel `[C]`.
    pub sq_mean: Tensor,
    /// Values per channel (N × spatial positions).
    pub count: f64,
}

impl BatchStatistics {
    /// Statistics of `xs` (`[N, C]` or `[N, C, …]`) over every dimension but the channel.
    pub fn of(xs: &Tensor) -> Result<BatchStatistics, TchError> {
        let size = xs.size();
        let dims: Vec<i64> = (0..size.len() as i64).filter(|&d| d != 1).collect();
        let channels = size.get(1).copied().unwrap_or(1).max(1);
        Ok(BatchStatistics {
            mean: xs.f_mean_dim(dims.as_slice(), false, xs.kind())?,
            sq_mean: xs
                .f_square()?
                .f_mean_dim(dims.as_slice(), false, xs.kind())?,
            count: (xs.numel() as i64 / channels) as f64,
        })
    }
}

/// The cross-iteration state of one normalisation layer: the recorded statistics of the last
/// `window − 1` iterations and the count of training steps seen.
#[derive(Debug)]
pub struct CrossIterationNorm {
    settings: CrossIterationSettings,
    constants: NormConstants,
    records: VecDeque<Record>,
    steps: usize,
    /// What the last training-mode forward changed, until the trainer settles it
    /// ([`CrossIterationNorm::settle_last_forward`]).
    last_change: Option<WindowChange>,
}

/// How one forward changed the window.
#[derive(Debug)]
struct WindowChange {
    /// Whether it appended a record.
    pushed: bool,
    /// The oldest records it dropped to keep the window's size.
    dropped: Vec<Record>,
}

impl CrossIterationNorm {
    /// An empty window.
    pub fn new(settings: CrossIterationSettings, constants: NormConstants) -> Self {
        CrossIterationNorm {
            settings,
            constants,
            records: VecDeque::with_capacity(settings.window),
            steps: 0,
            last_change: None,
        }
    }

    /// Settles the last training-mode forward once the trainer knows whether it took that
    /// step: keeps what it did to the window and the burn-in count (`taken`), or takes it
    /// back. Does nothing a second time.
    pub fn settle_last_forward(&mut self, taken: bool) {
        let Some(change) = self.last_change.take() else {
            return;
        };
        if taken {
            return;
        }
        if change.pushed {
            self.records.pop_back();
        }
        for record in change.dropped.into_iter().rev() {
            self.records.push_front(record);
        }
        self.steps = self.steps.saturating_sub(1);
    }

    /// Earlier iterations currently recorded (at most `window − 1`).
    pub fn recorded(&self) -> usize {
        self.records.len()
    }

    #[cfg(test)]
    /// Whether any recorded tensor still references an autograd graph (it never should).
    pub fn holds_graph(&self) -> bool {
        self.records.iter().any(|r| {
            r.mean.requires_grad()
                || r.sq_mean.requires_grad()
                || [&r.mean_taylor, &r.sq_taylor]
                    .into_iter()
                    .flatten()
                    .any(|t| {
                        t.at_record.requires_grad() || t.grads.iter().any(Tensor::requires_grad)
                    })
        })
    }

    /// Training-mode forward of `xs`, the output of the layer whose weights are `weights`
    /// (each with the channel as leading dimension), through BatchNorm `bn`: normalises, updates
    /// `bn`'s running statistics and records this iteration.
    pub fn forward(
        &mut self,
        xs: &Tensor,
        weights: &[&Tensor],
        bn: &nn::BatchNorm,
    ) -> Result<Tensor, TchError> {
        let current = BatchStatistics::of(xs)?;
        let ys = if self.steps < self.settings.burnin {
            xs.f_batch_norm(
                bn.ws.as_ref(),
                bn.bs.as_ref(),
                Some(&bn.running_mean),
                Some(&bn.running_var),
                true,
                self.constants.momentum,
                self.constants.eps,
                false,
            )?
        } else {
            let (mean, var) = self.pooled(&current, weights)?;
            self.update_running(bn, &mean, &var, current.count)?;
            self.normalise(xs, &mean, &var, bn)?
        };
        self.last_change = Some(self.record(current, weights)?);
        self.steps += 1;
        Ok(ys)
    }

    /// Pooled mean and (biased) variance `[C]` over the current batch and the recorded
    /// iterations compensated to `weights`; gradients flow through the current batch only.
    pub fn pooled(
        &self,
        current: &BatchStatistics,
        weights: &[&Tensor],
    ) -> Result<(Tensor, Tensor), TchError> {
        let mut total = current.count;
        let mut mean_sum = current.mean.f_mul_scalar(current.count)?;
        let mut sq_sum = current
            .sq_mean
            .f_maximum(&current.mean.f_square()?)?
            .f_mul_scalar(current.count)?;
        for (mean, sq_mean, count) in self.compensated(weights)? {
            mean_sum = mean_sum.f_add(&mean.f_mul_scalar(count)?)?;
            sq_sum = sq_sum.f_add(&sq_mean.f_maximum(&mean.f_square()?)?.f_mul_scalar(count)?)?;
            total += count;
        }
        let mean = mean_sum.f_div_scalar(total)?;
        let var = sq_sum
            .f_div_scalar(total)?
            .f_sub(&mean.f_square()?)?
            .f_clamp_min(0.0)?;
        Ok((mean, var))
    }

    /// The recorded iterations' `(mean, mean of squares, count)`, compensated to `weights`
    /// when the layer compensates (detached).
    pub fn compensated(&self, weights: &[&Tensor]) -> Result<Vec<(Tensor, Tensor, f64)>, TchError> {
        let adjust = |stat: &Tensor, taylor: &Option<Taylor>| match taylor {
            Some(t) if self.settings.compensate => stat.f_add(&t.shift(weights)?),
            _ => Ok(stat.shallow_clone()),
        };
        self.records
            .iter()
            .map(|r| {
                Ok((
                    adjust(&r.mean, &r.mean_taylor)?,
                    adjust(&r.sq_mean, &r.sq_taylor)?,
                    r.count,
                ))
            })
            .collect()
    }

    /// `γ (x − μ) / sqrt(σ² + ε) + β` with per-channel `mean` and `var`.
    pub fn normalise(
        &self,
        xs: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        bn: &nn::BatchNorm,
    ) -> Result<Tensor, TchError> {
        let mut shape = vec![1i64; xs.dim()];
        if let Some(c) = shape.get_mut(1) {
            *c = -1;
        }
        let inv_std = var.f_add_scalar(self.constants.eps)?.f_rsqrt()?;
        let mut ys = xs
            .f_sub(&mean.f_view(shape.as_slice())?)?
            .f_mul(&inv_std.f_view(shape.as_slice())?)?;
        if let Some(gamma) = &bn.ws {
            ys = ys.f_mul(&gamma.f_view(shape.as_slice())?)?;
        }
        if let Some(beta) = &bn.bs {
            ys = ys.f_add(&beta.f_view(shape.as_slice())?)?;
        }
        Ok(ys)
    }

    /// Moves `bn`'s running averages towards the pooled statistics (the variance unbiased over
    /// the pooled count, as BatchNorm does for one batch).
    fn update_running(
        &self,
        bn: &nn::BatchNorm,
        mean: &Tensor,
        var: &Tensor,
        current_count: f64,
    ) -> Result<(), TchError> {
        let total = current_count + self.records.iter().map(|r| r.count).sum::<f64>();
        let unbiased = if total > 1.0 {
            total / (total - 1.0)
        } else {
            1.0
        };
        let m = self.constants.momentum;
        tch::no_grad(|| {
            let mut running_mean = bn.running_mean.shallow_clone();
            let mut running_var = bn.running_var.shallow_clone();
            let _ = running_mean.f_mul_scalar_(1.0 - m)?;
            let _ = running_mean.f_add_(&mean.f_detach()?.f_mul_scalar(m)?)?;
            let _ = running_var.f_mul_scalar_(1.0 - m)?;
            let _ = running_var.f_add_(&var.f_detach()?.f_mul_scalar(m * unbiased)?)?;
            Ok(())
        })
    }

    /// Keeps `current` (detached, with its Taylor data when compensating) as the newest record
    /// and drops records beyond the window; returns what changed.
    fn record(
        &mut self,
        current: BatchStatistics,
        weights: &[&Tensor],
    ) -> Result<WindowChange, TchError> {
        let keep = self.settings.window.saturating_sub(1);
        if keep == 0 {
            return Ok(WindowChange {
                pushed: false,
                dropped: Vec::new(),
            });
        }
        let taylor = |stat: &Tensor| -> Result<Option<Taylor>, TchError> {
            if self.settings.compensate && stat.requires_grad() {
                Taylor::of(stat, weights).map(Some)
            } else {
                Ok(None)
            }
        };
        let record = Record {
            mean_taylor: taylor(&current.mean)?,
            sq_taylor: taylor(&current.sq_mean)?,
            mean: current.mean.f_detach()?,
            sq_mean: current.sq_mean.f_detach()?,
            count: current.count,
        };
        self.records.push_back(record);
        let mut dropped = Vec::new();
        while self.records.len() > keep {
            dropped.extend(self.records.pop_front());
        }
        Ok(WindowChange {
            pushed: true,
            dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::test_device;
    use tch::Kind;

    const CONSTANTS: NormConstants = NormConstants {
        eps: 1e-5,
        momentum: 0.1,
    };

    fn settings(window: usize, burnin: usize, compensate: bool) -> CrossIterationSettings {
        CrossIterationSettings {
            window,
            burnin,
            compensate,
        }
    }

    fn bn(vs: &nn::VarStore, channels: i64) -> nn::BatchNorm {
        let config = nn::BatchNormConfig {
            ws_init: nn::Init::Uniform { lo: 0.5, up: 1.5 },
            bs_init: nn::Init::Uniform { lo: -0.5, up: 0.5 },
            ..Default::default()
        };
        nn::batch_norm1d(vs.root() / "bn", channels, config)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// With frozen weights, CBN over k iterations is BatchNorm over the k batches pooled.
    #[test]
    fn frozen_weights_equal_batch_norm_over_the_pooled_window() {
        tch::manual_seed(1);
        let device = test_device();
        let vs = nn::VarStore::new(device);
        let conv = nn::conv2d(vs.root() / "conv", 3, 4, 3, Default::default());
        let norm = nn::batch_norm2d(vs.root() / "bn", 4, Default::default());
        let mut cbn = CrossIterationNorm::new(settings(3, 0, true), CONSTANTS);
        let batches: Vec<Tensor> = (0..5)
            .map(|i| Tensor::randn([2, 3, 6, 6], (Kind::Float, device)) * (1.0 + i as f64))
            .collect();
        for (i, input) in batches.iter().enumerate() {
            let xs = input.apply(&conv);
            let ys = cbn.forward(&xs, &[&conv.ws], &norm).unwrap();
            let first = i.saturating_sub(2);
            let pooled = Tensor::cat(
                &batches[first..=i]
                    .iter()
                    .map(|b| b.apply(&conv))
                    .collect::<Vec<_>>(),
                0,
            );
            let mean = pooled.mean_dim([0i64, 2, 3].as_slice(), true, Kind::Float);
            let var = pooled.var_correction([0i64, 2, 3].as_slice(), 0, true);
            let gamma = norm.ws.as_ref().unwrap().view([1, -1, 1, 1]);
            let beta = norm.bs.as_ref().unwrap().view([1, -1, 1, 1]);
            let expected = (&xs - mean) / (var + CONSTANTS.eps).sqrt() * gamma + beta;
            assert!(
                max_abs_diff(&ys, &expected) < 1e-4,
                "iteration {i}: {}",
                max_abs_diff(&ys, &expected)
            );
        }
        assert_eq!(cbn.recorded(), 2);
    }

    /// For a linear layer the mean is linear in the weights: the compensated mean equals the
    /// mean recomputed under the new weights exactly, and the mean of squares misses exactly
    /// the second-order term E[(Δθ·x)²].
    #[test]
    fn compensated_statistics_of_a_linear_layer_match_recomputation() {
        tch::manual_seed(2);
        let opts = (Kind::Double, test_device());
        let old_weight = Tensor::randn([5, 7], opts).set_requires_grad(true);
        let old_bias = Tensor::randn([5], opts).set_requires_grad(true);
        let inputs = Tensor::randn([6, 7], opts) + 0.5;
        let mut cbn = CrossIterationNorm::new(settings(2, 0, true), CONSTANTS);
        let xs = inputs.linear(&old_weight, Some(&old_bias));
        let stats = BatchStatistics::of(&xs).unwrap();
        cbn.record(stats, &[&old_weight, &old_bias]).unwrap();

        let delta_w = Tensor::randn([5, 7], opts) * 0.3;
        let delta_b = Tensor::randn([5], opts) * 0.3;
        let new_weight = (&old_weight + &delta_w).detach();
        let new_bias = (&old_bias + &delta_b).detach();
        let compensated = cbn.compensated(&[&new_weight, &new_bias]).unwrap();
        let (mean, sq_mean, count) = &compensated[0];
        assert_eq!(*count, 6.0);

        let recomputed = inputs.linear(&new_weight, Some(&new_bias));
        let exact_mean = recomputed.mean_dim(0, false, Kind::Double);
        assert!(max_abs_diff(mean, &exact_mean) < 1e-10);
        let exact_sq = recomputed.square().mean_dim(0, false, Kind::Double);
        let second_order =
            inputs
                .linear(&delta_w, Some(&delta_b))
                .square()
                .mean_dim(0, false, Kind::Double);
        assert!(max_abs_diff(&(sq_mean + second_order), &exact_sq) < 1e-10);
        assert!(
            max_abs_diff(sq_mean, &exact_sq) > 1e-3,
            "the test must see a change"
        );

        let naive = CrossIterationNorm {
            settings: settings(2, 0, false),
            ..cbn
        };
        let (uncompensated, _, _) = &naive.compensated(&[&new_weight, &new_bias]).unwrap()[0];
        assert!(max_abs_diff(uncompensated, &exact_mean) > 1e-3);
    }

    /// The layer's gradient with respect to its input (current statistics only; records are
    /// constants) matches central finite differences.
    #[test]
    fn input_gradient_matches_finite_differences() {
        tch::manual_seed(3);
        let device = test_device();
        let opts = (Kind::Double, device);
        let weight = Tensor::randn([3, 4], opts).set_requires_grad(true);
        let vs = nn::VarStore::new(device);
        let mut norm = bn(&vs, 3);
        norm.ws = norm.ws.map(|w| w.to_kind(Kind::Double));
        norm.bs = norm.bs.map(|b| b.to_kind(Kind::Double));
        let mut cbn = CrossIterationNorm::new(settings(3, 0, true), CONSTANTS);
        for _ in 0..2 {
            let stats =
                BatchStatistics::of(&Tensor::randn([4, 4], opts).linear::<Tensor>(&weight, None))
                    .unwrap();
            cbn.record(stats, &[&weight]).unwrap();
        }
        let current_weight = (&weight + Tensor::randn([3, 4], opts) * 0.1).detach();
        let probe = Tensor::randn([4, 3], opts);
        let objective = |xs: &Tensor| {
            let stats = BatchStatistics::of(xs).unwrap();
            let (mean, var) = cbn.pooled(&stats, &[&current_weight]).unwrap();
            (cbn.normalise(xs, &mean, &var, &norm).unwrap() * &probe).sum(Kind::Double)
        };
        let xs = Tensor::randn([4, 3], opts).set_requires_grad(true);
        let analytic = Tensor::run_backward(&[objective(&xs)], &[&xs], false, false).remove(0);
        let h = 1e-6;
        for i in 0..4 {
            for c in 0..3 {
                let bump = |sign: f64| {
                    let x = xs.detach().copy();
                    let _ = x.get(i).get(c).f_add_scalar_(sign * h);
                    objective(&x).double_value(&[])
                };
                let numeric = (bump(1.0) - bump(-1.0)) / (2.0 * h);
                let exact = analytic.double_value(&[i, c]);
                assert!(
                    (numeric - exact).abs() < 1e-6,
                    "[{i},{c}] {numeric} vs {exact}"
                );
            }
        }
    }

    /// Burn-in is plain BatchNorm; the window never exceeds k − 1 records and records hold no
    /// autograd graph, so memory stays flat however many steps run.
    #[test]
    fn burn_in_is_batch_norm_and_the_window_stays_bounded() {
        tch::manual_seed(4);
        let device = test_device();
        let vs = nn::VarStore::new(device);
        let linear = nn::linear(vs.root() / "fc", 6, 4, Default::default());
        let norm = bn(&vs, 4);
        let weights = [&linear.ws, linear.bs.as_ref().unwrap()];
        let mut cbn = CrossIterationNorm::new(settings(4, 3, true), CONSTANTS);
        for step in 0..40 {
            let xs = Tensor::randn([3, 6], (Kind::Float, device)).apply(&linear);
            let ys = cbn.forward(&xs, &weights, &norm).unwrap();
            if step < 3 {
                let plain = xs.batch_norm(
                    norm.ws.as_ref(),
                    norm.bs.as_ref(),
                    None,
                    None,
                    true,
                    0.1,
                    1e-5,
                    false,
                );
                assert!(max_abs_diff(&ys, &plain) < 1e-5);
            }
            assert!(cbn.recorded() <= 3);
            assert!(!cbn.holds_graph());
        }
        assert_eq!(cbn.recorded(), 3);
        assert!(
            !linear.ws.grad().defined(),
            "recording statistics must not accumulate parameter gradients"
        );
    }
}
