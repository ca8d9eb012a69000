//! `crossbatch serve`: the HTTP server.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::Config;

/// Flags of `crossbatch serve`; each overrides the configuration file and environment.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Configuration file overriding config/default.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Listen address HOST:PORT (port 0 picks a free port).
    #[arg(long)]
    pub addr: Option<String>,
    /// Directory of the durable store.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Model directory (model.toml + weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto | cpu | cuda:N.
    #[arg(long)]
    pub device: Option<String>,
}

impl ServeArgs {
    /// The configuration after every layer, flags last.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::from_process(self.config.as_deref())?;
        if let Some(addr) = &self.addr {
            config.server.addr = addr.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.server.data_dir = dir.clone();
        }
        if let Some(dir) = &self.model {
            config.model.dir = dir.clone();
        }
        if let Some(device) = &self.device {
            config.model.device = device.clone();
        }
        Ok(config)
    }
}

/// Runs the server until SIGINT or SIGTERM, then gives in-flight requests and the trainer's
/// current step `server.shutdown_grace_seconds` to finish. A shutdown that drained exits with
/// status 0; one the grace period cut short exits with status 1 (nothing acknowledged is lost
/// either way: the store is durable before a write is answered).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // When the grace period ends, once a signal has come.
    let deadline = std::sync::Arc::new(std::sync::OnceLock::new());
    let shutdown_deadline = deadline.clone();
    let served = runtime.block_on(async move {
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let server = crate::server::start(config, async move {
            shutdown_signal().await;
            let _ = signalled_tx.send(());
        })
        .await?;
        // Tests and scripts read this line to learn the port.
        println!("crossbatch listening on http://{}", server.addr);
        tokio::spawn(async move {
            if signalled_rx.await.is_ok() {
                tracing::info!("shutting down; draining in-flight requests and the trainer");
                let _ = shutdown_deadline.set(Instant::now() + grace);
                // A plain thread: it outlives the runtime's own shutdown below, so the grace
                // period bounds the whole exit.
                std::thread::spawn(move || {
                    std::thread::sleep(grace);
                    tracing::warn!("grace period over; exiting before the shutdown drained");
                    crate::server::exit_now(1);
                });
            }
        });
        server.wait().await
    });
    // Blocking work still running (a start-up re-embedding a large store) gets what is left
    // of the grace period, instead of holding the process until it ends.
    let left = deadline.get().map_or(grace, |d: &Instant| {
        d.saturating_duration_since(Instant::now())
    });
    runtime.shutdown_timeout(left);
    if deadline.get().is_some_and(|d| Instant::now() >= *d) {
        anyhow::bail!("the grace period ended before the shutdown finished");
    }
    served
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
