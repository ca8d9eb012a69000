//! Dynamic batching in front of one inference thread.
//!
//! Request handlers call [`Embedder::embed`] with preprocessed inputs. Admission is decided at
//! once: if the queue already holds `queue_capacity` inputs the call fails with
//! [`EmbedError::QueueFull`] (HTTP 429) instead of waiting. The inference thread owns the model
//! and every tensor; it takes the first waiting job, then gathers more until `max_batch`
//! inputs or `max_wait` has passed, runs one forward pass under `no_grad` and answers each job
//! over its own one-shot channel. Background work ([`Embedder::embed_background`]) is not
//! refused: it waits for room instead.
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::metrics::Metrics;
use crate::model::{spec::ModelSpec, LoadedModel};

/// Why inputs could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The queue is full; retry later.
    #[error("the inference queue is full ({capacity} inputs); retry later")]
    QueueFull {
        /// Queue capacity in inputs.
        capacity: usize,
    },
    /// One job holds more inputs than the whole queue: it could never be admitted.
    #[error("{inputs} inputs in one job; the inference queue holds {capacity}")]
    TooLarge {
        /// Inputs in the job.
        inputs: usize,
        /// Queue capacity in inputs.
        capacity: usize,
    },
    /// The inference thread has stopped.
    #[error("the inference thread has stopped")]
    Stopped,
    /// The model failed on this batch.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The model could not be loaded at start-up.
    #[error("cannot load model: {0}")]
    Load(String),
}

/// Batching limits of one embedder.
#[derive(Debug, Clone, Copy)]
pub struct BatchingLimits {
    /// Most inputs per forward pass.
    pub max_batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Inputs allowed to wait before new requests are refused.
    pub queue_capacity: usize,
}

struct Job {
    inputs: Vec<Vec<f32>>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>,
}

/// What the inference thread reports once its model is loaded and warm.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model's `model.toml`.
    pub spec: ModelSpec,
    /// Device in config syntax: `cpu` or `cuda:N`.
    pub device: String,
}

/// Cheap, cloneable handle to an inference thread. The thread stops when the last handle is
/// dropped and its queue has drained.
#[derive(Clone)]
pub struct Embedder {
    sender: Sender<Job>,
    queued: Arc<AtomicUsize>,
    limits: BatchingLimits,
    metrics: Arc<Metrics>,
}

