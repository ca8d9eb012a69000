//! The built-in network `resnet-small`: a small ResNet-style CNN in `tch::nn`.
//!
//! Layout: 3×3 conv stem (→ `widths[0]`) + BN + ReLU, then one residual stage per entry of
//! `widths` (the first at stride 1, the others at stride 2; each a basic block of two 3×3
//! convs with BN and a 1×1 projection shortcut when the shape changes), global average pool,
//! a linear head to `embedding_dim`, and L2 normalisation.
//!
//! Every BatchNorm follows a convolution; for training with tiny batches each such pair can
//! switch to cross-iteration statistics ([`ResNetSmall::set_cross_iteration`]).
use std::cell::RefCell;

use tch::nn;
use tch::{TchError, Tensor};

use super::cross_iteration_norm::{CrossIterationNorm, CrossIterationSettings, NormConstants};
use super::spec::ModelSpec;

/// Architecture name of the built-in network in `model.toml`.
pub const ARCHITECTURE: &str = "resnet-small";

/// Channel widths used when none are given.
pub const DEFAULT_WIDTHS: [i64; 3] = [32, 64, 128];

/// BatchNorm ε and momentum of every normalisation layer (tch's defaults).
const NORM: NormConstants = NormConstants {
    eps: 1e-5,
    momentum: 0.1,
};

/// A bias-free convolution followed by BatchNorm, optionally with cross-iteration statistics
/// while training.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    stride: i64,
    padding: i64,
    bn: nn::BatchNorm,
    cross_iteration: RefCell<Option<CrossIterationNorm>>,
}

impl ConvBn {
    /// Variables `conv_path/weight` and `bn_path/{weight,bias,running_mean,running_var}`.
    fn new(
        conv_path: nn::Path<'_>,
        bn_path: nn::Path<'_>,
        (c_in, c_out): (i64, i64),
        kernel: i64,
        stride: i64,
    ) -> Self {
        let padding = kernel / 2;
        let conv_config = nn::ConvConfig {
            stride,
            padding,
            bias: false,
            ..Default::default()
        };
        let bn_config = nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            eps: NORM.eps,
            momentum: NORM.momentum,
            ..Default::default()
        };
        ConvBn {
            conv: nn::conv2d(conv_path, c_in, c_out, kernel, conv_config),
            stride,
            padding,
            bn: nn::batch_norm2d(bn_path, c_out, bn_config),
            cross_iteration: RefCell::new(None),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let ys = xs.f_conv2d(
            &self.conv.ws,
            None::<&Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )?;
        if train {
            if let Some(cbn) = self.cross_iteration.borrow_mut().as_mut() {
                return cbn.forward(&ys, &[&self.conv.ws], &self.bn);
            }
        }
        ys.f_batch_norm(
            self.bn.ws.as_ref(),
            self.bn.bs.as_ref(),
            Some(&self.bn.running_mean),
            Some(&self.bn.running_var),
            train,
            NORM.momentum,
            NORM.eps,
            false,
        )
    }
}

/// A basic residual block: conv-BN-ReLU-conv-BN plus shortcut, then ReLU.
#[derive(Debug)]
struct BasicBlock {
    first: ConvBn,
    second: ConvBn,
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn new(vs: nn::Path<'_>, c_in: i64, c_out: i64, stride: i64) -> Self {
        let shortcut = (stride != 1 || c_in != c_out).then(|| {
            ConvBn::new(
                &vs / "shortcut_conv",
                &vs / "shortcut_bn",
                (c_in, c_out),
                1,
                stride,
            )
        });
        BasicBlock {
            first: ConvBn::new(&vs / "conv1", &vs / "bn1", (c_in, c_out), 3, stride),
            second: ConvBn::new(&vs / "conv2", &vs / "bn2", (c_out, c_out), 3, 1),
            shortcut,
        }
    }

