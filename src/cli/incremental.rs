//! `crossbatch incremental`: the class-incremental benchmark (issue 4). One model learns a
//! sequence of tasks, each adding new classes, through [`ClassLearner`] (class head with
//! Balanced Softmax, replay memory under a byte budget, duplets, classifier adaptation, LEO).
//! After every task it reports leave-one-out Recall@1 (exact cosine kNN) on the held-out test
//! images of all classes seen so far, the class head's accuracy on them and the forgetting of
//! old classes (Chaudhry et al. 2018).
//!
//! Protocol details:
//! - Classes are sorted by label (numerically when every label is an integer) and split into
//!   consecutive tasks.
//! - A fresh model's normalisation is fitted on the first task's training images only, so the
//!   future classes are not looked at.
//! - The learning rate follows [`lr_at`] (5 % warm-up, cosine decay) restarted in every task.
//! - A batch is P×K examples of the current task's classes (doubled by duplets) plus
//!   `--replay-per-batch` class-balanced exemplars of the replay memory.
//! - Classifier adaptation (mid-task every `--adapt-every` steps, and after each task) runs
//!   only with replay on: without a memory it would fit the head to the new classes alone.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use tch::{Device, Tensor};

use super::train::{preprocess, ModelArgs};
use crate::data::{self, Dataset, DatasetArgs, Sample};
use crate::eval::{for_each_ranking, EvalError};
use crate::model::spec::InputSpec;
use crate::train::augment::Augment;
use crate::train::incremental::{
    embed_values, ClassExamples, ClassLearner, ClassLearningConfig, FlatBatch, ProxyInit, StableIds,
};
use crate::train::offline::{lr_at, TrainData, Trainer};
use crate::train::replay::{Fidelity, ReplayConfig, Selection};
use crate::train::sampler::PkSampler;
use crate::train::TrainError;

/// Warm-up fraction of each task's learning-rate schedule.
const WARMUP_FRACTION: f64 = 0.05;

/// Which exemplars the replay memory stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReplayMode {
    /// No replay memory.
    None,
    /// Lossless exemplars at the model's input size.
    Full,
    /// Downsampled JPEG exemplars.
    Low,
}

/// How exemplars are chosen (command-line form of [`Selection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelectionArg {
    /// iCaRL herding.
    Herding,
    /// Seeded random order.
    Random,
}

/// Arguments of `crossbatch incremental`.
#[derive(Debug, clap::Args)]
pub struct IncrementalArgs {
    /// The training dataset.
    #[command(flatten)]
    pub dataset: DatasetArgs,
    /// Test dataset (same format, same classes); without it the last `--test-per-class`
    /// images of every class are held out of the training data.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// IDX label file of `--test` (default: derived from its name).
    #[arg(long)]
    pub test_labels: Option<PathBuf>,
    /// Number of tasks: the sorted classes split into this many consecutive groups of equal
    /// size (the first groups get one more class when it does not divide).
    #[arg(long, default_value_t = 5, conflicts_with = "classes_per_task")]
    pub tasks: usize,
    /// Classes per task instead of `--tasks` (the last task may be smaller).
    #[arg(long)]
    pub classes_per_task: Option<usize>,
    /// Training images per class (the first ones in data order); default all.
    #[arg(long)]
    pub train_per_class: Option<usize>,
    /// Test images per class (the first ones); default all (required without `--test`).
    #[arg(long)]
    pub test_per_class: Option<usize>,
    /// Few-shot setting: the classes of every task after the first get only this many
    /// training images.
    #[arg(long)]
    pub shots: Option<usize>,
    /// Optimisation steps per task.
    #[arg(long, default_value_t = 200)]
    pub steps_per_task: usize,
    /// New-task examples per batch, P × K (before duplets and replay).
    #[arg(long, default_value_t = 32, value_parser = super::at_least(2))]
    pub batch_size: usize,
    /// Examples per class in a batch (K); P = batch / K, at most the task's classes.
    #[arg(long, default_value_t = 4, value_parser = super::at_least(2))]
    pub per_class: usize,
    /// Replayed exemplars per batch (class-balanced) when the memory holds any.
    #[arg(long, default_value_t = 16)]
    pub replay_per_batch: usize,
    /// The network (fresh, or `--init`), its optimisation (`--lr` is every task's peak rate,
    /// `--seed` also seeds exemplar selection) and augmentation.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Replay memory: none, full (lossless) or low (downsampled JPEG) fidelity.
    #[arg(long, value_enum, default_value = "full")]
    pub replay: ReplayMode,
    /// Byte budget of the replay memory.
    #[arg(long, default_value_t = 30_000)]
    pub budget_bytes: usize,
    /// Downsampling factor of low-fidelity exemplars.
    #[arg(long, default_value_t = 2)]
    pub downsample: usize,
    /// JPEG quality of low-fidelity exemplars.
    #[arg(long, default_value_t = 75)]
    pub jpeg_quality: u8,
    /// Exemplar selection.
    #[arg(long, value_enum, default_value = "herding")]
    pub selection: SelectionArg,
    /// Balanced Softmax on the class head's training logits (true/false).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
    pub balanced_softmax: bool,
    /// Duplets: every new-class example with its low-fidelity twin (true/false).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
    pub duplets: bool,
    /// Steps between mid-task classifier adaptations (0 = only after each task).
    #[arg(long, default_value_t = 200)]
    pub adapt_every: usize,
    /// Proxy initialisation of new classes.
    #[arg(long, value_enum, default_value = "imprint")]
    pub proxy_init: ProxyInit,
    /// LEO meta-training episodes after each task (with `--proxy-init leo`).
    #[arg(long, default_value_t = 100)]
    pub leo_meta_steps: usize,
    /// Weight of the class head's cross-entropy next to the pair loss.
    #[arg(long, default_value_t = 1.0)]
    pub head_weight: f64,
    /// Print the result as JSON (with the Markdown table in `markdown`).
    #[arg(long)]
    pub json: bool,
}

