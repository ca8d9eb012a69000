//! The `crossbatch` binary: see `crossbatch --help`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hnsw_rs=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match crossbatch::cli::run(crossbatch::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crossbatch::cli::error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
