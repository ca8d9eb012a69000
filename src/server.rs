//! Server assembly: opens the store, binds the port, loads the first generation in the
//! background (so `/healthz` answers while `/readyz` is still 503), and shuts down gracefully.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::embed::{BatchingLimits, Embedder};
use crate::index::{indexable_norm, VectorIndex};
use crate::metrics::Metrics;
use crate::model::spec::ModelSpec;
use crate::registry::builder::{embed_stored, META_ACTIVE_VERSION};
use crate::registry::{BuildContext, Generation, Publisher, Registry};
use crate::store::{GenerationRecord, Store};
use crate::train::online::{self, OnlineContext};

/// Store meta key: fingerprint of the configured base model when it was last registered.
const META_BASE_FINGERPRINT: &str = "base_model_fingerprint";
/// Stored embeddings inserted into the index per parallel batch at start-up.
const REBUILD_BATCH: usize = 4096;
/// Items re-embedded per batch when the model changed.
const REEMBED_BATCH: usize = 256;

/// A server started by [`start`].
pub struct RunningServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state, for in-process callers such as the benchmark.
    pub state: AppState,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting connections, waits for in-flight requests to finish and stops the
    /// trainer.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        finish(self.task, &self.state).await
    }

    /// Waits until the server ends (after a shutdown signal), then stops the trainer.
    pub async fn wait(self) -> anyhow::Result<()> {
        finish(self.task, &self.state).await
    }
}

/// Waits for the HTTP server to drain, then for the trainer to end its current step, for at
/// most `server.shutdown_grace_seconds` (the same grace `crossbatch serve` gives the whole
/// shutdown).
async fn finish(
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    state: &AppState,
) -> anyhow::Result<()> {
    task.await??;
    if let Some(trainer) = state.trainer.clone() {
        let grace = Duration::from_secs(state.config.server.shutdown_grace_seconds);
        let stopped = tokio::task::spawn_blocking(move || trainer.stop(grace)).await?;
        anyhow::ensure!(
            stopped,
            "the trainer did not end its step within the {grace:?} grace period"
        );
    }
    Ok(())
}

/// Binds the port and starts serving; the model and index load in the background.
/// `shutdown_signal` ends the server gracefully when it completes.
pub async fn start(
    config: Config,
    shutdown_signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new()?);
    let data_dir = config.server.data_dir.clone();
    let store = Arc::new(tokio::task::spawn_blocking(move || Store::open(&data_dir)).await??);
    let registry = Arc::new(Registry::new());
    let device = crate::model::parse_device(&config.model.device)?;
    let publisher = Publisher::new(
        registry.clone(),
        BuildContext {
            store: store.clone(),
            metrics: metrics.clone(),
            limits: batching_limits(&config),
            device: config.model.device.clone(),
            index: config.index.clone(),
            reembed_rate: config.trainer.reembed_rate,
        },
    );
    let trainer = if config.trainer.enabled {
        Some(online::spawn(OnlineContext {
            config: config.trainer.clone(),
            store: store.clone(),
            publisher: publisher.clone(),
            data_dir: config.server.data_dir.clone(),
            device,
            metrics: metrics.clone(),
        })?)
    } else {
        None
    };
    let state = AppState {
        config: config.clone(),
        metrics: metrics.clone(),
        store: store.clone(),
        registry,
        publisher,
        trainer,
    };
    let listener = tokio::net::TcpListener::bind(&config.server.addr).await?;
    let addr = listener.local_addr()?;

    let loader_state = state.clone();
    let loader = tokio::task::spawn_blocking(move || load_first_generation(&loader_state));
    // A server that cannot load its model exits, so that a supervisor sees it: an error and a
    // panic alike (a dropped handle would swallow the panic and leave it unready forever).
    tokio::spawn(async move {
        let failure = match loader.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("{e:#}"),
            Err(panic) => format!("the loader panicked: {panic}"),
        };
        tracing::error!("start-up failed: {failure}");
        exit_now(1);
    });

    spawn_compactor(Arc::downgrade(&state.registry));

    let (shutdown, stop_requested) = tokio::sync::oneshot::channel::<()>();
    let router = api::router(state.clone());
    let trainer = state.trainer.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = shutdown_signal => {}
                    _ = stop_requested => {}
                }
                // The trainer ends its step while requests drain, within the same grace.
                if let Some(trainer) = trainer {
                    trainer.request_stop();
                }
            })
            .await
    });
    Ok(RunningServer {
        addr,
        state,
        shutdown,
        task,
    })
}