impl IncrementalArgs {
    /// The class-learning settings these flags select.
    pub fn class_learning(&self) -> ClassLearningConfig {
        let defaults = ClassLearningConfig::default();
        ClassLearningConfig {
            balanced_softmax: self.balanced_softmax,
            head_weight: self.head_weight,
            replay: self.replay != ReplayMode::None,
            replay_memory: ReplayConfig {
                budget_bytes: self.budget_bytes,
                fidelity: match self.replay {
                    ReplayMode::Full => Fidelity::Full,
                    ReplayMode::None | ReplayMode::Low => Fidelity::Low,
                },
                downsample: self.downsample,
                jpeg_quality: self.jpeg_quality,
                selection: match self.selection {
                    SelectionArg::Herding => Selection::Herding,
                    SelectionArg::Random => Selection::Random,
                },
                seed: self.model.seed,
            },
            replay_per_batch: self.replay_per_batch,
            duplets: self.duplets,
            adapt_every: self.adapt_every,
            proxy_init: self.proxy_init,
            leo_meta_steps: self.leo_meta_steps,
            ..defaults
        }
    }
}

/// How the tasks are trained (everything but the model and the class learner).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSchedule {
    /// Class index ranges of the tasks, in order.
    pub tasks: Vec<Range<usize>>,
    /// Steps per task.
    pub steps_per_task: usize,
    /// New-task examples per batch (P × K).
    pub batch_size: usize,
    /// K.
    pub per_class: usize,
    /// Peak learning rate of every task.
    pub lr: f64,
    /// Seed of sampling, augmentation and replay draws.
    pub seed: u64,
    /// Augmentation.
    pub augment: Augment,
}

