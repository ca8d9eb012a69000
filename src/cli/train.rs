//! `crossbatch train`: offline metric learning on a labelled dataset; writes a model directory.
use std::path::PathBuf;

use anyhow::Context;
use image::DynamicImage;

use crate::data::{self, Dataset, DatasetArgs};
use crate::embed::preprocess::image_to_input;
use crate::model::builtin::{ARCHITECTURE, DEFAULT_WIDTHS};
use crate::model::spec::{InputSpec, ModelFormat, ModelSpec};
use crate::train::augment::Augment;
use crate::train::objective::Objective;
use crate::train::offline::{self, TrainConfig, TrainData, Trainer, WEIGHTS_FILE};

/// Arguments of `crossbatch train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The training dataset.
    #[command(flatten)]
    pub dataset: DatasetArgs,
    /// Output model directory (model.toml + model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Optimisation steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Batch size P × K (P = classes per batch, at most the number of classes).
    #[arg(long, default_value_t = 128, value_parser = super::at_least(2))]
    pub batch_size: usize,
    /// Examples per class in a batch (K), when the data has enough classes for P = batch/K.
    #[arg(long, default_value_t = 8, value_parser = super::at_least(2))]
    pub per_class: usize,
    /// Model name written to model.toml (default: "resnet-small", or the --init model's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The network, its optimisation and augmentation.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The network to train (fresh or `--init`), its optimisation and augmentation: the flags
/// `train` and `incremental` share.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Fine-tune this builtin model directory instead of starting from scratch.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Input side in pixels (square); default: the dataset's image size. New models only.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Peak learning rate (Adam; linear warm-up over 5 % of the steps, then cosine decay).
    #[arg(long, default_value_t = 2e-3, value_parser = super::positive)]
    pub lr: f64,
    /// Seed of weight initialisation, sampling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Embedding dimension of a new model (default 128).
    #[arg(long)]
    pub embedding_dim: Option<usize>,
    /// Stage widths of a new model, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_WIDTHS.to_vec())]
    pub widths: Vec<i64>,
    /// Largest random translation in pixels (random crop with padding); 0 disables.
    #[arg(long, default_value_t = 2)]
    pub max_shift: usize,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    /// Pair loss and XBM cross-batch memory.
    #[command(flatten)]
    pub objective: Objective,
    /// Device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch intra-op threads (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<i32>,
}

impl ModelArgs {
    /// Sets libtorch's threads and seed, then loads `--init` or creates a fresh network whose
    /// input normalisation is fitted on `fit_on`, and applies the objective. Returns the
    /// trainer and the thread count.
    pub fn trainer(&self, fit_on: &Dataset) -> anyhow::Result<(Trainer, i32)> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as i32))
            .max(1);
        tch::set_num_threads(threads);
        tch::manual_seed(self.seed as i64);
        let device = crate::model::parse_device(&self.device)?;
        let loss = self.objective.pair_loss();
        let mut trainer = match &self.init {
            Some(dir) => {
                if self.embedding_dim.is_some() || self.image_size.is_some() {
                    anyhow::bail!(
                        "--embedding-dim and --image-size apply to new models, not to --init"
                    );
                }
                Trainer::from_dir(dir, device, self.lr, loss)
                    .with_context(|| format!("loading {}", dir.display()))?
            }
            None => {
                let mut input = raw_input_spec(fit_on, self.image_size)?;
                preprocess(fit_on, &mut input, true);
                let spec = ModelSpec {
                    name: ARCHITECTURE.into(),
                    format: ModelFormat::Builtin,
                    architecture: ARCHITECTURE.into(),
                    widths: self.widths.clone(),
                    input,
                    embedding_dim: self.embedding_dim.unwrap_or(128),
                    weights: WEIGHTS_FILE.into(),
                };
                if self.objective.norm.pools_across_iterations() && self.objective.cbn_burnin == 0 {
                    tracing::warn!(
                        "cross-iteration BatchNorm from scratch without --cbn-burnin: the \
                         statistics of earlier iterations are stale while fresh weights move \
                         fast (the CBN paper pools only after a burn-in)"
                    );
                }
                Trainer::new(spec, device, self.lr, loss)?
            }
        };
        self.objective.apply(&mut trainer)?;
        Ok((trainer, threads))
    }

    /// The augmentation for `input`.
    pub fn augment(&self, input: &InputSpec) -> Augment {
        Augment::for_input(input, self.max_shift, self.flip)
    }
}

fn is_gray(image: &DynamicImage) -> bool {
    matches!(
        image,
        DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)
    )
}

/// Input geometry of a new model from the data (and `--image-size`), with mean 0 / std 1.
fn raw_input_spec(dataset: &Dataset, image_size: Option<usize>) -> anyhow::Result<InputSpec> {
    let first = &dataset.samples.first().context("empty dataset")?.image;
    let channels = if dataset.samples.iter().all(|s| is_gray(&s.image)) {
        1
    } else {
        3
    };
    let (height, width) = match image_size {
        Some(side) if side > 0 => (side, side),
        Some(_) => anyhow::bail!("--image-size must be positive"),
        None => (first.height() as usize, first.width() as usize),
    };
    Ok(InputSpec {
        channels,
        height,
        width,
        mean: vec![0.0; channels],
        std: vec![1.0; channels],
    })
}