/// Ends the process with `code` at once, without the C and C++ exit handlers: libtorch's
/// static destructors would race a thread still running a model (a build dropped at
/// shutdown, a trainer step past the grace period) and crash the process. Standard output
/// and error are flushed first; everything acknowledged is already durable in the store.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` takes no pointers; it ends the process and never returns.
    unsafe { libc::_exit(code) }
}

/// How often the background compactor checks the live index's tombstone fraction.
const COMPACTION_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Rebuilds the live index in the background whenever deleted and replaced points pass the
/// index's tombstone threshold; stops when the registry is dropped.
fn spawn_compactor(registry: std::sync::Weak<Registry>) {
    let spawned = std::thread::Builder::new()
        .name("index-compactor".into())
        .spawn(move || loop {
            std::thread::sleep(COMPACTION_CHECK_INTERVAL);
            let Some(registry) = registry.upgrade() else {
                return;
            };
            if let Some(generation) = registry.live() {
                let started = Instant::now();
                // A panicking pass is logged; the thread goes on and the index keeps working.
                let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    generation.index.maybe_compact()
                }));
                match pass {
                    Ok(true) => tracing::info!(
                        seconds = started.elapsed().as_secs_f64(),
                        items = generation.index.len(),
                        "index compacted"
                    ),
                    Ok(false) => {}
                    Err(panic) => tracing::error!(
                        "index compaction panicked (the index is unchanged): {}",
                        crate::panic::message(panic.as_ref())
                    ),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("index compaction thread not started: {e}");
    }
}

/// The batching limits from the configuration.
pub fn batching_limits(config: &Config) -> BatchingLimits {
    BatchingLimits {
        max_batch: config.batching.max_batch.max(1),
        max_wait: Duration::from_millis(config.batching.max_wait_ms),
        queue_capacity: config.batching.queue_capacity.max(1),
    }
}

