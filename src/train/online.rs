//! The online trainer: a background thread that keeps fine-tuning the served model on the
//! labelled items in the store and publishes new generations.
//!
//! It reuses the offline [`Trainer`] (same losses, same XBM memory) on P×K batches sampled
//! from the store, sleeps between steps to respect `duty_cycle`, and every `publish_every`
//! steps (or on request) writes a checkpoint to `DATA_DIR/generations/VERSION/`, records it
//! with its training metrics and drift, and hands it to the [`Publisher`], which re-embeds
//! the gallery beside the live generation and swaps. If another generation goes live that it
//! did not publish (a rollback through the API), it restarts from that generation's weights.
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use tch::Device;

use super::augment::Augment;
use super::focus::ClassFocus;
use super::incremental::FlatBatch;
use super::offline::Trainer;
use super::pool::{ExamplePool, Probe};
use super::TrainError;
use crate::config::TrainerConfig;
use crate::metrics::Metrics;
use crate::registry::{retention, BuildError, BuildOrigin, Publisher};
use crate::store::{GenerationRecord, Store};

/// Steps between re-reads of the labelled examples from the store.
const REFRESH_EVERY_STEPS: usize = 50;

/// Failed steps in a row after which the trainer drops its weights (they have most likely
/// diverged) and restarts from the live generation.
const RESTART_AFTER_FAILED_STEPS: usize = 10;

/// How often a paused trainer re-reads the store, for its status.
const PAUSED_STORE_READ: Duration = Duration::from_secs(5);
/// How long an idle or paused trainer waits before looking again.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// What the trainer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainerState {
    /// Waiting for the first live generation.
    Starting,
    /// Not enough labelled examples (2 labels with 2 examples each), or no batch could be
    /// assembled (see `message`).
    Idle,
    /// Taking steps.
    Training,
    /// Its last step failed and changed nothing (see `message`); after 10 in a row, a step
    /// that panicked, or a publish that found the weights diverged, it restarted from the live
    /// generation.
    Failing,
    /// Paused through the API.
    Paused,
    /// The live model cannot be fine-tuned (see `message`).
    Unsupported,
    /// The trainer thread stopped after a panic outside a step (see `message` and the log);
    /// it trains again after a restart of the server.
    Crashed,
}

/// The trainer's state as `GET /v1/trainer` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct TrainerStatus {
    /// What it is doing.
    pub state: TrainerState,
    /// Steps since the trainer (re)started from a generation.
    pub step: usize,
    /// Loss of the last step.
    pub loss: Option<f64>,
    /// Rows filled in the XBM memory.
    pub memory_fill: usize,
    /// XBM memory capacity.
    pub memory_size: usize,
    /// Steps per second over the recent steps.
    pub steps_per_second: f64,
    /// Drift measured at the last publish (mean squared distance of probe embeddings).
    pub last_drift: Option<f64>,
    /// Generation the trainer's weights started from.
    pub base_generation: Option<u64>,
    /// Last generation the trainer published.
    pub last_published: Option<u64>,
    /// Labelled examples and labels it samples from.
    pub examples: usize,
    /// Labels with at least two examples.
    pub trainable_labels: usize,
    /// Uploaded classes being learnt (no generation includes them yet).
    pub pending_classes: Vec<String>,
    /// Why the trainer cannot run, or why its last step failed (cleared by the next success).
    pub message: Option<String>,
}

/// The replay memory's occupancy as `GET /v1/classes` reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayStatus {
    /// The byte budget (0 when replay is off).
    pub budget_bytes: usize,
    /// Bytes stored.
    pub used_bytes: usize,
    /// Exemplars and bytes per label.
    pub classes: HashMap<String, ReplayShare>,
}

/// One class's part of the replay memory.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReplayShare {
    /// Exemplars kept.
    pub exemplars: usize,
    /// Bytes they take.
    pub bytes: usize,
}

#[derive(Debug)]
struct Control {
    stopped: bool,
    finished: bool,
    paused: bool,
    /// A publish asked for through the API.
    publish_requested: bool,
    /// A periodic publish is due (dropped by a pause).
    periodic_publish_due: bool,
    /// Classes were learnt or left the head: a publish is due once no class is pending or
    /// being uploaded and the trainer is not paused (kept through a pause).
    auto_publish_due: bool,
    /// Classes were uploaded or deleted since the trainer last read the store.
    classes_changed: bool,
    /// Class uploads between [`TrainerHandle::expect_class`] and their store write: automatic
    /// publishes wait for them, so the generation an upload expects stays free for it.
    uploads_in_flight: usize,
    /// Class deletions between [`TrainerHandle::delete_class`] and their store commit: no
    /// publish starts meanwhile, so none carries a class deleted under it.
    deletions_in_flight: usize,
    /// Highest generation version the trainer has taken (published or about to be).
    reserved_version: u64,
    replay: ReplayStatus,
    status: TrainerStatus,
}