    fn units(&self) -> impl Iterator<Item = &ConvBn> {
        [&self.first, &self.second]
            .into_iter()
            .chain(self.shortcut.as_ref())
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let ys = self.first.forward_t(xs, train)?.f_relu()?;
        let ys = self.second.forward_t(&ys, train)?;
        let skip = match &self.shortcut {
            Some(unit) => unit.forward_t(xs, train)?,
            None => xs.shallow_clone(),
        };
        ys.f_add(&skip)?.f_relu()
    }
}

/// The `resnet-small` network. Its output is L2-normalised, shape `[N, embedding_dim]`.
#[derive(Debug)]
pub struct ResNetSmall {
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    head: nn::Linear,
}

impl ResNetSmall {
    /// Creates the network's variables under `vs` for the given spec's input channels,
    /// `widths` (must be non-empty and positive) and `embedding_dim`.
    pub fn new(vs: &nn::Path<'_>, channels: i64, widths: &[i64], embedding_dim: i64) -> Self {
        let first = widths.first().copied().unwrap_or(DEFAULT_WIDTHS[0]);
        let stem = ConvBn::new(vs / "stem_conv", vs / "stem_bn", (channels, first), 3, 1);
        let mut blocks = Vec::with_capacity(widths.len());
        let mut c_in = first;
        for (i, &w) in widths.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            blocks.push(BasicBlock::new(vs / format!("stage{i}"), c_in, w, stride));
            c_in = w;
        }
        let head = nn::linear(vs / "head", c_in, embedding_dim, Default::default());
        ResNetSmall { stem, blocks, head }
    }

    /// Creates the network described by a builtin [`ModelSpec`].
    pub fn from_spec(vs: &nn::Path<'_>, spec: &ModelSpec) -> Self {
        Self::new(
            vs,
            spec.input.channels as i64,
            &spec.widths,
            spec.embedding_dim as i64,
        )
    }

    fn units(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(self.blocks.iter().flat_map(BasicBlock::units))
    }

    /// Switches every BatchNorm to cross-iteration statistics while training (`Some`, with an
    /// empty window) or back to plain BatchNorm (`None`).
    pub fn set_cross_iteration(&self, settings: Option<CrossIterationSettings>) {
        for unit in self.units() {
            *unit.cross_iteration.borrow_mut() = settings.map(|s| CrossIterationNorm::new(s, NORM));
        }
    }

    /// Settles the last training-mode forward in every cross-iteration window: kept when the
    /// trainer took the step (`taken`), taken back when it skipped it.
    pub fn settle_cross_iteration_forward(&self, taken: bool) {
        for unit in self.units() {
            if let Some(cbn) = unit.cross_iteration.borrow_mut().as_mut() {
                cbn.settle_last_forward(taken);
            }
        }
    }

    /// Largest number of iterations any cross-iteration layer currently holds (0 without CBN).
    pub fn cross_iteration_records(&self) -> usize {
        self.units()
            .filter_map(|u| u.cross_iteration.borrow().as_ref().map(|c| c.recorded()))
            .max()
            .unwrap_or(0)
    }

    /// Embeds `xs` (`[N, C, H, W]`): in training mode (`train`) BatchNorm uses batch or
    /// cross-iteration statistics and updates its running averages; in evaluation mode it uses
    /// the running averages.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut ys = self.stem.forward_t(xs, train)?.f_relu()?;
        for block in &self.blocks {
            ys = block.forward_t(&ys, train)?;
        }
        let pooled = ys
            .f_adaptive_avg_pool2d([1i64, 1].as_slice())?
            .f_flatten(1, -1)?;
        l2_normalize(&pooled.f_linear(&self.head.ws, self.head.bs.as_ref())?)
    }
}

/// L2-normalises the rows of a `[N, D]` tensor (zero rows stay zero).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor, TchError> {
    let norm = xs.f_norm_scalaropt_dim(2.0, [1i64].as_slice(), true)?;
    xs.f_div(&norm.f_clamp_min(1e-12)?)
}