/// The outcome of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskResult {
    /// Task number (1-based).
    pub task: usize,
    /// Classes seen so far.
    pub classes_seen: usize,
    /// Classes added by this task.
    pub new_classes: usize,
    /// Recall@1 over the test images of all seen classes.
    pub recall_all: f64,
    /// Recall@1 of the queries of this task's classes (gallery: all seen classes).
    pub recall_new: f64,
    /// Recall@1 of the queries of earlier tasks' classes; `None` in the first task.
    pub recall_old: Option<f64>,
    /// Mean over old classes of (best earlier per-class R@1 − current); `None` in the first
    /// task.
    pub forgetting: Option<f64>,
    /// Class head accuracy (argmax over the seen classes) on all seen classes' test images.
    pub head_accuracy_all: f64,
    /// Class head accuracy on this task's classes' test images.
    pub head_accuracy_new: f64,
    /// Class head accuracy on all seen classes' test images rendered at the replay memory's
    /// low fidelity (the rendering old classes are trained at); `None` unless the replay
    /// memory stores low fidelity.
    pub head_accuracy_low_fidelity: Option<f64>,
    /// Per-class R@1 of the seen classes, in class order.
    pub per_class_recall: Vec<f64>,
    /// Labels drawn from the replay memory while this task was trained.
    pub replayed_labels: BTreeSet<String>,
    /// Replay memory bytes after the task.
    pub replay_bytes: usize,
    /// Exemplars stored after the task.
    pub exemplars: usize,
    /// Proxies generated by LEO (the rest were imprinted).
    pub leo_proxies: usize,
    /// Mean training loss of the task.
    pub mean_loss: f64,
    /// Wall-clock seconds of the task (training and evaluation).
    pub seconds: f64,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncrementalReport {
    /// One result per task.
    pub tasks: Vec<TaskResult>,
    /// Recall@1 after the last task.
    pub final_recall: f64,
    /// Mean of Recall@1 (all seen classes) over the tasks.
    pub average_incremental_recall: f64,
    /// Forgetting after the last task (`None` with a single task).
    pub final_forgetting: Option<f64>,
    /// Replay memory byte budget (`None` without replay).
    pub budget_bytes: Option<usize>,
}

impl IncrementalReport {
    /// Builds the summary from the per-task results.
    pub fn new(tasks: Vec<TaskResult>, budget_bytes: Option<usize>) -> Self {
        let final_recall = tasks.last().map_or(0.0, |t| t.recall_all);
        let average_incremental_recall =
            tasks.iter().map(|t| t.recall_all).sum::<f64>() / tasks.len().max(1) as f64;
        let final_forgetting = tasks.last().and_then(|t| t.forgetting);
        IncrementalReport {
            tasks,
            final_recall,
            average_incremental_recall,
            final_forgetting,
            budget_bytes,
        }
    }

    /// The per-task Markdown table and the summary line (rates in %).
    pub fn markdown(&self) -> String {
        let pct = |v: f64| format!("{:.1}", 100.0 * v);
        let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), pct);
        let mut out = String::from(
            "| task | classes seen | R@1 all | R@1 new | R@1 old | forgetting | head acc all | head acc new | head acc all, low-fi input |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for t in &self.tasks {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                t.task,
                t.classes_seen,
                pct(t.recall_all),
                pct(t.recall_new),
                opt(t.recall_old),
                opt(t.forgetting),
                pct(t.head_accuracy_all),
                pct(t.head_accuracy_new),
                opt(t.head_accuracy_low_fidelity),
            ));
        }
        let last = self.tasks.last();
        let replay = match self.budget_bytes {
            Some(budget) => format!(
                "replay {} / {budget} bytes, {} exemplars",
                last.map_or(0, |t| t.replay_bytes),
                last.map_or(0, |t| t.exemplars)
            ),
            None => "no replay".to_owned(),
        };
        out.push_str(&format!(
            "\nfinal R@1 {} %, average incremental R@1 {} %, final forgetting {}, {replay}\n",
            pct(self.final_recall),
            pct(self.average_incremental_recall),
            opt(self.final_forgetting),
        ));
        out
    }
}

/// Class index ranges of the tasks: `classes_per_task` consecutive classes each (the last
/// task may be smaller), or else `tasks` groups whose sizes differ by at most one (the
/// earlier ones larger).
pub fn split_tasks(
    n_classes: usize,
    tasks: usize,
    classes_per_task: Option<usize>,
) -> Result<Vec<Range<usize>>, TrainError> {
    let sizes: Vec<usize> = match classes_per_task {
        Some(0) => {
            return Err(TrainError::Config(
                "--classes-per-task must be positive".into(),
            ))
        }
        Some(per) => (0..n_classes.div_ceil(per))
            .map(|t| per.min(n_classes - t * per))
            .collect(),
        None => {
            if tasks == 0 || tasks > n_classes {
                return Err(TrainError::Config(format!(
                    "cannot split {n_classes} classes into {tasks} tasks"
                )));
            }
            (0..tasks)
                .map(|t| n_classes / tasks + usize::from(t < n_classes % tasks))
                .collect()
        }
    };
    let mut start = 0;
    Ok(sizes
        .into_iter()
        .map(|size| {
            start += size;
            start - size..start
        })
        .collect())
}