impl Control {
    /// The state of a trainer that has not started yet.
    fn new(paused: bool, memory_size: usize) -> Control {
        Control {
            stopped: false,
            finished: false,
            paused,
            publish_requested: false,
            periodic_publish_due: false,
            auto_publish_due: false,
            classes_changed: false,
            uploads_in_flight: 0,
            deletions_in_flight: 0,
            reserved_version: 0,
            replay: ReplayStatus::default(),
            status: TrainerStatus {
                state: TrainerState::Starting,
                step: 0,
                loss: None,
                memory_fill: 0,
                memory_size,
                steps_per_second: 0.0,
                last_drift: None,
                base_generation: None,
                last_published: None,
                examples: 0,
                trainable_labels: 0,
                pending_classes: Vec::new(),
                message: None,
            },
        }
    }
}

/// Handle to the trainer thread: status and control.
#[derive(Clone)]
pub struct TrainerHandle {
    shared: Arc<(Mutex<Control>, Condvar)>,
}

impl TrainerHandle {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the trainer's status.
    pub fn status(&self) -> TrainerStatus {
        let control = self.lock();
        TrainerStatus {
            // The stored state is what the thread does, pause aside (a crash stays shown).
            state: if control.paused && control.status.state != TrainerState::Crashed {
                TrainerState::Paused
            } else {
                control.status.state
            },
            ..control.status.clone()
        }
    }

    /// Stops taking steps and publishing on its own until [`TrainerHandle::resume`]: a
    /// periodic publish still pending is dropped, so nothing swaps in behind the caller's back
    /// (an explicit [`TrainerHandle::request_publish`] while paused still publishes).
    pub fn pause(&self) {
        let mut control = self.lock();
        control.paused = true;
        control.periodic_publish_due = false;
    }

    /// Resumes training.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.shared.1.notify_all();
    }

    /// Tells the trainer thread to end after its current step (it starts no build from then
    /// on); returns at once.
    pub fn request_stop(&self) {
        self.lock().stopped = true;
        self.shared.1.notify_all();
    }

    /// Ends the trainer thread after its current step and waits up to `timeout` for it, so
    /// that no training step runs while the process tears libtorch down. Returns whether it
    /// ended in time.
    pub fn stop(&self, timeout: Duration) -> bool {
        self.request_stop();
        let finished = self.wait_until(timeout, |control| control.finished);
        if !finished {
            tracing::warn!("the trainer did not stop within {timeout:?}");
        }
        finished
    }

    /// Waits until `done` holds for the control state or `timeout` has passed; returns
    /// whether it holds.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&Control) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut control = self.lock();
        while !done(&control) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            control = match self.shared.1.wait_timeout(control, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Publishes a generation after the next step (even while paused, if it has trained).
    pub fn request_publish(&self) {
        self.lock().publish_requested = true;
        self.shared.1.notify_all();
    }

    /// Starts a class upload: the version of the generation that will first include the class
    /// (the next version after every generation recorded or being published), held for it
    /// until the returned [`ClassUpload`] is dropped after the store write. The trainer holds
    /// back its own publishes (periodic, for classes learnt or deleted) meanwhile and while it
    /// learns the pending classes, so the next generation it publishes is that one (unless a
    /// publish is forced through the API).
    pub fn expect_class(&self, store: &Store) -> Result<ClassUpload, crate::store::StoreError> {
        // Read before the lock: a version recorded later was reserved first.
        let recorded = store.generations()?.last().map_or(0, |g| g.version);
        // Counted before the version is read: an automatic publish deciding meanwhile waits.
        let change = StoreChange::start(self, |control| &mut control.uploads_in_flight);
        let reserved = self.lock().reserved_version;
        Ok(ClassUpload {
            expected_generation: recorded.max(reserved) + 1,
            _change: change,
        })
    }

    /// Starts deleting a class from the store: no publish starts until the returned
    /// [`StoreChange`] is dropped after the commit; the trainer then re-reads the store
    /// (dropping the class's examples, replay exemplars and head proxy) and publishes a
    /// generation without it.
    pub fn delete_class(&self) -> StoreChange {
        StoreChange::start(self, |control| &mut control.deletions_in_flight)
    }

    /// The replay memory's occupancy.
    pub fn replay_status(&self) -> ReplayStatus {
        self.lock().replay.clone()
    }
}