/// Preprocesses every sample with `input`; with `fit_normalisation`, first measures the
/// per-channel mean and std of the pixels (scaled to [0, 1]) and stores them in `input`.
pub(crate) fn preprocess(
    dataset: &Dataset,
    input: &mut InputSpec,
    fit_normalisation: bool,
) -> Vec<f32> {
    let target = input.clone();
    let raw_spec = InputSpec {
        mean: vec![0.0; input.channels],
        std: vec![1.0; input.channels],
        ..target.clone()
    };
    let spec = if fit_normalisation {
        &raw_spec
    } else {
        &target
    };
    let mut values = Vec::with_capacity(dataset.len() * input.numel());
    for sample in &dataset.samples {
        values.extend(image_to_input(&sample.image, spec));
    }
    if fit_normalisation {
        let plane = input.height * input.width;
        let mut sums = vec![(0f64, 0f64); input.channels];
        for image in values.chunks(input.numel()) {
            for (c, sum) in sums.iter_mut().enumerate() {
                for &v in &image[c * plane..(c + 1) * plane] {
                    sum.0 += v as f64;
                    sum.1 += (v as f64) * (v as f64);
                }
            }
        }
        let count = (dataset.len() * plane).max(1) as f64;
        input.mean = sums.iter().map(|s| (s.0 / count) as f32).collect();
        input.std = sums
            .iter()
            .map(|s| {
                let mean = s.0 / count;
                ((s.1 / count - mean * mean).max(0.0).sqrt() as f32).max(1e-3)
            })
            .collect();
        for image in values.chunks_mut(input.numel()) {
            for c in 0..input.channels {
                for v in &mut image[c * plane..(c + 1) * plane] {
                    *v = (*v - input.mean[c]) / input.std[c];
                }
            }
        }
    }
    values
}

/// Runs `crossbatch train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let dataset = data::load(&args.dataset)?;
    let (mut trainer, threads) = args.model.trainer(&dataset)?;
    let device = trainer.device();
    let mut input = trainer.spec().input.clone();
    let values = preprocess(&dataset, &mut input, false);
    if let Some(name) = &args.name {
        trainer.set_name(name);
    }

    let mut class_names: Vec<String> = dataset.labels();
    class_names.sort();
    class_names.dedup();
    let classes: Vec<usize> = dataset
        .samples
        .iter()
        .map(|s| class_names.binary_search(&s.label).unwrap_or(0))
        .collect();
    let per_class = args.per_class.max(1);
    let p = (args.batch_size / per_class).clamp(1, class_names.len().max(1));
    let k = (args.batch_size / p).max(1);
    if class_names.len() < 2 {
        anyhow::bail!(
            "training needs at least 2 classes, the data has {}",
            class_names.len()
        );
    }
    let config = TrainConfig {
        steps: args.steps,
        classes_per_batch: p,
        per_class: k,
        lr: args.model.lr,
        warmup_fraction: 0.05,
        seed: args.model.seed,
        augment: args.model.augment(&input),
        progress: true,
    };
    let data = TrainData {
        values,
        shape: input.shape(),
        classes,
        class_names,
    };
    eprintln!(
        "training {} ({:?}, widths {:?}, dim {}) on {} images of {:?}, {} classes; batches {p}×{k}, {} steps, device {device:?}, {threads} threads",
        trainer.spec().name,
        trainer.spec().architecture,
        trainer.spec().widths,
        trainer.spec().embedding_dim,
        data.len(),
        data.shape,
        data.class_names.len(),
        config.steps,
    );
    let summary = offline::train(&mut trainer, &data, &config)?;
    trainer.save(&args.out)?;
    let peak_rss = peak_rss_mb().map_or_else(|| "unknown".to_owned(), |mb| format!("{mb} MB"));
    eprintln!(
        "trained {} steps in {:.2} s (loss {:.4} → {:.4}); peak RSS {peak_rss}; wrote {}",
        summary.steps,
        summary.seconds,
        summary.first_loss,
        summary.last_loss,
        args.out.display()
    );
    Ok(())
}

/// The process's peak resident set size in MB (the kernel's `VmHWM` high-water mark), for the
/// GradCache benchmark; `None` where `/proc` does not report it.
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn arguments_parse() {
        let w = Wrap::parse_from([
            "train", "--format", "idx", "--out", "m", "--steps", "5", "--widths", "8,16", "--flip",
            "data.gz",
        ]);
        assert_eq!(w.args.steps, 5);
        assert_eq!(w.args.model.widths, vec![8, 16]);
        assert!(w.args.model.flip);
        assert_eq!(w.args.dataset.path, PathBuf::from("data.gz"));
        assert_eq!(
            Wrap::parse_from(["train", "--out", "m", "x"])
                .args
                .model
                .widths,
            DEFAULT_WIDTHS.to_vec()
        );
    }
}