impl Embedder {
    /// Starts an inference thread: loads the model on `device`, warms it with a full batch,
    /// and returns once it is ready to serve.
    pub fn start(
        model_dir: &Path,
        device: &str,
        limits: BatchingLimits,
        metrics: Arc<Metrics>,
    ) -> Result<(Embedder, ModelInfo), EmbedError> {
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let dir = model_dir.to_path_buf();
        let device = device.to_string();
        let thread_metrics = metrics.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let thread_queued = queued.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let model =
                    match load_and_warm(&dir, &device, limits.max_batch.min(limits.queue_capacity))
                    {
                        Ok(model) => model,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                let info = ModelInfo {
                    spec: model.spec().clone(),
                    device: device_name(model.device()),
                };
                if ready_tx.send(Ok(info)).is_err() {
                    return;
                }
                serve_batches(&model, &receiver, limits, &thread_queued, &thread_metrics);
            })
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        let info = ready_rx.recv().map_err(|_| EmbedError::Stopped)??;
        let embedder = Embedder {
            sender,
            queued,
            limits,
            metrics,
        };
        Ok((embedder, info))
    }

    /// Embeds preprocessed inputs (each `C×H×W` values); answers in input order.
    pub async fn embed(&self, inputs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self.submit(inputs)? {
            Some(answer) => answer.await.map_err(|_| EmbedError::Stopped)?,
            None => Ok(Vec::new()),
        }
    }

    /// Like [`Embedder::embed`], for plain threads (never call it on the async runtime).
    pub fn embed_blocking(&self, inputs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self.submit(inputs)? {
            Some(answer) => answer.blocking_recv().map_err(|_| EmbedError::Stopped)?,
            None => Ok(Vec::new()),
        }
    }

    /// Embeds background work (a build, start-up) on a plain thread. It is not refused for a
    /// full queue: it goes in as jobs that fit the queue, each waiting for room — up to
    /// [`BACKGROUND_WAIT`], after which the queue is taken to be stuck.
    pub fn embed_background(&self, inputs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let capacity = self.limits.queue_capacity;
        let mut out = Vec::with_capacity(inputs.len());
        let mut inputs = inputs.into_iter().peekable();
        while inputs.peek().is_some() {
            let job: Vec<Vec<f32>> = inputs.by_ref().take(capacity.max(1)).collect();
            let deadline = Instant::now() + BACKGROUND_WAIT;
            while !self.admit(job.len()) {
                if Instant::now() > deadline {
                    return Err(EmbedError::QueueFull { capacity });
                }
                std::thread::sleep(QUEUE_FULL_WAIT);
            }
            let answer = self.enqueue(job)?;
            out.extend(answer.blocking_recv().map_err(|_| EmbedError::Stopped)??);
        }
        Ok(out)
    }

    /// Admits a request's job (or refuses it at once when the queue is full, or could never
    /// hold it) and returns the channel its answer arrives on; `None` for an empty job.
    fn submit(&self, inputs: Vec<Vec<f32>>) -> Result<Option<PendingAnswer>, EmbedError> {
        if inputs.is_empty() {
            return Ok(None);
        }
        let capacity = self.limits.queue_capacity;
        if inputs.len() > capacity {
            return Err(EmbedError::TooLarge {
                inputs: inputs.len(),
                capacity,
            });
        }
        if !self.admit(inputs.len()) {
            return Err(EmbedError::QueueFull { capacity });
        }
        self.enqueue(inputs).map(Some)
    }

    /// Counts `n` inputs into the queue if they fit.
    fn admit(&self, n: usize) -> bool {
        let capacity = self.limits.queue_capacity;
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + n <= capacity).then_some(queued + n)
            })
            .is_ok()
    }

    /// Sends admitted inputs to the inference thread (undoing the admission if it stopped).
    fn enqueue(&self, inputs: Vec<Vec<f32>>) -> Result<PendingAnswer, EmbedError> {
        let n = inputs.len();
        self.metrics.queue_depth.add(n as i64);
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.sender.send(Job { inputs, reply }).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.metrics.queue_depth.sub(n as i64);
            return Err(EmbedError::Stopped);
        }
        Ok(answer)
    }
}

/// How long background work waits before asking again for room in a full queue.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);
/// How long background work waits for room for one job before giving up.
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(600);

type PendingAnswer = tokio::sync::oneshot::Receiver<Result<Vec<Vec<f32>>, EmbedError>>;

/// `cpu` or `cuda:N`, the config syntax for a device.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(index) => format!("cuda:{index}"),
        tch::Device::Mps => "mps".into(),
        tch::Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

fn load_and_warm(dir: &Path, device: &str, max_batch: usize) -> Result<LoadedModel, EmbedError> {
    let device = crate::model::parse_device(device).map_err(|e| EmbedError::Load(e.to_string()))?;
    let model = LoadedModel::load(dir, device).map_err(|e| EmbedError::Load(e.to_string()))?;
    let numel = model.spec().input.numel();
    // Both ends of the batch sizes it will see: an exported model can treat one input
    // differently (a `squeeze()` turns [1, D] into [D]).
    let mut sizes = vec![1, max_batch.max(1)];
    sizes.dedup();
    for n in sizes {
        model
            .embed_values(&vec![0f32; numel * n], n)
            .map_err(|e| EmbedError::Load(format!("warm-up with {n} inputs failed: {e}")))?;
    }
    Ok(model)
}