/// A class upload in progress ([`TrainerHandle::expect_class`]). Dropping it, once the
/// class is stored (or the upload failed), tells the trainer to re-read the store.
pub struct ClassUpload {
    /// The generation expected to be the first that includes the class.
    pub expected_generation: u64,
    _change: StoreChange,
}

/// A change of the store's classes in progress: an upload or a deletion, counted in the
/// trainer's control until it is dropped, once committed (or failed); the trainer then
/// re-reads the store.
pub struct StoreChange {
    trainer: TrainerHandle,
    /// The count of such changes in flight, in the control.
    in_flight: fn(&mut Control) -> &mut usize,
}

impl StoreChange {
    fn start(trainer: &TrainerHandle, in_flight: fn(&mut Control) -> &mut usize) -> StoreChange {
        *in_flight(&mut trainer.lock()) += 1;
        StoreChange {
            trainer: trainer.clone(),
            in_flight,
        }
    }
}

impl Drop for StoreChange {
    fn drop(&mut self) {
        let mut control = self.trainer.lock();
        let count = (self.in_flight)(&mut control);
        *count = count.saturating_sub(1);
        control.classes_changed = true;
        self.trainer.shared.1.notify_all();
    }
}

/// What the trainer thread needs.
pub struct OnlineContext {
    /// Trainer settings.
    pub config: TrainerConfig,
    /// The store it reads examples from and records generations in.
    pub store: Arc<Store>,
    /// Where it publishes.
    pub publisher: Arc<Publisher>,
    /// Checkpoints go to `data_dir/generations/VERSION/`.
    pub data_dir: PathBuf,
    /// Device for training.
    pub device: Device,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Starts the trainer thread.
pub fn spawn(context: OnlineContext) -> std::io::Result<TrainerHandle> {
    let handle = TrainerHandle {
        shared: Arc::new((
            Mutex::new(Control::new(
                context.config.start_paused,
                context.config.objective.memory_size,
            )),
            Condvar::new(),
        )),
    };
    let thread_handle = handle.clone();
    std::thread::Builder::new()
        .name("online-trainer".into())
        .spawn(move || {
            let finished = MarkFinished(&thread_handle);
            run(context, finished.0);
        })?;
    Ok(handle)
}

/// Marks the trainer thread finished when dropped: when `run` returns and when it panics, so
/// that a stop never waits for a thread that is gone.
struct MarkFinished<'a>(&'a TrainerHandle);

impl Drop for MarkFinished<'_> {
    fn drop(&mut self) {
        let mut control = self.0.lock();
        control.finished = true;
        if std::thread::panicking() {
            control.status.state = TrainerState::Crashed;
            control.status.message =
                Some("the trainer thread panicked (see the log); restart the server".into());
        }
        self.0.shared.1.notify_all();
    }
}

/// The trainer's weights plus what it knows about where they came from.
struct Session {
    trainer: Trainer,
    classes: ClassFocus,
    base: u64,
    /// [`Publisher::activations`] when the session started from `base`.
    activations_seen: u64,
    published: Vec<u64>,
    /// `steps` when the last generation was published: nothing new to publish until it grows
    /// (or the head loses classes).
    published_at_step: usize,
    /// The head lost classes (deleted from the store) since the last generation.
    head_changed: bool,
    /// When the session last read the store's examples.
    store_read: Option<Instant>,
    probe: Option<Probe>,
    steps: usize,
    last_loss: Option<f64>,
}

