//! Command-line interface: `serve`, `import`, `eval`, `train`, `bench`, `glyphs`, `incremental`.

pub mod bench;
pub mod eval;
pub mod glyphs;
pub mod import;
pub mod incremental;
pub mod serve;
pub mod train;

use clap::{Parser, Subcommand};

/// crossbatch: an embedding retrieval server that keeps learning.
#[derive(Parser)]
#[command(name = "crossbatch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(serve::ServeArgs),
    /// Load a labelled dataset into a running server through its API.
    Import(import::ImportArgs),
    /// Retrieval quality (Recall@k, MAP@R) of a model or a running server on a dataset.
    Eval(eval::EvalArgs),
    /// Offline metric learning on a labelled dataset; writes a model directory.
    Train(Box<train::TrainArgs>),
    /// Benchmarks: embedding throughput (model vs HTTP), HNSW vs exact search.
    Bench(bench::BenchArgs),
    /// Render a many-class Hangul glyph dataset (train/test with disjoint classes) from fonts.
    Glyphs(glyphs::GlyphsArgs),
    /// Class-incremental benchmark: tasks of new classes, replay, Balanced Softmax, LEO.
    Incremental(Box<incremental::IncrementalArgs>),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Import(args) => import::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Glyphs(args) => glyphs::run(args),
        Command::Incremental(args) => incremental::run(*args),
    }
}
