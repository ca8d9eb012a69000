//! Runs generation builds in the background, one at a time, for the trainer (new weights)
//! and for `POST /v1/models/{version}/activate` (roll back or forward).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Starts builds on a background thread and reports their progress.
pub struct Publisher {
    registry: Arc<Registry>,
    context: BuildContext,
    progress: Arc<BuildProgress>,
    busy: AtomicBool,
    last: Mutex<Option<LastBuild>>,
}

impl Publisher {
    /// A publisher building into `registry` with `context`.
    pub fn new(registry: Arc<Registry>, context: BuildContext) -> Arc<Publisher> {
        Arc::new(Publisher {
            registry,
            context,
            progress: Arc::new(BuildProgress::default()),
            busy: AtomicBool::new(false),
            last: Mutex::new(None),
        })
    }

    /// Starts building generation `version` from `model_dir`; refused while another build
    /// runs. Returns at once; the swap happens when the gallery is re-embedded.
    pub fn start(self: &Arc<Self>, version: u64, model_dir: PathBuf) -> Result<(), BuildError> {
        if self.registry.live().is_none() {
            return Err(BuildError::NotReady);
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(BuildError::Busy(
                self.registry.building_version().unwrap_or(version),
            ));
        }
        let publisher = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("build-generation-{version}"))
            .spawn(move || publisher.run(version, &model_dir));
        if let Err(e) = spawned {
            self.busy.store(false, Ordering::Release);
            return Err(BuildError::Spawn(e));
        }
        Ok(())
    }

    fn run(&self, version: u64, model_dir: &std::path::Path) {
        let metrics = &self.context.metrics;
        metrics.reembed_progress.set(0.0);
        tracing::info!(version, dir = %model_dir.display(), "building generation");
        let outcome =
            self.registry
                .build_and_swap(&self.context, version, model_dir, &self.progress);
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
        self.busy.store(false, Ordering::Release);
    }

    /// Whether a build is running.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
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