fn run(context: OnlineContext, handle: &TrainerHandle) {
    let mut pool = ExamplePool::default();
    let mut session: Option<Session> = None;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut recent = std::collections::VecDeque::new();
    let mut failed_in_a_row = 0;
    // Why the session was dropped, reported once the next one has started.
    let mut restart_reason: Option<String> = None;
    while !handle.lock().stopped {
        // Read before the live generation: an activation counts only once it has swapped in.
        let activations = context.publisher.activations();
        let Some(live) = context.publisher.registry().live() else {
            std::thread::sleep(IDLE_WAIT);
            continue;
        };
        // Start, or restart after an activation (a rollback, even to this session's own base
        // or one of its generations) or a generation this trainer did not publish went live.
        let foreign = session.as_ref().is_none_or(|s| {
            s.activations_seen != activations
                || (live.version != s.base && !s.published.contains(&live.version))
        });
        if foreign {
            match start_session(&context, live.version, activations) {
                Ok(new_session) => {
                    session = Some(new_session);
                    let mut control = handle.lock();
                    // A publish asked for before the restart was of the weights just dropped.
                    control.publish_requested = false;
                    control.periodic_publish_due = false;
                    control.auto_publish_due = false;
                    control.status.base_generation = Some(live.version);
                    control.status.step = 0;
                    control.status.message = restart_reason.take();
                }
                Err(message) => {
                    set_state(handle, TrainerState::Unsupported, Some(message));
                    std::thread::sleep(IDLE_WAIT * 10);
                    continue;
                }
            }
        }
        let Some(current) = session.as_mut() else {
            continue;
        };
        if handle.lock().paused {
            // Read the store now and then even so (and after a class upload): a paused
            // trainer reports what it has.
            let uploaded = std::mem::take(&mut handle.lock().classes_changed);
            if uploaded
                || current
                    .store_read
                    .is_none_or(|at| at.elapsed() >= PAUSED_STORE_READ)
            {
                refresh_and_report(&context, handle, current, &mut pool, &mut rng);
            }
            publish_or_restart(&context, handle, &mut session, &mut restart_reason);
            wait(handle);
            continue;
        }
        let changed = std::mem::take(&mut handle.lock().classes_changed);
        if changed || current.steps % REFRESH_EVERY_STEPS == 0 || pool.sampler.is_none() {
            refresh_and_report(&context, handle, current, &mut pool, &mut rng);
        }
        let next = current.classes.next_batch(
            &mut pool,
            &context.store,
            context.config.classes_per_batch,
            context.config.per_class,
            &mut rng,
        );
        let batch = match next {
            Ok(Some(batch)) if !batch.is_empty() => batch,
            Ok(_) => {
                let why = format!(
                    "waiting for examples: training needs 2 labels with 2 examples each \
                     ({} such labels stored)",
                    pool.trainable_labels
                );
                set_state(handle, TrainerState::Idle, Some(why));
                // A class deleted down to too few examples still leaves the published head.
                publish_or_restart(&context, handle, &mut session, &mut restart_reason);
                wait(handle);
                continue;
            }
            Err(e) => {
                tracing::warn!("trainer cannot assemble a batch: {e}");
                let why = format!("cannot assemble a batch (tried again): {e}");
                set_state(handle, TrainerState::Idle, Some(why));
                pool.sampler = None;
                std::thread::sleep(IDLE_WAIT);
                continue;
            }
        };
        let started = Instant::now();
        // A panic (a tch operation that reports errors by panicking, such as running out of
        // GPU memory) is a failed step after which the session cannot be trusted.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            train_step(&context, current, &mut pool, &batch, &mut rng)
        }))
        .unwrap_or_else(|panic| Err(TrainError::Panicked(crate::panic::message(panic.as_ref()))));
        match outcome {
            Ok((loss, learnt)) => {
                failed_in_a_row = 0;
                current.steps += 1;
                current.last_loss = Some(loss);
                let seconds = started.elapsed().as_secs_f64();
                context.metrics.trainer_steps.inc();
                context.metrics.trainer_loss.set(loss);
                context.metrics.trainer_step_seconds.observe(seconds);
                let fill = current.trainer.memory_fill();
                context.metrics.memory_fill.set(fill as i64);
                recent.push_back(Instant::now());
                while recent.len() > 50 {
                    recent.pop_front();
                }
                let rate = match (recent.front(), recent.back()) {
                    (Some(first), Some(last)) if recent.len() > 1 => {
                        (recent.len() - 1) as f64
                            / last.duration_since(*first).as_secs_f64().max(1e-9)
                    }
                    _ => 0.0,
                };
                {
                    let mut control = handle.lock();
                    control.status.state = TrainerState::Training;
                    control.status.message = None;
                    control.status.step = current.steps;
                    control.status.loss = Some(loss);
                    control.status.memory_fill = fill;
                    control.status.steps_per_second = rate;
                }
                // Periodic publishes wait while uploaded classes are being learnt, so the
                // generation expected to include them is the next one published.
                let periodic = current.steps % context.config.publish_every.max(1) == 0;
                {
                    let mut control = handle.lock();
                    control.auto_publish_due |= learnt;
                    // A pause that came during the step holds a periodic publish back too.
                    control.periodic_publish_due |= periodic && !control.paused;
                }
                if learnt {
                    let mut control = handle.lock();
                    control.status.pending_classes = current.classes.pending_labels();
                    control.replay = current.classes.replay_status();
                    report_classes(&context.metrics, &control);
                }
                if publish_or_restart(&context, handle, &mut session, &mut restart_reason) {
                    continue;
                }
                let duty = context.config.duty_cycle.clamp(0.01, 1.0);
                // Rest, waking early when the trainer is told to stop.
                let rest = Duration::from_secs_f64(seconds * (1.0 - duty) / duty);
                handle.wait_until(rest, |control| control.stopped);
            }
            Err(e) => {
                failed_in_a_row += 1;
                context.metrics.trainer_failed_steps.inc();
                tracing::warn!("trainer step failed: {e}");
                if matches!(e, TrainError::Panicked(_)) {
                    failed_in_a_row = 0;
                    let message = format!(
                        "a step panicked, so the trainer restarted from the live generation: {e}"
                    );
                    drop_session(&context, handle, &mut session, &mut restart_reason, message);
                } else if failed_in_a_row >= RESTART_AFTER_FAILED_STEPS {
                    let message = format!(
                        "{failed_in_a_row} steps failed in a row, so the trainer restarted \
                         from the live generation; the last: {e}"
                    );
                    failed_in_a_row = 0;
                    drop_session(&context, handle, &mut session, &mut restart_reason, message);
                } else {
                    let message = format!("the last step failed: {e}");
                    set_state(handle, TrainerState::Failing, Some(message));
                }
                pool.sampler = None;
                std::thread::sleep(IDLE_WAIT);
            }
        }
    }
}