fn serve_batches(
    model: &LoadedModel,
    receiver: &Receiver<Job>,
    limits: BatchingLimits,
    queued: &AtomicUsize,
    metrics: &Metrics,
) {
    let _no_grad = tch::no_grad_guard();
    let numel = model.spec().input.numel();
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match receiver.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut jobs = vec![first];
        let mut count = jobs[0].inputs.len();
        let deadline = Instant::now() + limits.max_wait;
        while count < limits.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(wait) {
                Ok(job) if count + job.inputs.len() <= limits.max_batch => {
                    count += job.inputs.len();
                    jobs.push(job);
                }
                Ok(job) => {
                    carried = Some(job);
                    break;
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        queued.fetch_sub(count, Ordering::AcqRel);
        metrics.queue_depth.sub(count as i64);
        run_jobs(model, jobs, count, numel, limits.max_batch, metrics);
    }
}

/// Embeds every input of `jobs` in forward passes of at most `max_batch`, then answers each
/// job with its slice of the results (or the error of a failed pass).
fn run_jobs(
    model: &LoadedModel,
    jobs: Vec<Job>,
    count: usize,
    numel: usize,
    max_batch: usize,
    metrics: &Metrics,
) {
    let mut flat = Vec::with_capacity(count * numel);
    for job in &jobs {
        for input in &job.inputs {
            flat.extend_from_slice(input);
        }
    }
    let mut outputs = Vec::with_capacity(count);
    let mut failure = None;
    for chunk in flat.chunks(max_batch.max(1) * numel) {
        let n = chunk.len() / numel;
        let started = Instant::now();
        match model.embed_values(chunk, n) {
            Ok(vectors) => outputs.extend(vectors),
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
        metrics
            .inference_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(n as f64);
    }
    let mut outputs = outputs.into_iter();
    for job in jobs {
        let answer = match &failure {
            Some(message) => Err(EmbedError::Inference(message.clone())),
            None => Ok(outputs.by_ref().take(job.inputs.len()).collect()),
        };
        let _ = job.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_larger_than_the_queue_goes_in_as_jobs_that_fit() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let limits = BatchingLimits {
            max_batch: 3,
            max_wait: Duration::from_millis(1),
            queue_capacity: 4,
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let (embedder, info) = Embedder::start(&dir, "cpu", limits, metrics).unwrap();
        let numel = info.spec.input.numel();
        let inputs: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32 * 0.1 - 0.5; numel]).collect();
        // A request larger than the whole queue is refused as such (413, not a 429 that no
        // retry could fix) ...
        assert!(matches!(
            embedder.submit(inputs.clone()),
            Err(EmbedError::TooLarge {
                inputs: 10,
                capacity: 4
            })
        ));
        // ... background work goes in as jobs of at most 4, answered in order, and waits
        // while the queue is full (here: taken by someone else for 100 ms).
        assert!(embedder.admit(4));
        assert!(matches!(
            embedder.submit(inputs[..1].to_vec()),
            Err(EmbedError::QueueFull { capacity: 4 })
        ));
        let held = std::thread::spawn({
            let queued = embedder.queued.clone();
            move || {
                std::thread::sleep(Duration::from_millis(100));
                queued.fetch_sub(4, Ordering::AcqRel);
            }
        });
        let started = Instant::now();
        let all = embedder.embed_background(inputs.clone()).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "it waited for room"
        );
        held.join().unwrap();
        assert_eq!(all.len(), inputs.len());
        for (input, embedded) in inputs.iter().zip(&all) {
            let alone = embedder.embed_blocking(vec![input.clone()]).unwrap();
            let gap = alone[0]
                .iter()
                .zip(embedded)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(gap < 1e-5, "{gap}");
        }
        assert_eq!(
            embedder.queued.load(Ordering::Acquire),
            0,
            "the queue drained"
        );
    }

    #[test]
    fn a_model_that_fails_on_a_single_input_is_refused_at_warm_up() {
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("model.pt");
        // `squeeze()` turns the [1, 3] answer to one input into [3].
        let returns = "torch.stack([f.sum(1), f[:, 0], f[:, 1] + 1.0], 1).squeeze()";
        if !crate::model::test_support::export_flat_torchscript(returns, &pt) {
            return;
        }
        let spec = ModelSpec {
            name: "squeezes".into(),
            format: crate::model::spec::ModelFormat::Torchscript,
            architecture: "test-squeeze".into(),
            widths: vec![],
            input: crate::model::spec::gray_test_spec(2),
            embedding_dim: 3,
            weights: "model.pt".into(),
        };
        spec.save(dir.path()).unwrap();
        let limits = BatchingLimits {
            max_batch: 4,
            max_wait: Duration::from_millis(1),
            queue_capacity: 8,
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let Err(error) = Embedder::start(dir.path(), "cpu", limits, metrics) else {
            panic!("a model that fails on one input passed warm-up");
        };
        assert!(
            matches!(&error, EmbedError::Load(m) if m.contains("with 1 inputs")),
            "{error}"
        );
    }
}
