//! The built-in network `resnet-small`: a small ResNet-style CNN in `tch::nn`.
//!
//! Layout: 3×3 conv stem (→ `widths[0]`) + BN + ReLU, then one residual stage per entry of
//! `widths` (the first at stride 1, the others at stride 2; each a basic block of two 3×3
//! convs with BN and a 1×1 projection shortcut when the shape changes), global average pool,
//! a linear head to `embedding_dim`, and L2 normalisation.
use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::spec::ModelSpec;

/// Architecture name of the built-in network in `model.toml`.
pub const ARCHITECTURE: &str = "resnet-small";

/// Channel widths used when none are given.
pub const DEFAULT_WIDTHS: [i64; 3] = [32, 64, 128];

fn conv3x3(vs: nn::Path<'_>, c_in: i64, c_out: i64, stride: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: 1,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(vs, c_in, c_out, 3, config)
}

fn batch_norm(vs: nn::Path<'_>, c: i64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        ..Default::default()
    };
    nn::batch_norm2d(vs, c, config)
}

/// A basic residual block: conv-BN-ReLU-conv-BN plus shortcut, then ReLU.
#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    shortcut: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(vs: nn::Path<'_>, c_in: i64, c_out: i64, stride: i64) -> Self {
        let shortcut = if stride != 1 || c_in != c_out {
            let config = nn::ConvConfig {
                stride,
                bias: false,
                ..Default::default()
            };
            Some((
                nn::conv2d(&vs / "shortcut_conv", c_in, c_out, 1, config),
                batch_norm(&vs / "shortcut_bn", c_out),
            ))
        } else {
            None
        };
        BasicBlock {
            conv1: conv3x3(&vs / "conv1", c_in, c_out, stride),
            bn1: batch_norm(&vs / "bn1", c_out),
            conv2: conv3x3(&vs / "conv2", c_out, c_out, 1),
            bn2: batch_norm(&vs / "bn2", c_out),
            shortcut,
        }
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .apply(&self.conv2)
            .apply_t(&self.bn2, train);
        let skip = match &self.shortcut {
            Some((conv, bn)) => xs.apply(conv).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        (ys + skip).relu()
    }
}

/// The `resnet-small` network. Its output is L2-normalised, shape `[N, embedding_dim]`.
#[derive(Debug)]
pub struct ResNetSmall {
    stem_conv: nn::Conv2D,
    stem_bn: nn::BatchNorm,
    blocks: Vec<BasicBlock>,
    head: nn::Linear,
}

impl ResNetSmall {
    /// Creates the network's variables under `vs` for the given spec's input channels,
    /// `widths` (must be non-empty and positive) and `embedding_dim`.
    pub fn new(vs: &nn::Path<'_>, channels: i64, widths: &[i64], embedding_dim: i64) -> Self {
        let first = widths.first().copied().unwrap_or(DEFAULT_WIDTHS[0]);
        let stem_conv = conv3x3(vs / "stem_conv", channels, first, 1);
        let stem_bn = batch_norm(vs / "stem_bn", first);
        let mut blocks = Vec::with_capacity(widths.len());
        let mut c_in = first;
        for (i, &w) in widths.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            blocks.push(BasicBlock::new(vs / format!("stage{i}"), c_in, w, stride));
            c_in = w;
        }
        let head = nn::linear(vs / "head", c_in, embedding_dim, Default::default());
        ResNetSmall {
            stem_conv,
            stem_bn,
            blocks,
            head,
        }
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
}

/// L2-normalises the rows of a `[N, D]` tensor (zero rows stay zero).
pub fn l2_normalize(xs: &Tensor) -> Tensor {
    let norm = xs.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    xs / norm.clamp_min(1e-12)
}

impl ModuleT for ResNetSmall {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = xs
            .apply(&self.stem_conv)
            .apply_t(&self.stem_bn, train)
            .relu();
        for block in &self.blocks {
            ys = block.forward_t(&ys, train);
        }
        let pooled = ys.adaptive_avg_pool2d([1i64, 1].as_slice()).flatten(1, -1);
        l2_normalize(&pooled.apply(&self.head))
    }
}