/// Publishes if due ([`maybe_publish`]); drops the session when the publish found its
/// weights diverged, and then returns `true`.
fn publish_or_restart(
    context: &OnlineContext,
    handle: &TrainerHandle,
    session: &mut Option<Session>,
    restart_reason: &mut Option<String>,
) -> bool {
    let Some(diverged) = session
        .as_mut()
        .and_then(|current| maybe_publish(context, handle, current))
    else {
        return false;
    };
    drop_session(context, handle, session, restart_reason, diverged);
    true
}

/// Drops a session that cannot go on (its weights diverged, or a panic left it half
/// updated): the loop restarts from the live generation, and `message` says why in the
/// status until a step succeeds.
fn drop_session(
    context: &OnlineContext,
    handle: &TrainerHandle,
    session: &mut Option<Session>,
    restart_reason: &mut Option<String>,
    message: String,
) {
    tracing::error!("{message}");
    context.metrics.trainer_restarts.inc();
    *session = None;
    *restart_reason = Some(message.clone());
    set_state(handle, TrainerState::Failing, Some(message));
}

/// Re-reads the store's examples and pending classes, and reports them in the status.
fn refresh_and_report(
    context: &OnlineContext,
    handle: &TrainerHandle,
    session: &mut Session,
    pool: &mut ExamplePool,
    rng: &mut StdRng,
) {
    if let Err(e) = refresh(context, session, pool, rng) {
        tracing::warn!("trainer cannot read examples: {e}");
    }
    // Taken whether or not the refresh finished: a class it dropped is gone from the head.
    let head_lost_classes = session.classes.take_head_lost();
    session.store_read = Some(Instant::now());
    session.head_changed |= head_lost_classes;
    let mut control = handle.lock();
    control.auto_publish_due |= head_lost_classes;
    control.status.examples = pool.examples.len();
    control.status.trainable_labels = pool.trainable_labels;
    control.status.pending_classes = session.classes.pending_labels();
    control.replay = session.classes.replay_status();
    report_classes(&context.metrics, &control);
}

/// Sets the class gauges from the trainer's status.
fn report_classes(metrics: &Metrics, control: &Control) {
    metrics
        .classes_pending
        .set(control.status.pending_classes.len() as i64);
    metrics.replay_bytes.set(control.replay.used_bytes as i64);
}

fn rng_seed(rng: &mut StdRng) -> u64 {
    rand::Rng::gen(rng)
}

fn set_state(handle: &TrainerHandle, state: TrainerState, message: Option<String>) {
    let mut control = handle.lock();
    control.status.state = state;
    control.status.message = message;
}

fn wait(handle: &TrainerHandle) {
    let control = handle.lock();
    let _ = handle.shared.1.wait_timeout(control, IDLE_WAIT);
}

