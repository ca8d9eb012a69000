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

/// Parses a count that must be at least `min` (a flag such as `--batch-size`).
fn at_least(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(min..)
}

/// Parses a positive, finite number (a flag such as `--lr`).
fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

/// An error and its causes on one line, `outer: cause: …`, leaving out a cause whose text the
/// line already holds (many errors print their source in their own message).
pub fn error_report(error: &anyhow::Error) -> String {
    let mut report = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !report.contains(&text) {
            report.push_str(": ");
            report.push_str(&text);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_report_names_each_cause_once() {
        let missing = std::fs::read("/nonexistent/crossbatch").unwrap_err();
        let io_text = missing.to_string();
        // A message that already includes its source, wrapped in context.
        let spec = crate::model::spec::SpecError::Io {
            path: "/nonexistent/model.toml".into(),
            source: missing,
        };
        let error = anyhow::Error::new(spec).context("loading the model");
        let report = error_report(&error);
        assert_eq!(report.matches(&io_text).count(), 1, "{report}");
        assert!(report.starts_with("loading the model: /nonexistent/model.toml: "));
        // A cause the messages do not hold is kept.
        let chained = anyhow::anyhow!("inner detail").context("outer");
        assert_eq!(error_report(&chained), "outer: inner detail");
    }
}