/// Whether the query of each row of `embeddings` (`[N, D]`) has a same-class nearest other
/// row by cosine similarity (exact; ties to the lower index, like [`crate::eval`]).
pub fn nearest_hits(embeddings: &Tensor, classes: &[usize]) -> Result<Vec<bool>, EvalError> {
    let n = classes.len();
    let size = embeddings.size();
    if size.len() != 2 || size[0] != n as i64 || n < 2 {
        return Err(EvalError::Input(format!(
            "need [N ≥ 2, D] embeddings for {n} labels, got {:?}",
            embeddings.size()
        )));
    }
    let mut nearest = vec![0i64; n];
    for_each_ranking(embeddings, 1, |q, ranking| nearest[q] = ranking[0])?;
    Ok(nearest
        .iter()
        .enumerate()
        .map(|(q, &j)| classes[j as usize] == classes[q])
        .collect())
}

/// Mean of `hits` per class over `n_classes` classes (`classes[i]` of hit `i`); a class
/// without queries gets 0.
pub fn per_class_rate(hits: &[bool], classes: &[usize], n_classes: usize) -> Vec<f64> {
    let mut sums = vec![(0usize, 0usize); n_classes];
    for (&hit, &c) in hits.iter().zip(classes) {
        sums[c].0 += usize::from(hit);
        sums[c].1 += 1;
    }
    sums.iter()
        .map(|&(h, n)| if n == 0 { 0.0 } else { h as f64 / n as f64 })
        .collect()
}

/// Fraction of `hits` whose class satisfies `keep`; `None` when no query does.
fn rate_where(hits: &[bool], classes: &[usize], keep: impl Fn(usize) -> bool) -> Option<f64> {
    let (h, n) = hits
        .iter()
        .zip(classes)
        .filter(|(_, c)| keep(**c))
        .fold((0usize, 0usize), |(h, n), (&hit, _)| {
            (h + usize::from(hit), n + 1)
        });
    (n > 0).then(|| h as f64 / n as f64)
}

/// Forgetting after the last entry of `history` (per-class accuracies after each task; the
/// classes seen at a task are a prefix of those seen later): the mean over the classes seen
/// before the last task of (best accuracy at an earlier task − accuracy now). `None` before a
/// second task.
pub fn forgetting(history: &[Vec<f64>]) -> Option<f64> {
    let (current, earlier) = history.split_last()?;
    let old = earlier.last()?.len();
    if old == 0 {
        return None;
    }
    let total: f64 = (0..old)
        .map(|j| {
            let best = earlier
                .iter()
                .filter_map(|a| a.get(j).copied())
                .fold(f64::NEG_INFINITY, f64::max);
            best - current[j]
        })
        .sum();
    Some(total / old as f64)
}

/// Groups `data`'s examples by class (in class index order), ids `"{class}-{i}"`, with the
/// global example index of each.
pub fn class_examples(data: &TrainData) -> Vec<(ClassExamples, Vec<i64>)> {
    let numel: usize = data.shape.iter().product();
    let mut out: Vec<(ClassExamples, Vec<i64>)> = data
        .class_names
        .iter()
        .map(|name| {
            (
                ClassExamples {
                    label: name.clone(),
                    ids: Vec::new(),
                    values: Vec::new(),
                },
                Vec::new(),
            )
        })
        .collect();
    for (i, &c) in data.classes.iter().enumerate() {
        let (class, numeric) = &mut out[c];
        class.ids.push(format!("{}-{i}", class.label));
        class
            .values
            .push(data.values[i * numel..(i + 1) * numel].to_vec());
        numeric.push(i as i64);
    }
    out
}

