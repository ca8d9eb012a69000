//! Runs generation builds in the background, one at a time, for the trainer (new weights)
//! and for `POST /v1/models/{version}/activate` (roll back or forward).
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::builder::{BuildContext, BuildError, BuildProgress, SwapReport};
use super::Registry;

/// The outcome of the last build.
#[derive(Debug, Clone)]
pub enum LastBuild {
    /// Swapped in.
    Swapped(SwapReport),
    /// Failed; the previous generation stayed live.
    Failed {
        /// Version that failed.
        version: u64,
        /// Why.
        error: String,
    },
}

/// Who asked for a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOrigin {
    /// The online trainer publishing its weights, which descend from what was live when it had
    /// seen `activations_seen` activations ([`Publisher::activations`]). Refused with
    /// [`BuildError::Superseded`] once another activation has swapped in: those weights would
    /// undo it.
    Trainer {
        /// [`Publisher::activations`] when the trainer last (re)started from the live model.
        activations_seen: u64,
    },
    /// `POST /v1/models/{version}/activate`: a roll back or forward.
    Activation,
}

/// Starts builds on a background thread and reports their progress.
pub struct Publisher {
    registry: Arc<Registry>,
    context: BuildContext,
    progress: Arc<BuildProgress>,
    /// The version being built, from the moment a build is accepted until it ends.
    busy: Mutex<Option<u64>>,
    /// Activation builds swapped in so far (changes only while `busy` is held).
    activations: AtomicU64,
    last: Mutex<Option<LastBuild>>,
}

impl Publisher {
    /// A publisher building into `registry` with `context`.
    pub fn new(registry: Arc<Registry>, context: BuildContext) -> Arc<Publisher> {
        Arc::new(Publisher {
            registry,
            context,
            progress: Arc::new(BuildProgress::default()),
            busy: Mutex::new(None),
            activations: AtomicU64::new(0),
            last: Mutex::new(None),
        })
    }

    /// Starts building generation `version` from `model_dir` for `origin`; refused while
    /// another build runs, and a trainer's build once an activation it has not seen swapped
    /// in. Returns at once; the swap happens when the gallery is re-embedded.
    pub fn start(
        self: &Arc<Self>,
        version: u64,
        model_dir: PathBuf,
        origin: BuildOrigin,
    ) -> Result<(), BuildError> {
        self.reserve(version, origin)?.start(model_dir)
    }

    /// Accepts a build of generation `version` for `origin` (refused as by
    /// [`Publisher::start`]) without starting it yet: no other build is accepted until the
    /// reservation is started or dropped. The trainer writes and records its checkpoint
    /// meanwhile, so a refused build leaves no recorded generation behind.
    pub fn reserve(
        self: &Arc<Self>,
        version: u64,
        origin: BuildOrigin,
    ) -> Result<BuildReservation, BuildError> {
        let Some(live) = self.registry.live() else {
            return Err(BuildError::NotReady);
        };
        let mut busy = self.lock_busy();
        if let Some(building) = *busy {
            return Err(BuildError::Busy(building));
        }
        // No build runs and `busy` is locked: no activation can swap in before this build
        // ends, so the check is final.
        if let BuildOrigin::Trainer { activations_seen } = origin {
            if activations_seen != self.activations() {
                let live = self.registry.live().map_or(live.version, |g| g.version);
                return Err(BuildError::Superseded { live });
            }
        }
        *busy = Some(version);
        Ok(BuildReservation {
            publisher: self.clone(),
            version,
            origin,
            started: false,
        })
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, version: u64, model_dir: &std::path::Path, origin: BuildOrigin) {
        let metrics = &self.context.metrics;
        metrics.reembed_progress.set(0.0);
        tracing::info!(version, dir = %model_dir.display(), "building generation");
        // A panic (libtorch, a decoder, the graph library) fails the build like an error: the
        // half-built generation is dropped and the publisher takes builds again.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.registry
                .build_and_swap(&self.context, version, model_dir, &self.progress)
        }))
        .unwrap_or_else(|panic| {
            self.registry.abandon_build();
            Err(BuildError::Panicked(crate::panic::message(panic.as_ref())))
        });
        let last = match outcome {
            Ok(report) => {
                metrics.generations_published.inc();
                metrics.swap_seconds.observe(report.swap_seconds);
                metrics.index_items.set(report.items as i64);
                if let Some(live) = self.registry.live() {
                    metrics.model_info.reset();
                    metrics
                        .model_info
                        .with_label_values(&[
                            &live.info.spec.name,
                            &live.version.to_string(),
                            &live.info.device,
                        ])
                        .set(1.0);
                }
                tracing::info!(
                    version,
                    previous = ?report.previous,
                    items = report.items,
                    build_seconds = report.build_seconds,
                    swap_seconds = report.swap_seconds,
                    "generation swapped in"
                );
                if origin == BuildOrigin::Activation {
                    self.activations.fetch_add(1, Ordering::AcqRel);
                }
                LastBuild::Swapped(report)
            }
            Err(e) => {
                tracing::error!(version, "generation build failed: {e}");
                LastBuild::Failed {
                    version,
                    error: e.to_string(),
                }
            }
        };
        metrics.reembed_progress.set(1.0);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
        *self.lock_busy() = None;
    }

    /// How many activation builds have swapped in since start-up. A trainer whose weights
    /// predate the latest one restarts from the live generation.
    pub fn activations(&self) -> u64 {
        self.activations.load(Ordering::Acquire)
    }

    /// Whether a build is running.
    pub fn is_busy(&self) -> bool {
        self.lock_busy().is_some()
    }

    /// Items re-embedded so far and in total, for the running (or last) build.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.progress.done.load(Ordering::Relaxed),
            self.progress.total.load(Ordering::Relaxed),
        )
    }

    /// The outcome of the last finished build.
    pub fn last(&self) -> Option<LastBuild> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The registry it publishes into.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

/// A build accepted by [`Publisher::reserve`] and not started yet. Dropping it unstarted
/// releases the publisher for other builds.
pub struct BuildReservation {
    publisher: Arc<Publisher>,
    version: u64,
    origin: BuildOrigin,
    started: bool,
}

impl BuildReservation {
    /// Starts the reserved build from `model_dir` on a background thread; returns at once.
    pub fn start(mut self, model_dir: PathBuf) -> Result<(), BuildError> {
        let publisher = self.publisher.clone();
        let (version, origin) = (self.version, self.origin);
        std::thread::Builder::new()
            .name(format!("build-generation-{version}"))
            .spawn(move || publisher.run(version, &model_dir, origin))
            .map_err(BuildError::Spawn)?;
        // The build thread releases the publisher when it ends.
        self.started = true;
        Ok(())
    }
}

impl Drop for BuildReservation {
    fn drop(&mut self) {
        if !self.started {
            *self.publisher.lock_busy() = None;
        }
    }
}