/// Loads the trainer from a recorded generation's weights.
fn start_session(
    context: &OnlineContext,
    version: u64,
    activations_seen: u64,
) -> Result<Session, String> {
    let records = context.store.generations().map_err(|e| e.to_string())?;
    let record = records
        .iter()
        .find(|r| r.version == version)
        .ok_or_else(|| format!("generation {version} is not recorded"))?;
    let objective = &context.config.objective;
    let mut trainer = Trainer::from_dir(
        &record.model_dir,
        context.device,
        context.config.lr,
        objective.pair_loss(),
    )
    .map_err(|e| format!("generation {version} cannot be fine-tuned: {e}"))?;
    objective
        .apply(&mut trainer)
        .map_err(|e| format!("trainer settings: {e}"))?;
    let mut classes = ClassFocus::new(&context.config.classes, &trainer)
        .map_err(|e| format!("class learning settings: {e}"))?;
    if let Err(e) = classes.restore(&record.model_dir) {
        tracing::warn!("generation {version}'s class head cannot be restored, starting empty: {e}");
    }
    tracing::info!(version, "online trainer starts from generation");
    Ok(Session {
        trainer,
        classes,
        base: version,
        activations_seen,
        published: Vec::new(),
        published_at_step: 0,
        head_changed: false,
        store_read: None,
        probe: None,
        steps: 0,
        last_loss: None,
    })
}

/// One step on `batch` (see [`ClassFocus::step`]); returns the loss and whether a set of
/// uploaded classes was just learnt.
fn train_step(
    context: &OnlineContext,
    session: &mut Session,
    pool: &mut ExamplePool,
    batch: &FlatBatch,
    rng: &mut StdRng,
) -> Result<(f64, bool), TrainError> {
    let input = session.trainer.spec().input.clone();
    let augment = Augment::for_input(&input, context.config.max_shift, context.config.flip);
    if session.probe.is_none() {
        session.probe = pool.probe(&context.store, &session.trainer, context.config.probe_size)?;
    }
    let (stats, learnt) = session.classes.step(
        &mut session.trainer,
        batch,
        &augment,
        context.config.lr,
        rng,
    )?;
    Ok((stats.loss, learnt))
}

/// Re-reads the store: the sampler's pool, the pending classes and the labels to remember.
fn refresh(
    context: &OnlineContext,
    session: &mut Session,
    pool: &mut ExamplePool,
    rng: &mut StdRng,
) -> Result<(), TrainError> {
    let examples = context.store.labelled_examples()?;
    pool.refresh(&examples, &context.config, rng_seed(rng));
    session
        .classes
        .refresh(&mut session.trainer, pool, &context.store, &examples)
}

/// What, besides the control flags, decides whether a publish is due.
#[derive(Debug, Clone, Copy)]
struct PublishGate {
    /// Uploaded classes are pending (being learnt).
    focusing: bool,
    /// The session has steps or head changes no generation holds yet.
    unpublished: bool,
    /// A build is running.
    busy: bool,
    /// An activation overtook the session's weights.
    superseded: bool,
}

/// Whether a publish is due. Asked for through the API, it goes as soon as the rest allows.
/// Automatic ones (periodic, or classes learnt or deleted) also wait while classes are
/// pending or being uploaded, so that the generation an upload expects is the one that
/// includes it, and while the trainer is paused. Classes uploaded or deleted since the last
/// read of the store wait for the next read (a class deleted during this step must not be
/// published with the head); stopping, no build may start while the process tears libtorch
/// down.
fn publish_due(control: &Control, gate: PublishGate) -> bool {
    let automatic = (control.periodic_publish_due || control.auto_publish_due)
        && !control.paused
        && !gate.focusing
        && control.uploads_in_flight == 0;
    (control.publish_requested || automatic)
        && !control.classes_changed
        && control.deletions_in_flight == 0
        && !control.stopped
        && gate.unpublished
        && !gate.busy
        && !gate.superseded
}