/// Trains `trainer` and `learner` through the tasks of `schedule` on `train` and evaluates
/// after each on `test` (both indexed by class, same class order).
pub fn run_tasks(
    trainer: &mut Trainer,
    learner: &mut ClassLearner,
    train: &TrainData,
    test: &TrainData,
    schedule: &TaskSchedule,
) -> anyhow::Result<IncrementalReport> {
    anyhow::ensure!(
        train.class_names == test.class_names,
        "train and test classes differ"
    );
    let input = trainer.spec().input.clone();
    let classes = class_examples(train);
    let tests = class_examples(test);
    let twin_offset = train.len() as i64;
    let mut replay_ids = StableIds::new(2 * twin_offset);
    let mut rng = StdRng::seed_from_u64(schedule.seed ^ 0x5eed_1ac7);
    let mut history: Vec<Vec<f64>> = Vec::new();
    let mut results = Vec::new();
    for (t, range) in schedule.tasks.iter().enumerate() {
        let started = Instant::now();
        let new: Vec<ClassExamples> = classes[range.clone()]
            .iter()
            .map(|(c, _)| c.clone())
            .collect();
        let leo_proxies = learner.add_classes(trainer, &new)?;
        // P×K over the task's classes: sampler indices → (class in task, example in class).
        let owners: Vec<(usize, usize)> = classes[range.clone()]
            .iter()
            .enumerate()
            .flat_map(|(c, (ex, _))| (0..ex.values.len()).map(move |i| (c, i)))
            .collect();
        let sampler_classes: Vec<usize> = owners.iter().map(|&(c, _)| c).collect();
        let k = schedule.per_class.max(1);
        let p = (schedule.batch_size / k).clamp(1, new.len());
        let mut sampler = PkSampler::new(&sampler_classes, p, k, schedule.seed + t as u64)?;
        let mut replayed = BTreeSet::new();
        let mut loss_sum = 0.0;
        for step in 0..schedule.steps_per_task {
            let mut batch = FlatBatch::default();
            let indices = sampler.next_batch();
            for group in indices.chunks(k) {
                let c = owners[group[0]].0;
                let (examples, numeric) = &classes[range.start + c];
                let picks: Vec<(&[f32], i64)> = group
                    .iter()
                    .map(|&j| {
                        let i = owners[j].1;
                        (examples.values[i].as_slice(), numeric[i])
                    })
                    .collect();
                learner.push_examples(&mut batch, &examples.label, &picks, twin_offset)?;
            }
            let before = batch.len();
            let n_replay = learner.config().replay_per_batch;
            learner.push_replay(&mut batch, n_replay, |id| replay_ids.id(id), &mut rng)?;
            replayed.extend(batch.labels[before..].iter().cloned());
            let lr = lr_at(step, schedule.steps_per_task, schedule.lr, WARMUP_FRACTION);
            loss_sum += learner
                .step(trainer, &batch, &schedule.augment, lr, &mut rng)?
                .loss;
            if learner.replay().is_some() && learner.adaptation_due() {
                learner.adapt(trainer, &new, &mut rng)?;
            }
        }
        for class in &new {
            learner.remember(trainer, class)?;
        }
        if learner.replay().is_some() {
            learner.adapt(trainer, &[], &mut rng)?;
        }
        learner.meta_train(trainer, &mut rng)?;

        // Evaluation on the test images of every class seen so far.
        let seen = range.end;
        let mut values = Vec::new();
        let mut labels = Vec::new();
        for (c, (class, _)) in tests[..seen].iter().enumerate() {
            values.extend(class.values.iter().cloned());
            labels.extend(std::iter::repeat_n(c, class.values.len()));
        }
        let embeddings = embed_values(trainer, &values, &input)?;
        let hits = nearest_hits(&embeddings, &labels)?;
        let per_class = per_class_rate(&hits, &labels, seen);
        history.push(per_class.clone());
        let head = learner.head();
        // Whether the head's argmax is each test image's class.
        let head_correct = |embeddings: &Tensor| -> anyhow::Result<Vec<bool>> {
            let predicted: Vec<i64> = Vec::<i64>::try_from(
                &head
                    .predict(&embeddings.f_to_device(head.device())?)?
                    .f_argmax(1, false)?
                    .f_to_device(Device::Cpu)?,
            )?;
            Ok(predicted
                .iter()
                .zip(&labels)
                .map(|(&row, &c)| head.labels().get(row as usize) == Some(&train.class_names[c]))
                .collect())
        };
        let correct = head_correct(&embeddings)?;
        let head_accuracy_low_fidelity = if learner.replays_low_fidelity() {
            let rendered = values
                .iter()
                .map(|v| learner.replay_rendering(v))
                .collect::<Result<Vec<_>, _>>()?;
            let low_correct = head_correct(&embed_values(trainer, &rendered, &input)?)?;
            rate_where(&low_correct, &labels, |_| true)
        } else {
            None
        };
        let is_new = |c: usize| range.contains(&c);
        let replay = learner.replay();
        results.push(TaskResult {
            task: t + 1,
            classes_seen: seen,
            new_classes: range.len(),
            recall_all: rate_where(&hits, &labels, |_| true).unwrap_or(0.0),
            recall_new: rate_where(&hits, &labels, is_new).unwrap_or(0.0),
            recall_old: rate_where(&hits, &labels, |c| !is_new(c)),
            forgetting: forgetting(&history),
            head_accuracy_all: rate_where(&correct, &labels, |_| true).unwrap_or(0.0),
            head_accuracy_new: rate_where(&correct, &labels, is_new).unwrap_or(0.0),
            head_accuracy_low_fidelity,
            per_class_recall: per_class,
            replayed_labels: replayed,
            replay_bytes: replay.map_or(0, |r| r.bytes_used()),
            exemplars: replay.map_or(0, |r| r.len()),
            leo_proxies,
            mean_loss: loss_sum / schedule.steps_per_task.max(1) as f64,
            seconds: started.elapsed().as_secs_f64(),
        });
        if let Some(r) = results.last() {
            eprintln!(
                "task {}/{}: {} classes seen, R@1 {:.3} (new {:.3}), head acc {:.3}, loss {:.4}, replay {} B / {} exemplars, {:.1} s",
                r.task,
                schedule.tasks.len(),
                r.classes_seen,
                r.recall_all,
                r.recall_new,
                r.head_accuracy_all,
                r.mean_loss,
                r.replay_bytes,
                r.exemplars,
                r.seconds
            );
        }
    }
    let budget = learner
        .config()
        .replay
        .then_some(learner.config().replay_memory.budget_bytes);
    Ok(IncrementalReport::new(results, budget))
}