/// Loads the active generation's model, re-embeds stored items whose embeddings another
/// model made, rebuilds the index from the store and publishes the generation (ready).
fn load_first_generation(state: &AppState) -> anyhow::Result<()> {
    let config = &state.config;
    if config.model.threads > 0 {
        tch::set_num_threads(config.model.threads as i32);
    }
    let store = &state.store;
    let active = resolve_active_model(store, &config.model.dir)?;
    let (version, model_dir) = (active.version, active.dir.clone());
    let (embedder, info) = Embedder::start(
        &model_dir,
        &config.model.device,
        batching_limits(config),
        state.metrics.clone(),
    )?;
    // A new base model becomes the active generation only once it has loaded: one that fails
    // leaves the store serving what it served before.
    if let Some(base) = active.new_base {
        store.record_generation(&base.record)?;
        store.set_meta(META_ACTIVE_VERSION, &version.to_string())?;
        store.set_meta(META_BASE_FINGERPRINT, &base.fingerprint)?;
    }
    tracing::info!(model = %info.spec.name, version, device = %info.device, "model loaded and warm");
    reembed_stale(store, &embedder, &info.spec, version)?;

    let started = Instant::now();
    let index = Arc::new(VectorIndex::new(
        info.spec.embedding_dim,
        config.index.clone(),
    ));
    let mut rows = Vec::with_capacity(REBUILD_BATCH);
    let insert = |rows: &mut Vec<crate::store::EmbeddingRow>| -> anyhow::Result<()> {
        let batch: Vec<_> = rows
            .iter()
            .map(|r| (r.id.as_str(), r.label.as_deref(), r.embedding.as_slice()))
            .collect();
        index.upsert_batch(&batch)?;
        rows.clear();
        Ok(())
    };
    // The index never calls back into the store, so inserting inside the scan is safe.
    let mut left_out = 0usize;
    store.for_each_embedding(|row| {
        // A row the active model could not embed into an indexable vector keeps another
        // model's embedding (see `embed_stored`); it stays out of this model's index.
        if row.model_version != version || indexable_norm(&row.embedding).is_err() {
            left_out += 1;
            return Ok(());
        }
        rows.push(row);
        if rows.len() == REBUILD_BATCH {
            insert(&mut rows)?;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    insert(&mut rows)?;
    if left_out > 0 {
        tracing::warn!(
            items = left_out,
            version,
            "stored items left out of the index: the model cannot embed them"
        );
    }
    state
        .metrics
        .index_rebuild_seconds
        .set(started.elapsed().as_secs_f64());
    state.metrics.index_items.set(index.len() as i64);
    state
        .metrics
        .model_info
        .with_label_values(&[&info.spec.name, &version.to_string(), &info.device])
        .set(1.0);
    tracing::info!(items = index.len(), version, "index rebuilt; ready");
    let head = Generation::load_head(&model_dir, &info.spec.input);
    state.registry.publish_initial(
        &state.store,
        Generation::new(version, info, embedder, index, head),
    );
    Ok(())
}

/// The model start-up serves.
struct ActiveModel {
    version: u64,
    dir: PathBuf,
    /// Set when the configured base model changed: recorded once the model has loaded.
    new_base: Option<NewBase>,
}

/// A configured base model the store has not seen: its generation record and fingerprint.
struct NewBase {
    record: GenerationRecord,
    fingerprint: String,
}

/// Which model is active: the configured base model if it changed since the store last saw
/// it (it becomes a new generation), else the generation recorded as active.
fn resolve_active_model(store: &Store, base_dir: &Path) -> anyhow::Result<ActiveModel> {
    let base_dir = std::fs::canonicalize(base_dir)
        .with_context(|| format!("model directory {}", base_dir.display()))?;
    let spec = ModelSpec::load(&base_dir)?;
    let fingerprint = model_fingerprint(&base_dir, &spec)?;
    let generations = store.generations()?;
    if store.get_meta(META_BASE_FINGERPRINT)?.as_deref() != Some(fingerprint.as_str()) {
        let version = generations.last().map_or(0, |g| g.version) + 1;
        let record = GenerationRecord {
            version,
            model_dir: base_dir.clone(),
            created_unix: unix_now(),
            details: serde_json::json!({ "origin": "base", "name": spec.name }),
        };
        return Ok(ActiveModel {
            version,
            dir: base_dir,
            new_base: Some(NewBase {
                record,
                fingerprint,
            }),
        });
    }
    let active: u64 = store
        .get_meta(META_ACTIVE_VERSION)?
        .and_then(|v| v.parse().ok())
        .context("the store records no active model version")?;
    // The latest base generation is the configured model (same fingerprint); it may have moved
    // with a redeploy, so it is served from where it is configured now, and re-recorded there.
    let latest_base = generations
        .iter()
        .filter(|g| g.details["origin"] == "base")
        .map(|g| g.version)
        .max();
    let mut record = generations
        .into_iter()
        .find(|g| g.version == active)
        .with_context(|| format!("active generation {active} is not recorded"))?;
    if latest_base == Some(active) && record.model_dir != base_dir {
        tracing::info!(
            from = %record.model_dir.display(),
            to = %base_dir.display(),
            "the base model has moved"
        );
        record.model_dir = base_dir;
        store.record_generation(&record)?;
    }
    Ok(ActiveModel {
        version: active,
        dir: record.model_dir,
        new_base: None,
    })
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Re-embeds the stored items whose embeddings were made by another model version (a new
/// base model, or a swap interrupted before all embeddings were refreshed), so the index
/// never mixes two models.
fn reembed_stale(
    store: &Store,
    embedder: &Embedder,
    spec: &ModelSpec,
    version: u64,
) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    store.for_each_embedding(|row| {
        if row.model_version != version {
            stale.push(row.id);
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let mut total = 0usize;
    for ids in stale.chunks(REEMBED_BATCH) {
        let rows = store.inputs_of(ids)?;
        let refreshes = embed_stored(embedder, &spec.input, version, &rows)?;
        total += store.refresh_embeddings(&refreshes)?;
    }
    if total > 0 {
        tracing::info!(
            items = total,
            version,
            "re-embedded items stored by another model"
        );
    }
    Ok(())
}

/// FNV-1a over `model.toml` and the weights: identifies a model's exact contents.
fn model_fingerprint(dir: &Path, spec: &ModelSpec) -> anyhow::Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in [
        dir.join(crate::model::spec::SPEC_FILE),
        dir.join(&spec.weights),
    ] {
        for byte in std::fs::read(&file).with_context(|| format!("reading {}", file.display()))? {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{hash:016x}"))
}