/// Publishes a generation if one is due ([`publish_due`]). Returns why the session must be
/// dropped when its weights turned out to have diverged.
fn maybe_publish(
    context: &OnlineContext,
    handle: &TrainerHandle,
    session: &mut Session,
) -> Option<String> {
    let gate = || PublishGate {
        focusing: session.classes.focusing(),
        unpublished: session.steps != session.published_at_step || session.head_changed,
        busy: context.publisher.is_busy(),
        // Weights an activation has overtaken are not published; the loop restarts next.
        superseded: context.publisher.activations() != session.activations_seen,
    };
    // Most steps publish nothing: the store is read only when a publish looks due.
    if !publish_due(&handle.lock(), gate()) {
        return None;
    }
    let recorded = match context.store.generations() {
        Ok(records) => records.last().map_or(0, |g| g.version),
        Err(e) => {
            tracing::warn!("trainer cannot read the generations: {e}");
            return None;
        }
    };
    let live = context.publisher.registry().live().map_or(0, |g| g.version);
    // Decide again and reserve the version under one lock, so an upload's expected generation
    // is either taken before (and the upload expects the next) or left for it.
    let version = {
        let gate = gate();
        let mut control = handle.lock();
        if !publish_due(&control, gate) {
            return None;
        }
        control.publish_requested = false;
        control.periodic_publish_due = false;
        control.auto_publish_due = false;
        let version = recorded.max(live).max(control.reserved_version) + 1;
        control.reserved_version = version;
        version
    };
    match publish(context, session, version) {
        Ok(drift) => {
            session.published.push(version);
            session.published_at_step = session.steps;
            session.head_changed = false;
            if let Some(drift) = drift {
                context.metrics.drift.set(drift);
            }
            let mut control = handle.lock();
            control.status.last_published = Some(version);
            control.status.last_drift = drift.or(control.status.last_drift);
        }
        Err(e) => {
            if let Some(diverged) = e.downcast_ref::<Diverged>() {
                return Some(format!(
                    "{diverged}, so the trainer restarted from the live generation"
                ));
            }
            match e.downcast_ref::<BuildError>() {
                // Raced by an activation or another build: the loop restarts or retries.
                Some(refused @ (BuildError::Superseded { .. } | BuildError::Busy(_))) => {
                    tracing::info!("not published: {refused}");
                }
                _ => tracing::error!("publishing a generation failed: {e:#}"),
            }
        }
    }
    None
}