/// Class order: numeric when every label is an integer, else lexicographic.
fn sorted_classes(samples: &[Sample]) -> Vec<String> {
    let labels: BTreeSet<&str> = samples.iter().map(|s| s.label.as_str()).collect();
    let mut labels: Vec<String> = labels.into_iter().map(str::to_owned).collect();
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    }
    labels
}

/// Samples grouped by label, in data order.
fn by_label(samples: Vec<Sample>) -> BTreeMap<String, Vec<Sample>> {
    let mut out: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for s in samples {
        out.entry(s.label.clone()).or_default().push(s);
    }
    out
}

/// A dataset of `groups` in class order, with the `TrainData` class index of each sample.
fn flatten(groups: Vec<Vec<Sample>>) -> (Dataset, Vec<usize>) {
    let mut classes = Vec::new();
    let mut samples = Vec::new();
    for (c, group) in groups.into_iter().enumerate() {
        classes.extend(std::iter::repeat_n(c, group.len()));
        samples.extend(group);
    }
    (Dataset { samples }, classes)
}

/// Runs `crossbatch incremental`.
pub fn run(args: IncrementalArgs) -> anyhow::Result<()> {
    let config = args.class_learning();
    config.validate()?;

    // Classes, tasks and per-class train/test samples.
    let train_set = data::load(&args.dataset)?;
    let class_names = sorted_classes(&train_set.samples);
    let tasks = split_tasks(class_names.len(), args.tasks, args.classes_per_task)?;
    let mut train_groups = by_label(train_set.samples);
    let mut test_groups = match &args.test {
        Some(path) => by_label(
            data::load(&DatasetArgs {
                format: args.dataset.format,
                labels: args.test_labels.clone(),
                limit: None,
                path: path.clone(),
            })?
            .samples,
        ),
        None => {
            let hold = args
                .test_per_class
                .context("--test-per-class is required without --test")?;
            let mut held = BTreeMap::new();
            for (label, samples) in &mut train_groups {
                anyhow::ensure!(
                    samples.len() > hold,
                    "class {label} has {} images, cannot hold out {hold}",
                    samples.len()
                );
                held.insert(label.clone(), samples.split_off(samples.len() - hold));
            }
            held
        }
    };
    let first_task_end = tasks.first().map_or(0, |r| r.end);
    let mut train_per_class = Vec::new();
    let mut test_per_class = Vec::new();
    for (c, name) in class_names.iter().enumerate() {
        let mut train = train_groups.remove(name).unwrap_or_default();
        let cap = args.train_per_class.unwrap_or(usize::MAX);
        train.truncate(match args.shots {
            Some(shots) if c >= first_task_end => shots.min(cap),
            _ => cap,
        });
        let mut test = test_groups.remove(name).unwrap_or_default();
        test.truncate(args.test_per_class.unwrap_or(usize::MAX));
        anyhow::ensure!(
            !train.is_empty() && !test.is_empty(),
            "class {name} has {} training and {} test images",
            train.len(),
            test.len()
        );
        train_per_class.push(train);
        test_per_class.push(test);
    }

    // A fresh model's normalisation is fitted on the first task's training images only.
    let (first, _) = flatten(train_per_class[..first_task_end].to_vec());
    let (mut trainer, threads) = args.model.trainer(&first)?;
    let input = trainer.spec().input.clone();
    let device = trainer.device();
    let to_data = |groups: Vec<Vec<Sample>>, input: &InputSpec| {
        let (dataset, classes) = flatten(groups);
        let mut input = input.clone();
        TrainData {
            values: preprocess(&dataset, &mut input, false),
            shape: input.shape(),
            classes,
            class_names: class_names.clone(),
        }
    };
    let train = to_data(train_per_class, &input);
    let test = to_data(test_per_class, &input);
    let schedule = TaskSchedule {
        tasks,
        steps_per_task: args.steps_per_task,
        batch_size: args.batch_size,
        per_class: args.per_class,
        lr: args.model.lr,
        seed: args.model.seed,
        augment: args.model.augment(&input),
    };
    eprintln!(
        "incremental: {} classes in {} tasks, {} training / {} test images of {:?}; widths {:?}, dim {}, {} steps per task, replay {:?} ({} bytes), device {device:?}, {threads} threads",
        class_names.len(),
        schedule.tasks.len(),
        train.len(),
        test.len(),
        train.shape,
        trainer.spec().widths,
        trainer.spec().embedding_dim,
        schedule.steps_per_task,
        args.replay,
        args.budget_bytes,
    );
    let dim = trainer.spec().embedding_dim as i64;
    let mut learner = ClassLearner::new(config, input, dim, trainer.device())?;
    let report = run_tasks(&mut trainer, &mut learner, &train, &test, &schedule)?;
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["markdown"] = serde_json::Value::String(report.markdown());
        println!("{value}");
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::test_device;
    use crate::train::loss::PairLoss;
    use crate::train::offline::test_support::{spec as toy_spec, toy_data};
    use clap::Parser;

    #[test]
    fn tasks_split_into_consecutive_groups() {
        assert_eq!(
            split_tasks(10, 5, None).unwrap(),
            vec![0..2, 2..4, 4..6, 6..8, 8..10]
        );
        assert_eq!(split_tasks(7, 3, None).unwrap(), vec![0..3, 3..5, 5..7]);
        assert_eq!(split_tasks(7, 1, Some(3)).unwrap(), vec![0..3, 3..6, 6..7]);
        assert!(split_tasks(3, 4, None).is_err());
        assert!(split_tasks(3, 0, None).is_err());
        assert!(split_tasks(3, 1, Some(0)).is_err());
    }

    #[test]
    fn per_class_recall_by_hand_and_against_eval() {
        // 1-D-ish points: class 0 at angles 0°, 10°; class 1 at 90°, 100°, and one class-1
        // point at 5° whose nearest neighbour is class 0.
        let deg = [0.0f32, 10.0, 90.0, 100.0, 5.0];
        let rows: Vec<f32> = deg
            .iter()
            .flat_map(|d| {
                let r = d.to_radians();
                [r.cos(), r.sin()]
            })
            .collect();
        let emb = Tensor::from_slice(&rows).view([5, 2]);
        let classes = [0, 0, 1, 1, 1];
        let hits = nearest_hits(&emb, &classes).unwrap();
        // 0°→5° (class 1): miss; 10°→5°: miss; 90°→100°: hit; 100°→90°: hit; 5°→0°: miss.
        assert_eq!(hits, vec![false, false, true, true, false]);
        assert_eq!(
            per_class_rate(&hits, &classes, 3),
            vec![0.0, 2.0 / 3.0, 0.0]
        );
        let labels: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
        let report = crate::eval::evaluate(&emb, &labels).unwrap();
        let ours = hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64;
        assert!((report.recall_at["1"] - ours).abs() < 1e-12);
        assert_eq!(rate_where(&hits, &classes, |c| c == 1), Some(2.0 / 3.0));
        assert_eq!(rate_where(&hits, &classes, |c| c == 2), None);
    }

    #[test]
    fn forgetting_is_best_earlier_minus_now_over_old_classes() {
        assert_eq!(forgetting(&[vec![0.9, 0.8]]), None);
        // After task 2: old classes 0 and 1 drop 0.9→0.6 and 0.8→0.8.
        let h = vec![vec![0.9, 0.8], vec![0.6, 0.8, 0.7, 0.9]];
        assert!((forgetting(&h).unwrap() - 0.15).abs() < 1e-12);
        // After task 3: class 0 best 0.9 now 0.5; class 1 best 0.8 now 0.4; class 2 best 0.7
        // now 0.7; class 3 best 0.9 now 1.0 (negative forgetting).
        let mut h = h;
        h.push(vec![0.5, 0.4, 0.7, 1.0, 0.9, 0.9]);
        let expected = (0.4 + 0.4 + 0.0 - 0.1) / 4.0;
        assert!((forgetting(&h).unwrap() - expected).abs() < 1e-12);
    }

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: IncrementalArgs,
    }

    #[test]
    fn arguments_map_onto_class_learning() {
        let w = Wrap::parse_from([
            "incremental",
            "--test",
            "t.gz",
            "--replay",
            "full",
            "--balanced-softmax",
            "false",
            "--duplets",
            "false",
            "--proxy-init",
            "leo",
            "--selection",
            "random",
            "x.gz",
        ]);
        let c = w.args.class_learning();
        assert!(c.replay && !c.balanced_softmax && !c.duplets);
        assert_eq!(c.replay_memory.fidelity, Fidelity::Full);
        assert_eq!(c.replay_memory.selection, Selection::Random);
        assert_eq!(c.proxy_init, ProxyInit::Leo);
        let none = Wrap::parse_from(["incremental", "--replay", "none", "x.gz"]);
        assert!(!none.args.class_learning().replay);
        assert!(
            Wrap::try_parse_from(["i", "--tasks", "2", "--classes-per-task", "2", "x"]).is_err()
        );
    }

    #[test]
    fn two_tasks_end_to_end_replay_only_old_classes_within_budget() {
        let spec = toy_spec();
        let input = spec.input.clone();
        let mut trainer = Trainer::new(
            spec,
            test_device(),
            1e-2,
            PairLoss::Contrastive { margin: 0.5 },
        )
        .unwrap();
        let budget = 600;
        let mut config = ClassLearningConfig {
            adapt_every: 5,
            replay_per_batch: 4,
            ..ClassLearningConfig::default()
        };
        config.replay_memory.budget_bytes = budget;
        config.replay_memory.fidelity = Fidelity::Low;
        let mut learner = ClassLearner::new(config, input.clone(), 8, trainer.device()).unwrap();
        let schedule = TaskSchedule {
            tasks: split_tasks(4, 2, None).unwrap(),
            steps_per_task: 10,
            batch_size: 8,
            per_class: 4,
            lr: 1e-2,
            seed: 1,
            augment: Augment::for_input(&input, 1, false),
        };
        let report = run_tasks(
            &mut trainer,
            &mut learner,
            &toy_data(12, 2),
            &toy_data(5, 3),
            &schedule,
        )
        .unwrap();
        assert_eq!(report.tasks.len(), 2);
        let (first, second) = (&report.tasks[0], &report.tasks[1]);
        assert!(first.replayed_labels.is_empty());
        let old: BTreeSet<String> = ["0", "1"].map(String::from).into();
        assert_eq!(second.replayed_labels, old);
        assert_eq!((first.classes_seen, second.classes_seen), (2, 4));
        assert_eq!(second.per_class_recall.len(), 4);
        assert!(second.forgetting.is_some() && first.forgetting.is_none());
        for t in &report.tasks {
            assert!(
                t.replay_bytes > 0 && t.replay_bytes <= budget,
                "{}",
                t.replay_bytes
            );
            // Low-fidelity replay: the head is also scored on renderings.
            assert!(t
                .head_accuracy_low_fidelity
                .is_some_and(|a| (0.0..=1.0).contains(&a)));
        }
        let memory = learner.replay().unwrap();
        assert!(memory.bytes_used() <= budget);
        assert_eq!(memory.classes().len(), 4);
        let table = report.markdown();
        let rows = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| task"));
        assert_eq!(rows.count(), 2);
        assert!(table.contains(&format!("/ {budget} bytes")));
    }
}
