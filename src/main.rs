//! The `crossbatch` binary: see `crossbatch --help`.
use clap::Parser;

fn main() -> ! {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hnsw_rs=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match crossbatch::cli::run(crossbatch::cli::Cli::parse()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", crossbatch::cli::error_report(&e));
            1
        }
    };
    // Not a normal return: a server may still have a build embedding on another thread.
    crossbatch::server::exit_now(code)
}