/// Why weights were not published: they, or the probe set's embeddings under them, are not
/// finite. Training cannot recover from that, so the session is dropped.
#[derive(Debug, thiserror::Error)]
#[error("not published: {0} are not finite (training diverged)")]
struct Diverged(&'static str);

/// Checks, writes, records and starts building generation `version` from the session's
/// weights; returns the probe set's drift.
fn publish(
    context: &OnlineContext,
    session: &mut Session,
    version: u64,
) -> anyhow::Result<Option<f64>> {
    let store = &context.store;
    // A model with NaN in its weights (or, for the built-in network, its statistics) would
    // make every write and query fail once live; it is never published. The probe set's
    // embeddings are checked below as well.
    if !session.trainer.weights_finite()? {
        return Err(Diverged("the weights").into());
    }
    if !session.classes.head_finite()? {
        return Err(Diverged("the class head's proxies").into());
    }
    let drift = match session.probe.as_mut() {
        Some(probe) => {
            let now = session.trainer.embed_eval(&probe.inputs)?;
            let drift = (&now - &probe.last)
                .f_pow_tensor_scalar(2)?
                .f_sum_dim_intlist([1i64].as_slice(), false, tch::Kind::Float)?
                .f_mean(tch::Kind::Double)?
                .f_double_value(&[])?;
            if !drift.is_finite() {
                return Err(Diverged("the probe set's embeddings").into());
            }
            probe.last = now;
            Some(drift)
        }
        None => None,
    };
    let generations = context.data_dir.join("generations");
    let dir = generations.join(version.to_string());
    let details = serde_json::json!({
        "origin": "trainer",
        "parent": session.published.last().copied().unwrap_or(session.base),
        "steps": session.steps,
        "loss": session.last_loss,
        "memory_fill": session.trainer.memory_fill(),
        "drift": drift,
        "objective": context.config.objective,
    });
    // Accepted before anything is written: a refused build (another one running, or an
    // activation that overtook these weights) leaves no checkpoint or record behind.
    let build = context.publisher.reserve(
        version,
        BuildOrigin::Trainer {
            activations_seen: session.activations_seen,
        },
    )?;
    write_checkpoint(session, &dir, &details)?;
    store.record_generation(&GenerationRecord {
        version,
        model_dir: dir.clone(),
        created_unix: crate::server::unix_now(),
        details,
    })?;
    build.start(dir)?;
    // Only a build that started includes the learnt classes: a refused one leaves them to
    // the next publish.
    let learnt = session.classes.take_learnt();
    store.mark_first_generation(&learnt, version)?;
    context.metrics.classes_learnt.inc_by(learnt.len() as u64);
    // Old generations go, but never the live one or the one just started.
    let live = context.publisher.registry().live().map(|g| g.version);
    let protected: Vec<u64> = [Some(version), live].into_iter().flatten().collect();
    if let Err(e) = retention::prune(
        store,
        &generations,
        context.config.keep_generations,
        &protected,
    ) {
        tracing::warn!("old generations not deleted: {e}");
    }
    tracing::info!(
        version,
        steps = session.steps,
        ?drift,
        "published a generation"
    );
    Ok(drift)
}

/// Training metrics written beside a checkpoint's weights.
pub const CHECKPOINT_METRICS: &str = "metrics.json";

/// Writes the checkpoint (weights, model.toml, class head, metrics.json) to a temporary
/// directory, syncs it and renames it into place, so a crash never leaves a half-written
/// generation behind.
fn write_checkpoint(
    session: &Session,
    dir: &Path,
    details: &serde_json::Value,
) -> anyhow::Result<()> {
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    session.trainer.save(&tmp)?;
    session.classes.save(&tmp)?;
    std::fs::write(
        tmp.join(CHECKPOINT_METRICS),
        serde_json::to_vec_pretty(details)?,
    )?;
    for entry in std::fs::read_dir(&tmp)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing but the flags holds a publish back.
    const OPEN: PublishGate = PublishGate {
        focusing: false,
        unpublished: true,
        busy: false,
        superseded: false,
    };

    fn handle() -> TrainerHandle {
        TrainerHandle {
            shared: Arc::new((Mutex::new(Control::new(false, 0)), Condvar::new())),
        }
    }

    /// Whether a publish asked for through the API, a periodic one and one for classes
    /// learnt or deleted are each due, after `hold` changed the control and the gate.
    fn due_by_trigger(hold: impl Fn(&mut Control, &mut PublishGate)) -> [bool; 3] {
        let triggers: [fn(&mut Control); 3] = [
            |c| c.publish_requested = true,
            |c| c.periodic_publish_due = true,
            |c| c.auto_publish_due = true,
        ];
        triggers.map(|trigger| {
            let mut control = Control::new(false, 0);
            let mut gate = OPEN;
            trigger(&mut control);
            hold(&mut control, &mut gate);
            publish_due(&control, gate)
        })
    }

    #[test]
    fn automatic_publishes_wait_for_pending_classes_uploads_and_pauses_api_ones_do_not() {
        assert!(!publish_due(&Control::new(false, 0), OPEN), "nothing asked");
        type Hold = fn(&mut Control, &mut PublishGate);
        let cases: [(&str, Hold, [bool; 3]); 10] = [
            ("nothing holds it", |_, _| {}, [true; 3]),
            (
                "classes pending",
                |_, g| g.focusing = true,
                [true, false, false],
            ),
            (
                "an upload in flight",
                |c, _| c.uploads_in_flight = 1,
                [true, false, false],
            ),
            ("paused", |c, _| c.paused = true, [true, false, false]),
            (
                "store changes unread",
                |c, _| c.classes_changed = true,
                [false; 3],
            ),
            (
                "a deletion committing",
                |c, _| c.deletions_in_flight = 1,
                [false; 3],
            ),
            ("stopping", |c, _| c.stopped = true, [false; 3]),
            ("nothing new", |_, g| g.unpublished = false, [false; 3]),
            ("a build running", |_, g| g.busy = true, [false; 3]),
            (
                "overtaken by an activation",
                |_, g| g.superseded = true,
                [false; 3],
            ),
        ];
        for (name, hold, expected) in cases {
            assert_eq!(
                due_by_trigger(hold),
                expected,
                "{name}: [api, periodic, auto]"
            );
        }
    }

    #[test]
    fn a_class_deletion_holds_every_publish_until_committed_and_then_until_read() {
        let trainer = handle();
        trainer.request_publish();
        let removal = trainer.delete_class();
        assert!(!publish_due(&trainer.lock(), OPEN), "deletion committing");
        drop(removal);
        {
            let control = trainer.lock();
            assert!(control.classes_changed && control.deletions_in_flight == 0);
            assert!(!publish_due(&control, OPEN), "deletion not read yet");
        }
        trainer.lock().classes_changed = false;
        assert!(
            publish_due(&trainer.lock(), OPEN),
            "read: the API publish goes"
        );
    }

    #[test]
    fn a_pause_drops_a_periodic_publish_and_keeps_one_for_classes_until_resumed() {
        let trainer = handle();
        {
            let mut control = trainer.lock();
            control.periodic_publish_due = true;
            control.auto_publish_due = true;
        }
        trainer.pause();
        assert!(!publish_due(&trainer.lock(), OPEN));
        trainer.resume();
        let control = trainer.lock();
        assert!(!control.periodic_publish_due && control.auto_publish_due);
        assert!(publish_due(&control, OPEN));
    }
}
